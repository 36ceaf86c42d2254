"""Hugging Face transformers format for V1-shaped models: a GPT-NeoX directory (config.json + model.safetensors)
out, and back in bitwise.

A V1 layer is a GPT-NeoX layer with `use_parallel_residual: false`: pre-norm LayerNorm, rotary embedding on the
whole head, exact (erf) GELU MLP, biased projections. nn/rope.py rotates split halves as NeoX's `rotate_half`
does, with the same frequencies, so q and k need no permutation. What differs is how the tensors are stored:

  * q, k and v are fused into NeoX's `attention.query_key_value`, head by head: rows [q_h; k_h; v_h] for each
    head h (its forward views the output as [heads, 3 * head_dim] and splits each head's slice in three);
  * NeoX's output layer (`embed_out`; transformers 5 renames it `lm_head` on load) has no bias: a predictor
    bias of zeros, or none, is exact; a non-zero one cannot be written and is refused;
  * a bias a model was built without (`bias: false`) is written as zeros, which is exact.

Dropout is not carried (the config says 0): NeoX also drops the embeddings and has no dropout inside the MLP.
Writing and reading the directory needs no transformers; `to_transformers` (a live model) does (extra `hf`).
Reading never unpickles: config.json is parsed as JSON and the weights must be safetensors.
"""

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from soma_lightning.checkpoint_io import atomic_write, ordinary_mode
from soma_lightning.errors import SpecError, UserError
from soma_lightning.lm import SomaLM
from soma_lightning.nn.model import SomaModel
from soma_lightning.spec import ModelSpec
from soma_lightning.v1 import v1_shape_problem, v1_spec
from soma_lightning.vocabulary import BYTE_VOCABULARY, Vocabulary

CONFIG, WEIGHTS, WEIGHTS_INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
EMBEDDING, HEAD, HEAD_V5 = "gpt_neox.embed_in.weight", "embed_out.weight", "lm_head.weight"
# Our module inside encoder.layers.i -> NeoX's inside gpt_neox.layers.i, for those stored as weight and bias alike.
LAYER_MODULES = {
    "norm_1": "input_layernorm",
    "attention.output": "attention.dense",
    "norm_2": "post_attention_layernorm",
    "pwff.linear_inner": "mlp.dense_h_to_4h",
    "pwff.linear_outer": "mlp.dense_4h_to_h",
}
V1_ONLY = (
    "the Hugging Face (GPT-NeoX) format covers V1-shaped models only; other architectures export to safetensors "
    "with their spec (--layout state_dict) and load with soma_lightning.load"
)


class HFFormatError(UserError):
    pass


def _modules(n_layers: int) -> list[tuple[str, str]]:
    """(our module, NeoX's module) for every module both store as `weight` and `bias`."""
    pairs = [("final_norm", "gpt_neox.final_layer_norm")]
    for i in range(n_layers):
        pairs += [(f"encoder.layers.{i}.{ours}", f"gpt_neox.layers.{i}.{theirs}") for ours, theirs in LAYER_MODULES.items()]
    return pairs


def _weight_and_bias(module: nn.Module) -> tuple[Tensor, Tensor]:
    return module.weight, module.bias if module.bias is not None else module.weight.new_zeros(module.weight.shape[0])


