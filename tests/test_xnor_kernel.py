"""XNOR-popcount inference: the -n + 2 popcount identity, border handling, the compiled kernel
against the pure-torch path, and a deployed XNOR network against its float simulation."""
import copy

import pytest
import torch

from lowbit.deploy import xnor
from lowbit.methods import training_method
from lowbit.nn.binary import ScaledBinaryWeight, SignActivation, XNORConv2d


PATHS = ["scalar", "avx2", "avx512bw", "avx512vpopcntdq"]


@pytest.fixture(params=["torch", *PATHS])
def kernel(request, monkeypatch):
    """Run a test on the pure-torch path and on every compiled GEMM path this CPU supports
    (skipped where the kernel cannot build or the CPU lacks the instruction set)."""
    xnor.extension.cache_clear()
    if request.param == "torch":
        monkeypatch.setenv("LOWBIT_XNOR_KERNEL", "torch")
    elif xnor.extension() is None:
        pytest.skip("the XNOR kernel cannot be built here")
    elif request.param not in xnor.supported_paths():
        pytest.skip(f"this CPU has no {request.param}")
    else:
        monkeypatch.setenv("LOWBIT_XNOR_ISA", request.param)
    yield request.param
    xnor.extension.cache_clear()


@pytest.mark.parametrize("k", [1, 63, 64, 150, 576])
def test_binary_gemm_is_the_signed_dot_product(kernel, k):
    g = torch.Generator().manual_seed(k)
    a, b = torch.randn(37, k, generator=g), torch.randn(24, k, generator=g)
    got = xnor.popcount_gemm(*xnor.gemm_operands(xnor.pack_words(a >= 0), k),
                             xnor.pack_words(b >= 0))
    signs = lambda t: torch.where(t >= 0, 1.0, -1.0)  # noqa: E731
    assert torch.equal(got, (signs(a) @ signs(b).t()).to(torch.int32))


@pytest.mark.parametrize("cin, cout, stride, size", [(16, 16, 1, 8), (32, 64, 2, 9),
                                                     (70, 24, 1, 5), (3, 8, 2, 7),
                                                     (300, 6, 1, 11), (128, 8, 2, 6),
                                                     (16, 8, 2, 1), (16, 8, 2, 2)])
def test_popcount_conv_equals_the_xnor_simulation(kernel, cin, cout, stride, size):
    torch.manual_seed(cin)
    conv = torch.nn.Conv2d(cin, cout, 3, stride, 1)
    layer = XNORConv2d.from_float(conv, ScaledBinaryWeight(), SignActivation())
    x = torch.randn(3, cin, size, size)
    x[0, :, 0, 0] = 0.0  # binarize(0) = +1 on both paths
    with torch.no_grad():
        assert torch.equal(xnor.XNORPopcountConv2d(layer)(x), layer(x))  # bit for bit


@pytest.mark.parametrize("cin, stride", [(32, 1), (70, 2)])
def test_compiled_and_torch_paths_give_identical_outputs(monkeypatch, cin, stride):
    """Bit for bit, K included (the kernel sums it in its own passes), for every input shape
    (the kernel keeps the border masks of the last one)."""
    xnor.extension.cache_clear()
    if xnor.extension() is None:
        pytest.skip("the XNOR kernel cannot be built here")
    torch.manual_seed(0)
    layer = XNORConv2d.from_float(torch.nn.Conv2d(cin, 24, 3, stride, 1), ScaledBinaryWeight(),
                                  SignActivation())
    deployed = xnor.XNORPopcountConv2d(layer)
    inputs = [torch.randn(2, cin, 8, 8), torch.randn(3, cin, 9, 7), torch.randn(2, cin, 8, 8)]
    compiled = [deployed(x) for x in inputs]
    monkeypatch.setenv("LOWBIT_XNOR_KERNEL", "torch")
    xnor.extension.cache_clear()
    for x, out in zip(inputs, compiled):
        assert torch.equal(deployed(x), out)
    xnor.extension.cache_clear()


@pytest.mark.parametrize("path", PATHS[1:])
def test_every_vector_path_gives_the_scalar_integers(path):
    """Each instruction set's GEMM against the scalar loop on shapes that exercise the block
    tails (images of 7 x 7 = 49 pixels), channel groups not a multiple of 4, and more than
    31 words (the byte counters' flush)."""
    xnor.extension.cache_clear()
    if xnor.extension() is None:
        pytest.skip("the XNOR kernel cannot be built here")
    if path not in xnor.supported_paths():
        pytest.skip(f"this CPU has no {path}")
    g = torch.Generator().manual_seed(1)
    for k, m, o in [(150, 49 * 3, 7), (64 * 40 + 5, 49 * 2, 9), (9, 16, 4)]:
        a, b = torch.randn(m, k, generator=g), torch.randn(o, k, generator=g)
        rows, masks, valid = xnor.gemm_operands(xnor.pack_words(a >= 0), k)
        masks = masks & torch.randint(-2**62, 2**62, masks.shape, generator=g)  # ragged borders
        valid = ((masks.t().unsqueeze(-1) >> torch.arange(64)) & 1).sum((1, 2))
        alpha, scale, bias = torch.rand(o, generator=g), torch.rand(m, generator=g), \
            torch.randn(o, generator=g)
        plane = 49 if m % 49 == 0 else m
        reference, got = (xnor.extension().popcount_gemm(
            rows, masks, valid, xnor.pack_words(b >= 0), alpha, scale, bias, plane, name)
            for name in ("scalar", path))
        assert torch.equal(got, reference)


