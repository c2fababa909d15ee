"""The layer policy shared by every method: which layers are quantized, and at which bits.

First layer = the first Conv/Linear a forward pass calls; last layer = the last one called.
``first_last_bits`` applies to both their weights and their inputs (8 by default: the image and
the classifier are the most sensitive tensors, as in Banner et al., LSQ and PSG); ``None`` gives
them the target bits like every other layer. ``skip`` leaves layers in floating point;
``overrides`` sets ``w_bits`` / ``a_bits`` per layer. Both match a module name exactly or as a
regular expression (Python's ``re`` syntax, matched in full); a pattern that matches no layer is
an error.
"""
from __future__ import annotations

import regex
from dataclasses import dataclass, field

from lowbit.errors import ConfigError
from lowbit.quant.affine import check_bits


@dataclass(frozen=True)
class LayerBits:
    w_bits: int
    a_bits: int | None  # None: the layer's input stays in floating point


@dataclass
class LayerPolicy:
    first_last_bits: int | None = 8
    skip: list[str] = field(default_factory=list)
    overrides: dict[str, dict] = field(default_factory=dict)

    def validate(self) -> None:
        if self.first_last_bits is not None:
            check_bits(self.first_last_bits, "first_last_bits")
        for pattern, values in self.overrides.items():
            if not isinstance(values, dict) or not set(values) <= {"w_bits", "a_bits"}:
                raise ConfigError(f"override {pattern!r} must be a mapping with w_bits and/or "
                                  f"a_bits, got {values!r}")
            if "w_bits" in values:
                check_bits(values["w_bits"], f"override {pattern!r} w_bits")
            if values.get("a_bits") is not None:
                check_bits(values["a_bits"], f"override {pattern!r} a_bits")

    def resolve(self, order: list[str], w_bits: int, a_bits: int | None) -> dict[str, LayerBits]:
        """Bits of every quantized layer, in execution order (skipped layers are absent)."""
        self.validate()
        for pattern in [*self.skip, *self.overrides]:
            if not any(_match(pattern, name) for name in order):
                raise ConfigError(f"layer pattern {pattern!r} matches no layer; layers are: "
                                  f"{', '.join(order[:12])}{' ...' if len(order) > 12 else ''}")
        plan = {}
        for i, name in enumerate(order):
            if any(_match(p, name) for p in self.skip):
                continue
            wb, ab = w_bits, a_bits
            if self.first_last_bits is not None and i in (0, len(order) - 1):
                wb = self.first_last_bits
                ab = None if a_bits is None else self.first_last_bits
            for pattern, values in self.overrides.items():
                if _match(pattern, name):
                    wb = values.get("w_bits", wb)
                    ab = values.get("a_bits", ab)
            plan[name] = LayerBits(wb, ab)
        return plan

    def fixed(self, order: list[str]) -> set[str]:
        """The layers whose widths this policy sets itself (first / last, overrides): a
        mixed-precision plan leaves them as they are."""
        ends = {order[0], order[-1]} if self.first_last_bits is not None and order else set()
        return ends | {name for name in order
                       if any(_match(p, name) for p in self.overrides)}


def plan_overrides(bits: dict) -> dict[str, dict]:
    """``overrides`` that pin every layer of a per-layer plan at its widths: ``bits`` maps a
    layer name to ``[w_bits, a_bits]`` (a mixed-precision report's ``bits``) or to a
    :class:`LayerBits` (a quantized model's ``model.lowbit.plan``). For QAT / LSQ from a mixed
    plan; names are escaped, so each matches its own layer only."""
    overrides = {}
    for name, widths in bits.items():
        w, a = (widths.w_bits, widths.a_bits) if isinstance(widths, LayerBits) else widths
        overrides[regex.escape(name)] = {"w_bits": w, "a_bits": a}
    return overrides


MATCH_SECONDS = 0.1  # a pattern that needs longer on a layer name is a backtracking bomb


def _match(pattern: str, name: str) -> bool:
    """``pattern`` equals ``name`` or fully matches it as a regular expression. Patterns can come
    from a file (a saved method config), so matching runs in the ``regex`` module, Python's
    ``re`` syntax with a timeout: ``re`` would backtrack for hours on ``(.|.|.)*z``."""
    if pattern == name:
        return True
    try:
        return regex.fullmatch(pattern, name, timeout=MATCH_SECONDS) is not None
    except regex.error as e:
        raise ConfigError(f"layer pattern {pattern!r} is not a valid regex: {e}") from None
    except TimeoutError:
        raise ConfigError(f"layer pattern {pattern!r} takes more than {MATCH_SECONDS} s to "
                          f"match {name!r}: simplify it") from None
