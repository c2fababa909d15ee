import math

import pytest
import torch

from lowbit.quant import aciq_alpha, aciq_range, allocate_bits, correct_weight_bias
from lowbit.quant.affine import affine_qparams, fake_quantize

LAPLACE = [2.8307, 3.8972, 5.0286, 6.2048, 7.4131, 8.6456, 9.8968]  # M = 2..8
GAUSS = [1.2399, 1.7106, 2.1516, 2.5591, 2.9362, 3.2869, 3.6151, 3.9240]  # M = 1..8


@pytest.mark.parametrize("m,expected", zip(range(2, 9), LAPLACE))
def test_aciq_laplace_oracle_1(m, expected):
    assert aciq_alpha(m, "laplace") == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("m,expected", zip(range(1, 9), GAUSS))
def test_aciq_gauss_oracle_2(m, expected):
    assert aciq_alpha(m, "gauss") == pytest.approx(expected, abs=1e-3)


def test_aciq_alpha_scales_linearly_with_b():
    x = torch.distributions.Laplace(0.0, 1.0).sample((200_000,))
    lo1, hi1 = aciq_range(x, 4)
    lo3, hi3 = aciq_range(3 * x, 4)
    assert (hi3 - lo3).item() == pytest.approx(3 * (hi1 - lo1).item(), rel=1e-4)


def test_gauss_analytic_mse_matches_simulation_oracle_2():
    torch.manual_seed(0)
    x = torch.randn(2_000_000)
    for m in (2, 4, 6):  # at 8 bits only ~0.01% of samples clip: too few for a 1% check
        a = aciq_alpha(m, "gauss")
        step = 2 * a / 2**m
        # The model: values beyond +-a are clipped to +-a; inside, 2^M bins of width 2a / 2^M
        # (mid-rise) give the rounding noise step^2 / 12.
        inside = x.abs() < a
        y = torch.where(inside, (torch.floor(x / step) + 0.5) * step, x.clamp(-a, a))
        simulated = (x - y).pow(2).mean().item()
        clip = (1 + a**2) * (1 - math.erf(a / math.sqrt(2))) \
            - math.sqrt(2 / math.pi) * a * math.exp(-a**2 / 2)
        rounding = a**2 / (3 * 4**m)
        # Only the values inside the range get rounding noise: exact up to Monte-Carlo error.
        assert simulated == pytest.approx(clip + math.erf(a / math.sqrt(2)) * rounding, rel=0.01)
        # ACIQ's formula charges rounding noise to every value; close once P(clip) is small.
        if m >= 4:
            assert simulated == pytest.approx(clip + rounding, rel=0.03)


def test_half_range_oracle_3():
    for m in (1, 2, 3):
        assert aciq_alpha(m, one_sided=True) == pytest.approx(aciq_alpha(m + 1))
    x = torch.distributions.Laplace(0.5, 1.0).sample((100_000,))
    lo, hi = aciq_range(x, 4, one_sided=True)
    assert lo.item() == 0.0
    b = (x - x.mean()).abs().mean()
    assert hi.item() == pytest.approx(max(x.mean().item(), 0) + aciq_alpha(4, one_sided=True) * b.item(),
                                      rel=1e-5)
    scale, zp = affine_qparams(lo, hi, 0, 15, symmetric=False)
    assert (fake_quantize(x, scale, zp, 0, 15) >= 0).all()


def test_rectified_laplace_recovers_b():
    """The positive part of Laplace(mu <= 0, b) is Exp(b): mean of positives estimates b."""
    x = torch.relu(torch.distributions.Laplace(-0.5, 2.0).sample((1_000_000,)))
    lo, hi = aciq_range(x, 4, rectified=True)
    assert hi.item() / aciq_alpha(4, one_sided=True) == pytest.approx(2.0, rel=0.01)


def test_b_estimator_oracle_4():
    torch.manual_seed(0)
    x = torch.distributions.Laplace(3.0, 2.0).sample((1_000_000,))
    assert (x - x.mean()).abs().mean().item() == pytest.approx(2.0, abs=0.01)
    # per channel: channel 1 has b = 2, channel 0 has b = 0.5; each uses only its own values
    t = torch.stack([torch.distributions.Laplace(0.0, 0.5).sample((4, 50, 50)),
                     torch.distributions.Laplace(0.0, 2.0).sample((4, 50, 50))], dim=1)
    lo, hi = aciq_range(t, 4, axis=1)
    assert ((hi - lo) / (2 * aciq_alpha(4))).tolist() == pytest.approx([0.5, 2.0], rel=0.03)


def test_bit_allocation_oracle_5():
    assert allocate_bits(torch.tensor([1.0, 8.0]), 4).tolist() == [3, 5]
    assert allocate_bits(torch.full((10,), 2.5), 4).tolist() == [4] * 10
    torch.manual_seed(0)
    for _ in range(20):
        alpha = torch.rand(64) * 10 + 0.01
        bits = allocate_bits(alpha, 4)
        assert torch.equal(bits, allocate_bits(alpha * 7.3, 4))
        assert bits.min() >= 0 and bits.max() <= 8
        assert abs(bits.double().mean().item() - 4) <= 0.05


def test_bit_allocation_gives_zero_alpha_channels_the_floor():
    bits = allocate_bits(torch.tensor([0.0, 1.0, 1.0, 1.0]), 4)
    assert bits[0] == 1


def test_bias_correction_oracle_6():
    torch.manual_seed(0)
    w = torch.randn(16, 8, 3, 3) * 0.1 + 0.02
    from lowbit.quant.ranges import minmax_range
    lo, hi = minmax_range(w, 0)
    scale, zp = affine_qparams(lo, hi, 0, 3, symmetric=False)
    w_q = fake_quantize(w, scale, zp, 0, 3, axis=0)
    rows, rows_q = w.reshape(16, -1), w_q.reshape(16, -1)
    gain, shift = correct_weight_bias(w, w_q, "mean")
    corrected = (gain[:, None] * rows_q + shift[:, None])
    assert torch.allclose(corrected.mean(1), rows.mean(1), atol=1e-6)
    assert torch.allclose(shift, rows.mean(1) - rows_q.mean(1))  # mu_c of eq. 12
    gain, shift = correct_weight_bias(w, w_q, "mean_std")
    corrected = (gain[:, None] * rows_q + shift[:, None])
    assert torch.allclose(corrected.mean(1), rows.mean(1), atol=1e-6)
    assert torch.allclose(corrected.std(1), rows.std(1), rtol=1e-5)
