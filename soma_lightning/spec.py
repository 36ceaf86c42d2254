"""The declarative model spec and the one place that turns it into an nn.Module.

A spec names its components by a short registered name (`type: mha`) or by `class_path` for a user's own
module. Every component is a factory `f(d_model, **args)`; mixers and FFNs are modules called as
`module(x, ctx)` with `ctx` a `SequenceContext`. The spec is checked, and the model built once on the meta
device, before any weight is allocated; every error names the YAML key path.
"""

import typing
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import torch

from soma_lightning.components import REGISTRY, Component, resolve_component
from soma_lightning.config_files import read_yaml
from soma_lightning.device_memory import check_fits
from soma_lightning.errors import SpecError
from soma_lightning.nn.low_rank import apply_low_rank
from soma_lightning.nn.model import Block, SomaModel, Sublayer, normal_init
from soma_lightning.nn.mtp import SequentialMTP
from soma_lightning.nn.protocols import default_name
from soma_lightning.spec_types import check_value
from soma_lightning.token_space import check_ranges
from soma_lightning.vocabulary import BYTES, DEFAULT_EOS_TOKEN, vocabulary

@dataclass
class ModelSpec:
    """The architecture: `blocks` maps a block name to its residual sublayers, run in order; layer i uses
    block `pattern[i % len(pattern)]` (default: the blocks in the order written). A sublayer is
    `{norm: <norm or null>, mixer|ffn|mtp: <component>, name: <module name, optional>}`; a component is a
    registered name, `{type: name, arg: value, ...}`, or `{class_path: pkg.Module, init_args: {...}}`. An
    `mtp` sublayer places multi-token-prediction heads at that point of the block (training only).
    `input_embeddings`: embedding components added to the token embedding (e.g. hashed_ngram, modality).
    `tokenizer`: what the token ids are: `bytes`, the V1 contract's byte ids 0-255 with PAD 256 and EOS 257
    (data_modules/contract.py), or a tokenizers JSON file, whose ids the data must hold (prepare with
    `--tokenizer`), with EOS its `eos_token` and PAD the first id past its ids (vocabulary.py).
    `eos_token`: the tokenizer file's token that ends every document (unused for bytes).
    `vocab_size`: holds every id the tokenizer emits, PAD and EOS: at least 258 for bytes.
    `vocab_ranges`: the token space per modality, `{name: [start, end)}`, PAD and EOS inside one of them;
    batches with ids outside every range are refused when they arrive.
    `mtp`: DeepSeek-V3-style sequential MTP modules after the last layer, `{horizons: H, block: <a block
    name>, loss_weight: w}`: depth k (1..H) runs its own copy of that block and predicts token t+1+k.
    `token_embedding`: replaces the plain token table (null) with a component that also receives the
    sequence context, e.g. SOSM's `semantic_state`, which builds the semantic graph there.
    `init_std`: null keeps each module's PyTorch default initialisation (as soma-models does); a number
    draws every Linear and Embedding weight from N(0, init_std) and zeroes their biases (GPT-2's scheme
    without its residual scaling), after the components' own initialisation.
    `low_rank`: `{rank: R, include: [glob, ...]}` replaces every nn.Linear whose module name matches a glob
    (e.g. `encoder.layers.*.attention.*`) with a rank-R factorisation (nn/low_rank.py)."""

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
    tokenizer: str = BYTES
    eos_token: str = DEFAULT_EOS_TOKEN
    low_rank: dict | None = None


# ---------------------------------------------------------------- the spec as a whole


def _check_fields(spec: ModelSpec, path: str) -> None:
    hints = typing.get_type_hints(ModelSpec)
    for f in fields(ModelSpec):
        check_value(f"{path}.{f.name}", getattr(spec, f.name), hints[f.name])
    for key in ("d_model", "n_layers", "vocab_size", "max_seq_len"):
        if getattr(spec, key) <= 0:
            raise SpecError(f"{path}.{key}: must be positive, got {getattr(spec, key)}")
    if spec.init_std is not None and spec.init_std <= 0:
        raise SpecError(f"{path}.init_std: must be positive or null, got {spec.init_std}")
    if not 0.0 <= spec.dropout < 1.0:
        raise SpecError(f"{path}.dropout: must be in [0, 1), got {spec.dropout}")
    if spec.low_rank is not None:
        _check_low_rank(spec.low_rank, f"{path}.low_rank")
    vocab = vocabulary(spec.tokenizer, spec.eos_token, f"{path}.tokenizer", SpecError)
    pad, eos = vocab.pad, vocab.eos
    specials = max(pad, eos) + 1
    if spec.vocab_size < specials:
        ids = "the byte ids 0-255" if vocab.is_bytes else f"the ids 0-{vocab.size - 1} of {spec.tokenizer}"
        raise SpecError(
            f"{path}.vocab_size: must be at least {specials} to hold {ids}, PAD {pad} and EOS {eos} "
            f"(every data module's batches hold them), got {spec.vocab_size}"
        )
    if spec.vocab_ranges is not None:
        try:
            check_ranges(spec.vocab_ranges, spec.vocab_size, f"{path}.vocab_ranges")
        except ValueError as e:
            raise SpecError(str(e)) from None
        for special in (pad, eos):
            if not any(start <= special < end for start, end in spec.vocab_ranges.values()):
                raise SpecError(f"{path}.vocab_ranges: PAD {pad} and EOS {eos} must lie in a declared range (e.g. specials: [{pad}, {pad + 8}]); {special} lies in none")


