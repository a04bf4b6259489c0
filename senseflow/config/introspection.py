"""Questions about a schema (any tree of dataclasses): its keys, field types and the choices its fields allow."""
from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any, Callable

from senseflow.config.schema import CHOICES, SenseFlowConfig

__all__ = ["hints", "is_section", "field_type", "strip_optional", "describe_type", "schema_keys", "schema_choices"]


@functools.lru_cache(maxsize=None)
def hints(cls: type) -> dict[str, Any]:
    """The resolved type hints of a schema class, by field name."""
    return typing.get_type_hints(cls)


def is_section(tp: Any) -> bool:
    """Whether a type hint is a section (a nested dataclass) rather than a value."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def strip_optional(tp: Any) -> Any:
    """``X`` for ``X | None``; any other hint unchanged."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if type(None) in typing.get_args(tp) and len(args) == 1 else tp


def field_type(path: str, schema: type) -> Any:
    """Type hint of a dotted schema key (``method.isg.weight``); list items ``key[0]`` give the item type."""
    tp: Any = schema
    for part in path.split("."):
        name, _, index = part.partition("[")
        tp = hints(tp)[name]
        if index:
            tp = strip_optional(tp)
            tp = typing.get_args(tp)[0]
    return tp


def describe_type(tp: Any) -> str:
    """What a value of type ``tp`` is, in words ("an integer", "a list of numbers or null" …)."""
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if tp in names:
        return names[tp]
    if is_section(tp):
        return "a section (mapping) with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    if type(None) in typing.get_args(tp):
        return describe_type(strip_optional(tp)) + " or null"
    if typing.get_origin(tp) is list:
        item = typing.get_args(tp)[0]
        plural = {int: "integers", float: "numbers", str: "strings", bool: "booleans"}.get(item, "values")
        return f"a list of {plural}"
    return str(tp)


def schema_keys(cls: type = SenseFlowConfig, prefix: str = "") -> list[str]:
    """Every leaf key of the schema in dotted form, in declaration order."""
    out: list[str] = []
    for f in dataclasses.fields(cls):
        tp = hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        out.extend(schema_keys(tp, key + ".") if is_section(tp) else [key])
    return out


def schema_choices(cls: type = SenseFlowConfig, prefix: str = "") -> dict[str, tuple[str, ...] | Callable[[], Any]]:
    """Dotted key -> allowed values of every leaf field declared with choices (field metadata), in declaration order;
    choices given as a callable (the teacher families) stay a callable, to be asked when a value is checked."""
    out: dict[str, tuple[str, ...] | Callable[[], Any]] = {}
    for f in dataclasses.fields(cls):
        tp = hints(cls)[f.name]
        key = f"{prefix}{f.name}"
        if is_section(tp):
            out.update(schema_choices(tp, key + "."))
        elif CHOICES in f.metadata:
            choices = f.metadata[CHOICES]
            out[key] = choices if callable(choices) else tuple(choices)
    return out
