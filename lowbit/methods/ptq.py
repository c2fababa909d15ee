"""Post-training quantization (Banner, Nahshan, Soudry, NeurIPS 2019), plus the well-founded
steps a user expects around it: BN folding, cross-layer equalization (Nagel et al. 2019) and
empirical bias correction and learned rounding (AdaRound, Nagel et al. 2020).

Pipeline of :func:`quantize` (each step optional except 1, 4, 5):

1. copy the model, fold BN into the preceding conv (graph tracing);
2. cross-layer equalization of conv -> ReLU -> conv pairs;
3. record the float model's per-layer outputs (their means for empirical bias correction, the
   whole outputs for AdaRound);
4. weights: per-channel range (min-max / percentile / MSE), per-channel bit allocation
   (alpha^(2/3) rule with alpha = std of the channel), then Banner's weight bias correction
   (restoring each channel's mean, or mean and std);
5. activations, at the input of every Conv / Linear: one pass over the calibration set *as one
   batch*, in execution order, so each layer's range is fitted to the input it really receives
   (upstream layers already quantized); ranges by min-max, EMA, percentile, MSE or ACIQ,
   unsigned when the input is non-negative, optionally per channel with bit allocation;
   AdaRound then learns each layer's weight rounding on that quantized input against the float
   layer's output (the weights are rewritten onto the grid points it chose); empirical bias correction (Nagel et al. 2019; Finkelstein et al. 2019) shifts each layer's
   bias so its mean output matches the float model's, in the same pass, so the correction of
   one layer is seen by the next;
6. every bias is rounded to its int32 accumulator grid ``S_W * S_X`` (``int_bias``), as an
   integer device stores it, so the simulation adds the bias the device adds; in the same pass,
   right after the layer's own correction, so later layers' corrections absorb the rounding.

Calibration data is whatever the caller gives; the CLI only ever draws it from training images.
"""
from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from lowbit.config import ConfigMixin
from lowbit.errors import CheckpointError, ConfigError, DataError, NumericalError
from lowbit.nn.accumulator import round_bias, round_biases
from lowbit.nn.layers import QUANT_LAYERS, WRAPPERS
from lowbit.nn.quantizer import AffineQuantizer, CorrectedQuantizer, affine_part
from lowbit.policy import LayerBits, LayerPolicy
from lowbit.quant.aciq import aciq_range
from lowbit.quant.adaround import AdaRoundSchedule, learn_rounding
from lowbit.quant.affine import QScheme, broadcast_along, check_bits, integer_range
from lowbit.quant.bias_correction import correct_weight_bias
from lowbit.quant.bit_alloc import allocate_bits
from lowbit.quant.ranges import bn_activation_range, channel_sample, ema_update, minmax_range, \
    mse_range, percentile_range
from lowbit.transforms import bn_sources, equalize_model, fold_batchnorm, layer_order, \
    swap_layers

A_CLIPS = ("minmax", "ema", "percentile", "mse", "aciq-laplace", "aciq-gauss", "bn")
W_CLIPS = ("minmax", "percentile", "mse")
BIAS_CORRECTIONS = (None, "mean", "mean_std")
W_ROUNDINGS = ("nearest", "adaround")
BIT_ALLOC_MAX_BITS = 4  # as in the reference code, allocation only below 5 bits
EMA_CHUNK = 64  # images per EMA step when clip == "ema"


@dataclass
class PTQConfig(ConfigMixin):
    """Everything that decides a post-training quantization run (YAML recipes use these keys)."""

    label = "PTQ"

    w_bits: int = 8
    a_bits: int | None = 8
    w_per_channel: bool = True
    a_per_channel: bool = False
    w_symmetric: bool = False
    a_symmetric: bool = False
    w_clip: str = "minmax"
    clip: str = "minmax"
    percentile: float = 99.99
    bn_clip_n: float = 6.0
    bn_signed_gamma: bool = False
    w_bit_alloc: bool = False
    a_bit_alloc: bool = False
    bias_correction: str | None = None
    empirical_bias_correction: bool = False
    w_round: str = "nearest"
    round_iters: int = 1000
    equalize: bool = False
    int_bias: bool = True
    fold_bn: bool = True
    calib: int = 1024
    first_last_bits: int | None = 8
    skip: list[str] = field(default_factory=list)
    overrides: dict[str, dict] = field(default_factory=dict)
    seed: int = 0

    def validate(self) -> "PTQConfig":
        check_bits(self.w_bits, "w_bits")
        if self.a_bits is not None:
            check_bits(self.a_bits, "a_bits")
        for name, value, choices in (("clip", self.clip, A_CLIPS), ("w_clip", self.w_clip, W_CLIPS),
                                     ("bias_correction", self.bias_correction, BIAS_CORRECTIONS),
                                     ("w_round", self.w_round, W_ROUNDINGS)):
            if value not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))}; "
                                  f"got {value!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise ConfigError(f"percentile must be in (50, 100], got {self.percentile}")
        if isinstance(self.calib, bool) or not isinstance(self.calib, int) or self.calib < 1:
            raise ConfigError(f"calib must be a positive number of images, got {self.calib!r}")
        if self.a_bit_alloc and self.a_bits is None:
            raise ConfigError("a_bit_alloc needs a_bits")
        if self.w_round == "adaround" and self.bias_correction is not None:
            raise ConfigError("bias_correction corrects nearest rounding; with w_round: adaround "
                              "the learned rounding already minimises the output error: set "
                              "bias_correction to null (empirical_bias_correction still works)")
        if isinstance(self.round_iters, bool) or not isinstance(self.round_iters, int) \
                or self.round_iters < 1:
            raise ConfigError(f"round_iters must be a positive integer, got {self.round_iters!r}")
        self.policy().validate()
        return self

    def policy(self) -> LayerPolicy:
        return LayerPolicy(self.first_last_bits, list(self.skip), dict(self.overrides))


