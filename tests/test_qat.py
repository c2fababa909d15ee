"""QAT quantizers (STE with observed ranges, LSQ) and short QAT runs."""
import copy
import math

import pytest
import torch

import lowbit
from lowbit.data.core import Batches, Dataset
from lowbit.errors import ConfigError
from lowbit.methods import training_method
from lowbit.models import build_model
from lowbit.nn import LSQQuantizer, ObservedQuantizer
from lowbit.quant.affine import QScheme
from lowbit.quant.lsq import LSQFakeQuantize, lsq_bounds, lsq_grad_scale, lsq_mse_step
from lowbit.training import TrainConfig, train


def _lsq(x, step, q_n, q_p, g):
    x = x.clone().requires_grad_(True)
    s = step.clone().requires_grad_(True)
    y = LSQFakeQuantize.apply(x, s, q_n, q_p, g)
    y.backward(torch.linspace(-1, 1, x.numel()).reshape(x.shape))
    return y, x.grad, s.grad


def _torch_learnable(x, step, q_n, q_p, g):
    x = x.clone().requires_grad_(True)
    s = step.clone().requires_grad_(True)
    y = torch._fake_quantize_learnable_per_tensor_affine(x, s, torch.zeros(1), -q_n, q_p, g)
    y.backward(torch.linspace(-1, 1, x.numel()).reshape(x.shape))
    return y, x.grad, s.grad


def _bands(x, step, q_n, q_p):
    v = x / step
    return ((v >= q_p) & (v < q_p + 0.5)) | ((v > -q_n - 0.5) & (v <= -q_n))


@pytest.mark.parametrize("bits,signed", [(4, False), (4, True), (2, True), (8, False)])
def test_lsq_matches_pytorch_outside_the_half_step_bands(bits, signed):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(4000, generator=g) * 3
    x = x if signed else x.relu()
    step = torch.tensor([0.37])
    q_n, q_p = lsq_bounds(bits, signed)
    gs = lsq_grad_scale(x.numel(), q_p)
    # keep ties of round() out of the comparison: they have measure zero on real data
    x = x[((x / step).frac().abs() - 0.5).abs() > 1e-4]
    band = _bands(x, step, q_n, q_p)
    assert band.any()
    ours, theirs = _lsq(x, step, q_n, q_p, gs), _torch_learnable(x, step, q_n, q_p, gs)
    assert torch.equal(ours[0], theirs[0])                             # forward
    assert torch.allclose(ours[1][~band], theirs[1][~band])            # dL/dx
    # dL/ds outside the bands: subtract each side's band contribution before comparing
    grad_out = torch.linspace(-1, 1, x.numel())
    v = x / step
    ours_band = (grad_out * torch.where(v > 0, float(q_p), float(-q_n)) * band).sum() * gs
    theirs_band = (grad_out * (v.round().clamp(-q_n, q_p) - v) * band).sum() * gs
    assert torch.allclose(ours[2] - ours_band, theirs[2] - theirs_band, atol=1e-5)
    # inside the bands, the paper: dx = 0 and ds = Q_P (or -Q_N)
    assert (ours[1][band] == 0).all() and (theirs[1][band] != 0).any()


def test_lsq_equals_the_papers_roundpass_gradscale_formulation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, generator=g) * 2
    step = torch.tensor(0.3)
    q_n, q_p = lsq_bounds(3, True)
    gs = 0.01
    xr, sr = x.clone().requires_grad_(True), step.clone().requires_grad_(True)
    s_scaled = (sr - sr * gs).detach() + sr * gs                    # gradscale
    v = torch.clamp(xr / s_scaled, -q_n, q_p)
    y_ref = ((v.round() - v).detach() + v) * s_scaled              # roundpass
    grad_out = torch.linspace(-1, 1, x.numel())
    y_ref.backward(grad_out)
    y, dx, ds = _lsq(x, step, q_n, q_p, gs)
    assert torch.allclose(y, y_ref.detach(), atol=1e-6)
    assert torch.allclose(dx, xr.grad) and torch.allclose(ds, sr.grad, rtol=1e-4)


