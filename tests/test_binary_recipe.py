"""The modern binary recipe (ALGORITHMS.md 8.2): ApproxSign, RSign, RPReLU, Bi-Real's real-valued
shortcuts, two stages with a restarting cosine, and that the result deploys (packed file, XNOR
kernel) exactly as it trained."""
import copy
import math
import operator
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.deploy import deploy_xnor, export_packed, load_packed
from lowbit.errors import ConfigError
from lowbit.methods import training_method
from lowbit.models import resnet20
from lowbit.models.resnet_cifar import ShortcutA
from lowbit.nn.binary import RPReLU, SignActivation, XNORConv2d
from lowbit.quant.binary import ApproxSignSTE
from lowbit.training import TrainConfig
from lowbit.training.engine import _lr_factor
from lowbit.transforms.bireal import RealShortcut

RECIPE = {"kind": "xnor", "shortcuts": "bireal", "learnable_threshold": True, "rprelu": True,
          "sign_gradient": "approx", "binary_weights_from_epoch": 2}


def test_approxsign_gradient_is_bireal_piecewise_derivative():
    x = torch.tensor([-1.5, -1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0, 1.5], requires_grad=True)
    y = ApproxSignSTE.apply(x)
    y.sum().backward()
    assert y.tolist() == [-1, -1, -1, -1, 1, 1, 1, 1, 1]
    assert x.grad.tolist() == pytest.approx([0, 0, 1, 1.5, 2, 1.5, 1, 0, 0])


def test_rsign_thresholds_per_channel_and_learns():
    sign = SignActivation(2, "approx")
    with torch.no_grad():
        sign.threshold.copy_(torch.tensor([0.5, -0.5]))
    x = torch.zeros(1, 2, 1, 1, requires_grad=True)
    out = sign(x)
    assert out.flatten().tolist() == [-1, 1]  # 0 - 0.5 < 0, 0 + 0.5 >= 0
    out.sum().backward()
    # d/dt sign(x - t) = -ApproxSign'(x - t) = -(2 - 2 * 0.5)
    assert sign.threshold.grad.tolist() == pytest.approx([-1.0, -1.0])


def test_rprelu_formula():
    act = RPReLU(2)
    with torch.no_grad():
        act.gamma.copy_(torch.tensor([1.0, -1.0]))
        act.beta.copy_(torch.tensor([0.5, 0.1]))
        act.zeta.copy_(torch.tensor([2.0, 0.0]))
    x = torch.tensor([0.0, 3.0]).reshape(1, 1, 2, 1).expand(1, 2, 2, 1)
    out = act(x)
    # channel 0: 0 -> 0.5 * (0 - 1) + 2, 3 -> 3 - 1 + 2; channel 1: 0 -> 0 + 1, 3 -> 4
    assert out[0, 0].flatten().tolist() == pytest.approx([1.5, 4.0])
    assert out[0, 1].flatten().tolist() == pytest.approx([1.0, 4.0])


def test_real_shortcut_reaches_the_conv_output_shape():
    x = torch.arange(2 * 4 * 5 * 5, dtype=torch.float32).reshape(2, 4, 5, 5)
    up = RealShortcut(4, 8, 2)(x)
    assert up.shape == (2, 8, 3, 3)
    pooled = F.avg_pool2d(x, 2, ceil_mode=True, count_include_pad=False)
    assert torch.equal(up[:, :4], pooled) and torch.equal(up[:, 4:], pooled)
    down = RealShortcut(4, 2, 1)(x)
    assert torch.allclose(down[:, 0], x[:, :2].mean(1)) and torch.allclose(down[:, 1],
                                                                            x[:, 2:].mean(1))
    assert RealShortcut.reaches((2, 4, 5, 5), (2, 8, 3, 3), 2)
    assert not RealShortcut.reaches((2, 4, 5, 5), (2, 6, 3, 3), 2)  # 6 is no multiple of 4
    assert not RealShortcut.reaches((2, 4, 5, 5), (2, 8, 2, 2), 2)  # a padding that shrinks


def _prepared(values=RECIPE, model=None, example=None):
    torch.manual_seed(0)
    model = model if model is not None else resnet20()
    example = example if example is not None else torch.randn(4, 3, 32, 32)
    method = training_method("xnor", values)
    return method, method.prepare(copy.deepcopy(model).eval(), example), example


def test_bireal_puts_a_shortcut_and_rprelu_after_every_binary_conv():
    method, q, x = _prepared()
    binary = [n for n, m in q.named_modules() if isinstance(m, XNORConv2d)]
    assert len(binary) == 18  # ResNet-20's inner convs; the stem and the head stay 8-bit
    nodes = {n.target: n for n in q.graph.nodes if n.op == "call_module"}
    for name in binary:
        bn = next(iter(nodes[name].users))
        add = [u for u in bn.users]
        assert len(add) == 1 and add[0].target is operator.add  # BN output feeds only the sum
        shortcut = nodes[f"{name}_shortcut"]
        assert shortcut.args[0] is nodes[name].args[0]  # from the binary conv's real input
        assert list(add[0].users)[0].target == f"{name}_rprelu"
        assert isinstance(q.get_submodule(name).input_quantizer.threshold, nn.Parameter)
    # the shortcuts have no weights: the new parameters are RSign's and RPReLU's only
    new = sum(p.numel() for n, p in q.named_parameters() if "rprelu" in n or "threshold" in n)
    layers = [q.get_submodule(n) for n in binary]
    assert new == sum(layer.in_channels + 3 * layer.out_channels for layer in layers)
    assert sum(p.numel() for p in q.parameters()) == \
        sum(p.numel() for p in resnet20().parameters()) + new


