"""Bits per layer under a budget: "the most accurate model that fits in N KiB" (ALGORITHMS.md 8.3).

The PTQ pipeline (:mod:`lowbit.methods.ptq`) calls :func:`mixed_plan` on the folded float model
when a budget is set, and quantizes with the plan it returns. Three budgets, any combination:

* ``size_budget``: bytes of the packed file (``lowbit export``), e.g. ``"120KiB"``;
* ``avg_bits``: the mean weight width over every quantized weight;
* ``bops_budget``: bit operations, ``sum_l MACs_l * w_l * a_l`` (a float input counts 32).

**Sensitivity** of layer ``l`` at candidate ``(w, a)``, an estimate of the loss increase:

* ``hessian`` (HAWQ-V2, Dong et al. 2020): ``Omega_l(w) = 1/2 Tr(H_l) / n_l ||Q_w(W_l) - W_l||^2``,
  ``H_l`` the Hessian of the cross entropy against the float model's own predictions
  (calibration has no labels) in layer ``l``'s weights. Where the network is piecewise linear in
  each weight (:func:`gauss_newton_exact`: ReLU / clamp, pooling, adds, concat, folded
  batch norm, each layer called once) ``H_l`` *is* its Gauss-Newton block, and the trace is
  computed exactly, with no random vectors (:func:`gauss_newton_traces`); otherwise by
  Hutchinson's method, ``Tr(H) ~ mean_i v_i^T H v_i`` over Rademacher ``v_i`` and ``Hv`` by
  double backpropagation (:func:`hessian_traces`). The input width's term is the measured one
  below with float weights (HAWQ has no activation Hessian).
* ``output``: the measured ``KL(p_float || p_q)`` of the network's output when layer ``l`` alone
  is quantized at ``(w, a)`` (input range: min-max over the sample batches).

``Q_w`` is the weight quantizer the PTQ run would use (same clipping, per-channel, symmetric
settings). **Solver**: the integer program ``min sum Omega_l(c) x_lc`` subject to one candidate
per layer and each budget (``scipy.optimize.milp``); a greedy descent from the widest candidates
(the cheapest sensitivity per saved cost first) where the program fails. The layer policy stays
in force: the first / last layer, skipped and overridden layers keep their bits and count
against the budget at those bits.

The size of a candidate plan is ``fixed + sum_l codes_l(w)``: ``codes`` the packed bytes of the
layer's weight codes (one bit stream, as :mod:`lowbit.deploy.bitpack` packs it), ``fixed``
everything else in the file (biases, scales, input qparams, header), measured by the PTQ
pipeline on the packed file of a dry run at the uniform plan, plus a small margin; the final
file is measured too and reported beside the prediction (:func:`lowbit.methods.ptq.quantize`).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import ConfigError
from lowbit.policy import LayerBits
from lowbit.transforms.fold import trace
from lowbit.transforms.ops import kind_of

ESTIMATORS = ("hessian", "output")
BUDGET_NAMES = {"size_bytes": "size_budget (bytes)", "avg_bits": "avg_bits",
                "bops": "bops_budget"}
FLOAT_INPUT_BITS = 32  # a layer whose input is not quantized costs 32-bit operands in BOPs
# Op kinds (lowbit.transforms.ops) whose output is piecewise linear in their tensor inputs.
PIECEWISE_LINEAR = {"layer", "clamp", "add", "concat", "avgpool", "maxpool", "resize", "move",
                    "meta"}
PER_SAMPLE_ELEMENTS = 1 << 24  # per-sample gradients held at once (64 MiB of float32)


@dataclass(frozen=True)
class LayerShape:
    """What a layer's width costs: its weights and its MACs per image."""

    weights: int
    macs: int

    def code_bytes(self, w_bits: int) -> int:
        return (self.weights * w_bits + 7) // 8  # one width: packed as one bit stream


@dataclass
class Budget:
    size_bytes: int | None = None
    avg_bits: float | None = None
    bops: float | None = None


