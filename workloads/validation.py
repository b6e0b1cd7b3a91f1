"""Typed configuration: build frozen dataclasses from plain mappings with one-line errors.

Every config object in moesim is a dataclass. ``build(cls, mapping, key)`` checks that the
mapping has no unknown keys, converts each value to the field's annotated type (int, float, bool,
str, Literal, Optional, tuple/list of those, nested dataclasses) and then runs the class's
``validate()`` if it has one. Any problem raises :class:`ConfigError` whose message names the full
key, the offending value and what is allowed, in one line.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A user-supplied configuration value is invalid. The message is one line."""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin in (tuple, list):
        args = typing.get_args(tp)
        return f"a list of {_type_name(args[0]) if args else 'values'}"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{key}={value!r} is invalid; expected {_type_name(tp)}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{key}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}"
            )
        return value
    if origin in (tuple, list):
        if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
            raise ConfigError(f"{key}={value!r} is invalid; expected {_type_name(tp)}")
        (arg,) = typing.get_args(tp)[:1] or (Any,)
        items = [_convert(v, arg, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}={value!r} is invalid; expected a mapping of {tp.__name__} fields")
        return build(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}={value!r} is invalid; expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is invalid; expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}={value!r} is invalid; expected an integer")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)  # YAML 1.1 reads '80e9' as a string
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}={value!r} is invalid; expected a number")
        if not math.isfinite(number):   # no rate, bandwidth, size or time of moesim is infinite or NaN
            raise ConfigError(f"{key}={value!r} is invalid; expected a finite number")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}={value!r} is invalid; expected a string")
    if tp is Any:
        return value
    raise TypeError(f"unsupported config field type {tp!r} at {key}")


def build(cls: type, mapping: Mapping[str, Any] | None, key: str = ""):
    """Build dataclass ``cls`` from ``mapping``; ``key`` is the dotted config path for errors."""
    mapping = dict(mapping or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(mapping) - set(fields))
    prefix = f"{key}." if key else ""
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]} is not a known key; allowed keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, f in fields.items():
        if name in mapping:
            kwargs[name] = _convert(mapping[name], hints[name], prefix + name)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{name} is required ({_type_name(hints[name])})")
    obj = cls(**kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check(key)
    return obj


def require(cond: bool, key: str, value: Any, allowed: str) -> None:
    """Raise a one-line ConfigError unless ``cond`` holds."""
    if not cond:
        raise ConfigError(f"{key}={value!r} is invalid; {allowed}")


def positive(obj: Any, key: str, *names: str) -> None:
    """Require each named numeric field of ``obj`` to be > 0."""
    for name in names:
        value = getattr(obj, name)
        require(value is not None and value > 0, f"{key}.{name}" if key else name, value, "must be > 0")


def non_negative(obj: Any, key: str, *names: str) -> None:
    """Require each named numeric field of ``obj`` to be >= 0."""
    for name in names:
        value = getattr(obj, name)
        require(value is not None and value >= 0, f"{key}.{name}" if key else name, value, "must be >= 0")