def test_bireal_supersedes_the_networks_own_shortcuts(torchvision_models):
    method, q, _ = _prepared()
    assert not any(isinstance(m, ShortcutA) for m in q.modules())  # option A: replaced
    # Bi-Real's chain h = BN1 + s(x), out = BN2 + h: each block adds its input once
    nodes = {n.target: n for n in q.graph.nodes if n.op == "call_module"}
    h = nodes["layer1.0.conv1_rprelu"]
    assert nodes["layer1.0.conv2_shortcut"].args[0] is h
    model = torchvision_models.resnet18(num_classes=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        method, q, _ = _prepared({"kind": "xnor", "shortcuts": "bireal"}, model,
                                 torch.randn(2, 3, 64, 64))
    assert not any(n.endswith("downsample.0") for n in method.plan)  # superseded, gone
    assert not any("downsample" in n for n, _ in q.named_modules())
    binary = [n for n, b in method.plan.items() if b.w_bits == 1]
    shortcuts = [n for n, m in q.named_modules() if isinstance(m, RealShortcut)]
    assert len(binary) == 16 and len(shortcuts) == 16  # 20 convs less the stem and 3 downsampling


def test_two_stages_train_real_weights_first_then_binary():
    method, q, x = _prepared()
    layer = q.get_submodule("layer2.0.conv1")
    method.before_step(q, 1, 0)
    assert torch.equal(layer.binary_factors()[1], layer.weight)  # stage 1: real weights
    method.before_step(q, 2, 0)
    alpha, signs = layer.binary_factors()
    assert set(signs.unique().tolist()) == {-1.0, 1.0}
    method.before_step(q, 0, 0)
    method.finalize(q)  # what is saved and deployed is binary whatever the stage
    assert set(layer.binary_factors()[1].unique().tolist()) == {-1.0, 1.0}


def test_cosine_restarts_at_milestones():
    config = TrainConfig(epochs=4, schedule="cosine", milestones=[2])
    factor = _lr_factor(config, 10)
    assert factor(0) == 1.0 and factor(20) == 1.0  # full LR at the start of each stage
    assert factor(10) == pytest.approx(0.5) and factor(30) == pytest.approx(0.5)
    assert factor(19) < 0.01 and factor(40) == pytest.approx(0.0)
    plain = _lr_factor(TrainConfig(epochs=4, schedule="cosine"), 10)
    assert plain(20) == pytest.approx(0.5) and plain(10) == pytest.approx(0.5 + 0.5 / math.sqrt(2))


def test_the_recipe_trains_and_deploys_exactly(tmp_path):
    method, q, x = _prepared()
    q.train()
    optimizer = torch.optim.Adam(q.parameters(), 1e-2)
    for step in range(3):  # real weights, then binary: every new parameter moves
        method.before_step(q, step, step)
        optimizer.zero_grad()
        F.cross_entropy(q(x), torch.tensor([0, 1, 2, 3])).backward()
        optimizer.step()
    method.finalize(q).eval()
    assert q.get_submodule("layer1.0.conv1").input_quantizer.threshold.abs().sum() > 0
    assert (q.get_submodule("layer1.0.conv1_rprelu").beta != 0.25).any()
    with torch.no_grad():
        reference = q(x)
        assert torch.equal(deploy_xnor(q)(x), reference)  # RSign thresholds in the kernel too
        trained = {"method": "xnor", "method_config": method.config.to_dict(),
                   "input_shape": [3, 32, 32]}
        path = export_packed(q, tmp_path / "m.lowbit", "resnet20", 10, trained=trained)
        back, _ = load_packed(path)
        assert torch.equal(back(x), reference)


@pytest.mark.parametrize("values, message", [
    ({"kind": "bwn", "shortcuts": "bireal"}, "apply to binary activations"),
    ({"kind": "xnor", "shortcuts": "dense"}, "shortcuts must be one of"),
    ({"kind": "xnor", "rprelu": True}, "rprelu follows"),
    ({"kind": "bnn", "input_scale": False}, "applies to xnor"),
    ({"kind": "bnn", "sign_gradient": "tanh"}, "sign_gradient must be one of"),
    ({"kind": "xnor", "binary_weights_from_epoch": -1}, "binary_weights_from_epoch"),
])
def test_bad_recipe_settings(values, message):
    with pytest.raises(ConfigError, match=message):
        training_method(values["kind"], values)


def test_binary_first_and_last_layers_are_allowed_with_a_warning():
    """first_last_bits: null binarizes the first and last layers too: allowed, with one
    warning that it costs accuracy; every conv / linear is then binary."""
    with pytest.warns(UserWarning, match="first and last layers are binary too"):
        method = training_method("xnor", {"first_last_bits": None})
        method.prepare(resnet20().eval(), torch.randn(2, 3, 32, 32))
    assert {bits.w_bits for bits in method.plan.values()} == {1}
