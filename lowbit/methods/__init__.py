"""Quantization methods: one module each, a typed config and one entry point; the registries
let the CLI and YAML recipes name them.

* ``METHODS``: post-training methods, ``quantize(model, config, calib)``; their checkpoints
  rebuild through the module's ``restore``.
* ``TRAINING_METHODS``: methods the training engine runs; each entry builds the method object
  from a config (``None`` = plain float training).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from lowbit.errors import ConfigError
from lowbit.methods import binary, kmeans, psg, ptq, qat


@dataclass(frozen=True)
class MethodEntry:
    config: type
    defaults: dict
    build: Callable

    def make(self, values: dict):
        """The method object for a mapping of config values (recipe or CLI)."""
        return self.build(self.config.from_dict({**self.defaults, **values}))


METHODS = {"ptq": ptq}
TRAINING_METHODS = {
    "qat": MethodEntry(qat.QATConfig, {"quantizer": "ste"}, qat.QATMethod),
    "lsq": MethodEntry(qat.QATConfig, {"quantizer": "lsq", "w_per_channel": False},
                          qat.QATMethod),
    "psg": MethodEntry(psg.PSGConfig, {}, psg.PSGMethod),
    "kmeans": MethodEntry(kmeans.KMeansConfig, {}, kmeans.KMeansMethod),
    **{kind: MethodEntry(binary.BinaryConfig, {"kind": kind}, binary.BinaryMethod)
       for kind in binary.KINDS},
}


def training_method(name: str, values: dict | None = None):
    """Build a registered training method; ``"fp"`` is float training (None)."""
    if name == "fp":
        if values:
            raise ConfigError(f"float training takes no method settings, got {sorted(values)}")
        return None
    if name not in TRAINING_METHODS:
        raise ConfigError(f"unknown training method {name!r}; methods: fp, "
                          f"{', '.join(TRAINING_METHODS)}")
    return TRAINING_METHODS[name].make(values or {})


__all__ = ["METHODS", "TRAINING_METHODS", "training_method", "binary", "kmeans", "psg", "ptq",
           "qat"]
