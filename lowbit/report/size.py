"""Model size in bytes: float32 baseline vs the bits a quantized model really needs.

Quantized size = for every quantized weight tensor the bits its quantizer needs (affine: sum
over channels of weights x bits plus a float32 scale and a 32-bit zero point per channel, and
the bias-correction gain / shift; k-means: indices and the codebook; binary / ternary: codes and
scales); every other parameter or floating buffer at 32 bits. This is the ideal
packed size; the deployment exporter writes files of this size.
"""
from __future__ import annotations

from torch import nn

from lowbit.nn.layers import QUANT_LAYERS
from lowbit.nn.quantizer import AffineQuantizer


def _float_bits(tensors) -> int:
    return sum(32 * t.numel() for t in tensors if t.is_floating_point())


def float_size_bytes(model: nn.Module) -> int:
    """Parameters and floating buffers (BN running statistics) at 32 bits."""
    return _float_bits([*model.parameters(), *model.buffers()]) // 8


def quantized_size_bytes(model: nn.Module) -> int:
    """Each quantized layer's weight at the bits its quantizer reports (``storage_bits``:
    codes, scales, codebooks), input qparams at 64 bits per scale, everything else at 32."""
    counted, bits = set(), 0
    for layer in model.modules():
        if isinstance(layer, QUANT_LAYERS):
            slot = layer.weight_quantizer
            storage = getattr(slot, "storage_bits", None)
            bits += storage(layer.weight) if storage else 32 * layer.weight.numel()
            counted.add(id(layer.weight))
            for q in layer.input_quantizer.modules():
                if isinstance(q, AffineQuantizer):
                    bits += 64 * q.scale.numel()
            for sub in (layer.weight_quantizer, layer.input_quantizer):
                counted.update(id(t) for t in [*sub.buffers(), *sub.parameters()])
    rest = [t for t in [*model.parameters(), *model.buffers()] if id(t) not in counted]
    return (bits + _float_bits(rest)) // 8


def huffman_size_bytes(model: nn.Module) -> int:
    """:func:`quantized_size_bytes` with every k-means index stream Huffman-coded (Deep
    Compression's last stage) instead of stored at a fixed width."""
    from lowbit.nn.shared_weights import KMeansQuantizer
    from lowbit.quant.kmeans import huffman_bits

    saved = 0
    for layer in model.modules():
        q = getattr(layer, "weight_quantizer", None)
        if isinstance(q, KMeansQuantizer):
            fixed = q.storage_bits(layer.weight) - 32 * q.codebook.numel()
            saved += fixed - huffman_bits(q.indices)
    return quantized_size_bytes(model) - saved // 8
