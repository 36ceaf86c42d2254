"""LoRA: parameter-efficient fine-tuning through PEFT (the finetune extra): low-rank adapters on the Linear
layers whose names match a pattern, every base parameter frozen, and freezing of parameters by name pattern.

A LoRA run's checkpoints hold the adapters beside the base weights and the adapter settings under LORA_KEY:
`checkpoints.load_module` (so `soma_lightning.load`, `export`, `generate`, `score`) merges them into the base
weights on load, so every consumer sees a plain model. At the end of fit the adapter alone is written as one
safetensors file (PEFT's key names, the settings in its metadata): `load_adapter` puts it on a base model
and `merge_lora` folds it in."""

import json
import os
import re
from pathlib import Path
from typing import Any

import lightning as L
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from soma_lightning.callbacks.safetensors_export import full_state
from soma_lightning.checkpoint_io import atomic_write, ordinary_mode
from soma_lightning.errors import UserError

LORA_KEY = "soma_lightning_lora"  # a checkpoint's (and an adapter file's metadata) key of the adapter settings
ADAPTER_FILE = "adapter.safetensors"


def _peft() -> Any:
    """PEFT, imported only when adapters are used: it is the finetune extra, not a dependency."""
    try:
        import peft
    except ImportError as e:
        raise UserError(f"LoRA: needs PEFT, the finetune extra (pip install 'soma-lightning[finetune]'): {e}") from None
    return peft


def inject_lora(model: nn.Module, settings: dict[str, Any], argument: str = "LoRA(target_modules)") -> None:
    """Wrap the Linear layers of `model` that `settings["target_modules"]` names (PEFT's matching: a string is a
    regex on the full module name, a list holds names or name suffixes) with fresh LoRA adapters, in place, and
    leave only the adapters trainable. A pattern that matches nothing is a one-line UserError naming `argument`."""
    peft = _peft()
    config = peft.LoraConfig(target_modules=settings["target_modules"], r=settings["r"], lora_alpha=settings["alpha"], lora_dropout=settings["dropout"])
    try:
        peft.inject_adapter_in_model(config, model)
    except ValueError as e:  # PEFT's NoMatchingPeftModuleError, or a matched layer type LoRA does not support
        linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        raise UserError(f"{argument}: {settings['target_modules']!r} selects no Linear layer LoRA can wrap ({_first_line(e)}); "
                        f"the model's Linear layers are e.g. {', '.join(linears[:4])}") from None


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _tuner_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers PEFT wrapped, by name."""
    layer_type = _peft().tuners.tuners_utils.BaseTunerLayer
    return [(name, m) for name, m in model.named_modules() if isinstance(m, layer_type)]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base layer's weight and put the base layer back in its place: the
    model's state dict then has the base model's keys and nothing else. Returns `model`, changed in place."""
    for name, layer in _tuner_layers(model):
        layer.merge(safe_merge=True)  # refuses a merge that would make a weight non-finite
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' tensors under PEFT's names (no adapter name), full and on the CPU; a collective under FSDP2."""
    return _peft().get_peft_model_state_dict(model, state_dict=full_state(model))


def save_adapter(tensors: dict[str, Tensor], settings: dict[str, Any], path: str | os.PathLike) -> None:
    """Write an adapter (`adapter_state`) atomically, its settings in the metadata: one self-describing file."""

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), {LORA_KEY: json.dumps(settings)})
        ordinary_mode(tmp)

    atomic_write(Path(path), write)


def load_adapter(model: nn.Module, path: str | os.PathLike, argument: str = "adapter") -> nn.Module:
    """Put the adapter file at `path` (written by the LoRA callback) on `model`, in place, and return it."""
    with safe_open(str(path), framework="pt") as f:
        settings = (f.metadata() or {}).get(LORA_KEY)
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    if settings is None:
        raise UserError(f"{argument}: {path} is not a LoRA adapter (no {LORA_KEY} in its metadata)")
    inject_lora(model, json.loads(settings), argument)
    result = _peft().set_peft_model_state_dict(model, tensors)
    missing = [key for key in result.missing_keys if "lora_" in key]
    if missing or result.unexpected_keys:
        raise UserError(f"{argument}: {path} does not fit the model (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
    return model


class LoRA(L.Callback):
    """Fine-tune with LoRA adapters (PEFT) and/or freeze parameters by name pattern.

    Args:
        target_modules: the Linear layers of `SomaLM.model` to adapt: a regex matched against the whole module
            name (".*attention\\.(query|value)") or a list of names or name suffixes (["query", "value"]); None
            for no adapters (freezing only). Every base parameter is then frozen.
        r: the adapters' rank.
        alpha: the adapters' scale numerator (the update is alpha / r * B A).
        dropout: dropout on the adapters' input.
        freeze: regexes matched against the whole parameter names (as `SomaLM.model.named_parameters()` gives
            them, after adapters are added): those parameters are frozen (requires_grad False, so AdamW never
            updates them, weight decay included).
        adapter_path: where the adapter is written at the end of fit; default `<run dir>/adapter.safetensors`.
    """

    def __init__(self, target_modules: str | list[str] | None = None, r: int = 8, alpha: int = 16, dropout: float = 0.0,
                 freeze: list[str] | None = None, adapter_path: str | None = None) -> None:
        if target_modules is None and not freeze:
            raise ValueError("LoRA: expected target_modules (layers to adapt) or freeze (parameters to freeze), got neither")
        if target_modules is not None and not target_modules:
            raise ValueError(f"target_modules: expected a regex or a non-empty list of module names, got {target_modules!r}")
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"r: expected a positive integer, got {r!r}")
        if not isinstance(alpha, (int, float)) or alpha <= 0:
            raise ValueError(f"alpha: expected a positive number, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a number in [0, 1), got {dropout!r}")
        self.freeze: list[re.Pattern] = []
        for pattern in freeze or []:
            try:
                self.freeze.append(re.compile(pattern))
            except re.error as e:
                raise ValueError(f"freeze: {pattern!r} is not a regex ({e})") from None
        self.settings = None if target_modules is None else {"target_modules": target_modules, "r": r, "alpha": alpha, "dropout": dropout}
        self.adapter_path = adapter_path
        self._path: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before configure_model (compile, FSDP2), configure_optimizers and restoring a checkpoint, so a resumed
        # run's checkpoint finds the adapters it holds. Every stage: validating a LoRA checkpoint needs them too.
        model = pl_module.model
        if self.settings is not None and not _tuner_layers(model):
            inject_lora(model, self.settings)
            for name, p in model.named_parameters():
                p.requires_grad_("lora_" in name)
        frozen = [name for name, p in model.named_parameters() if any(pattern.fullmatch(name) for pattern in self.freeze)]
        if self.freeze and not frozen:
            raise UserError(f"LoRA(freeze): {[p.pattern for p in self.freeze]} matches no parameter of the model (e.g. {next(iter(dict(model.named_parameters())))})")
        for name in frozen:
            model.get_parameter(name).requires_grad_(False)
        if self.settings is not None:
            self._path = Path(self.adapter_path or Path(trainer.log_dir) / ADAPTER_FILE)  # log_dir: a collective

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.settings is not None:
            checkpoint[LORA_KEY] = self.settings

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.settings is None:
            return
        tensors = adapter_state(pl_module.model)  # on every rank: gathering FSDP2 shards is a collective
        if trainer.is_global_zero:
            save_adapter(tensors, self.settings, self._path)
