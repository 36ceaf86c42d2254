"""The declarative model spec and the one place that turns it into an nn.Module.

A spec names its components by a short registered name (`type: mha`) or by `class_path` for a user's own
module. Every component is a factory `f(d_model, **args)`; mixers and FFNs are modules called as
`module(x, ctx)` with `ctx` a `SequenceContext`. The spec is checked, and the model built once on the meta
device, before any weight is allocated; every error names the YAML key path.
"""

import importlib
import inspect
import os
import re
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, Iterable, Literal, Union

import torch
import yaml

from soma_lightning.errors import UserError
from soma_lightning.nn.attention import MultiHeadAttention
from soma_lightning.nn.embedding import HashedNgramEmbedding, ModalityEmbedding
from soma_lightning.nn.ffn import GeluMLP
from soma_lightning.nn.gated_deltanet import GatedDeltaNet
from soma_lightning.nn.gqa import GroupedQueryAttention
from soma_lightning.nn.graph_attention import GraphAttention
from soma_lightning.nn.model import Block, SomaModel, Sublayer, normal_init
from soma_lightning.nn.moe import MoE
from soma_lightning.nn.mtp import MTPHeads, SequentialMTP
from soma_lightning.nn.norm import layernorm, rmsnorm
from soma_lightning.nn.semantic_state import SemanticStateEmbedding
from soma_lightning.token_space import check_ranges

REGISTRY: dict[str, dict[str, Callable[..., torch.nn.Module]]] = {
    "mixer": {"mha": MultiHeadAttention, "gqa": GroupedQueryAttention, "gated_deltanet": GatedDeltaNet, "graph_attention": GraphAttention},
    "ffn": {"gelu_mlp": GeluMLP, "moe": MoE},
    "norm": {"layernorm": layernorm, "rmsnorm": rmsnorm},
    "embedding": {"hashed_ngram": HashedNgramEmbedding, "modality": ModalityEmbedding},
    "mtp": {"mtp_heads": MTPHeads},
    "token_embedding": {"semantic_state": SemanticStateEmbedding},
}

# Arguments a component receives from the model level unless its own spec sets them.
INHERITED = ("d_model", "dropout", "vocab_ranges", "vocab_size")


class SpecError(UserError, ValueError):
    """A spec mistake; the message starts with the YAML key path."""


def register(kind: Literal["mixer", "ffn", "norm", "embedding", "mtp", "token_embedding"], name: str, factory: Callable[..., torch.nn.Module]) -> None:
    """Make `factory` available to specs as `{kind}: {type: name, ...}`."""
    REGISTRY[kind][name] = factory


@dataclass
class ModelSpec:
    """The architecture: `blocks` maps a block name to its residual sublayers, run in order; layer i uses
    block `pattern[i % len(pattern)]` (default: the blocks in the order written). A sublayer is
    `{norm: <norm or null>, mixer|ffn|mtp: <component>, name: <module name, optional>}`; a component is a
    registered name, `{type: name, arg: value, ...}`, or `{class_path: pkg.Module, init_args: {...}}`. An
    `mtp` sublayer places multi-token-prediction heads at that point of the block (training only).
    `input_embeddings`: embedding components added to the token embedding (e.g. hashed_ngram, modality).
    `vocab_size`: at least 258, the byte ids 0-255 with PAD 256 and EOS 257 (data_modules/contract.py).
    `vocab_ranges`: the token space per modality, `{name: [start, end)}`, PAD and EOS inside one of them;
    batches with ids outside every range are refused when they arrive.
    `mtp`: DeepSeek-V3-style sequential MTP modules after the last layer, `{horizons: H, block: <a block
    name>, loss_weight: w}`: depth k (1..H) runs its own copy of that block and predicts token t+1+k.
    `token_embedding`: replaces the plain token table (null) with a component that also receives the
    sequence context, e.g. SOSM's `semantic_state`, which builds the semantic graph there.
    `init_std`: null keeps each module's PyTorch default initialisation (as soma-models does); a number
    draws every Linear and Embedding weight from N(0, init_std) and zeroes their biases (GPT-2's scheme
    without its residual scaling), after the components' own initialisation."""

    # Mappings that hold components are plain `dict`, not `dict[str, Any]`: jsonargparse (the CLI) parses a
    # `{class_path: ..., init_args: ...}` value of an `Any` as its own subclass spec, while a plain dict's
    # values are left as written for _plan to resolve.
    d_model: int
    n_layers: int
    blocks: dict[str, list[dict]]
    pattern: list[str] | None = None
    vocab_size: int = 264
    max_seq_len: int = 1024
    dropout: float = 0.0
    final_norm: str | dict = "layernorm"
    predictor_bias: bool = True
    input_embeddings: list[str | dict] = field(default_factory=list)
    vocab_ranges: dict[str, list[int]] | None = None
    mtp: dict | None = None
    token_embedding: str | dict | None = None
    init_std: float | None = None


