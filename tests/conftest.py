import csv
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from soma_lightning.spec import ModelSpec


def tiny_v1_arch(d_model: int = 16, n_layers: int = 2, num_heads: int = 4, hidden_dim: int = 32, dropout: float = 0.0, **mixer_args) -> dict:
    """The reference's small V1 config (D 16, FF 32, 2 layers, 4 heads) as a spec mapping."""
    return {
        "d_model": d_model,
        "n_layers": n_layers,
        "dropout": dropout,
        "blocks": {
            "layer": [
                {"norm": "layernorm", "mixer": {"type": "mha", "num_heads": num_heads, **mixer_args}},
                {"norm": "layernorm", "ffn": {"type": "gelu_mlp", "hidden_dim": hidden_dim}},
            ]
        },
    }


@pytest.fixture
def tiny_spec() -> ModelSpec:
    return ModelSpec(**tiny_v1_arch())


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def train_tiny_spec(spec: str, tmp_path, steps: int = 60, callbacks: list[dict] | None = None) -> list[dict]:
    """Train a tiny spec on 20 tiny-Shakespeare documents for `steps` steps through the CLI (with `callbacks`, as
    trainer.callbacks entries, if given); the metrics rows of its CSV log in tmp_path/runs/NAME/version_0."""
    from soma_lightning.cli import cli_main

    cfg = yaml.safe_load(open(spec))
    corpus = tmp_path / "docs"
    corpus.mkdir()
    text = open("soma_lightning/corpora/tinyshakespeare.txt").read()
    for i in range(20):
        (corpus / f"{i:02d}.txt").write_text(text[i * 3000 : (i + 1) * 3000])
    cfg["data"]["init_args"]["source"] = str(corpus)
    cfg["trainer"] |= {"max_steps": steps, "val_check_interval": steps, "log_every_n_steps": 1, "enable_progress_bar": False}
    if callbacks is not None:
        cfg["trainer"]["callbacks"] = callbacks
    for logger in cfg["trainer"]["logger"]:
        logger["init_args"]["save_dir"] = str(tmp_path / "runs")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli_main(["fit", "--config", str(path)])
    name = cfg["trainer"]["logger"][0]["init_args"]["name"]
    return list(csv.DictReader(open(tmp_path / "runs" / name / "version_0" / "metrics.csv")))


def run_config(tmp_path: Path, name: str, max_steps: int, dropout: float = 0.1, **trainer: object) -> Path:
    """A tiny V1-shaped run on 60 KB of tiny Shakespeare, CPU, deterministic, logging every step; `trainer`
    overrides Trainer arguments."""
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(open("soma_lightning/corpora/tinyshakespeare.txt").read()[:60_000])
    cfg = {
        "seed_everything": 1,
        "model": {"arch": tiny_v1_arch(d_model=32, hidden_dim=64, dropout=dropout), "optim": {"lr": 3e-3, "warmup_steps": 2}},
        "data": {"class_path": "soma_lightning.data_modules.ByteCorpus", "init_args": {"source": str(corpus), "seq_len": 32, "batch_size": 4, "val_seq_len": 64}},
        "trainer": {
            "accelerator": "cpu",
            "max_steps": max_steps,
            "val_check_interval": 4,
            "check_val_every_n_epoch": None,
            "limit_val_batches": 2,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "deterministic": True,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "runs"), "name": name}},
        } | trainer,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def train_losses(metrics_csv: Path, key: str = "train/loss") -> dict[int, float]:
    rows = csv.DictReader(open(metrics_csv))
    return {int(r["step"]): float(r[key]) for r in rows if r.get(key)}


class StopAtStep(L.Callback):
    """Stops a run after `step` optimizer steps, as an interruption would, with the schedule of the full run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            trainer.should_stop = True


def one_error_line(capsys: pytest.CaptureFixture, *args: str) -> str:
    """The one stderr line of a `soma-lightning` command that must exit with code 2."""
    from soma_lightning.cli import main

    with pytest.raises(SystemExit) as exit:
        main(list(args))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("soma-lightning: error: ")
    return lines[0]


def fresh_checkpoint(path: Path, arch: dict | None = None) -> Path:
    """A Lightning checkpoint of a fresh SomaLM of `arch` (default: tiny V1)."""
    from soma_lightning.lm import SomaLM
    from soma_lightning.spec import spec_from_dict

    module = SomaLM(spec_from_dict(arch or tiny_v1_arch()))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "pytorch-lightning_version": L.__version__}, path)
    return path
