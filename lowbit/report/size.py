"""Model size in bytes: float32 baseline vs the bits a quantized model really needs.

Quantized size = for every quantized weight tensor, sum over channels of (weights x bits) plus
a float32 scale and a 32-bit zero point per channel (and the float32 bias-correction gain /
shift when present); every other parameter or floating buffer at 32 bits. This is the ideal
packed size; the deployment exporter writes files of this size.
"""
from __future__ import annotations

from torch import nn

from lowbit.nn.layers import QUANT_LAYERS
from lowbit.nn.quantizer import AffineQuantizer, CorrectedQuantizer


def _float_bits(tensors) -> int:
    return sum(32 * t.numel() for t in tensors if t.is_floating_point())


def float_size_bytes(model: nn.Module) -> int:
    """Parameters and floating buffers (BN running statistics) at 32 bits."""
    return _float_bits([*model.parameters(), *model.buffers()]) // 8


def _weight_bits(layer) -> int:
    slot = layer.weight_quantizer
    q = slot.quantizer if isinstance(slot, CorrectedQuantizer) else slot
    if not isinstance(q, AffineQuantizer) or not q.calibrated:
        return 32 * layer.weight.numel()
    per_channel = layer.weight.numel() // layer.weight.shape[0]
    bits = q.bits.expand(layer.weight.shape[0]) if q.bits.dim() else q.bits
    total = int(bits.sum()) * per_channel if bits.dim() else int(bits) * layer.weight.numel()
    total += 64 * q.scale.numel()  # float32 scale + 32-bit zero point per channel
    if isinstance(slot, CorrectedQuantizer):
        total += 32 * (slot.gain.numel() + slot.shift.numel())
    return total


def quantized_size_bytes(model: nn.Module) -> int:
    counted, bits = set(), 0
    for layer in model.modules():
        if isinstance(layer, QUANT_LAYERS):
            bits += _weight_bits(layer)
            counted.add(id(layer.weight))
            for q in layer.input_quantizer.modules():
                if isinstance(q, AffineQuantizer):
                    bits += 64 * q.scale.numel()
            for sub in (layer.weight_quantizer, layer.input_quantizer):
                counted.update(id(t) for t in sub.buffers())
    rest = [t for t in [*model.parameters(), *model.buffers()] if id(t) not in counted]
    return (bits + _float_bits(rest)) // 8
