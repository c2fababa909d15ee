"""YAML recipes: named, versioned settings for a method. ``load_recipe("ptq-w4a4")`` reads the
packaged file; any other argument is a path. Keys are the method config's fields plus
``method`` (default ``ptq``); an unknown key is an error that lists the valid ones."""
from __future__ import annotations

from pathlib import Path

import yaml

from lowbit.errors import ConfigError

HERE = Path(__file__).parent


def recipe_names() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.yaml"))


def read_recipe(name_or_path: str) -> dict:
    path = HERE / f"{name_or_path}.yaml"
    if not path.is_file():
        path = Path(name_or_path)
    if not path.is_file():
        raise ConfigError(f"recipe {name_or_path!r} not found: give a path or one of "
                          f"{', '.join(recipe_names())}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {e}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"recipe {path} must be a mapping of keys to values")
    return values


def load_recipe(name_or_path: str, **overrides):
    """The method config a recipe describes, with ``overrides`` applied on top (a training
    recipe's ``train`` mapping is for :class:`lowbit.TrainConfig` and is left out here)."""
    from lowbit.methods import METHODS, TRAINING_METHODS

    values = {**read_recipe(name_or_path), **overrides}
    method = values.pop("method", "ptq")
    if method in METHODS:
        return METHODS[method].PTQConfig.from_dict(values)
    if method in TRAINING_METHODS:
        values.pop("train", None)
        entry = TRAINING_METHODS[method]
        return entry.config.from_dict({**entry.defaults, **values})
    raise ConfigError(f"recipe method {method!r} unknown; methods: "
                      f"{', '.join([*METHODS, *TRAINING_METHODS])}")
