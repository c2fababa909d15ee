"""Quantization methods: one module each, a typed config and one entry point; the registry lets
the CLI and YAML recipes name them."""
from lowbit.methods import ptq

METHODS = {"ptq": ptq}

__all__ = ["METHODS", "ptq"]
