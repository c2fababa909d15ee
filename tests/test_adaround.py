"""AdaRound (Nagel et al. 2020): its pieces, and learned rounding inside PTQ."""
import pytest
import torch
from torch.nn import functional as F

import lowbit
from lowbit.errors import ConfigError
from lowbit.nn import QuantConv2d, QuantLinear
from lowbit.quant.adaround import (AdaRoundSchedule, initial_logits, learn_rounding,
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


def test_learned_rounding_stays_on_grid_and_beats_nearest():
    w, x, scale, zero, qmin, qmax = _linear_problem()
    forward = lambda inp, weight: F.linear(inp, weight)  # noqa: E731
    target = forward(x, w)
    w_ada = learn_rounding(w, scale, zero, qmin, qmax, forward, x, target,
                           AdaRoundSchedule(iters=400, batch=64, lr=1e-2),
                           torch.Generator().manual_seed(0))
    codes = w_ada / scale
    assert torch.allclose(codes, codes.round(), atol=1e-4)                 # on the grid
    assert ((codes.round() - torch.floor(w / scale)).abs() <= 1).all()     # floor or ceil only
    nearest = torch.clamp(torch.round(w / scale), qmin, qmax) * scale
    err = lambda weight: (forward(x, weight) - target).pow(2).mean().item()  # noqa: E731
    assert err(w_ada) < 0.8 * err(nearest)
    assert not torch.equal(w_ada, nearest)


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
