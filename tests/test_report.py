"""`soma-lightning report RUN_DIR` and the run_info.json it reads: plots and summary of a real (tiny) run."""

import json
import subprocess

import pytest
import torch
from matplotlib.image import imread

from soma_lightning.callbacks.run_info import spec_hash
from soma_lightning.cli import main
from soma_lightning.report import write_report
from conftest import train_tiny_spec


@pytest.mark.slow
def test_report_of_a_moe_run(tmp_path):
    callbacks = [
        {"class_path": "soma_lightning.callbacks.Throughput"},
        {"class_path": "soma_lightning.callbacks.ExpertLoadMonitor", "init_args": {"every_n_steps": 2}},
        {"class_path": "soma_lightning.callbacks.BlockNormMonitor", "init_args": {"every_n_steps": 2}},
    ]
    rows = train_tiny_spec("specs/gpt5_moe_tiny.yaml", tmp_path, steps=4, callbacks=callbacks)
    run = tmp_path / "runs/gpt5_moe_tiny/version_0"
    info = json.loads((run / "run_info.json").read_text())
    ckpt = torch.load(run / "checkpoints/last.ckpt", weights_only=True)
    assert info["spec_sha256"] == spec_hash(ckpt["hyper_parameters"])
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert info["git"]["commit"] == head and info["tokens_per_step"] == 8 * 128
    assert info["packages"]["torch"] == torch.__version__ and info["hardware"]["accelerator"] == "cpu"

    result = write_report(str(run))
    report = run / "report"
    names = sorted(p.name for p in report.iterdir())
    assert names == sorted(["summary.md", "loss.png", "bits_per_byte.png", "learning_rate.png", "throughput.png", "expert_load.png",
                            "block_grad_norm.png", "block_activation_norm.png"])
    assert sorted(result["plots"]) == sorted(str(report / n) for n in names if n.endswith(".png"))
    for name in names:
        if name.endswith(".png"):
            height, width, _ = imread(report / name).shape
            assert height >= 300 and width >= 500, name
    summary = (report / "summary.md").read_text()
    val_bpb = float(next(r["val/bits_per_byte"] for r in reversed(rows) if r.get("val/bits_per_byte")))
    assert f"| val/bits_per_byte | 3 | {val_bpb:.4f} |" in summary
    assert info["spec_sha256"] in summary and head in summary and f"torch {torch.__version__}" in summary
    assert "| tokens seen | 3 | 4,096 |" in summary

    # The report reads the run's own record of commit and hardware, not the repository's state today.
    (run / "run_info.json").write_text(json.dumps(info | {"git": {"commit": "0123abc", "dirty": True}}))
    write_report(str(run), str(tmp_path / "again"))
    assert "`0123abc with uncommitted changes`" in (tmp_path / "again/summary.md").read_text()


def test_report_of_a_bad_run_dir_is_one_line(tmp_path, capsys):
    for target in (tmp_path / "missing", tmp_path):
        with pytest.raises(SystemExit) as exit:
            main(["report", str(target)])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and err.count("\n") == 1 and err.startswith("soma-lightning: error: RUN_DIR:"), err
