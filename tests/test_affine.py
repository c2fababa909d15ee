import pytest
import torch
from hypothesis import given, settings, strategies as st

from lowbit.errors import ConfigError
from lowbit.quant import QScheme, affine_qparams, dequantize, fake_quantize, integer_range, quantize

W = torch.tensor([[2.09, -0.98, 1.48, 0.09], [0.05, -0.14, -1.08, 2.12],
                  [-0.91, 1.92, 0.0, -1.03], [1.87, 0.0, 1.53, 1.49]])


def test_lecture_example_oracle_14():
    scale, zp = affine_qparams(W.min(), W.max(), -2, 1, symmetric=False)
    assert scale.item() == pytest.approx(3.2 / 3, abs=1e-6) and zp.item() == -1
    q = quantize(W, scale, zp, -2, 1)
    assert q.tolist() == [[1, -2, 0, -1], [-1, -1, -2, 1], [-2, 1, -1, -2], [1, -1, 0, 0]]
    assert (dequantize(q, scale, zp) - W).pow(2).sum().item() == pytest.approx(0.7454, abs=1e-4)


@pytest.mark.parametrize("bits,signed,narrow,expected", [
    (4, True, False, (-8, 7)), (4, True, True, (-7, 7)), (4, False, False, (0, 15)),
    (8, False, False, (0, 255)), (2, True, False, (-2, 1)), (16, True, False, (-32768, 32767))])
def test_integer_ranges(bits, signed, narrow, expected):
    assert integer_range(bits, signed, narrow) == expected


@pytest.mark.parametrize("bits", [0, 17, -1, 2.5, True])
def test_bits_outside_1_to_16_are_rejected(bits):
    with pytest.raises(ConfigError, match="1 to 16"):
        QScheme(bits)


def test_symmetric_signed_one_bit_has_no_level():
    with pytest.raises(ConfigError):
        QScheme(1, signed=True, symmetric=True)


tensors = st.lists(st.floats(-100, 100, allow_nan=False, width=32), min_size=2, max_size=64)


@settings(max_examples=150, deadline=None)
@given(values=tensors, bits=st.integers(1, 8), symmetric=st.booleans())
def test_gemmlowp_properties_oracle_7(values, bits, symmetric):
    x = torch.tensor(values)
    signed = symmetric and bits >= 2
    qmin, qmax = integer_range(bits, signed)
    scale, zp = affine_qparams(x.min(), x.max(), qmin, qmax, symmetric)
    fq = lambda t: fake_quantize(t, scale, zp, qmin, qmax)
    y = fq(x)
    assert fq(torch.zeros(1)).item() == 0.0                       # Q(0) == 0 exactly
    assert torch.unique(y).numel() <= 2 ** bits                    # at most 2^b levels
    assert torch.equal(fq(y), y)                                   # idempotent
    lo, hi = (qmin - zp) * scale, (qmax - zp) * scale               # the nudged range
    inside = (x >= lo) & (x <= hi)
    assert ((x - y).abs()[inside] <= scale / 2 * (1 + 1e-5) + 1e-6).all()


def _check_same(ours, theirs, x):
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    assert torch.equal(y1, y2)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    assert torch.equal(x1.grad, x2.grad)


@pytest.mark.parametrize("qmin,qmax", [(0, 15), (-8, 7), (0, 255), (-128, 127)])
def test_equals_torch_per_tensor_with_gradients(qmin, qmax):
    x = torch.randn(4, 3, 5, 5) * 3
    scale, zp = affine_qparams(x.min() * 0.7, x.max() * 0.6, qmin, qmax, symmetric=False)
    _check_same(lambda t: fake_quantize(t, scale, zp, qmin, qmax),
                lambda t: torch.fake_quantize_per_tensor_affine(t, scale, zp.int(), qmin, qmax), x)


@pytest.mark.parametrize("axis", [0, 1, 3])
def test_equals_torch_per_channel_with_gradients(axis):
    x = torch.randn(6, 5, 4, 3) * 2
    from lowbit.quant.ranges import minmax_range
    lo, hi = minmax_range(x * 0.8, axis)
    scale, zp = affine_qparams(lo, hi, 0, 15, symmetric=False)
    _check_same(lambda t: fake_quantize(t, scale, zp, 0, 15, axis),
                lambda t: torch.fake_quantize_per_channel_affine(t, scale, zp.int(), axis, 0, 15), x)


def test_all_zero_and_constant_channels_are_exact():
    w = torch.zeros(3, 8)
    w[1] = 0.37
    w[2] = -2.5
    from lowbit.quant.ranges import minmax_range
    for symmetric, (qmin, qmax) in ((False, (0, 15)), (True, (-7, 7))):
        lo, hi = minmax_range(w, 0)
        scale, zp = affine_qparams(lo, hi, qmin, qmax, symmetric)
        assert torch.isfinite(scale).all() and (scale > 0).all()
        y = fake_quantize(w, scale, zp, qmin, qmax, axis=0)
        assert torch.allclose(y, w, rtol=1e-6, atol=0)
        assert torch.equal(y[0], w[0])


def test_per_channel_bits_use_per_channel_ranges():
    x = torch.linspace(-1, 1, 200).repeat(2, 1)
    bits = torch.tensor([2, 6])
    qmin, qmax = integer_range(bits, False)
    scale, zp = affine_qparams(x.amin(1), x.amax(1), qmin, qmax, False)
    y = fake_quantize(x, scale, zp, qmin, qmax, axis=0)
    assert torch.unique(y[0]).numel() <= 4 and 32 < torch.unique(y[1]).numel() <= 64


def test_mse_range_finds_the_best_candidate():
    """The vectorized search equals a plain loop over the same candidates."""
    from lowbit.quant.ranges import mse_range
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((3, 4000)) * torch.tensor([[1.0], [3.0], [0.2]])
    lo, hi = mse_range(x, 0, 15, symmetric=False, axis=0, steps=40)
    for c in range(3):
        best, best_err = None, float("inf")
        for r in torch.linspace(0.05, 1.0, 40):
            s, z = affine_qparams(x[c].min() * r, x[c].max() * r, 0, 15, False)
            err = (fake_quantize(x[c], s, z, 0, 15) - x[c]).pow(2).mean().item()
            if err < best_err:
                best, best_err = r, err
        assert hi[c].item() == pytest.approx((x[c].max() * best).item(), rel=1e-5)
    assert (hi < x.amax(1)).all()  # heavy tails: clipping beats min-max at 4 bits


def test_channel_sample_keeps_channels_apart():
    from lowbit.quant.ranges import channel_sample
    x = torch.arange(4.0).reshape(1, 4, 1, 1).expand(50, 4, 30, 30).contiguous()
    s = channel_sample(x, 1, max_total=400)
    assert s.shape == (4, 100) and torch.equal(s, torch.arange(4.0)[:, None].expand(4, 100))
    assert channel_sample(x, None, max_total=400).shape == (1, 400)
    assert torch.equal(channel_sample(x[:1, :, :2, :2], 1), x[0, :, :2, :2].reshape(4, 4))
