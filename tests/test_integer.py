"""The integer-only engine: fixed-point arithmetic, agreement with the fake-quant simulation,
and clear refusals of what has no integer form."""
from fractions import Fraction

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
from lowbit.data.core import Batches
from lowbit.deploy.integer import IntegerEngine, fixed_point, multiply_by_fixed_point
from lowbit.errors import ConfigError, ModelError, NumericalError
from lowbit.evaluate import agreement
from lowbit.nn.accumulator import accumulator_scale
from tests.user_models import ConvThen, UserNet, trained_like


@settings(max_examples=300, deadline=None)
@given(st.floats(1e-6, 1e3, allow_nan=False), st.integers(-2 ** 31, 2 ** 31 - 1))
@example(0.5, 5).via("a tie rounds down to even")
@example(0.25, 6).via("a tie rounds up to even")
@example(0.25, -10).via("a negative tie")
def test_fixed_point_multiply_rounds_the_exact_product_half_to_even(multiplier, acc):
    m0, shift = fixed_point(multiplier)
    assert 2 ** 30 <= int(m0) < 2 ** 31
    held = Fraction(int(m0), 2 ** (31 + int(shift)))
    assert abs(held - Fraction(multiplier)) <= Fraction(multiplier) * Fraction(1, 2 ** 30)
    got = int(multiply_by_fixed_point(torch.tensor(acc), m0, shift))
    exact = held * acc
    assert got == round(exact)  # Fraction rounds half to even, as torch.round


def _digits(digits_fp, **cfg):
    d, fp = digits_fp
    q = lowbit.quantize(fp, lowbit.PTQConfig(**cfg), Batches(d.train, d.normalization(), 256))
    return q, Batches(d.test, d.normalization(), 250)


@pytest.mark.parametrize("cfg", [dict(w_bits=8, a_bits=8),
                                 dict(w_bits=4, a_bits=4, w_clip="mse", clip="mse",
                                      equalize=True, empirical_bias_correction=True),
                                 dict(w_bits=3, a_bits=8, w_symmetric=True, w_bit_alloc=True)])
def test_engine_agrees_with_the_simulation(digits_fp, cfg):
    q, test = _digits(digits_fp, **cfg)
    result = agreement(q, IntegerEngine(q), test)
    assert result["top1_agreement"] >= 99.9
    assert result["within_one_step"] >= 99.0
    assert abs(result["top1"] - result["top1_reference"]) <= 0.1


def test_engine_runs_residuals_grouped_convs_and_mean_pooling(calib):
    model = trained_like(UserNet())
    q = lowbit.quantize(model, lowbit.PTQConfig(w_bits=8, a_bits=8), calib)
    x = torch.randn(64, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    a, b = q(x), IntegerEngine(q)(x)
    step = (a.max() - a.min()) / 255
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.98
    assert ((a - b).abs() <= step).float().mean() >= 0.98


def test_biases_sit_on_the_accumulator_grid(digits_fp):
    q, _ = _digits(digits_fp, w_bits=4, a_bits=4)
    for layer in q.modules():
        if isinstance(layer, lowbit.nn.QUANT_LAYERS) and layer.bias is not None:
            units = layer.bias.double() / accumulator_scale(layer)
            assert torch.allclose(units, units.round(), atol=1e-3)


@pytest.mark.parametrize("cfg, message", [
    (dict(w_bits=8, a_bits=8, a_per_channel=True), "per-channel activation"),
    (dict(w_bits=4, a_bits=8, bias_correction="mean_std"), "bias correction"),
    (dict(w_bits=8, a_bits=None), "input is not quantized"),
])
def test_what_has_no_integer_form_is_refused_by_name(digits_fp, cfg, message):
    q, _ = _digits(digits_fp, **cfg)
    with pytest.raises(ConfigError, match=message):
        IntegerEngine(q)


def test_unsupported_op_is_named(calib):
    q = lowbit.quantize(ConvThen(torch.sigmoid).eval(), lowbit.PTQConfig(w_bits=8, a_bits=8), calib)
    with pytest.raises(ModelError, match="sigmoid"):
        IntegerEngine(q)(calib[0])


@pytest.mark.filterwarnings("ignore:only 16 calibration images")
def test_an_overflowing_accumulator_is_reported():
    model = nn.Sequential(nn.Flatten(), nn.Linear(8192, 2)).eval()
    data = [torch.rand(16, 8192) * 100]
    q = lowbit.quantize(model, lowbit.PTQConfig(w_bits=16, a_bits=16, first_last_bits=None),
                        data)
    with pytest.raises(NumericalError, match="overflow"):
        IntegerEngine(q)(data[0])