def test_an_unsupported_path_is_refused_in_one_line():
    if xnor.extension() is None:
        pytest.skip("the XNOR kernel cannot be built here")
    with pytest.raises(ValueError, match="not available on this CPU"):
        xnor.kernel_path("sse9")


def test_deployed_xnor_network_matches_its_simulation(kernel, digits_fp):
    d, fp = digits_fp
    x = d.test.images[:64].float()
    method = training_method("xnor", {})
    sim = method.prepare(copy.deepcopy(fp).eval(), x[:8]).train()
    with torch.no_grad():
        sim(x)
        sim.eval()
        deployed = xnor.deploy_xnor(sim)
        assert any(isinstance(m, xnor.XNORPopcountConv2d) for m in deployed.modules())
        a, b = sim(x), deployed(x)
    assert torch.equal(a, b)


def test_a_convolution_the_kernel_does_not_take_stays_in_float_form():
    """A dilated XNOR convolution (its K box-filters the dilated taps) keeps its float form,
    named in a warning; the rest deploys."""
    torch.manual_seed(0)
    layers = [XNORConv2d.from_float(torch.nn.Conv2d(16, 16, 3, 1, d, dilation=d),
                                    ScaledBinaryWeight(), SignActivation()) for d in (1, 2)]
    model = torch.nn.Sequential(*layers).eval()
    with pytest.warns(UserWarning, match="1 stays in float binary form"):
        deployed = xnor.deploy_xnor(model)
    assert isinstance(deployed[0], xnor.XNORPopcountConv2d) and isinstance(deployed[1], XNORConv2d)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        assert torch.equal(deployed(x), model(x))


@pytest.mark.parametrize("stride, dilation", [(1, 2), (2, 3)])
def test_xnor_scale_box_filters_the_dilated_taps(stride, dilation):
    from torch.nn import functional as F

    from lowbit.quant.binary import xnor_input_scale

    x = torch.randn(2, 5, 11, 11)
    box = torch.ones(1, 1, 3, 3) / 9
    expected = F.conv2d(x.abs().mean(1, keepdim=True), box, None, stride, dilation, dilation)
    got = xnor_input_scale(x, 3, stride, dilation, dilation)
    assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-6)


def _xnor_resnet20(recipe: dict, x: torch.Tensor):
    """A ResNet-20 prepared for XNOR-Net with ``recipe`` (random weights, BN statistics from
    ``x``, RSign thresholds moved off 0 so that the fused epilogue must subtract them)."""
    from lowbit.models import resnet20

    torch.manual_seed(0)
    sim = training_method("xnor", recipe).prepare(resnet20().eval(), x[:4]).train()
    with torch.no_grad():
        sim(x)
        for name, p in sim.named_parameters():
            if name.endswith("threshold"):
                p.normal_(0, 0.2)
    return sim.eval()


@pytest.mark.parametrize("recipe", [{}, {"shortcuts": "bireal", "learnable_threshold": True},
                                    {"shortcuts": "bireal", "learnable_threshold": True,
                                     "rprelu": True},
                                    {"input_scale": False},
                                    {"input_scale": False, "learnable_threshold": True}])
def test_fused_epilogues_keep_the_network_bit_identical(kernel, recipe):
    """BatchNorm, residual add and the next layer's packed signs fused into each binary
    convolution: every convolution takes its BatchNorm, the plain XNOR ResNet passes packed
    bits from one convolution to the next, and the outputs equal the simulation's on every
    path (thresholds included)."""
    x = torch.randn(6, 3, 32, 32)
    sim = _xnor_resnet20(recipe, x)
    deployed = xnor.deploy_xnor(sim)
    convs = [m for m in deployed.modules() if isinstance(m, xnor.XNORPopcountConv2d)]
    assert len(convs) == 18
    if kernel != "torch":
        assert all(c.bn_scale is not None for c in convs)
        if not recipe:  # BN -> sign -> conv inside a block, BN + shortcut -> sign between blocks
            assert [c.emits for c in convs[:2]] == ["signs", "both"] and convs[-1].emits == "float"
        if recipe.get("learnable_threshold") and not recipe.get("rprelu"):
            assert any(c.next_threshold is not None for c in convs)
    with torch.no_grad():
        assert torch.equal(deployed(x), sim(x))
        assert torch.equal(deployed(x[:1]), sim(x[:1]))  # another geometry: new border masks
    if kernel != "torch" and recipe.get("input_scale") is False:
        # without K, each block's first convolution writes its signs from integer thresholds
        assert [c._native.integer_signs() for c in convs[:2]] == [True, True]
        assert sum(c.emits == "signs" for c in convs) == 9


