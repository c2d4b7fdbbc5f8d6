"""Validated, versioned configuration dataclasses.

Every config is a frozen dataclass deriving from :class:`ConfigBase`. ``from_dict`` rejects
unknown keys and values of the wrong type, nested configs are built recursively, and each
class checks its own invariants in ``validate`` (called from ``__post_init__``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, ClassVar, Literal, TypeVar

from typing_extensions import Self

from .errors import ConfigError

CONFIG_VERSION = 1

C = TypeVar("C", bound="ConfigBase")


def _check_type(name: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against a (simple) type annotation; return it, possibly coerced."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _check_type(name, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: {value!r} matches none of {annotation}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}: {value!r} is not one of {list(args)}")
        return value
    if annotation is type(None):
        if value is not None:
            raise ConfigError(f"{name}: expected None, got {value!r}")
        return value
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if isinstance(value, dict) and issubclass(annotation, ConfigBase):
            return annotation.from_dict(value)
        raise ConfigError(f"{name}: expected a mapping for {annotation.__name__}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a sequence, got {type(value).__name__}")
        item_t = args[0] if args else Any
        return tuple(_check_type(f"{name}[{i}]", v, item_t) for i, v in enumerate(value))
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true/false, got {value!r}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    return value


@dataclasses.dataclass(frozen=True)
class ConfigBase:
    """Base of all configs: strict construction from plain data, round-trip to plain data."""

    section: ClassVar[str] = "config"

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _check_type(f"{self.section}.{f.name}", getattr(self, f.name), hints[f.name])
            object.__setattr__(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Check invariants across fields; raise :class:`ConfigError`."""

    @classmethod
    def from_dict(cls, data: typing.Mapping[str, Any]) -> Self:
        if not isinstance(data, typing.Mapping):
            raise ConfigError(f"{cls.section}: expected a mapping, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(repr(k) if not isinstance(k, str) else k for k in set(data) - names)
        if unknown:
            raise ConfigError(f"{cls.section}: unknown key(s) {unknown}; allowed: {sorted(names)}")
        try:
            return cls(**dict(data))
        except TypeError as exc:  # missing required fields
            raise ConfigError(f"{cls.section}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, ConfigBase):
                value = value.to_dict()
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def replace(self, **changes: Any) -> Self:
        return dataclasses.replace(self, **changes)


def require(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


def require_finite_positive(name: str, value: float) -> None:
    require(math.isfinite(value) and value > 0, f"{name} must be a finite positive number")