def test_lsq_per_channel_matches_pytorch_per_channel_op():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 3, 3, 3, generator=g)
    q_n, q_p = lsq_bounds(4, True)
    # steps that keep every weight inside the range, away from the half-step bands
    step = w.abs().amax((1, 2, 3)) / (q_p - 0.7)
    a, s = w.clone().requires_grad_(True), step.clone().requires_grad_(True)
    LSQFakeQuantize.apply(a, s.reshape(-1, 1, 1, 1), q_n, q_p, 0.5).sum().backward()
    b, t = w.clone().requires_grad_(True), step.clone().requires_grad_(True)
    y = torch._fake_quantize_learnable_per_channel_affine(b, t, torch.zeros(6), 0, -q_n, q_p, 0.5)
    y.sum().backward()
    assert torch.allclose(LSQFakeQuantize.apply(w, step.reshape(-1, 1, 1, 1), q_n, q_p, 0.5), y)
    assert torch.allclose(a.grad, b.grad) and torch.allclose(s.grad, t.grad, atol=1e-5)


def test_lsq_quantizer_initialisation_and_gradient_scale():
    w = torch.randn(8, 4, 3, 3)
    q = LSQQuantizer(4, signed=True, name="w")
    q(w)
    assert q.step.item() == pytest.approx(2 * w.abs().mean().item() / math.sqrt(7), rel=1e-5)
    x = torch.rand(16, 4, 5, 5)
    a = LSQQuantizer(4, signed=None, is_weight=False)
    a(x)
    assert not a.signed and a.bounds == (0, 15)
    a(x).sum().backward()
    # N counts one example's features: 4 * 5 * 5, not the batch's
    s = a.step.detach().clone().requires_grad_(True)
    LSQFakeQuantize.apply(x, s, 0, 15, 1 / math.sqrt(100 * 15)).sum().backward()
    assert torch.allclose(a.step.grad, s.grad)
    image = LSQQuantizer(8, signed=None, is_weight=False)
    image(torch.randn(4, 3, 8, 8))
    assert image.signed and image.bounds == (128, 127)


def _lsq_mse(v, step, q_n, q_p):
    return (torch.clamp(torch.round(v / step), -q_n, q_p) * step - v).pow(2).mean().item()


@pytest.mark.parametrize("signed", [True, False])
def test_lsq_mse_initialisation_is_the_least_error_step(signed):
    torch.manual_seed(0)
    v = torch.distributions.Laplace(0.0, 1.0).sample((4000,))
    v = v if signed else v.abs()
    q_n, q_p = lsq_bounds(4, signed)
    step = lsq_mse_step(v, q_n, q_p).item()
    best = _lsq_mse(v, step, q_n, q_p)
    top = v.abs().max().item() / q_p
    for other in torch.linspace(0.05 * top, top, 333):
        assert best <= _lsq_mse(v, other.item(), q_n, q_p) * 1.01
    # clipping the Laplace tail: well inside the min-max step
    assert step < 0.8 * top
    q = LSQQuantizer(4, signed=None, is_weight=False, init="mse")
    q(v.reshape(40, 100))
    assert q.step.item() == pytest.approx(step, rel=1e-6)


def test_lsq_mse_initialisation_per_channel():
    w = torch.randn(6, 50) * torch.arange(1, 7).float()[:, None]
    q = LSQQuantizer(3, signed=True, channels=6, init="mse")
    q(w)
    for c in range(6):
        assert q.step[c].item() == pytest.approx(lsq_mse_step(w[c], 4, 3).item(), rel=1e-6)
    assert (q.step[1:] > q.step[:-1]).all()  # wider channels, wider steps


def test_lsq_step_driven_negative_is_floored_with_a_warning():
    """The QAT method's after_step (run after every optimizer step) floors a step driven to
    NaN or below zero, with a warning naming the quantizer."""
    from lowbit.methods import training_method

    q = LSQQuantizer(4, signed=True, name="conv.weight")
    w = torch.randn(10, 10)
    q(w)
    with torch.no_grad():
        q.step.fill_(float("nan"))
    with pytest.warns(UserWarning, match="conv.weight"):
        training_method("lsq", {"w_bits": 4}).after_step(torch.nn.Sequential(q))
    assert torch.isfinite(q(w)).all() and q.step.item() > 0


