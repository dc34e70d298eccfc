"""Typed dataclasses from YAML mappings: the one loader behind every config of the package.

``from_dict(cls, data)`` builds a (nested) dataclass from a mapping, naming an unknown
field and listing the allowed ones; ``check_field_types(obj)`` checks every field against
its annotation; ``apply_override(data, "a.b=value")`` applies one ``--set`` (the value read
as YAML); ``read_yaml_mapping(path)`` reads a config file. Errors are one-line
``ConfigError``s. A leaf module: it imports nothing of the package but its errors.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import yaml

from .errors import ConfigError


def _type_ok(value: Any, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin is tuple:
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return isinstance(value, (list, tuple)) and all(_type_ok(v, args[0]) for v in value)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint) -> str:
    if typing.get_origin(hint) is tuple:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def check_field_types(obj, where: str = "") -> None:
    """Raises ``ConfigError`` naming the first field whose value does not match its type."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, hint = getattr(obj, f.name), hints[f.name]
        if dataclasses.is_dataclass(hint):
            ok = isinstance(value, hint)
        elif typing.get_origin(hint) is tuple and dataclasses.is_dataclass(typing.get_args(hint)[0]):
            ok = isinstance(value, tuple) and all(isinstance(v, typing.get_args(hint)[0]) for v in value)
        else:
            ok = _type_ok(value, hint)
        if not ok:
            raise ConfigError(f"config field {where + f.name!r} must be {_type_name(hint)}, got {value!r}")


def from_dict(cls, data: dict, where: str = ""):
    """Builds dataclass ``cls`` from a dict, checking field names and types. A class with a
    ``mapping_presets()`` classmethod (name -> fields) takes a ``preset`` key: the named
    preset's fields, the mapping's own on top."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    if hasattr(cls, "mapping_presets") and "preset" in data:  # the preset's fields, the section's on top
        presets = cls.mapping_presets()
        data = dict(data)
        name = data.pop("preset")
        if not isinstance(name, str) or name not in presets:
            raise ConfigError(f"config field {where + 'preset'!r}: {name!r} is not allowed; allowed: "
                              + ", ".join(presets))
        data = {**presets[name], **data}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}{key}"
        if key not in names:
            raise ConfigError(f"unknown config field {path!r}; allowed fields: {', '.join(names)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = from_dict(hint, value, f"{path}.")
        elif typing.get_origin(hint) is tuple and dataclasses.is_dataclass(typing.get_args(hint)[0]):
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"config field {path!r} must be a list of mappings, got {value!r}")
            item_cls = typing.get_args(hint)[0]
            kwargs[key] = tuple(from_dict(item_cls, v, f"{path}[{i}].") for i, v in enumerate(value))
        elif not _type_ok(value, hint):
            raise ConfigError(f"config field {path!r} must be {_type_name(hint)}, got {value!r}")
        else:
            kwargs[key] = float(value) if hint is float else tuple(value) if isinstance(value, list) else value
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{where}{err}" if where and not str(err).startswith(where) else str(err)) from None


def to_dict(config) -> dict:
    """The config tree as plain data (for YAML and JSON output)."""
    return dataclasses.asdict(config)


def apply_override(data: dict, assignment: str) -> dict:
    """Applies one ``a.b=value`` assignment (value parsed as YAML) to a nested dict."""
    if "=" not in assignment:
        raise ConfigError(f"--set takes field=value (e.g. pipeline.chunk_len=1024), got {assignment!r}")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part!r} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"--set {key}: the value {raw!r} is not valid YAML ({problem}); "
                          "e.g. pipeline.chunk_len=1024, lengths=[1024,2048], model='a name'") from None
    return data


def read_yaml_mapping(path: str) -> dict:
    """The mapping of fields in the YAML file ``path``; ``ConfigError`` for a file that cannot
    be read, is not UTF-8, is not valid YAML, is empty or is not a mapping."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as err:
        raise ConfigError(f"cannot read config file {path!r}: {err.strerror}") from err
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path!r} is not UTF-8 text (byte {err.start}: "
                          f"{err.object[err.start:err.start + 1]!r}); save it as UTF-8") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {path!r} is not valid YAML{at}: {problem}") from None
    if data is None:
        raise ConfigError(f"config file {path!r} is empty; give its fields, or leave --config out to run the "
                          "defaults")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must be a mapping of fields (e.g. 'model: ...'), "
                          f"got a {type(data).__name__}")
    return data
