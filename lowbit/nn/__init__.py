"""Stateful quantizers and the quantized layer wrappers."""
from lowbit.nn.layers import QUANT_LAYERS, WRAPPERS, QuantConv2d, QuantLinear
from lowbit.nn.lsq import LSQQuantizer
from lowbit.nn.observed import ObservedQuantizer
from lowbit.nn.psg import PSGGradientScaler
from lowbit.nn.quantizer import AffineQuantizer, CorrectedQuantizer

__all__ = ["QUANT_LAYERS", "WRAPPERS", "QuantConv2d", "QuantLinear", "AffineQuantizer",
           "CorrectedQuantizer", "LSQQuantizer", "ObservedQuantizer", "PSGGradientScaler"]
