"""Layer-by-layer streaming calibration of a prepared PTQ model (step 5 of
:mod:`lowbit.methods.ptq`).

The calibration set is consumed in batches and never held as one tensor:

1. :func:`calibration_images` reads up to ``calib`` images from the caller's iterable into an
   :class:`ActivationStore` of ``calib_batch_size`` batches (memory up to the budget, a
   temporary file beyond).
2. The traced network is cut into segments that hand one tensor to the next
   (:func:`lowbit.transforms.segments.segments`); an untraceable network is one segment.
3. For each segment, for each of its layers in execution order: every cached batch is run
   through the segment up to the layer (a pre-hook stops the pass there) and its input feeds a
   :class:`RangeObserver`; the input quantizer is fitted from the observer. With AdaRound or
   empirical bias correction the layer's inputs are cached too, and the float model's segment
   gives the float layer's output on the same images, batch by batch: AdaRound accumulates its
   reconstruction error as a quadratic form (:class:`ReconstructionError`), bias correction the
   per-channel mean; then the rounding is learned and the bias corrected and rounded to its
   int32 grid, before the next layer.
4. The segment's outputs on every batch become the next segment's cached input (the float
   model's too, when needed), and the old cache is freed.

Memory is the budget plus one batch's activations and the model; time is one pass of the
network per segment plus, inside a segment of ``k`` layers, ``k`` partial passes of that segment
(the segments are short: a residual block, or one layer of a plain chain).
"""
from __future__ import annotations

import warnings

import torch
from torch import fx, nn

from lowbit.errors import CalibrationError, DataError, NumericalError
from lowbit.nn.accumulator import round_bias
from lowbit.nn.quantizer import AffineQuantizer
from lowbit.quant.aciq import aciq_range
from lowbit.quant.adaround import AdaRoundSchedule, ReconstructionError, learn_rounding
from lowbit.quant.affine import broadcast_along, integer_range
from lowbit.quant.bit_alloc import allocate_bits
from lowbit.quant.observer import RangeObserver
from lowbit.quant.ranges import bn_activation_range, mse_range, percentile_range
from lowbit.methods.activation_store import ActivationStore, MemoryBudget

BIT_ALLOC_MAX_BITS = 4  # as in the reference code, allocation only below 5 bits


def calibration_images(calib_data, limit: int, batch_size: int, budget: MemoryBudget,
                       device: torch.device | str = "cpu") -> ActivationStore:
    """Up to ``limit`` input images from an iterable of tensors or ``(input, target)`` batches,
    regrouped into batches of ``batch_size``, checked finite, cached on ``device``."""
    if isinstance(calib_data, torch.Tensor):
        calib_data = [calib_data]
    store = ActivationStore(budget, "the calibration images")
    pending, n = [], 0
    for batch in calib_data:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, torch.Tensor):
            raise DataError(f"calibration batches must be tensors or (input, target) pairs, "
                            f"got {type(x).__name__}")
        x = x[: limit - n].float()
        if not torch.isfinite(x).all():
            raise DataError("the calibration data contains NaN or Inf values")
        pending.append(x)
        n += len(x)
        while sum(map(len, pending)) >= batch_size:
            pending = list(torch.cat(pending).split(batch_size))
            store.append(pending.pop(0).clone().to(device))
        if n >= limit:
            break
    if pending and sum(map(len, pending)):
        store.append(torch.cat(pending).to(device))
    if n == 0:
        raise DataError("the calibration set is empty: give at least one input image")
    if n < 32:
        warnings.warn(f"only {n} calibration images: ranges may be poor (1,024 is typical)",
                      stacklevel=3)
    return store


def bits_for(sample: torch.Tensor, bits: int, enabled: bool, proxy: str) -> int | torch.Tensor:
    """Per-channel bits from the allocation rule (on a [C, K] sample), or the plain width."""
    if not enabled or bits > BIT_ALLOC_MAX_BITS or sample.shape[0] < 2:
        return bits
    # alpha_i is proportional to the channel's spread (Banner: std, or b for the Laplace prior)
    if proxy == "laplace":
        alpha = (sample - sample.mean(1, keepdim=True)).abs().mean(1)
    else:
        alpha = sample.std(1)
    return allocate_bits(alpha, bits)


