"""Loggers: CSV and TensorBoard by default, in one runs/NAME/version_N with the resolved config as
hyper-parameters; W&B through specs/loggers/wandb.yaml, offline."""

import json
import time
from pathlib import Path

import wandb
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from wandb.proto.wandb_internal_pb2 import Record

from soma_lightning.cli import cli_main
from conftest import tiny_v1_arch

REPO = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, **trainer) -> Path:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(open(REPO / "soma_lightning/corpora/tinyshakespeare.txt").read()[:20_000])
    cfg = {
        "model": {"arch": tiny_v1_arch(), "optim": {"warmup_steps": 2}},
        "data": {"class_path": "soma_lightning.data_modules.ByteCorpus", "init_args": {"source": str(corpus), "seq_len": 32, "batch_size": 4}},
        "trainer": {"accelerator": "cpu", "max_steps": 3, "limit_val_batches": 0, "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False} | trainer,
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_default_loggers_share_one_version_directory_with_the_config_as_hyperparameters(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = _config(tmp_path)
    cli_main(["fit", "--config", str(config)])
    cli_main(["fit", "--config", str(config), "--trainer.max_steps", "2"])
    for version, steps in (("version_0", 3), ("version_1", 2)):
        run = tmp_path / "runs/soma" / version
        assert (run / "metrics.csv").is_file() and (run / "config.yaml").is_file() and (run / "checkpoints/last.ckpt").is_file()
        hparams = yaml.safe_load((run / "hparams.yaml").read_text())
        assert hparams["model"]["arch"]["d_model"] == 16 and hparams["trainer"]["max_steps"] == steps
        events = EventAccumulator(str(run))
        events.Reload()
        assert [e.step for e in events.Scalars("train/loss")] == list(range(steps))
        assert [e.step for e in events.Scalars("lr-AdamW/pg1")] == list(range(steps))
        plugin = events.PluginTagToContent("hparams")  # TensorBoard's HParams tab
        assert "_hparams_/session_start_info" in plugin and b"model/arch/d_model" in plugin["_hparams_/session_start_info"]
    assert sorted(p.name for p in (tmp_path / "runs/soma").iterdir()) == ["version_0", "version_1"]


def _wandb_records(path: Path) -> list[Record]:
    """The records of a .wandb file: LevelDB-log framing (32 KiB blocks; 7-byte record headers: CRC, length,
    type FULL 1 / FIRST 2 / MIDDLE 3 / LAST 4) after a 7-byte ':W&B' header, each record a protobuf."""
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def _finished_records(folder: Path, timeout_s: float = 60.0) -> list[Record]:
    """The records of the one offline run in `folder`, once its run record is on disk: wandb's service
    process may still be writing after wandb.finish() returns (seen once on a loaded machine)."""
    deadline = time.monotonic() + timeout_s
    while True:
        runs = list(folder.glob("offline-run-*/run-*.wandb"))
        records = _wandb_records(runs[0]) if len(runs) == 1 and runs[0].stat().st_size >= 7 else []
        if any(r.WhichOneof("record_type") == "run" for r in records) or time.monotonic() > deadline:
            assert len(runs) == 1, runs
            return records
        time.sleep(0.5)


def test_wandb_overlay_logs_offline_with_the_resolved_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cli_main(["fit", "--config", str(_config(tmp_path)), "--config", str(REPO / "specs/loggers/wandb.yaml")])
    wandb.finish()  # what the CLI's process exit does
    assert (tmp_path / "runs/soma/version_0/metrics.csv").is_file()  # the spec's loggers stay
    records = _finished_records(tmp_path / "runs/wandb")
    run_record = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run_record.project == "soma-lightning"
    config = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "config" for item in r.config.update}
    assert config["model"]["arch"]["d_model"] == 16 and config["trainer"]["max_steps"] == 3
    history = [{i.key or "/".join(i.nested_key): i.value_json for i in r.history.item} for r in records if r.WhichOneof("record_type") == "history"]
    assert [json.loads(h["trainer/global_step"]) for h in history if "train/loss" in h] == [0, 1, 2]
