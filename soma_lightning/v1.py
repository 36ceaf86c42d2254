"""SOMA V1 against the network's canonical scorer: canonical safetensors in and out, and the on-chain loss.

Canonical layout (contract section 5): LayerNorm weight/bias are `gamma`/`beta`, Linear weights are stored
transposed as (in, out), everything F32, exactly the V1 keys. The on-chain loss (section 4.3) is the Rust
`ModelRunner::eval`: contract chunks in batches of 16 in data order; for batch b, noise from soma-arrgen
with seed + b; CE summed over non-PAD targets divided by rows x S (PAD in the denominator); loss = CE +
0.02 SIGReg; loss and embedding (reps averaged over positions, then rows) are running means over batches.
"""

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from soma_lightning.data_modules.contract import PAD, tokenize
from soma_lightning.checkpoint_io import atomic_write, ordinary_mode
from soma_lightning.errors import UserError
from soma_lightning.nn.model import SomaModel
from soma_lightning.nn.sigreg import SIGRegConfig, sigreg_statistic
from soma_lightning.spec import ModelSpec, SpecError, build_model

# The registered V1 size (contract section 1): the network's scorer loads weights into this config only.
V1_D_MODEL, V1_N_LAYERS, V1_HIDDEN_DIM, V1_VOCAB_SIZE = 2048, 24, 8192, 264
V1_NUM_HEADS = 8
ONCHAIN_SIGREG = SIGRegConfig()  # 0.02, 256 slices, 17 points, t_max 3: fixed in ModelRunner::new


class WeightsError(UserError):
    pass


def v1_spec(
    d_model: int, n_layers: int, hidden_dim: int, num_heads: int = V1_NUM_HEADS, vocab_size: int = 264, dropout: float = 0.0, attention: str = "sdpa"
) -> ModelSpec:
    """The V1 architecture at the given size; `attention` is the mixer's impl ("sdpa" or "reference")."""
    return ModelSpec(
        d_model=d_model,
        n_layers=n_layers,
        vocab_size=vocab_size,
        dropout=dropout,
        blocks={
            "layer": [
                {"norm": "layernorm", "mixer": {"type": "mha", "num_heads": num_heads, "impl": attention}},
                {"norm": "layernorm", "ffn": {"type": "gelu_mlp", "hidden_dim": hidden_dim}},
            ]
        },
    )


def canonical_shapes(d_model: int, n_layers: int, hidden_dim: int, vocab_size: int = 264) -> dict[str, tuple[int, ...]]:
    """Every canonical key of a V1 model of this size and its shape."""
    d, ff = d_model, hidden_dim
    shapes = {"embedding.weight": (vocab_size, d), "final_norm.gamma": (d,), "final_norm.beta": (d,), "predictor.weight": (d, vocab_size), "predictor.bias": (vocab_size,)}
    for i in range(n_layers):
        p = f"encoder.layers.{i}"
        for norm in ("norm_1", "norm_2"):
            shapes[f"{p}.{norm}.gamma"] = shapes[f"{p}.{norm}.beta"] = (d,)
        for proj in ("query", "key", "value", "output"):
            shapes[f"{p}.attention.{proj}.weight"] = (d, d)
            shapes[f"{p}.attention.{proj}.bias"] = (d,)
        shapes[f"{p}.pwff.linear_inner.weight"], shapes[f"{p}.pwff.linear_inner.bias"] = (d, ff), (ff,)
        shapes[f"{p}.pwff.linear_outer.weight"], shapes[f"{p}.pwff.linear_outer.bias"] = (ff, d), (d,)
    return shapes


def _canonical_names(model: nn.Module) -> dict[str, tuple[str, bool]]:
    """torch state-dict key -> (canonical key, transposed?) for every parameter of the model."""
    names = {}
    for prefix, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if isinstance(module, nn.LayerNorm):
            names[f"{prefix}.weight"] = (f"{prefix}.gamma", False)
            names[f"{prefix}.bias"] = (f"{prefix}.beta", False)
        elif isinstance(module, nn.Linear):
            names[f"{prefix}.weight"] = (f"{prefix}.weight", True)
            names[f"{prefix}.bias"] = (f"{prefix}.bias", False)
        else:
            names.update({f"{prefix}.{n}": (f"{prefix}.{n}", False) for n in own})
    return names


def _v1_dims(model: SomaModel) -> tuple[int, int, int, int]:
    try:
        hidden_dim = model.encoder.layers[0].pwff.linear_inner.out_features
    except AttributeError:
        raise WeightsError("the model is not SOMA V1-shaped (no encoder.layers.0.pwff.linear_inner); the canonical layout is V1's only") from None
    return model.embedding.embedding_dim, len(model.encoder.layers), hidden_dim, model.embedding.num_embeddings


