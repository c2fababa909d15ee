"""What every typed config shares: a dict form for checkpoints and reports, and construction
from a mapping (a YAML recipe, CLI flags, a file's header) that names an unknown key and lists
the valid ones, and refuses a value whose type is not the field's (``lr: "fast"``, ``w_bits:
[4]``) before ``validate()`` compares it with anything."""
from __future__ import annotations

import types
import typing
from dataclasses import asdict, fields

from lowbit.errors import ConfigError


class ConfigMixin:
    """For ``@dataclass`` configs with a ``validate()`` method; ``label`` names the config in
    error messages."""

    label = "config"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict):
        if not isinstance(values, dict):
            raise ConfigError(f"{cls.label} settings must be a mapping, got "
                              f"{type(values).__name__}")
        valid = [f.name for f in fields(cls)]
        unknown = [k for k in values if k not in valid]
        if unknown:
            raise ConfigError(f"unknown {cls.label} key {unknown[0]!r}; valid keys: "
                              f"{', '.join(valid)}")
        hints = typing.get_type_hints(cls)
        for key, value in values.items():
            if not conforms(value, hints[key]):
                shown = repr(value)
                shown = shown if len(shown) <= 60 else shown[:60] + "..."
                raise ConfigError(f"{cls.label} key {key!r} must be {_describe(hints[key])}, "
                                  f"got {type(value).__name__} {shown}")
        return cls(**values).validate()


def conforms(value, hint) -> bool:
    """Whether ``value`` has the type a config field is annotated with (bool is not an int;
    an int is a float; lists and dicts are checked element by element)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, (list, tuple)) and all(conforms(v, args[0]) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict) and (not args or all(
            conforms(k, args[0]) and conforms(v, args[1]) for k, v in value.items()))
    return True  # any other annotation: the config's validate() checks it


def _describe(hint) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint)