def layer_shapes(model: nn.Module, names: list[str], example: torch.Tensor) -> dict[str, LayerShape]:
    """Weights and MACs per image of each named Conv2d / Linear."""
    shapes, handles = {}, []
    for name in names:
        layer = model.get_submodule(name)

        def hook(module, _inputs, out, name=name):
            per_output = module.weight[0].numel()  # in_channels / groups * kernel taps
            shapes[name] = LayerShape(module.weight.numel(), out[0].numel() * per_output)
        handles.append(layer.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model.eval()(example[:1])
    finally:
        for h in handles:
            h.remove()
    return shapes


def candidate_list(w_candidates, a_candidates, a_bits) -> list[tuple[int, int | None]]:
    widths = sorted(set(w_candidates))
    inputs = sorted(set(a_candidates)) if a_candidates else [a_bits]
    return [(w, a) for w in widths for a in inputs]


# ---------------------------------------------------------------------------------------------
# Sensitivity


def _pseudo_labels(model, batches):
    with torch.no_grad():
        return [model(x).argmax(1) for x in batches]


def hessian_traces(model: nn.Module, names: list[str], batches: list[torch.Tensor],
                   samples: int = 32, seed: int = 0) -> dict[str, float]:
    """Hutchinson's estimate of each layer's weight-Hessian trace ``Tr(H_l)`` of the cross
    entropy against the model's own predictions, averaged over ``batches``. One Rademacher
    vector over all layers per sample: ``v_l . (Hv)_l`` is unbiased for ``Tr(H_ll)`` (the
    cross-layer terms have mean zero). ``samples`` vectors per batch: fewer (32 in all over
    ResNet's four batches of 64, or 128 in all on chunks of 16 images) cut the search time by
    up to 4x but made ResNet-32's plan at the W3A4 size 0.9 to 3.4 points worse."""
    model = model.eval()
    weights = [model.get_submodule(n).weight for n in names]
    g = torch.Generator().manual_seed(seed)
    totals = torch.zeros(len(names), dtype=torch.float64)
    for x, y in zip(batches, _pseudo_labels(model, batches)):
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, weights, create_graph=True)
        for _ in range(samples):
            vs = [torch.randint(0, 2, w.shape, generator=g).to(w) * 2 - 1 for w in weights]
            hvs = torch.autograd.grad(sum((gr * v).sum() for gr, v in zip(grads, vs)), weights,
                                      retain_graph=True)
            totals += torch.tensor([float((hv * v).sum()) for hv, v in zip(hvs, vs)],
                                   dtype=torch.float64)
    count = samples * len(batches)
    return {n: float(t) / count for n, t in zip(names, totals)}


def gauss_newton_exact(model: nn.Module, names: list[str]) -> str:
    """"" when the Hessian of any loss of the logits in each named layer's weight equals its
    Gauss-Newton block, else why not. The Hessian of ``L(z(W))`` is
    ``J^T (d2L/dz2) J + sum_c dL/dz_c d2z_c/dW2``; the second term vanishes (almost
    everywhere) when the logits ``z`` are piecewise linear in ``W``: every op of the traced graph
    is piecewise linear in its tensor inputs (:data:`PIECEWISE_LINEAR`) and each named layer is a
    ``Conv2d`` (integer padding, zeros) or ``Linear`` called once."""
    graph_module, reason = trace(model)
    if graph_module is None:
        return reason
    modules, meta, calls = dict(graph_module.named_modules()), set(), {n: 0 for n in names}
    for node in graph_module.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        module = modules.get(node.target) if node.op == "call_module" else None
        kind = "layer" if isinstance(module, (nn.Conv2d, nn.Linear)) or (
            isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.training) \
            else kind_of(node, modules, meta)  # batch norm in eval mode is affine
        if kind == "meta":
            meta.add(node)
        if kind not in PIECEWISE_LINEAR:
            where, what = (node.target, type(module).__name__) if module is not None else \
                (node.name, getattr(node.target, "__name__", node.target))
            return f"{where} ({what}) is not piecewise linear"
        if node.target in calls:
            calls[node.target] += 1
    for name, count in calls.items():
        layer = model.get_submodule(name)
        if count != 1:
            return f"{name} is called {count} times"
        if isinstance(layer, nn.Conv2d) and (layer.padding_mode != "zeros" or
                                             isinstance(layer.padding, str)):
            return f"{name} pads with {layer.padding_mode} / {layer.padding}"
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            return f"{name} is a {type(layer).__name__}"
    return ""


