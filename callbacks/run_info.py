"""RunInfo: what a reviewer needs to reproduce a run, recorded into the run directory when training starts, so
that `soma-lightning report` reads the state of the code and machine the run had, not today's."""

import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

import soma_lightning
from soma_lightning.checkpoint_io import atomic_write
from soma_lightning.data_modules import ByteCorpus
from soma_lightning.measure import count_parameters, train_flops_per_token

RUN_INFO_FILE = "run_info.json"
TOKENIZER_FILE = "tokenizer.json"  # a copy of the model's tokenizer file, so that the run directory is self-contained
PACKAGES = ("soma-lightning", "torch", "lightning", "jsonargparse", "numpy", "triton", "flash-linear-attention")


def spec_hash(hparams: dict[str, Any]) -> str:
    """SHA-256 of the resolved model spec (the hyper-parameters a checkpoint carries) as canonical JSON."""
    return hashlib.sha256(json.dumps(hparams, sort_keys=True, default=str).encode()).hexdigest()


def _git(*args: str) -> str | None:
    source = Path(soma_lightning.__file__).parent
    try:
        done = subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    versions["cuda"] = torch.version.cuda
    return versions


class RunInfo(L.Callback):
    """At the first training batch, on global rank zero, writes `<log_dir>/run_info.json` atomically: the spec
    hash, the git commit of the soma_lightning source (and whether it had uncommitted changes), package
    versions, hardware, world size and precision, parameter and FLOP counts, and the tokens per optimizer step
    (batch tokens x world size x gradient accumulation), which `soma-lightning report` needs for its token axis,
    and the SHA-256 of each prepared corpus's manifest by path (`corpus_manifest_sha256`; absent for plain
    files). A model of a tokenizer file records its path and SHA-256 (`tokenizer`), and the file is copied to
    `<log_dir>/tokenizer.json`. `soma-lightning fit` adds it to every run."""

    def __init__(self) -> None:
        self.written: Path | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.written is not None:
            return
        log_dir = trainer.log_dir  # a broadcast: every rank must ask
        self.written = Path(log_dir) / RUN_INFO_FILE
        if not trainer.is_global_zero:
            return
        tokens = batch["tokens"]
        total, active = count_parameters(pl_module.model)
        devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if pl_module.device.type == "cuda" else []
        config = Path(log_dir) / "config.yaml"
        commit = _git("rev-parse", "HEAD")
        info = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": sys.argv,
            "log_dir": str(log_dir),
            "spec_sha256": spec_hash(dict(pl_module.hparams)),
            "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest() if config.is_file() else None,
            "git": {"commit": commit, "dirty": None if commit is None else bool(_git("status", "--porcelain", "--untracked-files=no"))},
            "packages": _versions(),
            "hardware": {
                "platform": platform.platform(),
                "cpu": _cpu_name(),
                "cpu_count": os.cpu_count(),
                "accelerator": pl_module.device.type,
                "gpus": devices,
                "world_size": trainer.world_size,
                "num_nodes": trainer.num_nodes,
            },
            "precision": str(trainer.precision),
            "start_step": trainer.global_step,
            "parameters": {"total": total, "active": active},
            "train_flops_per_token": train_flops_per_token(pl_module.model, tokens.shape[1]),
            "tokens_per_step": tokens.numel() * trainer.world_size * trainer.accumulate_grad_batches,
        }
        if isinstance(trainer.datamodule, ByteCorpus) and (corpora := trainer.datamodule.fingerprints()):
            info["corpus_manifest_sha256"] = corpora
        vocabulary = pl_module.vocabulary
        if not vocabulary.is_bytes:
            info["tokenizer"] = {"file": str(Path(vocabulary.tokenizer).resolve()), "sha256": vocabulary.sha256}
            atomic_write(Path(log_dir) / TOKENIZER_FILE, lambda tmp: shutil.copyfile(vocabulary.tokenizer, tmp))
        atomic_write(self.written, lambda tmp: tmp.write_text(json.dumps(info, indent=1)))
