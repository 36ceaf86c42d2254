"""SafetensorsExport: beside each Lightning .ckpt, the model's weights as `step=N.safetensors`, written
atomically, keeping the newest N files."""

import json
import os
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import lightning as L
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.tensor import DTensor

from soma_lightning.checkpoint_io import atomic_write, ordinary_mode
from soma_lightning.spec import ModelSpec, spec_from_dict
from soma_lightning.v1 import CANONICAL_HOLDS, WeightsError, canonical_metadata, canonical_state_dict, save_canonical, v1_shape_problem

SPEC_KEY = "soma_lightning_spec"
# Canonical files carry the resolved spec under their own key: their tensors have V1's canonical names, so
# `build_model(spec).load_state_dict` does not take them (v1.model_from_canonical or soma_lightning.load does).
CANONICAL_SPEC_KEY = "soma_lightning_canonical_spec"
_STEP_FILE = re.compile(r"step=(\d+)\.safetensors")


def full_state(model: nn.Module) -> dict[str, Tensor]:
    """The full state dict as contiguous CPU tensors, dtype kept. Under FSDP2 the shards are gathered, so
    every rank must call this. safetensors refuses tensors that share memory, so a tied weight is stored
    as a copy under each of its names."""
    if any(isinstance(p, DTensor) for p in model.parameters()):
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = model.state_dict()
    tensors, storages = {}, set()
    for key, value in state.items():
        tensor = value.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        tensors[key] = tensor.clone() if storage in storages else tensor
        storages.add(storage)
    return tensors


def check_canonical(model: nn.Module, flag: str = "--layout canonical", instead: str = "--layout state_dict") -> None:
    """Refuse (WeightsError, a one-line UserError) a model whose structure the canonical V1 layout cannot hold,
    naming what it has: "--layout canonical: the model has a semantic_state token embedding; ...; use
    --layout state_dict". Sizes and keys are checked when the file is written."""
    if problem := v1_shape_problem(model):
        raise WeightsError(f"{flag}: {problem}; the canonical V1 layout holds only {CANONICAL_HOLDS}; use {instead}")


def write_safetensors(model: nn.Module, tensors: dict[str, Tensor], arch: ModelSpec, path: str | os.PathLike, canonical: bool, step: int | None = None) -> None:
    """Write a model's full state (`tensors`, from `full_state`) atomically, mode 0666 less the umask: SOMA
    V1's canonical layout (a model that is not V1-shaped is refused, `check_canonical`), or the state dict.
    The metadata holds the resolved spec (SPEC_KEY for the state dict, CANONICAL_SPEC_KEY for the canonical
    layout, which also records the head count under v1.NUM_HEADS_KEY) and the step."""
    steps = {} if step is None else {"global_step": str(step)}
    if canonical:
        check_canonical(model)
        save_canonical(model, path, tensors, canonical_metadata(model) | {CANONICAL_SPEC_KEY: json.dumps(asdict(arch))} | steps)
        return
    metadata = {SPEC_KEY: json.dumps(asdict(arch))} | steps

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata)
        ordinary_mode(tmp)

    atomic_write(Path(path), write)


def is_v1(model: nn.Module) -> bool:
    """Whether the model is V1-shaped, by v1.py's own check: canonical_state_dict refuses any other model."""
    try:
        canonical_state_dict(model)
    except WeightsError:
        return False
    return True


def load_exported(path: str | os.PathLike) -> tuple[dict[str, Tensor], ModelSpec | None]:
    """The tensors of an exported file and the spec in its metadata (None when it has none, as canonical
    files): `build_model(spec).load_state_dict(tensors)` rebuilds a state_dict-layout export."""
    with safe_open(str(path), framework="pt") as f:
        spec = (f.metadata() or {}).get(SPEC_KEY)
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    return tensors, None if spec is None else spec_from_dict(json.loads(spec))


class SafetensorsExport(L.Callback):
    """Whenever Lightning saves a checkpoint, writes the model's weights to `dirpath/step=N.safetensors`
    (once per global step, on global rank zero), then deletes all but the `keep_last` highest steps.
    `layout`: "canonical" is SOMA V1's canonical layout (v1.py), "state_dict" the model's own tensors with the
    resolved spec and the step in the metadata (read back with `load_exported`), "auto" the canonical layout
    for a V1-shaped model and state_dict otherwise. `dirpath` defaults to `<trainer.log_dir>/safetensors`."""

    def __init__(self, dirpath: str | None = None, keep_last: int = 3, layout: Literal["auto", "canonical", "state_dict"] = "auto") -> None:
        if not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1:
            raise ValueError(f"keep_last: expected a positive integer, got {keep_last!r}")
        if layout not in ("auto", "canonical", "state_dict"):
            raise ValueError(f"layout: expected 'auto', 'canonical' or 'state_dict', got {layout!r}")
        self.dirpath = dirpath
        self.keep_last = keep_last
        self.layout = layout
        self._dir: Path | None = None
        self._canonical = False
        self._last_step: int | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # On every rank: trainer.log_dir is a collective (a broadcast from rank zero).
        self._dir = Path(self.dirpath or Path(trainer.log_dir) / "safetensors")
        if self.layout == "canonical":  # refuse a model that is not V1 now, with the reason
            check_canonical(pl_module.model, "SafetensorsExport(layout='canonical')", "layout 'state_dict' or 'auto'")
            canonical_state_dict(pl_module.model)
        self._canonical = self.layout == "canonical" or (self.layout == "auto" and is_v1(pl_module.model))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        step = trainer.global_step
        if step == self._last_step:
            return
        tensors = full_state(pl_module.model)  # on every rank: gathering FSDP2 shards is a collective
        self._last_step = step
        if trainer.is_global_zero:
            write_safetensors(pl_module.model, tensors, pl_module.arch, self._dir / f"step={step}.safetensors", self._canonical, step)
            self._prune()

    def _prune(self) -> None:
        """Delete all but the `keep_last` exports with the highest step numbers (from the names, not mtimes)."""
        steps: dict[int, Path] = {}
        for file in self._dir.iterdir():
            if match := _STEP_FILE.fullmatch(file.name):
                steps[int(match[1])] = file
        for step in sorted(steps)[: -self.keep_last]:
            steps[step].unlink(missing_ok=True)