def test_observed_quantizer_ema_oracle_13_and_delay():
    q = ObservedQuantizer(QScheme(8), observer="ema", momentum=0.01, enabled=False)
    q.train()
    x1, x2 = torch.tensor([0.0, 1.0]), torch.tensor([0.0, 2.0])
    assert torch.equal(q(x1), x1)                     # disabled: identity, range still tracked
    q(x2)
    assert q.running_max.item() == pytest.approx(1.01)
    q.enabled.fill_(True)
    q.eval()
    q(torch.tensor([0.0, 50.0]))                      # eval mode: range frozen
    assert q.running_max.item() == pytest.approx(1.01)
    w = ObservedQuantizer(QScheme(4, signed=True, symmetric=True, narrow=True), axis=0)
    weights = torch.randn(3, 5)
    out = w(weights)
    assert torch.allclose(out.abs().amax(1), weights.abs().amax(1))  # extremes on the grid
    w(weights * 2)
    assert torch.allclose(w.scale, weights.abs().amax(1) * 2 / 7)  # follows the current tensor


def test_activation_delay_and_bn_freeze_follow_the_schedule():
    method = training_method("qat", {"act_quant_delay": 5, "freeze_bn_epoch": 2})
    model = method.prepare(build_model("digits_cnn").eval(), torch.randn(4, 1, 8, 8)).train()
    quantizers = method.input_quantizers
    assert len(quantizers) == 4 and not any(q.enabled for q in quantizers)
    method.before_step(model, 0, 4)
    assert not any(q.enabled for q in quantizers) and model[1].training
    method.before_step(model, 1, 5)
    assert all(q.enabled for q in quantizers) and model[1].training
    method.before_step(model, 2, 9)
    assert not model[1].training                     # BN statistics frozen


def test_qat_config_errors():
    for bad in (dict(quantizer="dorefa"), dict(w_bits=1), dict(a_bits=0), dict(act_momentum=0),
                dict(quantizer="lsq", lsq_init="max")):
        with pytest.raises(ConfigError):
            training_method("qat", bad)
    with pytest.raises(ConfigError, match="unknown training method"):
        training_method("nope")


@pytest.mark.parametrize("name", ["qat", "lsq"])
def test_short_qat_run_beats_ptq_at_2_bits(name, digits_fp):
    d, fp = digits_fp
    norm = d.normalization()
    test = Batches(d.test, norm, 500)
    ptq = lowbit.quantize(fp, lowbit.PTQConfig(w_bits=2, a_bits=2, w_symmetric=True),
                          Batches(d.train, norm, 256))
    ptq_top1 = lowbit.evaluate(ptq, test)
    method = training_method(name, {"w_bits": 2, "a_bits": 2})
    config = TrainConfig(epochs=3, batch_size=64, optimizer="adam", lr=1e-3, augment=False)
    result = train(copy.deepcopy(fp), Dataset("digits", d.train, d.test, 10), norm, config,
                   method=method)
    qat_top1 = result.metrics[-1]["test_top1"]
    assert qat_top1 > ptq_top1 + 5, (qat_top1, ptq_top1)


def test_lsq_bounds_and_grad_scale_oracle_9():
    assert lsq_bounds(4, True) == (8, 7) and lsq_bounds(4, False) == (0, 15)
    assert lsq_bounds(2, True) == (2, 1) and lsq_bounds(8, False) == (0, 255)
    assert 1 / lsq_grad_scale(3 * 3 * 64 * 64, 7) == pytest.approx(507.98, abs=0.01)
    w = torch.randn(64, 64, 3, 3)
    q = LSQQuantizer(4, signed=True)
    out = q(w)
    out.sum().backward()
    s = q.step.detach().clone().requires_grad_(True)
    LSQFakeQuantize.apply(w, s, 8, 7, 1 / 507.98).sum().backward()
    assert torch.allclose(q.step.grad, s.grad, rtol=1e-4)   # the layer uses N = 36,864