def _fuse(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """Rows of q, k, v (weights [D, D] or biases [D]) as NeoX's query_key_value: per head, its q, k and v rows."""
    return torch.stack([t.unflatten(0, (heads, -1)) for t in (q, k, v)], dim=1).flatten(0, 2)


def _split(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """`_fuse` undone."""
    return tuple(t.flatten(0, 1).contiguous() for t in qkv.unflatten(0, (heads, 3, -1)).unbind(1))


def export_problem(model: SomaModel) -> str | None:
    """What keeps the model from being written as GPT-NeoX exactly, in words; None when nothing does."""
    if problem := v1_shape_problem(model):
        return f"{problem}; {V1_ONLY}"
    layers = model.encoder.layers
    norms = [model.final_norm] + [norm for layer in layers for norm in (layer.norm_1, layer.norm_2)]
    # GPT-NeoX's config has one value of each for all layers.
    shared = {
        "num_heads": {layer.attention.num_heads for layer in layers},
        "rope_base": {layer.attention.rope_base for layer in layers},
        "hidden_dim": {layer.pwff.linear_inner.out_features for layer in layers},
        "LayerNorm eps": {norm.eps for norm in norms},
    }
    for what, values in shared.items():
        if len(values) > 1:
            return f"the layers differ in {what} ({', '.join(map(str, sorted(values)))}), which GPT-NeoX's config holds once for all layers"
    if scales := sorted({layer.attention.rope_scale for layer in layers} - {1.0}):
        return f"the attention has rope_scale {scales[0]}, which the export does not carry (GPT-NeoX's default rotary embedding has no position scaling)"
    bias = model.predictor.bias
    if bias is not None and bool(bias.detach().ne(0).any()):
        return (
            f"predictor.bias is non-zero (max |bias| {bias.detach().abs().max().item():.3g}) and GPT-NeoX's output layer has no bias, "
            "so these logits cannot be written exactly; train a model meant for transformers with predictor_bias: false"
        )
    return None


def neox_tensors(model: SomaModel) -> dict[str, Tensor]:
    """The model's weights under GPT-NeoX's checkpoint keys, float32 on the CPU; HFFormatError (one line) for a
    model that cannot be written exactly (`export_problem`)."""
    if problem := export_problem(model):
        raise HFFormatError(problem)
    heads = model.encoder.layers[0].attention.num_heads
    tensors = {EMBEDDING: model.embedding.weight, HEAD: model.predictor.weight}
    for ours, theirs in _modules(len(model.encoder.layers)):
        tensors[f"{theirs}.weight"], tensors[f"{theirs}.bias"] = _weight_and_bias(model.get_submodule(ours))
    for i, layer in enumerate(model.encoder.layers):
        q, k, v = (_weight_and_bias(m) for m in (layer.attention.query, layer.attention.key, layer.attention.value))
        for j, name in enumerate(("weight", "bias")):
            tensors[f"gpt_neox.layers.{i}.attention.query_key_value.{name}"] = _fuse(q[j], k[j], v[j], heads)
    return {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in tensors.items()}


def neox_config(model: SomaModel, vocabulary: Vocabulary = BYTE_VOCABULARY, max_positions: int = 1024) -> dict:
    """The config.json of the model as GPT-NeoX (check it with `export_problem` first). `max_positions`: NeoX's
    max_position_embeddings (the spec's max_seq_len); `vocabulary` gives EOS and PAD."""
    layer = model.encoder.layers[0]
    base = layer.attention.rope_base
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": model.embedding.num_embeddings,
        "hidden_size": model.embedding.embedding_dim,
        "num_hidden_layers": len(model.encoder.layers),
        "num_attention_heads": layer.attention.num_heads,
        "intermediate_size": layer.pwff.linear_inner.out_features,
        "hidden_act": "gelu",  # the exact (erf) GELU; "gelu_new" would be the tanh approximation
        "use_parallel_residual": False,
        "layer_norm_eps": model.final_norm.eps,
        "max_position_embeddings": max_positions,
        "tie_word_embeddings": False,
        "attention_bias": True,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        # transformers 4 reads rotary_pct and rotary_emb_base, 5 reads rope_parameters (and takes 4's keys too)
        "rotary_pct": 1.0,
        "rotary_emb_base": base,
        "rope_parameters": {"rope_type": "default", "rope_theta": base, "partial_rotary_factor": 1.0},
        "bos_token_id": None,
        "eos_token_id": vocabulary.eos,
        "pad_token_id": vocabulary.pad,
    }


def save_transformers(model: SomaModel, directory: str | os.PathLike, vocabulary: Vocabulary = BYTE_VOCABULARY, max_positions: int = 1024) -> int:
    """Write the model as a transformers GPT-NeoX directory, config.json and model.safetensors (each atomically,
    the weights first), which `GPTNeoXForCausalLM.from_pretrained` loads; the number of tensors written."""
    tensors = neox_tensors(model)
    config = neox_config(model, vocabulary, max_positions)
    target = Path(directory)

    def write_weights(tmp: Path) -> None:
        save_file(tensors, str(tmp), {"format": "pt"})  # transformers checks the format metadata
        ordinary_mode(tmp)

    atomic_write(target / WEIGHTS, write_weights)
    atomic_write(target / CONFIG, lambda tmp: tmp.write_text(json.dumps(config, indent=2) + "\n"))
    return len(tensors)


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise HFFormatError(f"a transformers model needs the transformers package: pip install 'soma-lightning[hf]' ({e})") from None
    return transformers


def to_transformers(model: SomaModel, vocabulary: Vocabulary = BYTE_VOCABULARY, max_positions: int = 1024) -> nn.Module:
    """The model as a transformers GPTNeoXForCausalLM in eval mode, on the CPU in float32 (no files written)."""
    transformers = _transformers()
    tensors = neox_tensors(model)
    hf = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig.from_dict(neox_config(model, vocabulary, max_positions)))
    head = tensors.pop(HEAD)  # the attribute's name differs between transformers 4 and 5
    hf.gpt_neox.load_state_dict({key.removeprefix("gpt_neox."): value for key, value in tensors.items()}, strict=True)
    with torch.no_grad():
        hf.get_output_embeddings().weight.copy_(head)
    return hf.eval()