@dataclass
class QuantInfo:
    """What a quantized model carries about how it was made (saved with its checkpoint)."""

    method: str
    config: dict
    plan: dict[str, LayerBits]
    folded: bool
    notes: list[str] = field(default_factory=list)
    calibration_seconds: float = 0.0
    equalized_pairs: int = 0


# ---------------------------------------------------------------------------------------------
# Building the quantized structure


def _weight_quantizer(config: PTQConfig, bits: LayerBits, name: str) -> nn.Module:
    scheme = QScheme(bits.w_bits, signed=config.w_symmetric, symmetric=config.w_symmetric,
                     narrow=config.w_symmetric)
    q = AffineQuantizer(scheme, axis=0 if config.w_per_channel else None, name=f"{name}.weight")
    return CorrectedQuantizer(q) if config.bias_correction in ("mean", "mean_std") else q


def _input_quantizer(config: PTQConfig, bits: LayerBits, name: str):
    if bits.a_bits is None:
        return None
    per_channel = config.a_per_channel or config.a_bit_alloc
    # Per-channel input ranges along channels (axis 1); a Linear's input is [N, C] too.
    scheme = QScheme(bits.a_bits, signed=False, symmetric=config.a_symmetric)
    return AffineQuantizer(scheme, axis=1 if per_channel else None, name=f"{name}.input")


def prepare(model: nn.Module, config: PTQConfig, plan: dict[str, LayerBits], folded: bool):
    """The quantized structure (uncalibrated): BN folded if ``folded``, each planned layer
    wrapped with empty quantizers. Used by :func:`quantize` and to reload a checkpoint."""
    if folded:
        model, reason = fold_batchnorm(model)
        if reason:
            raise CheckpointError(f"the checkpoint was made with BN folded but the model cannot "
                                  f"be traced now: {reason}")
    with_bias = config.empirical_bias_correction

    def wrap(name, layer):
        if name not in plan:
            return None
        bits = plan[name]
        return WRAPPERS[type(layer)].from_float(
            layer, _weight_quantizer(config, bits, name),
            _input_quantizer(config, bits, name), with_bias=with_bias)

    return swap_layers(model, wrap)


# ---------------------------------------------------------------------------------------------
# Calibration


def calibration_tensor(calib_data, limit: int) -> torch.Tensor:
    """Concatenate up to ``limit`` inputs from an iterable of tensors or (input, target) batches."""
    if isinstance(calib_data, torch.Tensor):
        calib_data = [calib_data]
    chunks, n = [], 0
    for batch in calib_data:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(x, torch.Tensor):
            raise DataError(f"calibration batches must be tensors or (input, target) pairs, "
                            f"got {type(x).__name__}")
        chunks.append(x[: limit - n].float())
        n += len(chunks[-1])
        if n >= limit:
            break
    if n == 0:
        raise DataError("the calibration set is empty: give at least one input image")
    x = torch.cat(chunks)
    if not torch.isfinite(x).all():
        raise DataError("the calibration data contains NaN or Inf values")
    if n < 32:
        warnings.warn(f"only {n} calibration images: ranges may be poor (1,024 is typical)",
                      stacklevel=3)
    return x


