"""Post-training quantization (Banner, Nahshan, Soudry, NeurIPS 2019), plus the well-founded
steps a user expects around it: BN folding, cross-layer equalization (Nagel et al. 2019) and
empirical bias correction and learned rounding (AdaRound, Nagel et al. 2020).

Pipeline of :func:`quantize` (each step optional except 1, 4, 5):

1. copy the model, fold BN into the preceding conv (graph tracing);
2. cross-layer equalization of conv -> ReLU -> conv pairs;
3. keep a copy of the float (folded, equalized) model when empirical bias correction or
   AdaRound need its per-layer outputs;
4. weights: per-channel range (min-max / percentile / MSE), per-channel bit allocation
   (alpha^(2/3) rule with alpha = std of the channel), then Banner's weight bias correction
   (restoring each channel's mean, or mean and std);
5. activations, at the input of every Conv / Linear, **layer by layer in execution order and
   streaming**: the calibration set is consumed in batches of ``calib_batch_size``; the traced
   network is cut into segments that hand one tensor to the next
   (:mod:`lowbit.transforms.segments`), and only the current segment's input is cached over the
   whole set (in memory up to ``calib_memory``, spilled to a temporary file beyond it:
   :mod:`lowbit.methods.activation_store`). Each layer's range is fitted to the input it really
   receives (upstream layers already quantized), from streaming statistics whose result does not
   depend on the batch size (:mod:`lowbit.quant.observer`: exact min / max, a per-image-seeded
   sample, EMA over 64-image chunks); ranges by min-max, EMA, percentile, MSE or ACIQ, unsigned
   when the input is non-negative, optionally per channel with bit allocation. AdaRound then
   learns the layer's weight rounding on its cached quantized input against the float layer's
   output on the same images (the weights are rewritten onto the grid points it chose);
   empirical bias correction (Nagel et al. 2019; Finkelstein et al. 2019) shifts the layer's
   bias so its mean output matches the float model's; both before the next layer is calibrated,
   so the correction of one layer is seen by the next. A model that cannot be traced is one
   segment: each layer then re-runs the network from its input (the same results, more time);
6. every bias is rounded to its int32 accumulator grid ``S_W * S_X`` (``int_bias``), as an
   integer device stores it, so the simulation adds the bias the device adds; in the same pass,
   right after the layer's own correction, so later layers' corrections absorb the rounding.

Calibration data is whatever the caller gives; the CLI only ever draws it from training images.
"""
from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from lowbit.config import ConfigMixin
from lowbit.devices import module_device, resolve_device
from lowbit.errors import CheckpointError, ConfigError, DataError, NumericalError
from lowbit.methods.calibration import bits_for, calibrate_activations, calibration_images, \
    fit_range
from lowbit.nn.accumulator import round_biases
from lowbit.nn.layers import QUANT_LAYERS, WRAPPERS
from lowbit.nn.quantizer import AffineQuantizer, CorrectedQuantizer, affine_part
from lowbit.policy import LayerBits, LayerPolicy
from lowbit.quant.affine import QScheme, check_bits
from lowbit.quant.bias_correction import correct_weight_bias
from lowbit.quant.ranges import channel_sample, minmax_range
from lowbit.methods.activation_store import ActivationStore, MemoryBudget, gib, parse_bytes
from lowbit.methods.mixed_precision import ESTIMATORS, Budget, candidate_list, mixed_plan
from lowbit.transforms import bn_sources, equalize_model, fold_batchnorm, layer_order, \
    swap_layers, trace
from lowbit.transforms.segments import segments

