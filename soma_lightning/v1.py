"""SOMA V1 as the network stores it: canonical safetensors in and out, the registered size, and V1 models
built from files (the on-chain loss is onchain.py).

Canonical layout (contract section 5): LayerNorm weight/bias are `gamma`/`beta`, Linear weights are stored
transposed as (in, out), everything F32, exactly the V1 keys.
"""

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from soma_lightning.checkpoint_io import atomic_write, ordinary_mode
from soma_lightning.errors import UserError
from soma_lightning.nn.attention import MultiHeadAttention
from soma_lightning.nn.ffn import GeluMLP
from soma_lightning.nn.model import SomaModel
from soma_lightning.components import REGISTRY
from soma_lightning.spec import ModelSpec, SpecError, build_model

# The registered V1 size (contract section 1): the network's scorer loads weights into this config only.
V1_D_MODEL, V1_N_LAYERS, V1_HIDDEN_DIM, V1_VOCAB_SIZE = 2048, 24, 8192, 264
V1_NUM_HEADS = 8
# The head count, in the str -> str metadata of the safetensors header that soma-lightning's exports write
# (the shapes cannot tell it). The network's loaders read the tensors only; files from elsewhere (soma-models'
# Model.save) carry no metadata.
NUM_HEADS_KEY = "num_heads"
# What the canonical layout can hold (contract section 5), for refusals of other models.
CANONICAL_HOLDS = (
    "a plain token table, pre-norm LayerNorm layers of multi-head attention (mha) and a GELU MLP (gelu_mlp), "
    "a final LayerNorm and a biased predictor"
)


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


def _component_name(module: nn.Module, kind: str) -> str:
    """The spec name of a built component (`semantic_state`, `gqa`, ...), else its class name."""
    for name, factory in REGISTRY.get(kind, {}).items():
        if isinstance(factory, type) and type(module) is factory:
            return name
    return type(module).__name__


def v1_shape_problem(model: SomaModel) -> str | None:
    """What the model has that the canonical V1 layout cannot hold, in words ("the model has a semantic_state
    token embedding"); None when its structure is V1's (sizes and keys are checked by `canonical_state_dict`)."""
    if not isinstance(model.embedding, nn.Embedding):
        return f"the model has a {_component_name(model.embedding, 'token_embedding')} token embedding"
    if len(model.input_embeddings):
        return f"the model has input embeddings ({', '.join(_component_name(e, 'embedding') for e in model.input_embeddings)})"
    if model.mtp is not None:
        return "the model has multi-token-prediction heads (model.arch.mtp)"
    for i, layer in enumerate(model.encoder.layers):
        order = list(layer.order)
        if len(order) != 2:
            return f"layer {i} has {len(order)} sublayers, not attention and pwff"
        (norm_1, mixer), (norm_2, ffn) = order
        kinds = ((mixer, "attention", MultiHeadAttention, "mixer", "mixer"), (ffn, "pwff", GeluMLP, "ffn", "feed-forward"))
        for name, canonical, cls, kind, what in kinds:
            module = layer.get_submodule(name)
            if not isinstance(module, cls):
                return f"layer {i} has a {_component_name(module, kind)} {what}"
            if name != canonical:
                return f"layer {i} names its {what} {name!r}, not {canonical!r}"
        for norm, which in ((norm_1, "attention"), (norm_2, "pwff")):
            if norm is None or not isinstance(layer.get_submodule(norm), nn.LayerNorm):
                return f"layer {i} has {'no norm' if norm is None else 'a ' + type(layer.get_submodule(norm)).__name__} before its {which}, not a LayerNorm"
    if not isinstance(model.final_norm, nn.LayerNorm):
        return f"the model's final norm is {type(model.final_norm).__name__}, not a LayerNorm"
    return None


def _v1_dims(model: SomaModel) -> tuple[int, int, int, int]:
    if problem := v1_shape_problem(model):
        raise WeightsError(f"the model is not SOMA V1-shaped: {problem}; the canonical layout holds only {CANONICAL_HOLDS}")
    hidden_dim = model.encoder.layers[0].pwff.linear_inner.out_features
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


