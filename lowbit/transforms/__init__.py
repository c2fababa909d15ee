"""Graph and module transforms shared by every method: BN folding, cross-layer equalization,
execution order of layers, and swapping float layers for quantized wrappers."""
from lowbit.transforms.activations import remove_relus
from lowbit.transforms.bn_ranges import bn_sources
from lowbit.transforms.equalize import equalize_model
from lowbit.transforms.fold import fold_batchnorm, trace
from lowbit.transforms.swap import layer_order, quantizable_layers, swap_layers

__all__ = ["remove_relus", "bn_sources", "equalize_model", "fold_batchnorm", "trace", "layer_order", "quantizable_layers",
           "swap_layers"]