LOW_RANK_KEYS = {"rank": int, "include": list[str]}


def _check_low_rank(raw: dict[str, Any], path: str) -> None:
    for key, value in raw.items():
        if key not in LOW_RANK_KEYS:
            raise SpecError(f"{path}.{key}: unknown key; valid keys: {', '.join(LOW_RANK_KEYS)}")
        check_value(f"{path}.{key}", value, LOW_RANK_KEYS[key])
    for key in LOW_RANK_KEYS:
        if key not in raw:
            raise SpecError(f"{path}.{key}: missing key")
    if raw["rank"] < 1:
        raise SpecError(f"{path}.rank: must be at least 1, got {raw['rank']}")
    if not raw["include"]:
        raise SpecError(f"{path}.include: expected at least one glob of module names, e.g. 'encoder.layers.*.attention.*'")


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


BlockPlan = list[tuple[str, Component | None, Component]]


@dataclass
class _Plan:
    layers: list[BlockPlan]
    final_norm: Component
    input_embeddings: list[Component]
    token_embedding: Component | None
    mtp_blocks: list[BlockPlan]
    mtp_loss_weight: float


SEQUENTIAL_MTP_KEYS = {"horizons": int, "block": str, "loss_weight": float}


def _plan_sequential_mtp(raw: dict[str, Any], blocks: dict[str, BlockPlan], path: str) -> tuple[list[BlockPlan], float]:
    for key, value in raw.items():
        if key not in SEQUENTIAL_MTP_KEYS:
            raise SpecError(f"{path}.{key}: unknown key; valid keys: {', '.join(SEQUENTIAL_MTP_KEYS)}")
        check_value(f"{path}.{key}", value, SEQUENTIAL_MTP_KEYS[key])
    for key in ("horizons", "block"):
        if key not in raw:
            raise SpecError(f"{path}.{key}: missing key")
    if raw["horizons"] < 1:
        raise SpecError(f"{path}.horizons: must be at least 1, got {raw['horizons']}")
    if raw.get("loss_weight", 0.0) < 0:
        raise SpecError(f"{path}.loss_weight: must be non-negative, got {raw['loss_weight']}")
    if raw["block"] not in blocks:
        raise SpecError(f"{path}.block: unknown block {raw['block']!r}; valid: {', '.join(blocks)}")
    if any(comp.kind == "mtp" for _, _, comp in blocks[raw["block"]]):
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
            comp = resolve_component(kind, entry[kind], f"{spath}.{kind}", inherited)
            norm = None if entry["norm"] is None else resolve_component("norm", entry["norm"], f"{spath}.norm", inherited)
            name = entry.get("name") or default_name(comp.factory, kind)
            if not isinstance(name, str) or not name.isidentifier() or name == "drop" or name.startswith("norm_"):
                raise SpecError(f"{spath}.name: {name!r} is not a valid module name")
            if name in seen:
                raise SpecError(f"{spath}.name: {name!r} is used twice in block {block_name!r}; give each a distinct name")
            seen.add(name)
            resolved.append((name, norm, comp))
        blocks[block_name] = resolved
    layers = [blocks[pattern[i % len(pattern)]] for i in range(spec.n_layers)]
    embeddings = [resolve_component("embedding", e, f"{path}.input_embeddings[{i}]", inherited) for i, e in enumerate(spec.input_embeddings)]
    mtp_blocks, mtp_loss_weight = [], 0.0
    if spec.mtp is not None:
        mtp_blocks, mtp_loss_weight = _plan_sequential_mtp(spec.mtp, blocks, f"{path}.mtp")
    token_embedding = None
    if spec.token_embedding is not None:
        if spec.mtp is not None:
            raise SpecError(f"{path}.mtp: sequential MTP modules embed future tokens with the plain token table; drop token_embedding or mtp")
        token_embedding = resolve_component("token_embedding", spec.token_embedding, f"{path}.token_embedding", inherited)
    final_norm = resolve_component("norm", spec.final_norm, f"{path}.final_norm", inherited)
    return _Plan(layers, final_norm, embeddings, token_embedding, mtp_blocks, mtp_loss_weight)


def _assemble(spec: ModelSpec, plan: _Plan, path: str) -> SomaModel:
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
    if spec.low_rank is not None and not apply_low_rank(model, spec.low_rank["rank"], spec.low_rank["include"]):
        raise SpecError(
            f"{path}.low_rank.include: no nn.Linear module matches {spec.low_rank['include']}; names look like encoder.layers.0.attention.query"
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
        model = _assemble(spec, plan, path)
    target = torch.device(device or "cpu")
    if target.type == "meta":
        return model
    check_fits(model, target, path)
    with torch.device(target):
        return _assemble(spec, plan, path)


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
