"""A run as a user lives it, through the CLI: one run directory per run (named with --name, continued by a
resume), a validation at the end of every fit, and validate/test/predict that say what they did and where."""

import csv
import json
import re
import subprocess
import sys

import pytest

from conftest import run_config
from soma_lightning.cli import main


def rows(path) -> list[dict]:
    return list(csv.DictReader(open(path)))


def fails(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_a_fit_validates_at_its_last_step_and_name_sets_every_logger(tmp_path):
    loggers = [{"class_path": f"lightning.pytorch.loggers.{kind}", "init_args": {"save_dir": str(tmp_path / "runs"), "name": "q"}} for kind in ("CSVLogger", "TensorBoardLogger")]
    config = str(run_config(tmp_path, "q", 6, val_check_interval=4, logger=loggers))
    main(["fit", "--config", config, "--name", "mine"])
    run = tmp_path / "runs" / "mine" / "version_0"
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["mine"]
    assert list(run.glob("events.out.tfevents.*")), "TensorBoard follows --name"
    validated = [int(r["step"]) for r in rows(run / "metrics.csv") if r.get("val/loss")]
    assert validated == [3, 5]  # at val_check_interval, and at the last step although 6 is not a multiple of 4
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best-step=6.ckpt", "last.ckpt"]


def test_evaluations_write_beside_the_checkpoint_and_create_no_run(tmp_path, capsys):
    corpus = tmp_path / "test.txt"
    corpus.write_text(open("soma_lightning/corpora/tinyshakespeare.txt").read()[-5000:])
    config = str(run_config(tmp_path, "q", 4))
    main(["fit", "--config", config])
    run = tmp_path / "runs" / "q" / "version_0"
    line = fails(["test", "--config", config, "--ckpt_path", "last"], capsys)
    assert line.startswith("soma-lightning: error: data.test_source: ") and "run `validate`" in line
    main(["validate", "--config", config, "--ckpt_path", "last"])
    main(["test", "--config", config, "--ckpt_path", "last", "--data.init_args.test_source", str(corpus)])
    main(["predict", "--config", config, "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    err = capsys.readouterr().err
    assert f"rows written to {run / 'predict-last.jsonl'}" in err
    assert json.loads((run / "validate-last.json").read_text())["val/loss"] > 0
    assert json.loads((run / "test-last.json").read_text())["test/loss"] > 0
    predictions = [json.loads(line) for line in (run / "predict-last.jsonl").read_text().splitlines()]
    assert predictions and all(p["n_tokens"] > 0 and p["nll"] > 0 for p in predictions)
    assert [p["row"] for p in predictions] == list(range(len(predictions)))
    assert sorted(p.name for p in (tmp_path / "runs" / "q").iterdir()) == ["version_0"]


def test_a_fit_prints_no_warning_a_user_cannot_act_on(tmp_path):
    """Run as a user runs it (a fresh process, Python's default warning filters), a fit and its resume print
    Lightning's progress and summary, with the spec's FLOPs, and no warning."""
    config = str(run_config(tmp_path, "q", 3, enable_model_summary=True))
    for extra in ([], ["--ckpt_path", "last", "--trainer.max_steps", "5"]):
        done = subprocess.run([sys.executable, "-m", "soma_lightning", "fit", "--config", config, *extra], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        output = done.stdout + done.stderr
        assert "Training FLOPs per token" in output and "Total Flops" not in output
        # Lightning prints its warnings as "path.py:LINE: message", without the category
        assert not [line for line in output.splitlines() if re.search(r"\.py:\d+: |Warning|💡", line)], output
    assert sorted(p.name for p in (tmp_path / "runs" / "q").iterdir()) == ["version_0"]


def test_checkpointing_can_be_switched_off(tmp_path):
    config = str(run_config(tmp_path, "q", 2))
    main(["fit", "--config", config, "--trainer.enable_checkpointing", "false"])
    assert not (tmp_path / "runs" / "q" / "version_0" / "checkpoints").exists()