def save_canonical(model: SomaModel, path: str | os.PathLike, state: dict[str, Tensor] | None = None, metadata: dict[str, str] | None = None) -> None:
    """Write the canonical safetensors file atomically (checkpoint_io.atomic_write), mode 0666 less the umask.
    Without `metadata` the file is byte for byte what soma-models' `Model.save` writes for these weights;
    `metadata` (str -> str, e.g. `canonical_metadata(model)`) goes into the header and leaves the tensors
    as they are."""
    tensors = canonical_state_dict(model, state)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata)
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


def file_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The str -> str metadata of a safetensors file's header ({} when it has none); no tensor is read."""
    if not Path(path).is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({e})") from None


def file_num_heads(path: str | os.PathLike) -> int | None:
    """The head count a canonical file records in its metadata (soma-lightning's exports do); None when it
    records none (files written elsewhere, e.g. by soma-models)."""
    value = file_metadata(path).get(NUM_HEADS_KEY)
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()) or int(value) <= 0:
        raise WeightsError(f"{path}: its metadata {NUM_HEADS_KEY}={value!r} is not a positive number of heads")
    return int(value)


def resolve_num_heads(path: str | os.PathLike, num_heads: int | None = None, flag: str = "--num_heads") -> int:
    """The head count to load `path` with: `num_heads` (the user's `flag`) when given, else the file's
    metadata, else V1_NUM_HEADS (8). A `num_heads` that contradicts the metadata is refused (WeightsError,
    one line naming the file and both numbers)."""
    recorded = file_num_heads(path)
    if num_heads is None:
        return V1_NUM_HEADS if recorded is None else recorded
    if recorded is not None and num_heads != recorded:
        raise WeightsError(f"{flag} {num_heads} contradicts {path}, whose metadata records {recorded} heads; drop {flag} or pass {recorded}")
    return num_heads


def canonical_metadata(model: SomaModel) -> dict[str, str]:
    """The metadata soma-lightning writes into a canonical file: the model's head count (NUM_HEADS_KEY)."""
    return {NUM_HEADS_KEY: str(model_size(model)[4])}


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


def file_size(path: str | os.PathLike, num_heads: int | None = None) -> Size:
    """The size of a canonical file, from its header (no tensor is read); the head count, which shapes cannot
    tell, is `resolve_num_heads(path, num_heads)`."""
    return (*dims_of(file_shapes(path), str(path)), resolve_num_heads(path, num_heads))


def model_size(model: SomaModel) -> Size:
    """(d_model, n_layers, hidden_dim, vocab_size, num_heads) of a V1-shaped model; WeightsError otherwise."""
    dims = _v1_dims(model)  # refuses any other structure, naming it (v1_shape_problem)
    return (*dims, model.encoder.layers[0].attention.num_heads)


def from_canonical(model: nn.Module, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Canonical tensors under the model's state-dict names, Linear weights transposed back (the inverse of
    `canonical_state_dict`'s renaming); a key the model has no place for keeps its name, and a tensor that
    cannot be a Linear weight (not 2-D) is left as it is for the shape check to report."""
    to_model = {canonical: (key, transposed) for key, (canonical, transposed) in _canonical_names(model).items()}
    renamed = {}
    for name, tensor in tensors.items():
        key, transposed = to_model.get(name, (name, False))
        renamed[key] = tensor.t() if transposed and tensor.dim() == 2 else tensor
    return renamed


def load_canonical(model: SomaModel, tensors: dict[str, Tensor], where: str = "weights") -> None:
    """Load canonical tensors into our V1 model, strictly."""
    _check(tensors, canonical_shapes(*_v1_dims(model)), where)
    model.load_state_dict(from_canonical(model, tensors), strict=True)


def model_from_canonical(path: str | os.PathLike, num_heads: int | None = None, device: str = "cpu", attention: str = "reference") -> SomaModel:
    """A V1 model in eval mode holding the file's weights. `num_heads` None: the head count the file's
    metadata records, else V1_NUM_HEADS; one that contradicts the metadata is refused (`resolve_num_heads`).
    The default attention is the plain softmax reference, bitwise the reference scorer's arithmetic on CPU;
    "sdpa" is faster and agrees to ~1e-5."""
    num_heads = resolve_num_heads(path, num_heads)
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
