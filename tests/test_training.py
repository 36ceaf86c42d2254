"""End to end through the CLI on CPU: training lowers the loss, resume continues exactly, the saved config
reproduces the run, checkpoints survive a failed write."""

import csv
import json

import pytest
import torch

from soma_lightning.checkpoint_io import AtomicCheckpointIO
from soma_lightning.cli import cli_main
from conftest import run_config, tiny_v1_arch, train_losses


@pytest.mark.slow
def test_training_lowers_loss_and_writes_last_and_best(tmp_path):
    cli_main(["fit", "--config", str(run_config(tmp_path, "run", 12))])
    version = tmp_path / "runs" / "run" / "version_0"
    losses = train_losses(version / "metrics.csv")
    assert losses[11] < losses[0] - 0.5
    ckpts = sorted(p.name for p in (version / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(n.startswith("best-") for n in ckpts)
    assert (version / "config.yaml").exists()


@pytest.mark.slow
def test_resume_continues_step_and_loss_exactly(tmp_path):
    cli_main(["fit", "--config", str(run_config(tmp_path, "straight", 8))])
    interrupted = {"class_path": "conftest.StopAtStep", "init_args": {"step": 4}}
    cli_main(["fit", "--config", str(run_config(tmp_path, "split", 8)), f"--trainer.callbacks=[{json.dumps(interrupted)}]"])
    cli_main(["fit", "--config", str(run_config(tmp_path, "split", 8)), "--ckpt_path", "last"])
    straight = train_losses(tmp_path / "runs/straight/version_0/metrics.csv")
    resumed = train_losses(tmp_path / "runs/split/version_0/metrics.csv")  # the resumed run continues its directory
    assert not (tmp_path / "runs/split/version_1").exists()
    assert resumed == straight and sorted(resumed) == list(range(8))
    ckpt = torch.load(tmp_path / "runs/split/version_0/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 8


@pytest.mark.slow
def test_saved_config_reproduces_the_run(tmp_path):
    cli_main(["fit", "--config", str(run_config(tmp_path, "orig", 5))])
    saved = tmp_path / "runs/orig/version_0/config.yaml"
    cli_main(["fit", "--config", str(saved)])
    first = train_losses(tmp_path / "runs/orig/version_0/metrics.csv")
    again = train_losses(tmp_path / "runs/orig/version_1/metrics.csv")
    assert first == again and len(first) == 5


def test_resume_last_without_checkpoint_is_a_user_error(tmp_path):
    from soma_lightning.errors import UserError

    with pytest.raises(UserError, match="no last.ckpt under"):
        cli_main(["fit", "--config", str(run_config(tmp_path, "fresh", 2)), "--ckpt_path", "last"])


def test_failed_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


@pytest.mark.slow
def test_throughput_callback_logs_tokens_and_flops(tmp_path):
    callback = {"class_path": "soma_lightning.callbacks.Throughput"}
    cli_main(["fit", "--config", str(run_config(tmp_path, "speed", 5)), f"--trainer.callbacks=[{json.dumps(callback)}]"])
    rows = [r for r in csv.DictReader(open(tmp_path / "runs/speed/version_0/metrics.csv")) if r.get("train/tokens_per_s")]
    assert len(rows) >= 3 and all(float(r["train/tokens_per_s"]) > 0 and float(r["train/tflops"]) > 0 for r in rows)
    assert not any(r.get("train/mfu") for r in rows)  # no peak is known for a CPU
    from soma_lightning import build_model
    from soma_lightning.measure import train_flops_per_token

    expected = train_flops_per_token(build_model(tiny_v1_arch(d_model=32, hidden_dim=64)), 32)
    for r in rows:
        assert float(r["train/tflops"]) * 1e12 / float(r["train/tokens_per_s"]) == pytest.approx(expected, rel=1e-5)
