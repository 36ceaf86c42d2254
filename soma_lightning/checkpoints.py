"""Reading the checkpoints a user hands us, without running code.

A checkpoint is a Lightning `.ckpt` file, a sharded folder (FSDP2 or FSDP1: torch.distributed.checkpoint
shards beside Lightning's `meta.pt`), or a DeepSpeed ZeRO folder; a run directory (runs/NAME/version_N)
stands for its best or last checkpoint. `.ckpt` and `meta.pt` are read with `torch.load(weights_only=True)`,
sharded folders through safe_unpickling.py; a file that is not a checkpoint is a one-line UserError naming it.
"""

import pickle
import tempfile
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch.distributed.checkpoint import metadata as dcp_metadata

from soma_lightning.callbacks.lora import LORA_KEY, inject_lora, merge_lora
from soma_lightning.errors import UserError
from soma_lightning.lm import TOKENIZER_SHA256, SomaLM
from soma_lightning.safe_unpickling import MetadataUnpickler, restricted_unpickling
from soma_lightning.spec import ModelSpec
from soma_lightning.vocabulary import BYTES, check_tokenizer_file

SHARDED_METADATA = "meta.pt"  # what Lightning's FSDP and ModelParallel strategies write beside the shards
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint's index of the shards
DEEPSPEED_LATEST = "latest"  # what DeepSpeed writes into its checkpoint folders

def refuse_url(value: str, argument: str) -> None:
    """A checkpoint must be a local path: Lightning would download a URL and unpickle it with weights_only=False."""
    if "://" in str(value):
        raise UserError(f"{argument}: {value} is a URL; download the checkpoint and pass its local path (remote checkpoints are not loaded)")


def _is_checkpoint_folder(path: Path) -> bool:
    return (path / SHARDED_METADATA).is_file() or (path / DEEPSPEED_LATEST).is_file()


