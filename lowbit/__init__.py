"""lowbit: make trained PyTorch CNNs small and fast (PTQ, QAT, weight sharing, binary/ternary).

    import lowbit
    qmodel = lowbit.quantize(model, lowbit.PTQConfig(w_bits=4, a_bits=4, clip="aciq-laplace",
                                                     w_bit_alloc=True, bias_correction="mean"),
                             calib_batches)
    top1 = lowbit.evaluate(qmodel, test_batches)
"""
from lowbit import errors
from lowbit.checkpoint import load_quantized, save_quantized
from lowbit.deploy import export_packed, load_packed
from lowbit.evaluate import evaluate
from lowbit.methods.ptq import PTQConfig, quantize
from lowbit.recipes import load_recipe
from lowbit.training import TrainConfig, train

__version__ = "0.1.0"
__all__ = ["errors", "evaluate", "PTQConfig", "quantize", "TrainConfig", "train",
           "load_recipe", "save_quantized",
           "load_quantized", "export_packed", "load_packed", "__version__"]