def _per_sample_squared_norms(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> float:
    """``sum_n ||dz_n/dW||^2`` for the gradient ``grad_out`` at the layer's output, a few
    samples at a time. A conv's per-sample weight gradients are one weight gradient of a conv
    with the samples as groups (``torch.nn.grad.conv2d_weight``; 3 to 7 times faster here than
    unfolding the patches); a linear layer's are outer products."""
    step = max(1, PER_SAMPLE_ELEMENTS // layer.weight.numel())
    total = 0.0
    for i in range(0, x.shape[0], step):
        xs, gs = x[i:i + step], grad_out[i:i + step]
        n = len(xs)
        if isinstance(layer, nn.Conv2d):
            shape = layer.weight.shape
            grads = torch.nn.grad.conv2d_weight(
                xs.reshape(1, -1, *xs.shape[2:]), (n * shape[0], *shape[1:]),
                gs.reshape(1, -1, *gs.shape[2:]), layer.stride, layer.padding, layer.dilation,
                n * layer.groups)
        else:
            grads = torch.einsum("n...o,n...i->noi", gs, xs)
        total += float(grads.pow(2).sum())
    return total


def gauss_newton_traces(model: nn.Module, names: list[str],
                        batches: list[torch.Tensor]) -> dict[str, float]:
    """The exact trace of each layer's Gauss-Newton block of the cross entropy,
    ``Tr(G_l) = 1/N sum_n Tr(J_n^T (diag(p_n) - p_n p_n^T) J_n)``, ``J_n = dz_n/dW_l``: the
    Hessian's own block where :func:`gauss_newton_exact` holds. With
    ``diag(p) - p p^T = S S^T``, ``S = diag(sqrt p) - p sqrt(p)^T``, it is
    ``1/N sum_n sum_c ||J_n^T S_c||^2``: one backward pass per class ``c`` gives every
    sample's gradient at each layer's output, and the weight gradients' squared norms follow
    per sample (``J_n^T S_c`` is sample n's gradient of ``S_c . z_n``). Cost: classes x
    batches backward passes, against Hutchinson's samples x batches double-backward ones."""
    model = model.eval()
    layers = [model.get_submodule(n) for n in names]
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [layer.register_forward_hook(
        lambda _m, inputs, out, name=name: seen.__setitem__(name, (inputs[0].detach(), out)))
        for name, layer in zip(names, layers)]
    totals, count = [0.0] * len(names), 0
    try:
        with torch.enable_grad():
            for x in batches:
                z = model(x)
                p = torch.softmax(z.detach().double(), 1)
                root = p.sqrt()
                outs = [seen[n][1] for n in names]
                for c in range(z.shape[1]):
                    s = -p * root[:, c:c + 1]
                    s[:, c] += root[:, c]
                    grads = torch.autograd.grad(z, outs, s.to(z.dtype),
                                                retain_graph=c + 1 < z.shape[1])
                    for i, (name, layer, g) in enumerate(zip(names, layers, grads)):
                        totals[i] += _per_sample_squared_norms(layer, seen[name][0], g)
                count += len(x)
    finally:
        for hook in hooks:
            hook.remove()
        seen.clear()
    return {n: t / count for n, t in zip(names, totals)}


def _kl(reference: list[torch.Tensor], model: nn.Module, batches) -> float:
    with torch.no_grad():
        total = sum(F.kl_div(F.log_softmax(model(x), 1), F.log_softmax(r, 1),
                             reduction="batchmean", log_target=True).item()
                    for x, r in zip(batches, reference))
    return total / len(batches)


def _quantized_input(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-tensor min-max fake quantization of an input at ``bits`` (unsigned when >= 0)."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    levels = 2 ** bits - 1
    scale = max(hi - lo, 1e-12) / levels
    zero = round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, levels) - zero) * scale


class _Swap:
    """Temporarily replace one layer's weight, and quantize its input at some width."""

    def __init__(self, layer: nn.Module, weight: torch.Tensor | None, a_bits: int | None):
        self.layer, self.weight, self.a_bits = layer, weight, a_bits

    def __enter__(self):
        self.saved = self.layer.weight.data
        if self.weight is not None:
            self.layer.weight.data = self.weight
        self.handle = self.layer.register_forward_pre_hook(
            lambda _m, inputs: (_quantized_input(inputs[0], self.a_bits),) + inputs[1:]
            if self.a_bits is not None else None)
        return self

    def __exit__(self, *exc):
        self.layer.weight.data = self.saved
        self.handle.remove()


def output_sensitivity(model: nn.Module, names: list[str], batches, candidates,
                       quantized_weight) -> dict[str, dict[tuple, float]]:
    """``KL(p_float || p_q)`` of the output with one layer at a time at each candidate
    ``(w, a)``; ``quantized_weight(name, w_bits)`` gives that layer's quantized weight, and a
    ``w`` or ``a`` of None leaves the weight or the input in float."""
    model = model.eval()
    with torch.no_grad():
        reference = [model(x) for x in batches]
    table = {}
    for name in names:
        layer = model.get_submodule(name)
        table[name] = {}
        for w, a in candidates:
            weight = quantized_weight(name, w) if w is not None else None
            with _Swap(layer, weight, a):
                table[name][(w, a)] = _kl(reference, model, batches)
    return table


# ---------------------------------------------------------------------------------------------
# Solver


def solve(omega: dict[str, dict[tuple, float]], costs: dict[str, dict[str, dict[tuple, float]]],
          limits: dict[str, float]) -> dict[str, tuple]:
    """The candidate per layer minimising ``sum omega`` with ``sum costs[k] <= limits[k]`` for
    each budget ``k`` (``costs[k][layer][candidate]``); ConfigError when nothing fits."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    layers = list(omega)
    index = [(layer, c) for layer in layers for c in omega[layer]]
    n = len(index)
    objective = np.array([omega[layer][c] for layer, c in index], dtype=np.float64)
    rows, lower, upper = [], [], []
    for layer in layers:  # one candidate per layer
        rows.append([1.0 if lay == layer else 0.0 for lay, _ in index])
        lower.append(1.0)
        upper.append(1.0)
    for key, limit in limits.items():
        rows.append([costs[key][layer][c] for layer, c in index])
        lower.append(-np.inf)
        upper.append(limit)
    result = milp(objective, constraints=LinearConstraint(np.array(rows), lower, upper),
                  integrality=np.ones(n), bounds=Bounds(0, 1))
    if result.status == 0 and result.x is not None:
        chosen = {layer: c for (layer, c), x in zip(index, result.x) if x > 0.5}
        if len(chosen) == len(layers):
            return chosen
    return greedy(omega, costs, limits)


def greedy(omega, costs, limits) -> dict[str, tuple]:
    """From each layer's most expensive candidate, repeatedly take the step that lowers the
    over-budget costs most per unit of sensitivity added, until every budget holds."""
    def total(key, plan):
        return sum(costs[key][layer][c] for layer, c in plan.items())

    def cost_of(layer, c):
        return sum(costs[key][layer][c] for key in limits)

    plan = {layer: max(cands, key=lambda c: cost_of(layer, c)) for layer, cands in omega.items()}
    while True:
        over = [k for k, limit in limits.items() if total(k, plan) > limit + 1e-9]
        if not over:
            return plan
        best, best_rate = None, math.inf
        for layer, current in plan.items():
            for c in omega[layer]:
                saved = sum(costs[k][layer][current] - costs[k][layer][c] for k in over)
                if saved <= 0:
                    continue
                rate = max(omega[layer][c] - omega[layer][current], 0.0) / saved
                if rate < best_rate:
                    best, best_rate = (layer, c), rate
        if best is None:
            raise ConfigError(f"no bit widths fit the budget ({', '.join(over)}): even the "
                              "narrowest candidates exceed it; raise it or allow narrower widths")
        plan[best[0]] = best[1]


# ---------------------------------------------------------------------------------------------
# The plan


def budget_costs(shapes: dict[str, LayerShape], candidates,
                 code_bytes=None) -> dict[str, dict[str, dict]]:
    """Per budget kind, per layer, per candidate: the cost that kind adds up. ``code_bytes(name,
    w_bits)``: a layer's bytes in the file (default: its codes bit-packed at one width)."""
    total_weights = sum(s.weights for s in shapes.values())
    code_bytes = code_bytes or (lambda name, bits: shapes[name].code_bytes(bits))
    return {
        "size_bytes": {n: {c: code_bytes(n, c[0]) for c in candidates[n]} for n in shapes},
        "avg_bits": {n: {c: c[0] * s.weights / total_weights for c in candidates[n]}
                     for n, s in shapes.items()},
        "bops": {n: {c: s.macs * c[0] * (c[1] or FLOAT_INPUT_BITS) for c in candidates[n]}
                 for n, s in shapes.items()}}


def mixed_plan(model: nn.Module, plan: dict[str, LayerBits], free: list[str], budget: Budget,
               candidates, estimator: str, batches: list[torch.Tensor], quantized_weight,
               fixed_bytes: int, hessian_samples: int = 32, seed: int = 0,
               cache: dict | None = None, code_bytes=None):
    """``(plan, report)``: ``plan`` with the ``free`` layers' widths chosen under ``budget``;
    the other layers keep theirs and count against it. ``fixed_bytes``: the packed file's size
    beside the weight codes. ``cache`` keeps the sensitivities between calls (a second solve
    with a measured ``fixed_bytes``). ``code_bytes(name, w_bits)``: a layer's bytes in the file
    (default: bit-packed at one width; the PTQ pipeline passes Banner's widths or the Huffman
    coder's measured size). ``report``: the estimator (and for ``hessian`` how the trace was
    taken), the sensitivities, the chosen bits and the predicted cost of each budget kind."""
    if estimator not in ESTIMATORS:
        raise ConfigError(f"sensitivity must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    cache = {} if cache is None else cache
    names = list(plan)
    start = time.perf_counter()
    if "omega" not in cache:
        cache["shapes"] = layer_shapes(model, names, batches[0])
        cache["omega"], cache["trace"] = sensitivities(
            copy.deepcopy(model).eval(), free, batches, candidates, estimator, quantized_weight,
            hessian_samples, seed)
        cache["sensitivity_seconds"] = time.perf_counter() - start
        start = time.perf_counter()
    shapes, omega = cache["shapes"], dict(cache["omega"])
    for n in names:  # the policy's layers: their one width, no sensitivity to minimise
        if n not in free:
            omega[n] = {(plan[n].w_bits, plan[n].a_bits): 0.0}
    if "costs" not in cache:  # coded sizes run the coder: once per layer and width
        cache["costs"] = budget_costs(shapes, {n: list(omega[n]) for n in names}, code_bytes)
    costs = cache["costs"]
    limits = {}
    if budget.size_bytes is not None:
        limits["size_bytes"] = budget.size_bytes - fixed_bytes
    if budget.avg_bits is not None:
        limits["avg_bits"] = budget.avg_bits
    if budget.bops is not None:
        limits["bops"] = budget.bops
    for key, limit in limits.items():
        need = sum(min(costs[key][n][c] for c in omega[n]) for n in names)
        if need > limit:
            extra = fixed_bytes if key == "size_bytes" else 0
            raise ConfigError(f"the {BUDGET_NAMES[key]} {getattr(budget, key):g} cannot be met: "
                              f"the narrowest widths allowed (w_candidates, the first / last "
                              f"layer policy) need {need + extra:g}")
    chosen = solve(omega, costs, limits)
    new_plan = {n: LayerBits(*chosen[n]) if n in free else plan[n] for n in names}
    code_bytes = sum(costs["size_bytes"][n][chosen[n]] for n in names)
    predicted = {"size_bytes": code_bytes + fixed_bytes, "code_bytes": code_bytes,
                 "avg_bits": sum(costs["avg_bits"][n][chosen[n]] for n in names),
                 "bops": sum(costs["bops"][n][chosen[n]] for n in names)}
    report = {"estimator": estimator, **({"trace": cache["trace"]} if cache["trace"] else {}),
              "predicted": predicted,
              "search_seconds": cache["sensitivity_seconds"] + time.perf_counter() - start,
              "budget": {k: v for k, v in vars(budget).items() if v is not None},
              "sensitivity": {n: {f"w{c[0]}a{c[1]}": v for c, v in omega[n].items()}
                              for n in free},
              "bits": {n: [b.w_bits, b.a_bits] for n, b in new_plan.items()}}
    return new_plan, report


def sensitivities(model: nn.Module, free: list[str], batches, candidates, estimator: str,
                  quantized_weight, hessian_samples: int, seed: int):
    """``(Omega, trace)``: ``Omega[layer][(w, a)]`` by ``estimator`` (the module docstring);
    ``trace`` says how the Hessian traces were taken ("" for ``output``)."""
    if estimator == "output":
        return output_sensitivity(model, free, batches, candidates, quantized_weight), ""
    inexact = gauss_newton_exact(model, free)
    if inexact:
        traces = hessian_traces(model, free, batches, hessian_samples, seed)
        trace = f"Hutchinson, {hessian_samples} samples ({inexact})"
    else:
        traces, trace = gauss_newton_traces(model, free, batches), "exact Gauss-Newton"
    inputs = output_sensitivity(model, free, batches, {(None, a) for _, a in candidates},
                                quantized_weight)  # the input width's term: float weights
    omega = {}
    for n in free:
        w = model.get_submodule(n).weight.detach()
        errors = {b: float((quantized_weight(n, b) - w).pow(2).sum())
                  for b in {c[0] for c in candidates}}
        omega[n] = {c: 0.5 * traces[n] / w.numel() * errors[c[0]] + inputs[n][(None, c[1])]
                    for c in candidates}
    return omega, trace
