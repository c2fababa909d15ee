"""Pure tensor math of quantization: no ``nn.Module``, no I/O.

Every function here is a formula of ``ALGORITHMS.md`` with the formula and its paper in the
docstring. Rounding is ``torch.round`` (half to even) everywhere.
"""
from lowbit.quant.affine import (
    FakeQuantizeSTE,
    QScheme,
    affine_qparams,
    dequantize,
    fake_quantize,
    integer_range,
    quantize,
)
from lowbit.quant.aciq import aciq_alpha, aciq_range
from lowbit.quant.bias_correction import correct_weight_bias
from lowbit.quant.binary import (SignSTE, TTQTernarize, binarize, bwn_alpha, stochastic_binarize,
                                 twn_ternarize, xnor_input_scale)
from lowbit.quant.bit_alloc import allocate_bits
from lowbit.quant.equalize import equalization_scales
from lowbit.quant.kmeans import cluster_weights, huffman_bits, kmeans_1d
from lowbit.quant.ranges import (
    bn_activation_range,
    ema_update,
    minmax_range,
    mse_range,
    percentile_range,
)

__all__ = [
    "FakeQuantizeSTE", "QScheme", "affine_qparams", "dequantize", "fake_quantize", "integer_range",
    "quantize", "aciq_alpha", "aciq_range", "correct_weight_bias", "allocate_bits",
    "equalization_scales", "bn_activation_range", "ema_update", "minmax_range", "mse_range",
    "percentile_range", "SignSTE", "TTQTernarize", "binarize", "bwn_alpha",
    "stochastic_binarize", "twn_ternarize", "xnor_input_scale", "cluster_weights", "huffman_bits",
    "kmeans_1d",
]