def test_bn_terms_reproduce_atens_batchnorm():
    """``fma(y, scale, shift)`` equals ``F.batch_norm`` element for element (else the
    BatchNorm is not fused), with and without affine parameters."""
    if xnor.extension() is None:
        pytest.skip("the XNOR kernel cannot be built here")
    for affine in (True, False):
        bn = torch.nn.BatchNorm2d(40, affine=affine).eval()
        with torch.no_grad():
            bn.running_mean.normal_(0, 2)
            bn.running_var.uniform_(0.01, 5)
            if affine:
                bn.weight.normal_()
                bn.bias.normal_()
        scale, shift = xnor.bn_terms(bn)
        y = torch.randn(3, 40, 9, 11) * 10
        with torch.no_grad():
            assert torch.equal(xnor.extension().affine(y, scale, shift), bn(y))
    assert xnor.bn_terms(torch.nn.BatchNorm2d(4).train()) is None  # batch statistics: unfused


def test_a_residual_of_another_shape_is_added_outside_the_kernel():
    """A broadcast residual (here [N, O, 1, 1]) is not fused into the kernel's add: the float
    output takes torch's broadcasting add, then the signs are packed from it."""
    if xnor.extension() is None:
        pytest.skip("the XNOR kernel cannot be built here")
    torch.manual_seed(0)
    layers = [XNORConv2d.from_float(torch.nn.Conv2d(8, 8, 3, 1, 1), ScaledBinaryWeight(),
                                    SignActivation()) for _ in range(2)]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = layers

        def forward(self, x):
            return self.b(self.a(x) + x.mean((2, 3), keepdim=True))

    from lowbit.transforms.fold import trace

    net = Net().eval()
    deployed = xnor.deploy_xnor(trace(net)[0])
    assert deployed.a.emits == "signs"
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        assert torch.equal(deployed(x), net(x))


def test_integer_sign_thresholds_follow_the_float_epilogue_both_ways(kernel):
    """A K-free binary convolution whose BatchNorm scales are of both signs (a falling sign
    as well as a rising one), some channels constant, and the next layer's RSign threshold:
    the deployed signs (integer thresholds on the kernel paths) equal the simulation's."""
    from lowbit.transforms.fold import trace

    torch.manual_seed(0)
    a, b = (XNORConv2d.from_float(torch.nn.Conv2d(24, 24, 3, 1, 1), ScaledBinaryWeight(),
                                  SignActivation(24)) for _ in range(2))
    a.input_scale = b.input_scale = False
    bn = torch.nn.BatchNorm2d(24).eval()
    with torch.no_grad():
        bn.weight.normal_()
        bn.weight[:3] = 0.0  # constant channels: the sign of the BN shift alone
        bn.bias.normal_()
        bn.running_mean.normal_(0, 5)
        bn.running_var.uniform_(0.5, 20)
        b.input_quantizer.threshold.normal_(0, 0.5)
    net = trace(torch.nn.Sequential(a, bn, b).eval())[0]
    deployed = xnor.deploy_xnor(net)
    x = torch.randn(3, 24, 7, 9)
    with torch.no_grad():
        assert torch.equal(deployed(x), net(x))
    first = deployed.get_submodule("0")
    if kernel != "torch":
        assert first.emits == "signs" and first._native.integer_signs()


def test_a_bnn_network_runs_on_the_kernel(kernel):
    """BNN (binary weights and inputs, no scale, no K) deploys on the same kernel: every binary
    convolution of ResNet-20, outputs equal to the simulation's on every path."""
    from lowbit.models import resnet20

    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    sim = training_method("bnn", {}).prepare(resnet20().eval(), x[:2]).train()
    with torch.no_grad():
        sim(x)
    sim.eval()
    deployed = xnor.deploy_xnor(sim)
    convs = [m for m in deployed.modules() if isinstance(m, xnor.XNORPopcountConv2d)]
    assert len(convs) == 18 and not any(c.input_scale for c in convs)
    with torch.no_grad():
        assert torch.equal(deployed(x), sim(x))


def test_a_bnn_convolution_with_a_bias_stays_in_float_form():
    """A float convolution adds its bias inside its sums, which the kernel's dot + bias does
    not reproduce bit for bit: such a BNN layer keeps its float form, named in a warning."""
    from lowbit.nn.binary import BinaryWeight
    from lowbit.nn.layers import QuantConv2d

    layer = QuantConv2d.from_float(torch.nn.Conv2d(8, 8, 3, 1, 1, bias=True), BinaryWeight(),
                                   SignActivation())
    assert xnor.binary_conv(layer)
    with pytest.warns(UserWarning, match="0 stays in float binary form: a BNN convolution's bias"):
        deployed = xnor.deploy_xnor(torch.nn.Sequential(layer).eval())
    assert not isinstance(deployed[0], xnor.XNORPopcountConv2d)