def check_finite(model: nn.Module) -> None:
    """Raise NumericalError naming the first parameter or buffer holding NaN / Inf."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NumericalError(f"{name} contains NaN or Inf values; fix the checkpoint first")


def _bits_for(sample: torch.Tensor, bits: int, enabled: bool, proxy: str) -> int | torch.Tensor:
    """Per-channel bits from the allocation rule (on a [C, K] sample), or the plain width."""
    if not enabled or bits > BIT_ALLOC_MAX_BITS or sample.shape[0] < 2:
        return bits
    # alpha_i is proportional to the channel's spread (Banner: std, or b for the Laplace prior)
    if proxy == "laplace":
        alpha = (sample - sample.mean(1, keepdim=True)).abs().mean(1)
    else:
        alpha = sample.std(1)
    return allocate_bits(alpha, bits)


def _range(sample: torch.Tensor, exact: tuple, method: str, bits, quantizer: AffineQuantizer,
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


@torch.no_grad()
def calibrate_weights(model: nn.Module, config: PTQConfig) -> None:
    for name, layer in model.named_modules():
        if not isinstance(layer, QUANT_LAYERS):
            continue
        slot = layer.weight_quantizer
        quantizer = affine_part(slot)
        w = layer.weight.detach()
        per_channel = quantizer.axis is not None
        exact = minmax_range(w, 0 if per_channel else None)
        rows = channel_sample(w, 0, max_total=w.numel())  # every weight, one row per channel
        bits = _bits_for(rows, quantizer.scheme.bits, config.w_bit_alloc and per_channel, "std")
        sample = rows if per_channel else rows.reshape(1, -1)
        lo, hi = _range(sample, exact, config.w_clip, bits, quantizer, quantizer.scheme.signed,
                        config.percentile, per_channel)
        quantizer.set_range(lo, hi, bits)
        if isinstance(slot, CorrectedQuantizer):
            slot.set_correction(*correct_weight_bias(w, quantizer(w), config.bias_correction))


def _set_input_range(quantizer: AffineQuantizer, x: torch.Tensor, config: PTQConfig,
                     bn=None) -> None:
    """Fit an input quantizer to ``x``; with ``clip="bn"`` and a BatchNorm ``bn`` feeding this
    non-negative input the range is data-free: [0, beta + n gamma] (max over channels unless
    per channel)."""
    per_channel = quantizer.axis is not None and x.dim() >= 2
    axis = 1 if per_channel else None
    dims = [d for d in range(x.dim()) if d != 1]
    exact = (x.amin(dims), x.amax(dims)) if per_channel else tuple(torch.aminmax(x))
    signed = bool(exact[0].min() < 0)
    sample = channel_sample(x, axis, seed=config.seed)
    prior = config.clip[5:] if config.clip.startswith("aciq-") else "std"
    bits = _bits_for(sample, quantizer.scheme.bits, config.a_bit_alloc and per_channel, prior)
    if config.clip == "bn" and bn is not None and not signed:  # a ReLU'd BatchNorm output
        lo, hi = bn_activation_range(bn.bias, bn.weight, config.bn_clip_n,
                                     config.bn_signed_gamma, per_channel)
    elif config.clip == "ema":
        lo = hi = None
        for chunk in x.split(EMA_CHUNK):
            c_lo, c_hi = minmax_range(chunk, axis)
            lo, hi = ema_update(lo, c_lo, 0.01), ema_update(hi, c_hi, 0.01)
    elif config.clip == "bn":  # no ReLU'd BatchNorm feeds this input (e.g. the image)
        lo, hi = exact
    else:
        lo, hi = _range(sample, exact, config.clip, bits, quantizer, signed, config.percentile,
                        per_channel)
    if not per_channel and quantizer.axis is not None:
        quantizer.axis = None  # e.g. a per-channel quantizer that met a 1-D input
    quantizer.set_range(lo, hi, bits, signed=signed)


def _output_means(y: torch.Tensor) -> torch.Tensor:
    """Per-channel mean of a layer output (channels on axis 1)."""
    return y.mean([d for d in range(y.dim()) if d != 1]) if y.dim() > 1 else y


@torch.no_grad()
def float_outputs(model: nn.Module, x: torch.Tensor, names, keep: bool) -> dict[str, tuple]:
    """Per named float layer on ``x``: (per-channel output mean, whole output if ``keep``)."""
    outputs, handles = {}, []
    modules = dict(model.named_modules())
    for name in names:
        handles.append(modules[name].register_forward_hook(
            lambda _m, _i, y, name=name: outputs.__setitem__(
                name, (_output_means(y), y if keep else None))))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return outputs


def _adaround(layer, x: torch.Tensor, target: torch.Tensor, config: PTQConfig,
              generator: torch.Generator) -> None:
    """Replace ``layer.weight`` by the grid values AdaRound chose (its quantizer reproduces
    them exactly: they are S * integer)."""
    q = layer.weight_quantizer
    w = layer.weight
    qparams = [broadcast_along(t, w, q.axis if t.dim() else None)
               for t in (q.scale, q.zero_point, q.quant_min, q.quant_max)]
    x_q = layer.input_quantizer(x)
    if x_q.dim() == 4:  # CPU convolutions (and their weight gradient) run faster this way
        x_q, target = (t.contiguous(memory_format=torch.channels_last) for t in (x_q, target))
    layer.weight.copy_(learn_rounding(w, *qparams, layer.forward_with, x_q, target,
                                      AdaRoundSchedule(iters=config.round_iters), generator))


@torch.no_grad()
def calibrate_activations(model: nn.Module, x: torch.Tensor, config: PTQConfig,
                          float_out: dict[str, tuple] | None, bns: dict | None = None) -> None:
    """One pass in execution order: fit each input range, then (optionally) learn the weight
    rounding and correct the bias, so every later layer sees this layer's final output."""
    handles, rounded = [], set()
    generator = torch.Generator().manual_seed(config.seed)

    def fit_input(name):
        def hook(layer, args):
            q = layer.input_quantizer
            if isinstance(q, AffineQuantizer) and not q.calibrated:
                if not torch.isfinite(torch.stack(torch.aminmax(args[0]))).all():  # NaN spreads
                    raise NumericalError(f"{q.name} receives NaN or Inf activations")
                _set_input_range(q, args[0], config, (bns or {}).get(name))
            if config.w_round == "adaround" and name not in rounded:  # a reused layer: once
                rounded.add(name)
                _adaround(layer, args[0], float_out[name][1], config, generator)
        return hook

    def finish_bias(name):
        """Empirical bias correction, then the bias onto its accumulator grid: both before any
        later layer is calibrated, so each later correction also absorbs this rounding."""
        def hook(layer, _args, y):
            if layer.bias is None:
                return y
            before = layer.bias.clone()
            if config.empirical_bias_correction:
                layer.bias.add_(float_out[name][0] - _output_means(y))
            if config.int_bias:
                round_bias(layer)
            return y + (layer.bias - before).reshape(1, -1, *([1] * (y.dim() - 2)))
        return hook

    for name, layer in model.named_modules():
        if isinstance(layer, QUANT_LAYERS):
            handles.append(layer.register_forward_pre_hook(fit_input(name)))
            if config.empirical_bias_correction or config.int_bias:
                handles.append(layer.register_forward_hook(finish_bias(name)))
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()