def fit_range(sample: torch.Tensor, exact: tuple, method: str, bits, quantizer: AffineQuantizer,
              signed: bool, percentile: float, per_channel: bool):
    """(lo, hi) by ``method`` from a [C, K] sample (min-max uses the ``exact`` extremes);
    scalars when not per channel."""
    if method == "minmax":
        return exact
    axis = 0 if per_channel else None
    if method == "percentile":
        return percentile_range(sample, percentile, axis)
    if method == "mse":
        qmin, qmax = integer_range(torch.as_tensor(bits), signed, quantizer.scheme.narrow)
        return mse_range(sample, qmin, qmax, quantizer.scheme.symmetric, axis)
    prior = method.split("-")[1]
    return aciq_range(sample, bits, prior, axis, rectified=not signed)


def set_input_range(quantizer: AffineQuantizer, seen: RangeObserver, config, bn=None) -> None:
    """Fit an input quantizer to what ``seen`` observed; with ``clip="bn"`` and a BatchNorm
    ``bn`` feeding this non-negative input the range is data-free: [0, beta + n gamma] (max
    over channels unless per channel)."""
    per_channel = seen.per_channel
    sample = seen.sample
    prior = config.clip[5:] if config.clip.startswith("aciq-") else "std"
    bits = bits_for(sample, quantizer.scheme.bits, config.a_bit_alloc and per_channel, prior)
    if config.clip == "bn" and bn is not None and not seen.signed:  # a ReLU'd BatchNorm output
        lo, hi = bn_activation_range(bn.bias, bn.weight, config.bn_clip_n,
                                     config.bn_signed_gamma, per_channel)
    elif config.clip == "ema":
        lo, hi = seen.ema_range
    elif config.clip == "bn":  # no ReLU'd BatchNorm feeds this input (e.g. the image)
        lo, hi = seen.exact
    else:
        lo, hi = fit_range(sample, seen.exact, config.clip, bits, quantizer, seen.signed,
                           config.percentile, per_channel)
    if not per_channel and quantizer.axis is not None:
        quantizer.axis = None  # e.g. a per-channel quantizer that met a 1-D input
    quantizer.set_range(lo, hi, bits, signed=seen.signed)


class _Reached(Exception):
    """Stops a forward pass at the layer being calibrated, carrying its input or output."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value


def _run_to(module: nn.Module, layer: nn.Module, x: torch.Tensor, output: bool) -> torch.Tensor:
    """``layer``'s input (or output) when ``module`` runs on ``x``; the pass stops there."""
    def reached(*hook_args):
        raise _Reached(hook_args[2] if output else hook_args[1][0])

    handle = layer.register_forward_hook(reached) if output else \
        layer.register_forward_pre_hook(reached)
    try:
        module(x)
    except _Reached as stop:
        return stop.value
    finally:
        handle.remove()
    raise CalibrationError(f"{type(layer).__name__} was not called by its segment")


def _channel_sums(y: torch.Tensor) -> torch.Tensor:
    """Per-channel sum of a layer output (channels on axis 1), in float64."""
    return y.double().sum([d for d in range(y.dim()) if d != 1]) if y.dim() > 1 \
        else y.double()


def _per_image(y: torch.Tensor) -> int:
    """How many values per channel one image adds to :func:`_channel_sums`."""
    return y[0, 0].numel() if y.dim() > 1 else 1


def _adaround(layer, error: ReconstructionError, config) -> None:
    """Replace ``layer.weight`` by the grid values AdaRound chose (its quantizer reproduces
    them exactly: they are S * integer)."""
    q = layer.weight_quantizer
    w = layer.weight
    qparams = [broadcast_along(t, w, q.axis if t.dim() else None)
               for t in (q.scale, q.zero_point, q.quant_min, q.quant_max)]
    layer.weight.copy_(learn_rounding(w, *qparams, error,
                                      AdaRoundSchedule(iters=config.round_iters)))


