"""Loading a config: YAML files with ``defaults`` chains, ``key=value`` overrides, unknown-key hints, type checks.

Loading, in order (every failure is a :class:`ConfigError` with a one-line message naming the key and the file):

1. the YAML file and, recursively, the files named by its top-level ``defaults:`` (a path, or a list of paths,
   relative to the including file), base files first;
2. the command-line overrides (``method.gd=10 train.iterations=20``, values parsed as YAML);
3. each layer is checked for unknown keys (the message proposes the closest valid key) and merged onto the schema
   (wrong types are rejected), then required keys are checked; :func:`load_config` then checks value ranges and
   enum choices (:func:`senseflow.config.validation.validate`).

:func:`load_structured` works for any dataclass schema (the teacher-training config uses it too).
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from senseflow.config.errors import ConfigError
from senseflow.config.introspection import describe_type, field_type, hints, is_section, schema_keys
from senseflow.config.schema import SenseFlowConfig
from senseflow.config.validation import validate

__all__ = ["load_structured", "load_config"]


def _suggest(name: str, cls: type, prefix: str, schema: type) -> str:
    """A ' (did you mean ...?)' hint for the unknown key ``prefix + name``: a close sibling first, then the same name
    in another section, then keys elsewhere whose name is close or starts like it (never a section the key already
    sits in), else the valid keys of its section."""
    siblings = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    all_keys = schema_keys(schema)
    sections = sorted({k.rsplit(".", i)[0] for k in all_keys for i in range(1, k.count(".") + 1)})
    enclosing = {prefix[:i].rstrip(".") for i in range(len(prefix) + 1) if prefix[:i].endswith(".")}
    candidates = [k for k in all_keys + sections if k not in enclosing]
    same_leaf = [k for k in candidates if k.rsplit(".", 1)[-1] == name]
    if same_leaf:
        return f" (did you mean '{same_leaf[0]}'?)"
    leaf_of = {k: k.rsplit(".", 1)[-1] for k in candidates}
    close_leaves = set(difflib.get_close_matches(name, list(leaf_of.values()), n=3, cutoff=0.75))
    stem = name.rstrip("_")[:-1] if len(name) > 2 else name  # 'lrr' -> 'lr': a typed extra character
    similar = [k for k, leaf in leaf_of.items()
               if leaf in close_leaves or (len(stem) >= 2 and leaf.split("_")[0] in (name, stem))]
    if similar:
        if len(similar) == 1:
            return f" (did you mean '{similar[0]}'?)"
        more = ", ..." if len(similar) > 3 else ""
        return f" (did you mean one of {', '.join(repr(k) for k in similar[:3])}{more}?)"
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6) if not prefix else []
    if close:  # a mistyped section name
        return f" (did you mean '{close[0]}'?)"
    where = f"under '{prefix[:-1]}'" if prefix else "at the top level"
    return f" (valid keys {where}: {', '.join(siblings)})"


def _check_keys(data: dict, cls: type, prefix: str, label: str, sources: dict[str, str], schema: type) -> None:
    """Reject keys that the schema does not have; record which layer set each leaf in ``sources``."""
    fields = hints(cls)
    for key, value in data.items():
        if not isinstance(key, str) or key not in fields:
            raise ConfigError(f"{label}: unknown key '{prefix}{key}'{_suggest(str(key), cls, prefix, schema)}")
        tp = fields[key]
        if is_section(tp):
            if value is None:  # an empty section (all its lines commented out) sets nothing
                data[key] = value = {}
            if not isinstance(value, dict):
                raise ConfigError(f"{label}: {prefix}{key} = {value!r}: expected {describe_type(tp)}")
            _check_keys(value, tp, f"{prefix}{key}.", label, sources, schema)
        else:
            sources[f"{prefix}{key}"] = label


def _display(path: Path) -> str:
    try:
        rel = os.path.relpath(path)
        return rel if not rel.startswith("..") else str(path)
    except ValueError:
        return str(path)


def _read_yaml(path: Path) -> dict:
    label = _display(path)
    if not path.is_file():
        raise ConfigError(f"config file {label} not found")
    try:
        node = OmegaConf.load(path)
    except Exception as exc:  # yaml and OmegaConf parse errors
        raise ConfigError(f"{label}: cannot parse YAML: {exc}") from exc
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{label}: expected a mapping of sections at the top level, got a list")
    return OmegaConf.to_container(node, resolve=False)  # type: ignore[return-value]


def _layers(path: Path, chain: tuple[Path, ...] = ()) -> list[tuple[str, dict]]:
    """(label, mapping) of ``path`` and its ``defaults`` ancestors, in merge order (bases first)."""
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(_display(p) for p in (*chain, path))
        raise ConfigError(f"config files inherit from each other in a cycle: {cycle}")
    data = _read_yaml(path)
    label = _display(path)
    bases = data.pop("defaults", None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    elif not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise ConfigError(f"{label}: 'defaults' must be a path (or a list of paths) to another YAML file")
    layers: list[tuple[str, dict]] = []
    for base in bases:
        base_path = (path.parent / base).resolve()
        if not base_path.is_file():
            raise ConfigError(f"{label}: defaults file '{base}' not found (looked for {_display(base_path)})")
        layers.extend(_layers(base_path, (*chain, path)))
    layers.append((label, data))
    return layers


def _parse_override(item: str, schema: type) -> dict:
    label = f"command-line override '{item}'"
    key, sep, _ = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"{label}: expected key=value, e.g. method.gd=10")
    cls: Any = schema
    parts = key.split(".")
    for i, part in enumerate(parts):
        prefix = ".".join(parts[:i]) + ("." if i else "")
        if typing.get_origin(cls) is dict:  # a free-form mapping: its keys are checked by whoever reads it
            break
        if not is_section(cls):
            raise ConfigError(f"{label}: '{prefix[:-1]}' is a value, not a section")
        if part not in hints(cls):
            raise ConfigError(f"{label}: unknown key '{prefix}{part}'{_suggest(part, cls, prefix, schema)}")
        cls = hints(cls)[part]
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False)  # type: ignore[return-value]
    except Exception as exc:
        raise ConfigError(f"{label}: cannot parse the value: {exc}") from exc


def _type_error(label: str, exc: OmegaConfBaseException, schema: type) -> ConfigError:
    key = str(getattr(exc, "full_key", "") or "")
    detail = str(getattr(exc, "msg", None) or exc).splitlines()[0]
    try:
        expected = describe_type(field_type(key, schema)) if key else ""
    except (KeyError, IndexError):
        expected = ""
    where = f" {key}" if key else ""
    return ConfigError(f"{label}:{where} has a wrong type: {detail}" + (f"; expected {expected}" if expected else ""))


def load_structured(path: str | os.PathLike, overrides: Sequence[str], schema: type) -> tuple[Any, dict[str, str]]:
    """Load ``path`` (with its ``defaults`` chain) into the dataclass ``schema``, applying ``key=value`` overrides.

    Unknown keys (with a "did you mean" hint), wrong types and missing required keys raise :class:`ConfigError`
    naming the file or override. Returns the schema object and, per leaf key, the layer that set it.
    """
    layers = _layers(Path(path))
    layers += [(f"command-line override '{item}'", _parse_override(item, schema)) for item in overrides]
    sources: dict[str, str] = {}
    try:  # every layer at once (one copy of the schema instead of one per layer) ...
        for label, data in layers:
            _check_keys(data, schema, "", label, sources, schema)
        merged = OmegaConf.merge(OmegaConf.structured(schema), *(data for _, data in layers))
    except (ConfigError, OmegaConfBaseException):  # ... and layer by layer to report the first problem
        sources, merged = {}, OmegaConf.structured(schema)
        for label, data in layers:
            _check_keys(data, schema, "", label, sources, schema)
            try:
                merged = OmegaConf.merge(merged, data)
            except OmegaConfBaseException as exc:
                raise _type_error(label, exc, schema) from exc
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        key = missing[0]
        raise ConfigError(
            f"{key} is required but not set in {_display(Path(path))} or its defaults (add it to the YAML or "
            f"pass {key}=... on the command line)"
        )
    try:
        return OmegaConf.to_object(merged), sources
    except OmegaConfBaseException as exc:
        raise _type_error(_display(Path(path)), exc, schema) from exc


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> SenseFlowConfig:
    """Load ``path`` (with its ``defaults`` chain), apply ``key=value`` overrides, check keys, types and ranges.

    Paths are not checked here; call :func:`validate_paths` before loading models. Raises :class:`ConfigError`.
    """
    cfg, sources = load_structured(path, overrides, SenseFlowConfig)
    validate(cfg, sources)
    return cfg