def canonical_state_dict(model: SomaModel, state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The model's weights (or `state`, a full state dict of it, e.g. gathered from FSDP2 shards) in the
    canonical V1 layout; WeightsError if the model is not V1-shaped."""
    names = _canonical_names(model)
    tensors = {}
    for key, value in (model.state_dict() if state is None else state).items():
        canonical, transposed = names.get(key, (key, False))
        tensors[canonical] = (value.t() if transposed else value).detach().to("cpu", torch.float32).contiguous()
    _check(tensors, canonical_shapes(*_v1_dims(model)), "model")
    return tensors


def _check(tensors: dict[str, Tensor], expected: dict[str, tuple[int, ...]], where: str) -> None:
    for key in sorted(expected):
        if key not in tensors:
            raise WeightsError(f"{where}: missing canonical key {key!r} (shape {list(expected[key])})")
    for key in sorted(tensors):
        if key not in expected:
            raise WeightsError(f"{where}: unexpected key {key!r}; a V1 file holds exactly {len(expected)} canonical keys")
        if tuple(tensors[key].shape) != expected[key]:
            raise WeightsError(f"{where}: {key!r} has shape {list(tensors[key].shape)}, expected {list(expected[key])}")
        if tensors[key].dtype != torch.float32:
            raise WeightsError(f"{where}: {key!r} has dtype {tensors[key].dtype}, expected F32")


def save_canonical(model: SomaModel, path: str | os.PathLike, state: dict[str, Tensor] | None = None) -> None:
    """Write the canonical safetensors file atomically (checkpoint_io.atomic_write)."""
    tensors = canonical_state_dict(model, state)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp))
        ordinary_mode(tmp)

    atomic_write(Path(path), write)


def read_canonical(path: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of a canonical V1 safetensors file, checked key by key against the V1 layout at the size
    its shapes give."""
    if not Path(path).is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None
    _check(tensors, canonical_shapes(*dims_of(tensors, str(path))), str(path))
    return tensors


def file_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Key -> shape of every tensor of a safetensors file, from its header alone (no tensor is read)."""
    if not Path(path).is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None


def dims_of(tensors: Mapping[str, Tensor | tuple[int, ...]], where: str) -> tuple[int, int, int, int]:
    """(d_model, n_layers, hidden_dim, vocab_size) read off canonical shapes: of tensors, or the shapes
    themselves (`file_shapes`)."""
    shapes = {key: tuple(value.shape) if isinstance(value, Tensor) else tuple(value) for key, value in tensors.items()}
    for key in ("embedding.weight", "encoder.layers.0.pwff.linear_inner.weight"):
        if len(shapes.get(key, ())) != 2:
            raise WeightsError(f"{where}: no 2-D {key!r}; not a SOMA V1 canonical file")
    vocab, d_model = shapes["embedding.weight"]
    n_layers = 0
    while f"encoder.layers.{n_layers}.norm_1.gamma" in shapes:
        n_layers += 1
    return d_model, n_layers, shapes["encoder.layers.0.pwff.linear_inner.weight"][1], vocab


Size = tuple[int, int, int, int, int]  # d_model, n_layers, hidden_dim, vocab_size, num_heads
REGISTERED_SIZE: Size = (V1_D_MODEL, V1_N_LAYERS, V1_HIDDEN_DIM, V1_VOCAB_SIZE, V1_NUM_HEADS)


def _describe(size: Size) -> str:
    d_model, n_layers, hidden_dim, vocab_size, num_heads = size
    return f"d_model {d_model}, {n_layers} layers, {num_heads} heads, hidden {hidden_dim}, vocab {vocab_size}"


def size_mismatch(size: Size) -> str | None:
    """None for the registered V1 size, the only one the network's scorer loads; otherwise what differs."""
    if tuple(size) == REGISTERED_SIZE:
        return None
    return f"{_describe(size)}, not the registered V1 size ({_describe(REGISTERED_SIZE)}) that the network's scorer loads"


def file_size(path: str | os.PathLike, num_heads: int) -> Size:
    """The size of a canonical file, from its header (no tensor is read); the head count is the caller's,
    as shapes cannot tell it."""
    return (*dims_of(file_shapes(path), str(path)), num_heads)


def model_size(model: SomaModel) -> Size:
    """(d_model, n_layers, hidden_dim, vocab_size, num_heads) of a V1-shaped model; WeightsError otherwise."""
    dims = _v1_dims(model)
    try:
        num_heads = model.encoder.layers[0].attention.num_heads
    except AttributeError:
        raise WeightsError("the model is not SOMA V1-shaped (no encoder.layers.0.attention with heads); the canonical layout is V1's only") from None
    return (*dims, num_heads)


def load_canonical(model: SomaModel, tensors: dict[str, Tensor], where: str = "weights") -> None:
    """Load canonical tensors into our V1 model, strictly."""
    _check(tensors, canonical_shapes(*_v1_dims(model)), where)
    state = {key: (tensors[c].t() if transposed else tensors[c]).contiguous() for key, (c, transposed) in _canonical_names(model).items()}
    model.load_state_dict(state, strict=True)


def model_from_canonical(path: str | os.PathLike, num_heads: int = V1_NUM_HEADS, device: str = "cpu", attention: str = "reference") -> SomaModel:
    """A V1 model in eval mode holding the file's weights. The default attention is the plain softmax
    reference, bitwise the reference scorer's arithmetic on CPU; "sdpa" is faster and agrees to ~1e-5."""
    tensors = read_canonical(path)
    d_model, n_layers, hidden_dim, vocab = dims_of(tensors, str(path))
    try:
        model = build_model(v1_spec(d_model, n_layers, hidden_dim, num_heads, vocab, attention=attention))
    except SpecError as e:  # the attention's own check of the head count, for d_model read from the file
        raise WeightsError(f"--num-heads {num_heads} with d_model {d_model} from {path}: {e}") from None
    load_canonical(model, tensors, str(path))
    return model.to(device).eval()


def check_device(device: str, flag: str = "--device") -> torch.device:
    """The torch device a `--device` argument names, refused (UserError) when it is not cpu or cuda[:N], or
    when that CUDA device is not there."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise UserError(f"{flag}: expected cpu, cuda or cuda:N, got {device!r}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{flag}: {device} asked for, but no CUDA device is available (torch {torch.__version__}); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UserError(f"{flag}: {device} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return parsed


def arrgen_noise(seed: int, d_model: int, slices: int = 256) -> Tensor:
    """The runtime's SIGReg noise: soma-arrgen's normal(seed, [D, slices], 0, 1) in row-major order."""
    import arrgen

    return torch.from_numpy(np.asarray(arrgen.normal_array(seed, [d_model, slices], 0.0, 1.0), dtype=np.float32))


def target_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """Per-position NLL [B, T] in float32, zero where the target is PAD."""
    return F.cross_entropy(logits.transpose(1, 2).float(), targets, ignore_index=PAD, reduction="none")


def onchain_batch_loss(nll: Tensor, sigreg_raw: Tensor) -> Tensor:
    """One batch's on-chain loss: NLL summed over non-PAD targets / (rows x S), plus 0.02 x raw SIGReg."""
    return nll.sum() / nll.numel() + ONCHAIN_SIGREG.coefficient * sigreg_raw


@dataclass
class Score:
    loss: float
    ce: float
    sigreg: float
    n_tokens: int
    n_batches: int
    embedding_norm: float


@torch.no_grad()
def score(model: SomaModel, data: bytes, seed: int = 0, batch_size: int = 16, seq_len: int = 1024, autocast_dtype: torch.dtype | None = None) -> tuple[Score, Tensor]:
    """The canonical scorer's loss and embedding of `data` (running means over batches, as ModelRunner::eval).
    `ce` and `sigreg` (raw, before the 0.02) are running means of their per-batch values too."""
    rows = tokenize(data, seq_len)
    if len(rows["tokens"]) == 0:
        raise UserError("--data: no data to score (0 bytes); the canonical scorer fails with EmptyData")
    device = next(model.parameters()).device
    d_model = model.embedding.embedding_dim
    means = torch.zeros(3, dtype=torch.float32)
    embedding = torch.zeros(d_model, dtype=torch.float32)
    n_batches = 0
    for b, start in enumerate(range(0, len(rows["tokens"]), batch_size)):
        batch = {k: v[start : start + batch_size].to(device) for k, v in rows.items()}
        with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            reps = model.encode(batch["tokens"], batch["positions"])
            logits = model.predict(reps)
        nll = target_nll(logits, batch["targets"])
        sig = sigreg_statistic(reps, arrgen_noise(seed + b, d_model).to(device))
        values = torch.stack([onchain_batch_loss(nll, sig), nll.sum() / nll.numel(), sig]).float().cpu()
        n_batches += 1
        means += (values - means) / n_batches
        embedding += (reps.float().mean(dim=1).mean(dim=0).cpu() - embedding) / n_batches
    n_tokens = int((rows["targets"] != PAD).sum())
    loss, ce, sig = means.tolist()
    return Score(loss, ce, sig, n_tokens, n_batches, float(embedding.norm())), embedding
