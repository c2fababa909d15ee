"""AdaRound (Nagel et al. 2020): its pieces, and learned rounding inside PTQ."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lowbit
from lowbit.errors import ConfigError
from lowbit.nn import QuantConv2d, QuantLinear
from lowbit.quant.adaround import (AdaRoundSchedule, ReconstructionError, _rounding_gradient,
                                   initial_logits, learn_rounding, reconstruction_error,
                                   rectified_sigmoid, rounding_regularizer)


def test_initial_logits_invert_the_rectified_sigmoid():
    f = torch.linspace(0, 0.999, 101)
    assert torch.allclose(rectified_sigmoid(initial_logits(f)), f, atol=1e-5)


def test_regularizer_is_zero_only_for_hard_decisions():
    hard = initial_logits(torch.tensor([0.0, 1.0 - 1e-9])) * 0 + torch.tensor([-50.0, 50.0])
    assert rounding_regularizer(hard, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    assert rounding_regularizer(initial_logits(torch.tensor([0.5])), 2.0).item() == \
        pytest.approx(1.0, abs=1e-4)


def test_beta_anneals_after_warmup():
    s = AdaRoundSchedule(iters=100)
    assert s.beta(0) is None and s.beta(19) is None
    assert s.beta(20) == pytest.approx(20.0) and s.beta(100) == pytest.approx(2.0)
    assert s.beta(60) == pytest.approx(11.0)


def _linear_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 32, generator=g)
    # Correlated inputs: with independent ones each weight's error adds up separately and
    # nearest rounding is already optimal; correlations let rounding errors cancel.
    x = torch.randn(512, 8, generator=g) @ torch.randn(8, 32, generator=g) \
        + 0.1 * torch.randn(512, 32, generator=g)
    scale = (w.abs().amax(1, keepdim=True) / 7)
    zero = torch.zeros_like(scale)
    qmin, qmax = torch.full_like(scale, -8.0), torch.full_like(scale, 7.0)
    return w, x, scale, zero, qmin, qmax


def _linear_layer(w):
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    layer.weight.data.copy_(w)
    return layer


def test_learned_rounding_stays_on_grid_and_beats_nearest():
    w, x, scale, zero, qmin, qmax = _linear_problem()
    target = F.linear(x, w)
    error = ReconstructionError(_linear_layer(w), len(x))
    error.update(x, target)
    w_ada = learn_rounding(w, scale, zero, qmin, qmax, error,
                           AdaRoundSchedule(iters=400, lr=1e-2))
    codes = w_ada / scale
    assert torch.allclose(codes, codes.round(), atol=1e-4)                 # on the grid
    assert ((codes.round() - torch.floor(w / scale)).abs() <= 1).all()     # floor or ceil only
    nearest = torch.clamp(torch.round(w / scale), qmin, qmax) * scale
    err = lambda weight: (F.linear(x, weight) - target).pow(2).mean().item()  # noqa: E731
    assert err(w_ada) < 0.8 * err(nearest)
    assert not torch.equal(w_ada, nearest)


@pytest.mark.parametrize("layer", [
    nn.Conv2d(6, 8, 3, stride=2, padding=1, dilation=1, groups=2),
    nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4, bias=False),
    nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"),
    nn.Linear(12, 7),
], ids=["grouped-strided", "depthwise-dilated", "reflect", "linear"])
def test_quadratic_reconstruction_error_equals_the_direct_one(layer):
    """The accumulated quadratic form is the error of running the layer on every image."""
    g = torch.Generator().manual_seed(0)
    shape = (10, layer.in_features) if isinstance(layer, nn.Linear) else \
        (10, layer.in_channels, 9, 9)
    x, w = torch.randn(*shape, generator=g), torch.randn(layer.weight.shape, generator=g)
    with torch.no_grad():
        target = layer(torch.randn(*shape, generator=g))
    error = ReconstructionError(layer, len(x))
    for part, t in zip(x.split(4), target.split(4)):
        error.update(part, t)
    direct = reconstruction_error(layer._conv_forward(x, w, layer.bias)
                                  if isinstance(layer, nn.Conv2d) else F.linear(x, w, layer.bias),
                                  target)
    assert error(w).item() == pytest.approx(direct.item(), rel=1e-4)


@pytest.mark.parametrize("beta", [None, 2.0, 11.5])
def test_rounding_gradient_is_autograds(beta):
    """The hand-written chain rule equals autograd through the soft weight and regulariser,
    clamped weights (at the grid's ends) and saturated h(V) included."""
    w, x, scale, zero, qmin, qmax = _linear_problem()
    error = ReconstructionError(_linear_layer(w), len(x))
    error.update(x, F.linear(x, w) + 0.3)
    floor = torch.floor(w / scale)
    v = initial_logits(w / scale - floor) + 3 * torch.randn(w.shape)  # some h(V) saturate
    lo, hi = qmin - zero, qmax - zero
    hi = hi - 1  # some weights clamp at the top of the grid
    leaf = v.clone().requires_grad_(True)
    loss = error(torch.clamp(floor + rectified_sigmoid(leaf), lo, hi) * scale)
    if beta is not None:
        loss = loss + 0.01 * rounding_regularizer(leaf, beta)
    loss.backward()
    ours = _rounding_gradient(v, floor, lo, hi, scale, error, beta, 0.01)
    assert (ours == 0).any() and (ours != 0).any()
    assert torch.allclose(ours, leaf.grad, rtol=1e-4, atol=1e-6 * leaf.grad.abs().max())


def test_sampled_reconstruction_error_does_not_depend_on_the_batching():
    layer = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(12, 3, 16, 16)
    with torch.no_grad():
        target = layer(x) + 0.1
    errors = []
    for size in (12, 5):
        error = ReconstructionError(layer, len(x), max_patches=300)
        for part, t in zip(x.split(size), target.split(size)):
            error.update(part, t)
        errors.append(error)
    assert errors[0].count == errors[1].count == 12 * 25
    for a, b in ((errors[0].h, errors[1].h), (errors[0].g, errors[1].g)):  # float32 partial sums
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_ptq_adaround_rewrites_weights_onto_the_quantizer_grid(user_model, calib):
    cfg = lowbit.PTQConfig(w_bits=4, a_bits=8, w_round="adaround", round_iters=30,
                           empirical_bias_correction=True)
    q = lowbit.quantize(user_model, cfg, calib)
    for m in q.modules():
        if isinstance(m, (QuantConv2d, QuantLinear)):
            assert torch.equal(m.quantized_weight(), m.weight)
    x = calib[0]
    ref = user_model(x)
    assert (q(x) - ref).pow(2).mean() / ref.pow(2).mean() < 0.2


def test_adaround_with_weight_bias_correction_is_refused(user_model, calib):
    with pytest.raises(ConfigError, match="bias_correction"):
        lowbit.quantize(user_model, lowbit.PTQConfig(w_bits=4, w_round="adaround",
                                                     bias_correction="mean"), calib)
    with pytest.raises(ConfigError, match="round_iters"):
        lowbit.PTQConfig(round_iters=0).validate()
