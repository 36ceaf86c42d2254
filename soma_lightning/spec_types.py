"""Checking a spec value against a type annotation, with an error a user reads: the key path, what was
expected in words, and what was given."""

import inspect
import types
import typing
from typing import Any, Literal, Union

from soma_lightning.errors import SpecError


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


def check_value(path: str, value: Any, ann: Any) -> None:
    if not _type_ok(value, ann):
        raise SpecError(f"{path}: expected {_describe(ann)}, got {value!r}")