A_CLIPS = ("minmax", "ema", "percentile", "mse", "aciq-laplace", "aciq-gauss", "bn")
W_CLIPS = ("minmax", "percentile", "mse")
BIAS_CORRECTIONS = (None, "mean", "mean_std")
W_ROUNDINGS = ("nearest", "adaround")


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
    calib_batch_size: int = 64
    calib_memory: str = "2GiB"
    first_last_bits: int | None = 8
    skip: list[str] = field(default_factory=list)
    overrides: dict[str, dict] = field(default_factory=dict)
    size_budget: int | str | None = None
    avg_bits: float | None = None
    bops_budget: float | None = None
    w_candidates: list[int] = field(default_factory=lambda: [2, 3, 4, 6, 8])
    a_candidates: list[int] = field(default_factory=list)
    sensitivity: str = "hessian"
    size_entropy: str | None = None  # "huffman": size_budget counts the Huffman-coded file
    sensitivity_images: int = 256
    hessian_samples: int = 32
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
        if isinstance(self.calib_batch_size, bool) or not isinstance(self.calib_batch_size, int) \
                or self.calib_batch_size < 1:
            raise ConfigError(f"calib_batch_size must be a positive number of images, "
                              f"got {self.calib_batch_size!r}")
        parse_bytes(self.calib_memory)
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
        self._validate_budget()
        return self

    def _validate_budget(self) -> None:
        if self.size_budget is not None and parse_bytes(self.size_budget) <= 0:
            raise ConfigError(f"size_budget must be positive, got {self.size_budget!r}")
        for name in ("avg_bits", "bops_budget"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or
                                      not isinstance(value, (int, float)) or not value > 0):
                raise ConfigError(f"{name} must be a positive number, got {value!r}")
        for name in ("w_candidates", "a_candidates"):
            for bits in getattr(self, name):
                check_bits(bits, f"{name} entry")
        if not self.w_candidates:
            raise ConfigError("w_candidates must list at least one weight width")
        if self.a_candidates and self.a_bits is None:
            raise ConfigError("a_candidates choose input widths: they need a_bits")
        from lowbit.deploy.entropy import CODINGS  # lowbit.deploy imports the methods

        if self.size_entropy is not None and self.size_entropy not in CODINGS:
            raise ConfigError(f"size_entropy must be one of {', '.join(CODINGS)} or null, "
                              f"got {self.size_entropy!r}")
        if self.sensitivity not in ESTIMATORS:
            raise ConfigError(f"sensitivity must be one of {', '.join(ESTIMATORS)}, "
                              f"got {self.sensitivity!r}")
        for name in ("sensitivity_images", "hessian_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")

    def budget(self) -> Budget | None:
        """The mixed-precision budget, or None for one width everywhere."""
        if self.size_budget is None and self.avg_bits is None and self.bops_budget is None:
            return None
        size = parse_bytes(self.size_budget) if self.size_budget is not None else None
        return Budget(size, self.avg_bits, self.bops_budget)

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
    mixed: dict | None = None  # the mixed-precision report, when a budget chose the widths


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
# Calibration (activations: lowbit.methods.calibration)