# ---------------------------------------------------------------- reading a directory


def is_transformers_dir(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG).is_file()


def _read_config(directory: Path) -> dict:
    try:
        config = json.loads((directory / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFFormatError(f"{directory / CONFIG}: not a readable JSON file ({' '.join(str(e).split())})") from None
    if not isinstance(config, dict):
        raise HFFormatError(f"{directory / CONFIG}: expected a JSON object")
    return config


def _spec(config: dict, where: Path) -> ModelSpec:
    """The V1 spec of a GPT-NeoX config; HFFormatError (one line) for what V1 cannot compute."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise HFFormatError(f"{where / CONFIG}: rope_parameters is {rope!r}, not a mapping")
    settings = {  # name -> (value, the V1 value), with transformers' defaults where the config leaves one out
        "model_type": (config.get("model_type"), "gpt_neox"),
        "hidden_act": (config.get("hidden_act", "gelu"), "gelu"),
        "use_parallel_residual": (config.get("use_parallel_residual", True), False),
        "rotary_pct": (rope.get("partial_rotary_factor", config.get("rotary_pct", 0.25)), 1.0),
        "rope_type": (rope.get("rope_type", rope.get("type", "default")), "default"),
        "attention_bias": (config.get("attention_bias", True), True),
    }
    for name, (value, v1) in settings.items():
        if value != v1:
            raise HFFormatError(f"{where / CONFIG}: {name} is {value!r}, not V1's {v1!r}; only V1-shaped GPT-NeoX models import")
    try:
        dims = [int(config[key]) for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size")]
    except (KeyError, TypeError, ValueError) as e:
        raise HFFormatError(f"{where / CONFIG}: no integer {e}") from None
    spec = v1_spec(*dims)
    spec.max_seq_len = int(config.get("max_position_embeddings", spec.max_seq_len))
    base, eps = float(rope.get("rope_theta", config.get("rotary_emb_base", 10000.0))), float(config.get("layer_norm_eps", 1e-5))
    if base != 10000.0:
        spec.blocks["layer"][0]["mixer"]["rope_base"] = base
    if eps != 1e-5:
        norm = {"type": "layernorm", "eps": eps}
        spec.final_norm = norm
        for sublayer in spec.blocks["layer"]:
            sublayer["norm"] = norm
    return spec


def _read_weights(directory: Path) -> dict[str, Tensor]:
    if (directory / WEIGHTS).is_file():
        files = [WEIGHTS]
    elif (directory / WEIGHTS_INDEX).is_file():  # sharded: the shards the index names, inside the directory
        try:
            files = sorted({Path(name).name for name in json.loads((directory / WEIGHTS_INDEX).read_text())["weight_map"].values()})
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise HFFormatError(f"{directory / WEIGHTS_INDEX}: not a readable safetensors index ({e!r})") from None
    else:
        pickles = sorted(p.name for p in directory.glob("*.bin"))
        found = f"only {pickles[0]}, a pickle, which is never loaded (unpickling can run code)" if pickles else "no weights"
        raise HFFormatError(
            f"{directory}: {found}; soma-lightning reads safetensors weights only ({WEIGHTS} or {WEIGHTS_INDEX}): "
            "write them with transformers' save_pretrained(DIR, safe_serialization=True)"
        )
    tensors = {}
    for name in files:
        try:
            tensors |= load_file(str(directory / name))
        except (SafetensorError, OSError, ValueError) as e:
            raise HFFormatError(f"{directory / name}: not a readable safetensors file ({' '.join(str(e).split())})") from None
    return tensors


def _our_state(tensors: dict[str, Tensor], config: dict, spec: ModelSpec, where: Path) -> dict[str, Tensor]:
    """Our state dict from NeoX's tensors: `neox_tensors` undone; the predictor's bias is zeros."""
    left = dict(tensors)

    def take(key: str) -> Tensor:
        if key not in left:
            raise HFFormatError(f"{where}: the weights have no {key!r}, which a GPT-NeoX model of this config has")
        return left.pop(key)

    state = {"embedding.weight": take(EMBEDDING)}
    head = next((key for key in (HEAD, HEAD_V5) if key in left), None)
    tied = head is None and config.get("tie_word_embeddings", False)
    state["predictor.weight"] = state["embedding.weight"].clone() if tied else take(head or HEAD)
    state["predictor.bias"] = torch.zeros(spec.vocab_size)
    for ours, theirs in _modules(spec.n_layers):
        state[f"{ours}.weight"], state[f"{ours}.bias"] = take(f"{theirs}.weight"), take(f"{theirs}.bias")
    heads = spec.blocks["layer"][0]["mixer"]["num_heads"]
    for i in range(spec.n_layers):
        for name in ("weight", "bias"):
            q, k, v = _split(take(f"gpt_neox.layers.{i}.attention.query_key_value.{name}"), heads)
            for proj, value in zip(("query", "key", "value"), (q, k, v)):
                state[f"encoder.layers.{i}.attention.{proj}.{name}"] = value
    if left:
        raise HFFormatError(f"{where}: {len(left)} tensors a V1-shaped GPT-NeoX model does not have, e.g. {sorted(left)[0]!r}")
    return state


def read_transformers(directory: str | os.PathLike) -> tuple[ModelSpec, dict[str, Tensor]]:
    """The V1 spec and our state dict of a transformers GPT-NeoX directory; HFFormatError (one line) for one that
    is not V1-shaped, holds pickled weights only, or does not match its config."""
    where = Path(directory)
    if not is_transformers_dir(where):
        raise HFFormatError(f"{directory}: not a transformers model directory (no {CONFIG})")
    config = _read_config(where)
    spec = _spec(config, where)
    return spec, _our_state(_read_weights(where), config, spec, where)


def load_transformers(directory: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> SomaLM:
    """The SomaLM (SomaLM's default settings) of a transformers GPT-NeoX directory, in eval mode: the V1 spec
    with its weights, bitwise for float32 ones. `tokenizer`: the model's tokenizers file (default: V1's bytes)."""
    spec, state = read_transformers(directory)
    if tokenizer is not None:
        spec.tokenizer = str(tokenizer)
    try:
        module = SomaLM(spec)
        module.model.load_state_dict(state, strict=True)
    except (SpecError, RuntimeError) as e:  # a config V1 refuses (e.g. an odd head size), shapes that contradict it
        raise HFFormatError(f"{directory}: {' '.join(str(e).split())[:300]}") from None
    return module.eval()


def from_transformers(directory: str | os.PathLike, device: str = "cpu") -> SomaModel:
    """The V1 model of a transformers GPT-NeoX directory (`load_transformers`), in eval mode on `device`."""
    return load_transformers(directory).model.to(device).eval()
