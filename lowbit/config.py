"""What every typed config shares: a dict form for checkpoints and reports, and construction
from a mapping (a YAML recipe, CLI flags) that names an unknown key and lists the valid ones."""
from __future__ import annotations

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
        valid = [f.name for f in fields(cls)]
        unknown = [k for k in values if k not in valid]
        if unknown:
            raise ConfigError(f"unknown {cls.label} key {unknown[0]!r}; valid keys: "
                              f"{', '.join(valid)}")
        return cls(**values).validate()