def check_finite(model: nn.Module) -> None:
    """Raise NumericalError naming the first parameter or buffer holding NaN / Inf."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise NumericalError(f"{name} contains NaN or Inf values; fix the checkpoint first")


@torch.no_grad()
def calibrate_weights(model: nn.Module, config: PTQConfig) -> None:
    for layer in model.modules():
        if isinstance(layer, QUANT_LAYERS):
            fit_weight(layer.weight_quantizer, layer.weight.detach(), config)


@torch.no_grad()
def fit_weight(slot: nn.Module, w: torch.Tensor, config: PTQConfig) -> None:
    """Range (and bit allocation, bias correction) of one weight quantizer slot from ``w``."""
    quantizer = affine_part(slot)
    per_channel = quantizer.axis is not None
    exact = minmax_range(w, 0 if per_channel else None)
    rows = channel_sample(w, 0, max_total=w.numel())  # every weight, one row per channel
    bits = bits_for(rows, quantizer.scheme.bits, config.w_bit_alloc and per_channel, "std")
    sample = rows if per_channel else rows.reshape(1, -1)
    lo, hi = fit_range(sample, exact, config.w_clip, bits, quantizer, quantizer.scheme.signed,
                       config.percentile, per_channel)
    quantizer.set_range(lo, hi, bits)
    if isinstance(slot, CorrectedQuantizer):
        slot.set_correction(*correct_weight_bias(w, quantizer(w), config.bias_correction))


def quantize(model: nn.Module, config: PTQConfig | None = None, calib_data=None,
             device=None) -> nn.Module:
    """Post-training quantize ``model``; return a fake-quant copy that runs like the original.

    ``calib_data``: an iterable of input tensors or of ``(input, target)`` batches (training
    images, never the test set); the first ``config.calib`` images are used. ``device``
    (``"cuda"``, ``"cpu"``; default: where ``model`` is) runs the calibration passes, AdaRound
    and bias correction; the graph transforms and weight ranges run on the CPU, and the result
    comes back on ``model``'s device. The returned model carries a :class:`QuantInfo` as
    ``model.lowbit``.
    """
    config = (config or PTQConfig()).validate()
    home = module_device(model)
    device = resolve_device(home if device is None else device)
    if calib_data is None:
        raise DataError("quantize needs calibration data (an iterable of input batches)")
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    check_finite(model)
    with MemoryBudget(parse_bytes(config.calib_memory)) as budget:
        images = calibration_images(calib_data, config.calib, config.calib_batch_size, budget,
                                    device)
        count = len(images)
        mixed = {} if config.budget() is not None else None
        qmodel, plan, notes, folded, pairs = _quantize(model, config, images, budget, device,
                                                       mixed)
    qmodel = qmodel.to(home)
    notes.append(f"calibration: {count} images in batches of {config.calib_batch_size}"
                 + (f", {gib(budget.spilled)} of activations spilled to disk"
                    if budget.spilled else ""))
    qmodel.lowbit = QuantInfo("ptq", config.to_dict(), plan, folded, notes, 0.0, pairs,
                              mixed=mixed.get("report") if mixed else None)
    if mixed is not None and config.budget().size_bytes is not None:
        measured = packed_file_size(qmodel, config.size_entropy)
        mixed["report"]["measured_bytes"] = measured
        if measured > config.budget().size_bytes:  # the margin below was too small
            warnings.warn(f"the packed file is {measured} bytes, "
                          f"{measured - config.budget().size_bytes} over size_budget "
                          f"{config.size_budget}", stacklevel=2)
    qmodel.lowbit.calibration_seconds = time.perf_counter() - start
    return qmodel


# The plan is solved for the budget less this margin: the file's non-code bytes are measured on
# a dry run at the uniform plan, and the final file's header differs from it by its model name
# (a torchvision spec, a user's module path) and its width fields; it is measured afterwards.
SIZE_MARGIN_BYTES = 256


def packed_file_size(qmodel: nn.Module, entropy: str | None = None) -> int:
    """Bytes of the packed file ``lowbit export [--entropy ENTROPY]`` writes for ``qmodel``
    (written to a temporary folder and measured)."""
    import tempfile
    from pathlib import Path

    from lowbit.deploy.packed import export_packed

    with tempfile.TemporaryDirectory() as folder:
        return export_packed(qmodel, Path(folder) / "m.lowbit", "model",
                             entropy=entropy).stat().st_size


def _fitted_slot(w: torch.Tensor, config: PTQConfig, w_bits: int) -> nn.Module:
    """The weight quantizer a PTQ run with ``config`` gives ``w`` at ``w_bits``, fitted."""
    slot = _weight_quantizer(config, LayerBits(w_bits, None), "weight")
    fit_weight(slot, w, config)
    return slot


def _code_bytes(w: torch.Tensor, slot: nn.Module, config: PTQConfig) -> int:
    """Bytes of ``w``'s codes in the packed file on its fitted weight quantizer ``slot``:
    bit-packed at their widths, or Huffman-coded with ``config.size_entropy`` (the coder run on
    the codes)."""
    from lowbit.deploy.bitpack import packed_size  # lowbit.deploy imports the methods
    from lowbit.deploy.entropy import coded_bytes
    from lowbit.deploy.packed import affine_codes

    codes, widths = affine_codes(w, affine_part(slot))
    coded = coded_bytes(codes.numpy()) if config.size_entropy else None
    if coded is not None:
        return coded
    per_row = codes.shape[1]
    return sum(packed_size(per_row, int(b)) for b in widths) if len(widths) == codes.shape[0] \
        and len(set(widths.tolist())) > 1 else packed_size(codes.numel(), int(widths[0]))


def _quantize(model: nn.Module, config: PTQConfig, images, budget, device: torch.device,
              mixed: dict | None = None):
    """The pipeline of the module docstring on cached calibration ``images``, calibrating on
    ``device``; returns ``(qmodel, plan, notes, folded, equalized pairs)``. ``mixed`` (a dict):
    choose the widths under ``config.budget()``; its ``"report"`` is filled in."""
    example = next(iter(images)).cpu()
    qmodel = copy.deepcopy(model).cpu().eval()
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
    order = layer_order(qmodel, example)
    if not order:
        raise ConfigError("the model has no Conv2d or Linear layer to quantize")
    plan = config.policy().resolve(order, config.w_bits, config.a_bits)
    if mixed is not None:
        plan = _mixed_plan(qmodel, config, plan, order, images, budget, mixed)
        notes.append(f"mixed precision: widths per layer chosen by {config.sensitivity} "
                     "sensitivity under the budget (the plan)")
    if config.a_bits is not None and not any(b.a_bits for b in plan.values()):
        raise ConfigError("a_bits is set but no layer has an input to quantize "
                          "(all skipped or overridden); drop a_bits or quantize a layer")
    graphs, reason = _segment_graphs(qmodel, example, plan)
    if reason:
        notes.append(f"calibrated without segments ({reason}): each layer re-runs the network")
    float_model = copy.deepcopy(qmodel) \
        if config.empirical_bias_correction or config.w_round == "adaround" else None
    qmodel = prepare(qmodel, config, plan, folded=False)
    calibrate_weights(qmodel, config)
    qmodel = qmodel.to(device)
    float_model = float_model.to(device) if float_model is not None else None
    calibrate_activations(qmodel, images, config, list(plan), budget, float_model, graphs, bns)
    if config.int_bias:  # layers the calibration pass did not reach
        round_biases(qmodel)
    return qmodel, plan, notes, folded, pairs


def _mixed_plan(model: nn.Module, config: PTQConfig, plan: dict, order: list[str], images,
                budget: MemoryBudget, mixed: dict) -> dict:
    """The plan with widths chosen under the budget (:mod:`lowbit.methods.mixed_precision`)
    on the folded float ``model``."""
    fixed = config.policy().fixed(order)
    free = [n for n in plan if n not in fixed]
    batches, n = [], 0
    for x in images:
        batches.append(x.cpu())
        n += len(x)
        if n >= config.sensitivity_images:
            break
    candidates = candidate_list(config.w_candidates, config.a_candidates, config.a_bits)
    weights = {name: model.get_submodule(name).weight.detach() for name in plan}
    if "fixed_bytes" not in mixed:
        mixed["fixed_bytes"] = _file_overhead(model, config, plan, batches[0][:2], budget)
    slots = {}  # each layer's weight quantizer fitted once per width, for both uses

    def slot(name, bits):
        if (name, bits) not in slots:
            slots[name, bits] = _fitted_slot(weights[name], config, bits)
        return slots[name, bits]
    new_plan, report = mixed_plan(
        model, plan, free, config.budget(), candidates, config.sensitivity, batches,
        lambda name, bits: slot(name, bits)(weights[name]),
        mixed["fixed_bytes"], config.hessian_samples, config.seed, mixed,
        code_bytes=lambda name, bits: _code_bytes(weights[name], slot(name, bits), config))
    mixed["report"] = report
    return new_plan


def _file_overhead(model: nn.Module, config: PTQConfig, plan: dict, sample: torch.Tensor,
                   budget: MemoryBudget) -> int:
    """Bytes of the packed file beside its weight codes: a dry run of the pipeline at the
    uniform ``plan`` on two images (nearest rounding and no empirical correction: they change
    values, not sizes), exported and measured, less its codes. Every input quantizer's
    parameters (per channel where the recipe says so) are then in the file as they will be.
    The per-channel width lists of weight bit allocation are counted for every layer whether
    or not this plan's widths happen to vary, and a margin covers the header's few changes."""
    quick = replace(config, w_round="nearest", empirical_bias_correction=False)
    probe = prepare(copy.deepcopy(model), quick, plan, folded=False)
    calibrate_weights(probe, quick)
    images = ActivationStore(budget, "the size probe's images")
    images.append(sample)
    calibrate_activations(probe, images, quick, list(plan), budget)
    probe.lowbit = QuantInfo("ptq", config.to_dict(), plan, False)
    total = packed_file_size(probe, config.size_entropy)
    for name in plan:
        layer = probe.get_submodule(name)
        rows, widths = layer.weight.shape[0], affine_part(layer.weight_quantizer).bits.reshape(-1)
        total -= _code_bytes(layer.weight.detach(), layer.weight_quantizer, config)
        if bool((widths != widths[0]).any()):
            total -= rows  # this plan's width list, counted below for every layer alike
        total += rows if config.w_bit_alloc else 0
    return total + SIZE_MARGIN_BYTES


def _segment_graphs(model: nn.Module, example: torch.Tensor, plan: dict) -> tuple[list | None, str]:
    """The segments of the (float) model for layer-by-layer calibration, or ``(None, reason)``
    when it cannot be cut (the whole model is then one segment)."""
    traced, reason = trace(model)
    if traced is None:
        return None, f"not traceable: {reason}"
    graphs = segments(traced, example, set(plan))
    if graphs is None:
        return None, "the traced model does not take one input"
    called = {n.target for g in graphs for n in g.nodes if n.op == "call_module"}
    missing = [name for name in plan if name not in called]
    if missing:
        return None, f"{missing[0]} is not called from the traced graph"
    return graphs, ""


def restore(model: nn.Module, info: QuantInfo) -> nn.Module:
    """Rebuild the quantized structure of a saved PTQ model (weights loaded by the caller)."""
    config = PTQConfig.from_dict(info.config)
    qmodel = prepare(model.eval(), config, info.plan, info.folded)
    qmodel.lowbit = info
    return qmodel