@torch.no_grad()
def calibrate_activations(qmodel: nn.Module, images: ActivationStore, config, order: list[str],
                          budget: MemoryBudget, float_model: nn.Module | None = None,
                          graphs: list | None = None, bns: dict | None = None) -> None:
    """Fit every input quantizer of ``qmodel`` (and learn the rounding / correct the bias) layer
    by layer, segment by segment (module docstring). ``order``: the layers in execution order;
    ``graphs``: the segment graphs (None: the whole model is one segment); ``float_model``: the
    float model for AdaRound and empirical bias correction. ``images`` is consumed: it is
    cleared once the first segment's outputs are cached."""
    if graphs:
        runs = [(fx.GraphModule(qmodel, g),
                 fx.GraphModule(float_model, g) if float_model is not None else None,
                 [n.target for n in g.nodes if n.op == "call_module" and n.target in order])
                for g in graphs]
    else:
        runs = [(qmodel, float_model, list(order))]
    modules = dict(qmodel.named_modules())
    float_modules = dict(float_model.named_modules()) if float_model is not None else {}
    done = set()
    q_in, f_in = images, images
    for k, (q_seg, f_seg, names) in enumerate(runs):
        for name in names:
            if name not in done:  # a layer called twice is calibrated at its first call
                done.add(name)
                _calibrate_layer(name, modules[name], float_modules.get(name), q_seg, f_seg,
                                 q_in, f_in, config, (bns or {}).get(name), budget)
        if k + 1 < len(runs):
            q_next = _outputs(q_seg, q_in, budget, f"the input of segment {k + 2}")
            f_next = _outputs(f_seg, f_in, budget, f"the float input of segment {k + 2}") \
                if f_seg is not None else None
            for store in {id(s): s for s in (q_in, f_in) if s is not None}.values():
                store.clear()  # the images too: from here on the segments' outputs stand in
            q_in, f_in = q_next, f_next


def _outputs(module: nn.Module, inputs: ActivationStore, budget: MemoryBudget,
             what: str) -> ActivationStore:
    out = ActivationStore(budget, what)
    for x in inputs:
        out.append(module(x))
    return out


def _calibrate_layer(name: str, layer, float_layer, q_seg, f_seg, q_in: ActivationStore,
                     f_in: ActivationStore, config, bn, budget: MemoryBudget) -> None:
    """Observe and fit one layer's input, then AdaRound / bias correction / bias rounding."""
    quantizer = layer.input_quantizer
    fit = isinstance(quantizer, AffineQuantizer) and not quantizer.calibrated
    learn = config.w_round == "adaround"
    correct = config.empirical_bias_correction and layer.bias is not None
    inputs = ActivationStore(budget, f"the input of {name}") if learn or correct else None
    if fit or inputs is not None:
        seen = None
        for x in q_in:
            v = _run_to(q_seg, layer, x, output=False)
            if not torch.isfinite(torch.stack(torch.aminmax(v))).all():  # NaN spreads
                raise NumericalError(f"{name}.input receives NaN or Inf activations")
            if fit:
                seen = seen or RangeObserver(len(q_in), quantizer.axis is not None and
                                             v.dim() >= 2, seed=config.seed)
                seen.update(v)
            if inputs is not None:
                inputs.append(v)
        if fit:
            set_input_range(quantizer, seen, config, bn)
    if inputs is not None:
        error = ReconstructionError(layer, len(q_in), seed=config.seed) if learn else None
        float_sum, count = 0, 0
        for v, x in zip(inputs, f_in):
            y = _run_to(f_seg, float_layer, x, output=True)
            if learn:
                error.update(layer.input_quantizer(v), y)
            float_sum, count = float_sum + _channel_sums(y), count + len(y) * _per_image(y)
        if learn:
            _adaround(layer, error, config)
        if correct:
            q_sum = sum(_channel_sums(layer(v)) for v in inputs)
            layer.bias.add_(((float_sum - q_sum) / count).to(layer.bias.dtype))
        inputs.clear()
    if config.int_bias and layer.bias is not None:
        round_bias(layer)
