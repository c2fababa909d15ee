"""XNOR-popcount inference: the -n + 2 popcount identity, border handling, the compiled kernel
against the pure-torch path, and a deployed XNOR network against its float simulation."""
import copy

import pytest
import torch

from lowbit.deploy import xnor
from lowbit.methods import training_method
from lowbit.nn.binary import ScaledBinaryWeight, SignActivation, XNORConv2d


@pytest.fixture(params=["compiled", "torch"])
def kernel(request, monkeypatch):
    """Run a test with the compiled kernel (skipped where it cannot build) and the torch path."""
    xnor.extension.cache_clear()
    if request.param == "torch":
        monkeypatch.setenv("LOWBIT_XNOR_KERNEL", "torch")
    elif xnor.extension() is None:
        pytest.skip("the XNOR kernel cannot be built here")
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
                                                     (70, 24, 1, 5), (3, 8, 2, 7)])
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
