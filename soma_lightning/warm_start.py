"""Starting a model from weights on disk (`--model.init_weights FILE`): a safetensors export of any spec
(state_dict layout, the spec in its metadata) or SOMA V1's canonical file, matched against the model tensor by
tensor. Only safetensors files are read, so nothing in the file is executed."""

import os
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from soma_lightning.v1 import WeightsError, file_num_heads, from_canonical, model_size, v1_shape_problem

FLAG = "model.init_weights"
SHOWN = 3  # names listed per kind of mismatch; the counts say how many there are


@dataclass
class WarmStart:
    """What `load_initial_weights` found: the model's tensors it loaded, those the file lacks (`missing`),
    the file's that the model has no place for (`unexpected`), and (key, file shape, model shape) of each
    tensor whose shape differs (`misshaped`)."""

    path: str
    layout: str  # "state_dict" or "canonical"
    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    misshaped: list[tuple[str, list[int], list[int]]]

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.misshaped)

    def differences(self) -> str:
        """The mismatches as `2 missing (a, b), 2 mis-shaped (c has shape [4] in the file, [8] in the model; d ...)`,
        at most SHOWN names of each kind."""
        misshaped = [f"{key} has shape {file} in the file, {model} in the model" for key, file, model in self.misshaped]
        kinds = (("missing", self.missing, ", "), ("unexpected", self.unexpected, ", "), ("mis-shaped", misshaped, "; "))
        return ", ".join(f"{len(items)} {kind} ({_few(items, sep)})" for kind, items, sep in kinds if items)


def _few(items: list[str], sep: str) -> str:
    return sep.join(items[:SHOWN]) + (f"{sep}…" if len(items) > SHOWN else "")


def _refuse_non_safetensors(path: Path) -> None:
    """A checkpoint or run directory is not read here: initial weights come from safetensors files only."""
    export = f"write its weights with `soma-lightning export --ckpt {path} --out weights.safetensors` and pass that file"
    if path.is_dir():
        raise WeightsError(f"{FLAG}: {path} is a folder, not a safetensors file; for a checkpoint folder or run directory {export}")
    try:
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"  # torch.save's format, whatever the file's name
    except OSError:
        is_zip = False  # reading it as safetensors reports why
    if path.suffix == ".ckpt" or is_zip:
        raise WeightsError(f"{FLAG}: {path} is a checkpoint, not a safetensors file; {export} (to resume its run, use --ckpt_path)")


def read_weights(model: nn.Module, path: str | os.PathLike) -> tuple[dict[str, Tensor], str]:
    """The tensors of a safetensors file under the model's state-dict names, and the file's layout: "canonical"
    for SOMA V1's canonical file (its metadata says so, or its `final_norm.gamma` does: our LayerNorms name that
    `weight`), renamed and transposed the way `v1.canonical_state_dict` wrote them; "state_dict" for anything
    else, the keys as they are. A canonical file's recorded head count must be the model's."""
    # Imported here: the callbacks package pulls in the data modules and plotting, which SomaLM does not need.
    from soma_lightning.callbacks.safetensors_export import CANONICAL_SPEC_KEY, SPEC_KEY

    file = Path(path)
    if not file.exists():
        raise WeightsError(f"{FLAG}: {path} does not exist")
    _refuse_non_safetensors(file)
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{FLAG}: {path} is not a readable safetensors file ({' '.join(str(e).split())})") from None
    if SPEC_KEY in metadata or not (CANONICAL_SPEC_KEY in metadata or "final_norm.gamma" in tensors):
        return tensors, "state_dict"
    try:
        recorded = file_num_heads(file)
    except WeightsError as e:
        raise WeightsError(f"{FLAG}: {e}") from None
    if recorded is not None and v1_shape_problem(model) is None and (heads := model_size(model)[4]) != recorded:
        raise WeightsError(f"{FLAG}: {path} records {recorded} attention heads, the model has {heads}; set the mha mixer's num_heads to {recorded}")
    return from_canonical(model, tensors), "canonical"


def load_initial_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> WarmStart:
    """Load a safetensors file (`read_weights`) into the model. Strict: every tensor of the model's state dict
    must be in the file with its shape and the file must hold nothing else, else a one-line WeightsError names
    what differs. Not strict: the tensors whose name and shape match are loaded, the rest keep their
    initialisation, and one warning line says what was not loaded."""
    tensors, layout = read_weights(model, path)
    own = model.state_dict()
    fits = {key: key in tensors and tensors[key].shape == value.shape for key, value in own.items()}
    report = WarmStart(
        path=str(path),
        layout=layout,
        loaded=[key for key, fit in fits.items() if fit],
        missing=[key for key in own if key not in tensors],
        unexpected=[key for key in tensors if key not in own],
        misshaped=[(key, list(tensors[key].shape), list(value.shape)) for key, value in own.items() if key in tensors and not fits[key]],
    )
    if strict and not report.complete:
        raise WeightsError(f"{FLAG}: {path} does not fit the model: {report.differences()}; pass --model.init_weights_strict false to load what matches")
    # The comparison above is the check; what it let through loads as is.
    model.load_state_dict({key: tensors[key] for key in report.loaded}, strict=False)
    if report.complete:
        rank_zero_info(f"{FLAG}: loaded all {len(own)} tensors of {path} ({layout} layout)")
    else:
        rank_zero_warn(f"{FLAG}: loaded {len(report.loaded)} of the model's {len(own)} tensors from {path}; not loaded: {report.differences()}")
    return report
