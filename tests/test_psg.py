"""PSG / PSGD: oracles 10 and 11, the method's hooks, sparse mode and bad input."""
import copy

import pytest
import torch
from torch import nn

from lowbit.errors import ConfigError
from lowbit.methods import training_method
from lowbit.methods.psg import PSGConfig, ptq_config, sparsity, unwrap
from lowbit.models import build_model
from lowbit.nn import PSGGradientScaler
from lowbit.quant.psg import psg_grid_step, psg_quantize
from tests.conftest import SHARED, needs_shared

PSG150 = SHARED / "checkpoints" / "PSG_ResNet150.pth"


def test_grid_oracle_11():
    w = torch.tensor([-0.7, -0.1, 0.05, 0.35, 0.2])
    step = psg_grid_step(w.min(), w.max(), 4)
    assert step.item() == pytest.approx(0.1)                   # absmax / 7
    levels = psg_quantize(torch.linspace(-1, 1, 1001), psg_grid_step(torch.tensor(-1.0),
                                                                      torch.tensor(1.0), 4), 4)
    assert levels.unique().numel() == 15
    two = psg_quantize(torch.linspace(-1, 1, 101), psg_grid_step(torch.tensor(-1.0),
                                                                  torch.tensor(1.0), 2), 2)
    assert sorted(two.unique().tolist()) == [-1.0, 0.0, 1.0]
    assert PSGConfig(w_bits=3).first_last_bits == 8 and PSGConfig(w_bits=4).first_last_bits == 4


def test_backward_oracle_10():
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(64, generator=g) * 0.5).requires_grad_(True)
    scaler = PSGGradientScaler(4, lambda_s=150.0).train()
    out = scaler(w)
    assert torch.equal(out, w)                                           # identity forward
    grad_out = torch.randn(64, generator=g)
    out.backward(grad_out)
    with torch.no_grad():
        step = psg_grid_step(w.min(), w.max(), 4)
        distance = (w - psg_quantize(w, step, 4)).abs()
    assert torch.allclose(w.grad, 150.0 * distance * grad_out)
    assert (w.grad / grad_out).abs().max() <= 150.0 * step / 2 + 1e-6


def test_on_grid_weights_get_no_gradient_and_barely_move():
    step = 0.1
    grid = torch.tensor([-0.7, -0.3, 0.0, 0.2, 0.7])                    # absmax 0.7 -> step 0.1
    for eps, bound in ((0.0, 0.0), (1e-4, None)):
        w = nn.Parameter(grid + eps * torch.tensor([0, 1, 1, -1, 0]))
        scaler = PSGGradientScaler(4, lambda_s=150.0).train()
        opt = torch.optim.SGD([w], lr=0.01)
        scaler(w).sum().backward()
        if bound == 0.0:
            assert (w.grad == 0).all()
        before = w.detach().clone()
        opt.step()
        moved = (w.detach() - before).abs().max().item()
        assert moved <= 0.01 * 150 * eps + 1e-9                          # O(eps lambda lr)
    assert step == pytest.approx(0.1)


def test_weight_decay_is_not_scaled_and_any_optimizer_works():
    w = nn.Parameter(torch.tensor([-0.7, 0.2, 0.7]))                     # all on the grid
    scaler = PSGGradientScaler(4, lambda_s=150.0).train()
    opt = torch.optim.SGD([w], lr=0.1, weight_decay=0.01)
    scaler(w).sum().backward()
    opt.step()
    assert torch.allclose(w.detach(), torch.tensor([-0.7, 0.2, 0.7]) * (1 - 0.1 * 0.01))
    v = nn.Parameter(torch.tensor([0.33, -0.7]))
    adam = torch.optim.Adam([v], lr=0.01)
    PSGGradientScaler(4, 150.0).train()(v).sum().backward()
    assert v.grad[0].item() == pytest.approx(150.0 * 0.03, rel=1e-4)
    adam.step()
    assert v[0].item() < 0.33


def test_sparse_mode_pulls_to_zero():
    w = torch.tensor([0.5, -0.2, 0.0], requires_grad=True)
    PSGGradientScaler(4, lambda_s=10.0, sparse=True).train()(w).sum().backward()
    assert torch.allclose(w.grad, torch.tensor([5.0, 2.0, 0.0]))


def test_ema_range_matches_the_reference_momentum():
    s = PSGGradientScaler(4, 150.0, ema_momentum=0.1).train()
    s(torch.tensor([-1.0, 1.0], requires_grad=True))
    s(torch.tensor([-2.0, 2.0], requires_grad=True))
    assert s.running_max.item() == pytest.approx(1.1) and s.running_min.item() == pytest.approx(-1.1)


def test_method_wraps_every_layer_with_reference_first_last_policy():
    model = build_model("psg_resnet32", num_classes=100).eval()
    ref = copy.deepcopy(model)
    method = training_method("psg", {"w_bits": 2, "lambda_s": 50.0})
    wrapped = method.prepare(model, torch.randn(2, 3, 32, 32))
    bits = {k: v.w_bits for k, v in method.plan.items()}
    assert bits["conv1"] == 8 and bits["fc"] == 8 and bits["layer2.0.downsample.0"] == 2
    assert len(bits) == 34  # stem, 30 block convs, 2 downsample convs, fc
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(wrapped.eval()(x), ref.eval()(x), atol=1e-5)   # PSG: float forward
    wrapped.train()(x).sum().backward()
    assert wrapped.fc.bias.grad is not None
    expected = wrapped.eval()(x)
    plain = method.finalize(wrapped).eval()
    assert type(plain.conv1) is nn.Conv2d and plain.state_dict().keys() == ref.state_dict().keys()
    assert torch.equal(plain(x), expected)


def test_bad_psg_settings():
    with pytest.raises(ConfigError, match="1 bit"):
        training_method("psg", {"w_bits": 1})
    with pytest.raises(ConfigError, match="lambda_s"):
        training_method("psg", {"lambda_s": 0})
    assert training_method("psg", {"w_bits": 1, "sparse": True}).config.sparse


def test_sparsity_and_ptq_grid():
    model = nn.Sequential(nn.Linear(4, 4, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[0.0, 1e-4, 0.5, -0.5]] * 4))
    assert sparsity(model, 1e-3) == 0.5
    cfg = ptq_config(PSGConfig(w_bits=3))
    assert cfg.w_symmetric and not cfg.w_per_channel and not cfg.fold_bn and cfg.a_bits is None
    assert cfg.first_last_bits == 8
    assert unwrap(model) is model


@needs_shared(PSG150)
def test_grid_regression_on_the_psg_checkpoint_oracle_11():
    model = build_model("psg_resnet32", PSG150)
    w = model.layer1[0].conv1.weight.detach()
    step = psg_grid_step(w.min(), w.max(), 4)
    assert w.abs().max().item() == pytest.approx(1.16647, abs=1e-4)
    assert (w - psg_quantize(w, step, 4)).pow(2).sum().item() == pytest.approx(5.02598, rel=1e-4)
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for bits, expected in ((4, 387.692), (3, 1691.34), (2, 5544.25), (8, 1.17668)):
        total = 0.0
        for i, m in enumerate(layers):
            b = PSGConfig(w_bits=bits).first_last_bits if i in (0, len(layers) - 1) else bits
            w = m.weight.detach()
            total += (w - psg_quantize(w, psg_grid_step(w.min(), w.max(), b), b)).pow(2).sum()
        assert total.item() == pytest.approx(expected, rel=1e-4), bits