def quantize(model: nn.Module, config: PTQConfig | None = None, calib_data=None) -> nn.Module:
    """Post-training quantize ``model``; return a fake-quant copy that runs like the original.

    ``calib_data``: an iterable of input tensors or of ``(input, target)`` batches (training
    images, never the test set); the first ``config.calib`` images are used. The returned
    model carries a :class:`QuantInfo` as ``model.lowbit``.
    """
    config = (config or PTQConfig()).validate()
    if calib_data is None:
        raise DataError("quantize needs calibration data (an iterable of input batches)")
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    x = calibration_tensor(calib_data, config.calib)
    check_finite(model)
    qmodel = copy.deepcopy(model).eval()
    notes = []
    folded = False
    bns = None
    if config.clip == "bn":  # found before folding removes the BatchNorms
        bns, reason = bn_sources(qmodel)
        notes.append(f"bn clipping: {len(bns)} inputs from BatchNorm statistics, the others "
                     f"min-max{f' (not traceable: {reason})' if reason else ''}")
    if config.fold_bn:
        qmodel, reason = fold_batchnorm(qmodel)
        folded = not reason
        if reason:
            notes.append(f"not traceable ({reason}): BN not folded, no equalization")
    pairs = 0
    if config.equalize and folded:
        pairs = len(equalize_model(qmodel))
    elif config.equalize:
        notes.append("equalization skipped: it needs a traced (folded) model")
    order = layer_order(qmodel, x)
    if not order:
        raise ConfigError("the model has no Conv2d or Linear layer to quantize")
    plan = config.policy().resolve(order, config.w_bits, config.a_bits)
    if config.a_bits is not None and not any(b.a_bits for b in plan.values()):
        raise ConfigError("a_bits is set but no layer has an input to quantize "
                          "(all skipped or overridden); drop a_bits or quantize a layer")
    float_out = None
    if config.empirical_bias_correction or config.w_round == "adaround":
        float_out = float_outputs(qmodel, x, plan, keep=config.w_round == "adaround")
    qmodel = prepare(qmodel, config, plan, folded=False)
    calibrate_weights(qmodel, config)
    calibrate_activations(qmodel, x, config, float_out, bns)
    if config.int_bias:  # layers the calibration pass did not reach
        round_biases(qmodel)
    qmodel.lowbit = QuantInfo("ptq", config.to_dict(), plan, folded, notes,
                              time.perf_counter() - start, pairs)
    return qmodel


def restore(model: nn.Module, info: QuantInfo) -> nn.Module:
    """Rebuild the quantized structure of a saved PTQ model (weights loaded by the caller)."""
    config = PTQConfig.from_dict(info.config)
    qmodel = prepare(model.eval(), config, info.plan, info.folded)
    qmodel.lowbit = info
    return qmodel