def resolve_checkpoint(path: str | Path, which: Literal["best", "last"] = "last", argument: str = "--ckpt") -> Path:
    """A checkpoint (a .ckpt file or a sharded checkpoint folder), or the best / last checkpoint of a run
    directory (runs/NAME/version_N or its checkpoints/ folder)."""
    refuse_url(str(path), argument)
    p = Path(path)
    if not p.exists():
        raise UserError(f"{argument}: {path} does not exist")
    if p.is_file():
        if p.stat().st_size == 0:
            raise UserError(f"{argument}: {path} is an empty file, not a checkpoint")
        return p
    if _is_checkpoint_folder(p):
        return p
    folder = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    pattern = "last.ckpt" if which == "last" else "best-*.ckpt"
    found = sorted(folder.glob(pattern), key=lambda f: f.stat().st_mtime)
    if not found:
        raise UserError(f"{argument}: {path} is neither a checkpoint nor a run directory with a {pattern} in {folder}")
    return resolve_checkpoint(found[-1], which, argument)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _torch_load(path: Path, argument: str) -> dict[str, Any]:
    """torch.load, weights only, with every failure as one line naming the file."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            reason = next((line for line in str(e).splitlines() if "Unsupported global" in line or "Unsupported operand" in line), "")
            raise UserError(f"{argument}: refused {path}: it holds objects other than weights and plain data, which could run code ({_one_line(Exception(reason)) or 'weights-only load failed'})") from None
        raise UserError(f"{argument}: {path} is not a checkpoint ({_one_line(e)})") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise UserError(f"{argument}: {path} is not a readable checkpoint, perhaps truncated ({type(e).__name__}: {_one_line(e)})") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{argument}: {path} is not a Lightning checkpoint (it holds a {type(loaded).__name__}, not a mapping)")
    return loaded


def _check_dcp_metadata(folder: Path, argument: str) -> None:
    metadata = folder / DCP_METADATA
    if not metadata.is_file():
        raise UserError(f"{argument}: {folder} has {SHARDED_METADATA} but no {DCP_METADATA}; not a complete sharded checkpoint")
    try:
        with open(metadata, "rb") as f:
            loaded = MetadataUnpickler(f).load()
    except pickle.UnpicklingError as e:
        raise UserError(f"{argument}: refused {metadata}: {_one_line(e)}, which could run code") from None
    except (EOFError, OSError, ValueError, TypeError, AttributeError) as e:
        raise UserError(f"{argument}: {metadata} is not readable checkpoint metadata ({type(e).__name__}: {_one_line(e)})") from None
    if not isinstance(loaded, dcp_metadata.Metadata):
        raise UserError(f"{argument}: {metadata} is not checkpoint metadata (it holds a {type(loaded).__name__})")


def _read_checkpoint(path: Path, argument: str) -> dict[str, Any] | None:
    """A checkpoint's contents, read without running code: a sharded folder's meta.pt (all but the weights
    and optimizer state); None for a DeepSpeed folder, whose state DeepSpeed itself reads. Refuses, as one
    line, anything that is not a readable checkpoint."""
    if not path.is_dir():
        return _torch_load(path, argument)
    if (path / DEEPSPEED_LATEST).is_file():
        return None
    if not (path / SHARDED_METADATA).is_file():
        raise UserError(f"{argument}: {path} is a folder but not a checkpoint (no {SHARDED_METADATA} or {DEEPSPEED_LATEST})")
    checkpoint = _torch_load(path / SHARDED_METADATA, argument)
    _check_dcp_metadata(path, argument)
    return checkpoint


def read_hyperparameters(path: Path, argument: str = "--ckpt_path") -> dict[str, Any] | None:
    """The hyper-parameters a checkpoint was trained with (SomaLM's saved init arguments), read without
    running code; None for a DeepSpeed folder, whose state DeepSpeed itself reads."""
    checkpoint = _read_checkpoint(path, argument)
    return None if checkpoint is None else _hyperparameters_of(checkpoint, path, argument)


def read_global_step(path: Path, argument: str = "--ckpt_path") -> int | None:
    """The optimizer steps a checkpoint was saved after; None for a DeepSpeed folder."""
    if path.is_dir():
        if not (path / SHARDED_METADATA).is_file():
            return None
        path = path / SHARDED_METADATA
    step = _torch_load(path, argument).get("global_step")
    return step if isinstance(step, int) else None


def _hyperparameters_of(checkpoint: dict[str, Any], path: Path, argument: str) -> dict[str, Any]:
    hparams = checkpoint.get("hyper_parameters")
    if not isinstance(hparams, dict) or "arch" not in hparams:
        raise UserError(f"{argument}: {path} is not a soma-lightning checkpoint (no model hyper-parameters in it)")
    return hparams


def _hparams_to_load(checkpoint: dict[str, Any], path: Path, argument: str, tokenizer: str | Path | None) -> dict[str, Any]:
    """The arguments to build a checkpoint's module with: its hyper-parameters without init_weights, with the
    tokenizer file at `tokenizer` when given, which must be the file the checkpoint was trained with."""
    hparams = _hyperparameters_of(checkpoint, path, argument)
    arch = hparams["arch"] if tokenizer is None else hparams["arch"] | {"tokenizer": str(tokenizer)}
    flag = "--tokenizer" if argument.startswith("--") else "tokenizer"
    check_tokenizer_file(arch.get("tokenizer", BYTES), checkpoint.get(TOKENIZER_SHA256), str(path), flag)
    return hparams | {"arch": arch, "init_weights": None}


def _with_lora(module: SomaLM, checkpoint: dict[str, Any], argument: str) -> SomaLM:
    """A LoRA run's module gets the adapters its checkpoint holds (callbacks/lora.py), to load them into."""
    if (settings := checkpoint.get(LORA_KEY)) is not None:
        inject_lora(module.model, settings, argument)
    return module


def _merged(module: SomaLM, checkpoint: dict[str, Any]) -> SomaLM:
    """A LoRA run's adapters folded into the base weights: it loads as the plain model it amounts to."""
    if checkpoint.get(LORA_KEY) is not None:
        merge_lora(module.model)
    return module


def _module_of(checkpoint: dict[str, Any], path: Path, argument: str, tokenizer: str | Path | None) -> SomaLM:
    module = _with_lora(SomaLM(**_hparams_to_load(checkpoint, path, argument, tokenizer)), checkpoint, argument)
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        raise UserError(f"{argument}: {path} holds no state_dict")
    module.load_state_dict(state)
    return _merged(module, checkpoint)


def _load_sharded(path: Path, checkpoint: dict[str, Any], hparams: dict[str, Any], argument: str) -> SomaLM:
    """The full weights of a sharded (torch.distributed.checkpoint) folder, read in this one process.
    Lightning's ModelParallelStrategy (FSDP2) stores them under "state_dict", its FSDPStrategy (FSDP1) under
    "model"."""
    import torch.distributed.checkpoint as dcp

    module = _with_lora(SomaLM(**hparams), checkpoint, argument)
    with restricted_unpickling():
        stored = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        top = "model" if any(key.startswith("model.model.") for key in stored) else "state_dict"
        state = {top: module.state_dict()}
        dcp.load(state, checkpoint_id=path)
    module.load_state_dict(state[top])
    return _merged(module, checkpoint)


def _load_deepspeed(path: Path, argument: str, tokenizer: str | Path | None) -> SomaLM:
    """The full float32 weights of a DeepSpeed ZeRO folder, consolidated by Lightning's converter (needs the
    deepspeed extra). DeepSpeed's files are read by DeepSpeed's own loader: load only folders you wrote."""
    try:
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
    except ImportError as e:
        raise UserError(f"{argument}: {path} is a DeepSpeed checkpoint; reading it needs the deepspeed extra ({e})") from None
    with tempfile.TemporaryDirectory() as tmp:
        consolidated = Path(tmp) / "consolidated.ckpt"
        convert_zero_checkpoint_to_fp32_state_dict(path, consolidated)
        return _module_of(_torch_load(consolidated, argument), path, argument, tokenizer)


def load_module(path: str | Path, which: Literal["best", "last"] = "last", argument: str = "--ckpt", tokenizer: str | Path | None = None) -> SomaLM:
    """The SomaLM of a checkpoint or run directory, on the CPU, with its full weights (sharded checkpoints
    consolidated in this process). Nothing in the files is executed; a file that is not a soma-lightning
    checkpoint is a one-line UserError naming it. `tokenizer`: the model's tokenizer file, replacing the path
    its spec records (a file moved since training); a tokenizer file that is missing, or is not the one the
    checkpoint was trained with (its SHA-256), is a one-line UserError."""
    checkpoint = resolve_checkpoint(path, which, argument)
    if checkpoint.is_dir() and (checkpoint / DEEPSPEED_LATEST).is_file():
        return _load_deepspeed(checkpoint, argument, tokenizer)
    loaded = _read_checkpoint(checkpoint, argument)
    try:
        if checkpoint.is_dir():
            return _load_sharded(checkpoint, loaded, _hparams_to_load(loaded, checkpoint, argument, tokenizer), argument)
        return _module_of(loaded, checkpoint, argument, tokenizer)
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        raise UserError(f"{argument}: {checkpoint} does not match the model its hyper-parameters describe ({type(e).__name__}: {_one_line(e)})") from None


# Settings of how a model runs, not what it is: they may differ between a checkpoint and the run that loads it.
RUNTIME_HPARAMS = frozenset({"compile", "activation_checkpointing", "init_weights", "init_weights_strict"})


def _flatten(value: object, prefix: str) -> dict[str, object]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flatten(item, f"{prefix}.{key}").items()}
    return {prefix: list(value) if isinstance(value, tuple) else value}


