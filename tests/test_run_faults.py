"""Faults of a run that must never pass silently: resuming with other settings, `--ckpt_path last` for every
subcommand, a non-finite loss, and the partial files of an interrupted save."""

import csv
import errno
import json

import pytest
import torch
import yaml

from conftest import run_config
from soma_lightning.cli import main


def metrics(tmp_path, name: str, version: int) -> list[dict]:
    return list(csv.DictReader(open(tmp_path / "runs" / name / f"version_{version}" / "metrics.csv")))


def exit_code(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("soma-lightning: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return e.value.code, errors[0]


def test_resume_with_other_model_settings_is_refused_naming_the_keys(tmp_path, capsys):
    config = str(run_config(tmp_path, "q", 4))
    main(["fit", "--config", config])
    code, error = exit_code(["fit", "--config", config, "--ckpt_path", "last", "--trainer.max_steps", "8", "--model.arch.d_model", "64", "--model.optim.lr", "0.1"], capsys)
    assert code == 2 and "model.arch.d_model (checkpoint 32, config 64)" in error and "model.optim.lr (checkpoint 0.003, config 0.1)" in error
    # Asked for explicitly, the checkpoint's values are taken, and said so in the saved config.
    main(["fit", "--config", config, "--ckpt_path", "last", "--trainer.max_steps", "8", "--model.optim.lr", "0.1", "--ckpt_spec", "checkpoint"])
    saved = yaml.safe_load(open(tmp_path / "runs" / "q" / "version_0" / "config.yaml"))
    assert saved["model"]["optim"]["lr"] == 0.003 and int(metrics(tmp_path, "q", 0)[-1]["step"]) >= 7
    assert not (tmp_path / "runs" / "q" / "version_1").exists()


def test_validate_with_ckpt_path_last_scores_the_last_checkpoint(tmp_path, capsys):
    config = str(run_config(tmp_path, "q", 4))
    code, error = exit_code(["validate", "--config", config, "--ckpt_path", "last"], capsys)
    assert code == 2 and "no last.ckpt" in error
    main(["fit", "--config", config])
    fit_val = [float(r["val/loss"]) for r in metrics(tmp_path, "q", 0) if r.get("val/loss")][-1]
    main(["validate", "--config", config, "--ckpt_path", "last"])
    assert "runs/q/version_0/checkpoints/last.ckpt" in capsys.readouterr().err
    results = json.loads((tmp_path / "runs" / "q" / "version_0" / "validate-last.json").read_text())
    assert results["val/loss"] == pytest.approx(fit_val, rel=1e-6)
    assert sorted(p.name for p in (tmp_path / "runs" / "q").iterdir()) == ["version_0"]


def test_non_finite_loss_stops_the_run_with_a_one_line_error(tmp_path, capsys):
    config = str(run_config(tmp_path, "q", 12, **{"val_check_interval": 2}))
    code, error = exit_code(["fit", "--config", config, "--model.optim.lr", "1e30", "--model.optim.warmup_steps", "1"], capsys)
    assert code == 2 and "training stopped: non-finite" in error and "at step" in error
    checkpoints = tmp_path / "runs" / "q" / "version_0" / "checkpoints"
    for ckpt in checkpoints.glob("*.ckpt"):
        state = torch.load(ckpt, weights_only=True)["state_dict"]
        assert all(bool(t.isfinite().all()) for t in state.values() if t.is_floating_point()), ckpt


def test_partial_checkpoint_files_are_removed_on_the_next_start(tmp_path, capsys):
    checkpoints = tmp_path / "runs" / "q" / "version_0" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "last.ckpt.tmp").write_bytes(b"partial")
    (checkpoints / "best-step=4.ckpt.tmp").mkdir()
    main(["fit", "--config", str(run_config(tmp_path, "q", 2))])
    assert not list(checkpoints.glob("*.tmp"))
    assert "left by an interrupted save" in capsys.readouterr().err


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only")])
def test_full_or_read_only_checkpoint_directory_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch, code, words):
    config = str(run_config(tmp_path, "q", 4))
    main(["fit", "--config", config])
    last = tmp_path / "runs" / "q" / "version_0" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        if hasattr(f, "write"):
            f.write(b"partial")
            raise OSError(code, "simulated")
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    exit, error = exit_code(["fit", "--config", config, "--ckpt_path", "last", "--trainer.max_steps", "8"], capsys)
    assert exit == 2 and words in error and ("last.ckpt" in error or "best-" in error)
    assert last.read_bytes() == before