# ---------------------------------------------------------------- type checks with readable errors


def _describe(ann: Any) -> str:
    origin = typing.get_origin(ann)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(ann))
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(ann))
    if ann is type(None):
        return "null"
    if origin is not None:
        return getattr(origin, "__name__", str(ann))
    return getattr(ann, "__name__", str(ann))


def _type_ok(value: Any, ann: Any) -> bool:
    origin = typing.get_origin(ann)
    if ann is Any or ann is inspect.Parameter.empty:
        return True
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(ann))
    if origin is Literal:
        return value in typing.get_args(ann)
    if ann is type(None):
        return value is None
    if ann is bool:
        return isinstance(value, bool)
    if ann is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if ann is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple):
        (item,) = typing.get_args(ann)[:1] or (Any,)
        return isinstance(value, (list, tuple)) and all(_type_ok(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if isinstance(ann, type):
        return isinstance(value, ann)
    return True


def _check_value(path: str, value: Any, ann: Any) -> None:
    if not _type_ok(value, ann):
        raise SpecError(f"{path}: expected {_describe(ann)}, got {value!r}")


# ---------------------------------------------------------------- components


def _import(class_path: str, path: str) -> Callable[..., torch.nn.Module]:
    module_name, _, attr = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise SpecError(f"{path}.class_path: cannot import {class_path!r} ({e})") from None


def _parameters(factory: Callable[..., Any]) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    target = factory.__init__ if inspect.isclass(factory) else factory
    sig = inspect.signature(target)
    try:
        hints = typing.get_type_hints(target)
    except Exception:
        hints = {}
    params = {
        n: p for n, p in sig.parameters.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    takes_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    return params, hints, takes_any


@dataclass
class _Component:
    path: str
    factory: Callable[..., torch.nn.Module]
    args: dict[str, Any]

    def build(self) -> torch.nn.Module:
        try:
            return self.factory(**self.args)
        except (ValueError, TypeError) as e:
            msg = str(e)
            arg = msg.split(":", 1)[0]
            raise SpecError(f"{self.path}.{msg}" if arg in self.args else f"{self.path}: {msg}") from None


def _component(kind: str, raw: Any, path: str, inherited: dict[str, Any]) -> _Component:
    table = REGISTRY[kind]
    choices = ", ".join(sorted(table))
    if isinstance(raw, str):
        raw = {"type": raw}
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a {kind} name ({choices}) or a mapping with 'type' or 'class_path', got {raw!r}")
    if "class_path" in raw:
        extra = set(raw) - {"class_path", "init_args"}
        if extra:
            raise SpecError(f"{path}.{sorted(extra)[0]}: unknown key beside class_path; put arguments under init_args")
        factory = _import(raw["class_path"], path)
        args, args_path, label = dict(raw.get("init_args") or {}), f"{path}.init_args", raw["class_path"]
    elif "type" in raw:
        name = raw["type"]
        if name not in table:
            raise SpecError(f"{path}.type: unknown {kind} {name!r}; valid: {choices} (or class_path: pkg.YourModule)")
        factory = table[name]
        args, args_path, label = {k: v for k, v in raw.items() if k != "type"}, path, name
    else:
        raise SpecError(f"{path}: missing key 'type' (a {kind}: {choices}) or 'class_path'")

    params, hints, takes_any = _parameters(factory)
    for key, value in args.items():
        if key in INHERITED:
            raise SpecError(f"{args_path}.{key}: set at the model level (model.arch.{key}), not per component")
        if key not in params and not takes_any:
            valid = ", ".join(n for n in params if n not in INHERITED) or "none"
            raise SpecError(f"{args_path}.{key}: unknown argument of {kind} {label!r}; valid: {valid}")
        if key in params:
            _check_value(f"{args_path}.{key}", value, hints.get(key, params[key].annotation))
    for key, value in inherited.items():
        if key in params:
            args[key] = value
    for key, p in params.items():
        if key not in args and p.default is inspect.Parameter.empty:
            raise SpecError(f"{args_path}.{key}: missing required argument of {kind} {label!r}")
    return _Component(args_path if "class_path" in raw else path, factory, args)


# ---------------------------------------------------------------- the spec as a whole


def _check_fields(spec: ModelSpec, path: str) -> None:
    hints = typing.get_type_hints(ModelSpec)
    for f in fields(ModelSpec):
        _check_value(f"{path}.{f.name}", getattr(spec, f.name), hints[f.name])
    for key in ("d_model", "n_layers", "vocab_size", "max_seq_len"):
        if getattr(spec, key) <= 0:
            raise SpecError(f"{path}.{key}: must be positive, got {getattr(spec, key)}")
    if spec.init_std is not None and spec.init_std <= 0:
        raise SpecError(f"{path}.init_std: must be positive or null, got {spec.init_std}")
    if not 0.0 <= spec.dropout < 1.0:
        raise SpecError(f"{path}.dropout: must be in [0, 1), got {spec.dropout}")
    # Imported here: soma_lightning.data_modules imports this module.
    from soma_lightning.data_modules.contract import EOS, PAD

    specials = max(PAD, EOS) + 1
    if spec.vocab_size < specials:
        raise SpecError(
            f"{path}.vocab_size: must be at least {specials} to hold the byte ids 0-255, PAD {PAD} and EOS {EOS} "
            f"(every data module's batches hold them), got {spec.vocab_size}"
        )
    if spec.vocab_ranges is not None:
        try:
            check_ranges(spec.vocab_ranges, spec.vocab_size, f"{path}.vocab_ranges")
        except ValueError as e:
            raise SpecError(str(e)) from None
        for special in (PAD, EOS):
            if not any(start <= special < end for start, end in spec.vocab_ranges.values()):
                raise SpecError(f"{path}.vocab_ranges: PAD {PAD} and EOS {EOS} must lie in a declared range (e.g. specials: [256, 264]); {special} lies in none")


def spec_from_dict(raw: Any, path: str = "model.arch") -> ModelSpec:
    """A ModelSpec from a plain mapping (as read from YAML), with errors naming the key path."""
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: expected a mapping of the model spec, got {raw!r}")
    names = [f.name for f in fields(ModelSpec)]
    for key in raw:
        if key not in names:
            raise SpecError(f"{path}.{key}: unknown key; valid keys: {', '.join(names)}")
    for f in fields(ModelSpec):
        if f.default is MISSING and f.default_factory is MISSING and f.name not in raw:
            raise SpecError(f"{path}.{f.name}: missing required key")
    spec = ModelSpec(**raw)
    _check_fields(spec, path)
    return spec


BlockPlan = list[tuple[str, _Component | None, _Component]]


@dataclass
class _Plan:
    layers: list[BlockPlan]
    final_norm: _Component
    input_embeddings: list[_Component]
    token_embedding: _Component | None
    mtp_blocks: list[BlockPlan]
    mtp_loss_weight: float


SEQUENTIAL_MTP_KEYS = {"horizons": int, "block": str, "loss_weight": float}


def _plan_sequential_mtp(raw: dict[str, Any], blocks: dict[str, BlockPlan], path: str) -> tuple[list[BlockPlan], float]:
    for key, value in raw.items():
        if key not in SEQUENTIAL_MTP_KEYS:
            raise SpecError(f"{path}.{key}: unknown key; valid keys: {', '.join(SEQUENTIAL_MTP_KEYS)}")
        _check_value(f"{path}.{key}", value, SEQUENTIAL_MTP_KEYS[key])
    for key in ("horizons", "block"):
        if key not in raw:
            raise SpecError(f"{path}.{key}: missing key")
    if raw["horizons"] < 1:
        raise SpecError(f"{path}.horizons: must be at least 1, got {raw['horizons']}")
    if raw.get("loss_weight", 0.0) < 0:
        raise SpecError(f"{path}.loss_weight: must be non-negative, got {raw['loss_weight']}")
    if raw["block"] not in blocks:
        raise SpecError(f"{path}.block: unknown block {raw['block']!r}; valid: {', '.join(blocks)}")
    if any(comp.factory is MTPHeads for _, _, comp in blocks[raw["block"]]):
        raise SpecError(f"{path}.block: block {raw['block']!r} has MTP heads of its own; name a block without them")
    return [blocks[raw["block"]]] * raw["horizons"], float(raw.get("loss_weight", 0.3))


def _plan(spec: ModelSpec, path: str) -> _Plan:
    """Resolve every component of every layer; raises SpecError before anything is built."""
    _check_fields(spec, path)
    if not spec.blocks:
        raise SpecError(f"{path}.blocks: needs at least one block")
    pattern = spec.pattern if spec.pattern is not None else list(spec.blocks)
    if not pattern:
        raise SpecError(f"{path}.pattern: must name at least one block")
    for i, name in enumerate(pattern):
        if name not in spec.blocks:
            raise SpecError(f"{path}.pattern[{i}]: unknown block {name!r}; valid: {', '.join(spec.blocks)}")
    inherited = {"d_model": spec.d_model, "dropout": spec.dropout, "vocab_ranges": spec.vocab_ranges, "vocab_size": spec.vocab_size}
    blocks = {}
    for block_name, sublayers in spec.blocks.items():
        bpath = f"{path}.blocks.{block_name}"
        if not isinstance(sublayers, list) or not sublayers:
            raise SpecError(f"{bpath}: expected a non-empty list of sublayers, got {sublayers!r}")
        resolved, seen = [], set()
        for k, entry in enumerate(sublayers):
            spath = f"{bpath}[{k}]"
            if not isinstance(entry, dict):
                raise SpecError(f"{spath}: expected a mapping with 'norm' and one of 'mixer', 'ffn', 'mtp', got {entry!r}")
            for key in entry:
                if key not in ("norm", "mixer", "ffn", "mtp", "name"):
                    raise SpecError(f"{spath}.{key}: unknown key; valid keys: norm, mixer, ffn, mtp, name")
            kinds = [key for key in ("mixer", "ffn", "mtp") if key in entry]
            if len(kinds) != 1:
                raise SpecError(f"{spath}: needs exactly one of 'mixer', 'ffn' or 'mtp', got {kinds or 'none'}")
            if "norm" not in entry:
                raise SpecError(f"{spath}.norm: missing key (a norm: {', '.join(sorted(REGISTRY['norm']))}, or null)")
            kind = kinds[0]
            comp = _component(kind, entry[kind], f"{spath}.{kind}", inherited)
            norm = None if entry["norm"] is None else _component("norm", entry["norm"], f"{spath}.norm", inherited)
            name = entry.get("name") or getattr(comp.factory, "default_name", kind)
            if not isinstance(name, str) or not name.isidentifier() or name == "drop" or name.startswith("norm_"):
                raise SpecError(f"{spath}.name: {name!r} is not a valid module name")
            if name in seen:
                raise SpecError(f"{spath}.name: {name!r} is used twice in block {block_name!r}; give each a distinct name")
            seen.add(name)
            resolved.append((name, norm, comp))
        blocks[block_name] = resolved
    layers = [blocks[pattern[i % len(pattern)]] for i in range(spec.n_layers)]
    embeddings = [_component("embedding", e, f"{path}.input_embeddings[{i}]", inherited) for i, e in enumerate(spec.input_embeddings)]
    mtp_blocks, mtp_loss_weight = [], 0.0
    if spec.mtp is not None:
        mtp_blocks, mtp_loss_weight = _plan_sequential_mtp(spec.mtp, blocks, f"{path}.mtp")
    token_embedding = None
    if spec.token_embedding is not None:
        if spec.mtp is not None:
            raise SpecError(f"{path}.mtp: sequential MTP modules embed future tokens with the plain token table; drop token_embedding or mtp")
        token_embedding = _component("token_embedding", spec.token_embedding, f"{path}.token_embedding", inherited)
    final_norm = _component("norm", spec.final_norm, f"{path}.final_norm", inherited)
    return _Plan(layers, final_norm, embeddings, token_embedding, mtp_blocks, mtp_loss_weight)


def _assemble(spec: ModelSpec, plan: _Plan) -> SomaModel:
    def block(layer: BlockPlan) -> Block:
        return Block([Sublayer(name, comp.build(), norm.build() if norm else None) for name, norm, comp in layer], spec.dropout)

    mtp = None
    if plan.mtp_blocks:
        mtp = SequentialMTP(spec.d_model, [block(b) for b in plan.mtp_blocks], plan.final_norm.build, plan.mtp_loss_weight)
    embeddings = [e.build() for e in plan.input_embeddings]
    token_embedding = plan.token_embedding.build() if plan.token_embedding else None
    model = SomaModel(
        spec.vocab_size, spec.d_model, [block(layer) for layer in plan.layers], plan.final_norm.build(), spec.predictor_bias, embeddings, mtp,
        token_embedding,
    )
    if spec.init_std is not None:
        normal_init(model, spec.init_std)
    return model


def build_model(spec: ModelSpec | dict, device: str | torch.device | None = None, path: str = "model.arch") -> SomaModel:
    """Build the model a spec describes. It is validated and built on the meta device first, so a bad spec
    fails before any weight is allocated; `device="meta"` returns that weightless model."""
    if isinstance(spec, dict):
        spec = spec_from_dict(spec, path)
    plan = _plan(spec, path)
    with torch.device("meta"):
        model = _assemble(spec, plan)
    target = torch.device(device or "cpu")
    if target.type == "meta":
        return model
    _check_fits(model, target, path)
    with torch.device(target):
        return _assemble(spec, plan)


def _available_memory(device: torch.device) -> int | None:
    """Bytes that can be allocated now on `device` (cpu or cuda), or None where that is unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] if torch.cuda.is_available() else None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def _check_fits(model: SomaModel, device: torch.device, path: str) -> None:
    """A SpecError, before any weight is allocated, when the weights alone exceed the memory available on `device`."""
    dtype = torch.get_default_dtype()
    count = sum(p.numel() for p in model.parameters())
    needed = count * dtype.itemsize
    available = _available_memory(device)
    if available is not None and needed > available:
        raise SpecError(
            f"{path}: the model has {count:,} parameters, {needed:,} bytes ({needed / 2**30:,.1f} GiB) of {str(dtype).removeprefix('torch.')} "
            f"weights, more than the {available:,} bytes ({available / 2**30:,.1f} GiB) available on {device}"
        )


class _SpecLoader(yaml.SafeLoader):
    """YAML 1.2 floats: `1e-5` is a float, not the string PyYAML's YAML 1.1 rules make it."""


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def read_yaml(path: str) -> Any:
    try:
        with open(path) as f:
            return yaml.load(f, Loader=_SpecLoader)
    except OSError as e:
        raise SpecError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise SpecError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None


def load_spec(path: str) -> ModelSpec:
    """The model spec (`model.arch`) of a YAML config file, fully validated (built once on the meta device)."""
    raw = read_yaml(path)
    arch = raw.get("model", {}).get("arch") if isinstance(raw, dict) and isinstance(raw.get("model"), dict) else None
    if arch is None:
        raise SpecError(f"{path}: model.arch: missing key (the model spec)")
    try:
        spec = spec_from_dict(arch, "model.arch")
        build_model(spec, device="meta")
        return spec
    except SpecError as e:
        raise SpecError(f"{path}: {e}") from None


def _holds_nothing(value: Any) -> bool:
    return isinstance(value, dict) and all(_holds_nothing(v) for v in value.values())


def check_config_keys(path: str, dests: Iterable[str]) -> None:
    """A SpecError naming the first key of the config file `path` that the command does not take; `dests` are
    the dotted names of its arguments. jsonargparse reports such keys itself, except one whose value is a
    mapping with nothing in it (`modle: {arch: {}}`): that one it drops without a word."""
    values = {d for d in dests if d.rsplit(".", 1)[-1] != "help"}
    branches = {d.rsplit(".", k)[0] for d in values for k in range(1, d.count(".") + 1)}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if name in branches and isinstance(value, dict):
                walk(value, name + ".")
            elif name not in values and name not in branches and _holds_nothing(value):
                valid = sorted({n.removeprefix(prefix).split(".")[0] for n in values if n.startswith(prefix)})
                raise SpecError(f"{path}: {name}: unknown key; valid keys{' under ' + prefix[:-1] if prefix else ''}: {', '.join(valid)}")

    raw = read_yaml(path)
    if isinstance(raw, dict):
        walk(raw, "")