# The spec keys' defaults, which a checkpoint written before the key existed was trained with.
SPEC_DEFAULTS = {f.name: f.default for f in fields(ModelSpec) if f.default is not MISSING}


def hparams_differences(checkpoint: dict[str, Any], config: dict[str, Any], ignored: frozenset[str] = RUNTIME_HPARAMS) -> list[str]:
    """Each model.* key whose value differs between a checkpoint's hyper-parameters and a config's, as
    "model.KEY (checkpoint A, config B)", sorted; top-level keys in `ignored` are not compared, nor where two
    tokenizer files lie (SomaLM.on_load_checkpoint compares their SHA-256)."""
    if isinstance(checkpoint.get("arch"), dict):
        checkpoint = checkpoint | {"arch": SPEC_DEFAULTS | checkpoint["arch"]}
    theirs = _flatten({k: v for k, v in checkpoint.items() if k not in ignored}, "model")
    mine = _flatten({k: v for k, v in config.items() if k not in ignored}, "model")
    if BYTES not in (theirs.get("model.arch.tokenizer"), mine.get("model.arch.tokenizer")):
        for flat in (theirs, mine):
            flat.pop("model.arch.tokenizer", None)
    return [f"{key} (checkpoint {theirs.get(key, '-')}, config {mine.get(key, '-')})" for key in sorted(mine.keys() | theirs.keys()) if mine.get(key) != theirs.get(key)]
