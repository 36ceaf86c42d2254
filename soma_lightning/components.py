"""The component registry and how one component of a spec is resolved: a registered name, `{type: name, ...}`
or `{class_path: pkg.Module, init_args: {...}}`, its arguments checked against the constructor's signature
before anything is built; every error names the YAML key path."""

import importlib
import inspect
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from soma_lightning.errors import SpecError
from soma_lightning.nn.attention import MultiHeadAttention
from soma_lightning.nn.embedding import HashedNgramEmbedding, ModalityEmbedding
from soma_lightning.nn.ffn import GeluMLP
from soma_lightning.nn.gated_deltanet import GatedDeltaNet
from soma_lightning.nn.gqa import GroupedQueryAttention
from soma_lightning.nn.graph_attention import GraphAttention
from soma_lightning.nn.memory_attention import MemoryAttention
from soma_lightning.nn.moe import MoE
from soma_lightning.nn.mtp import MTPHeads
from soma_lightning.nn.norm import layernorm, rmsnorm
from soma_lightning.nn.protocols import ComponentArgumentError
from soma_lightning.nn.semantic_state import SemanticStateEmbedding
from soma_lightning.spec_types import check_value

REGISTRY: dict[str, dict[str, Callable[..., torch.nn.Module]]] = {
    "mixer": {"mha": MultiHeadAttention, "gqa": GroupedQueryAttention, "gated_deltanet": GatedDeltaNet, "graph_attention": GraphAttention,
              "memory_attention": MemoryAttention},
    "ffn": {"gelu_mlp": GeluMLP, "moe": MoE},
    "norm": {"layernorm": layernorm, "rmsnorm": rmsnorm},
    "embedding": {"hashed_ngram": HashedNgramEmbedding, "modality": ModalityEmbedding},
    "mtp": {"mtp_heads": MTPHeads},
    "token_embedding": {"semantic_state": SemanticStateEmbedding},
}

# Arguments a component receives from the model level unless its own spec sets them.
INHERITED = ("d_model", "dropout", "vocab_ranges", "vocab_size")


def register(kind: Literal["mixer", "ffn", "norm", "embedding", "mtp", "token_embedding"], name: str, factory: Callable[..., torch.nn.Module]) -> None:
    """Make `factory` available to specs as `{kind}: {type: name, ...}`."""
    REGISTRY[kind][name] = factory


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
class Component:
    path: str
    factory: Callable[..., torch.nn.Module]
    args: dict[str, Any]
    kind: str

    def build(self) -> torch.nn.Module:
        try:
            return self.factory(**self.args)
        except ComponentArgumentError as e:
            raise SpecError(f"{self.path}.{e.arg}: {e.reason}" if e.arg in self.args else f"{self.path}: {e}") from None
        except (ValueError, TypeError) as e:
            raise SpecError(f"{self.path}: {e}") from None


def resolve_component(kind: str, raw: Any, path: str, inherited: dict[str, Any]) -> Component:
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
            check_value(f"{args_path}.{key}", value, hints.get(key, params[key].annotation))
    for key, value in inherited.items():
        if key in params:
            args[key] = value
    for key, p in params.items():
        if key not in args and p.default is inspect.Parameter.empty:
            raise SpecError(f"{args_path}.{key}: missing required argument of {kind} {label!r}")
    return Component(args_path if "class_path" in raw else path, factory, args, kind)
