
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lowbit
from lowbit.nn.accumulator import accumulator_scale
from lowbit.errors import ConfigError, DataError, NumericalError
from lowbit.nn import AffineQuantizer, QuantConv2d, QuantLinear
from lowbit.quant.ranges import bn_activation_range, ema_update
from lowbit.transforms import equalize_model, fold_batchnorm
from lowbit.models import build_model
from tests.user_models import trained_like


def test_user_model_quantizes_and_runs(user_model, calib):
    q = lowbit.quantize(user_model, lowbit.PTQConfig(w_bits=8, a_bits=8), calib)
    wrappers = [m for m in q.modules() if isinstance(m, (QuantConv2d, QuantLinear))]
    assert len(wrappers) == 9 and q.lowbit.folded
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
    x = calib[0]
    ref, out = user_model(x), q(x)
    assert out.shape == ref.shape
    assert (out - ref).pow(2).mean() / ref.pow(2).mean() < 1e-3      # W8A8 is close
    assert q.head.bias is None                                        # bias-free Linear kept


def test_first_and_last_layer_policy(user_model, calib):
    q = lowbit.quantize(user_model, lowbit.PTQConfig(w_bits=4, a_bits=4), calib)
    plan = q.lowbit.plan
    names = list(plan)
    assert names[0] == "stem.0" and names[-1] == "head"
    assert plan["stem.0"].w_bits == 8 and plan["head"].a_bits == 8 and plan["group"].w_bits == 4
    q2 = lowbit.quantize(user_model, lowbit.PTQConfig(
        w_bits=4, a_bits=4, first_last_bits=None, skip=["body\\.a\\..*"],
        overrides={"group": {"w_bits": 6}}), calib)
    assert q2.lowbit.plan["stem.0"].w_bits == 4 and q2.lowbit.plan["group"].w_bits == 6
    assert "body.a.dw" not in q2.lowbit.plan and type(q2.get_submodule("body.a.dw")) is nn.Conv2d


def test_input_signedness_follows_data(user_model, calib):
    q = lowbit.quantize(user_model, lowbit.PTQConfig(w_bits=4, a_bits=4), calib)
    assert q.get_submodule("stem.0").input_quantizer.quant_min.item() < 0  # image: signed
    assert q.get_submodule("body.a.pw").input_quantizer.quant_min.item() == 0  # after ReLU: unsigned


@pytest.mark.parametrize("cfg", [
    dict(clip="aciq-laplace", a_per_channel=True, w_bit_alloc=True, a_bit_alloc=True,
         bias_correction="mean"),
    dict(clip="aciq-gauss", bias_correction="mean_std"),
    dict(clip="mse", w_clip="mse", equalize=True, bias_correction="mean_std",
         empirical_bias_correction=True),
    dict(clip="percentile", w_clip="percentile"), dict(clip="ema"),
])
def test_every_option_runs_and_stays_close(user_model, calib, cfg):
    q = lowbit.quantize(user_model, lowbit.PTQConfig(w_bits=4, a_bits=8, **cfg), calib)
    x = calib[0]
    ref = user_model(x)
    assert (q(x) - ref).pow(2).mean() / ref.pow(2).mean() < 0.2


def test_weight_bit_allocation_keeps_average(user_model, calib):
    q = lowbit.quantize(user_model, lowbit.PTQConfig(w_bits=4, a_bits=None, w_bit_alloc=True), calib)
    bits = q.get_submodule("body.a.pw").weight_quantizer.bits
    assert bits.numel() == 8 and abs(bits.float().mean().item() - 4) <= 0.5 and bits.min() >= 1


@pytest.mark.parametrize("int_bias", [False, True])
def test_empirical_bias_correction_matches_float_means(user_model, calib, int_bias):
    q = lowbit.quantize(user_model, lowbit.PTQConfig(w_bits=3, a_bits=3, int_bias=int_bias,
                                                     empirical_bias_correction=True), calib)
    x = torch.cat(calib)
    means = {}
    q.get_submodule("group").register_forward_hook(
        lambda m, i, y: means.__setitem__("group", y.mean((0, 2, 3))))
    q(x)
    fp = fold_batchnorm(user_model)[0]
    ref = {}
    fp.group.register_forward_hook(lambda m, i, y: ref.__setitem__("group", y.mean((0, 2, 3))))
    fp(x)
    # rounding the bias onto the int32 accumulator grid moves it by at most half a step
    slack = 0.5 * accumulator_scale(q.get_submodule("group")).float() if int_bias else 0.0
    assert ((means["group"] - ref["group"]).abs() <= slack + 1e-4).all()


def test_equalization_preserves_function_and_balances_ranges(user_model, calib):
    folded, _ = fold_batchnorm(user_model)
    x = calib[0]
    before = folded(x)
    pairs = equalize_model(folded)
    assert ("body.a.dw", "body.a.pw") in pairs
    assert torch.allclose(folded(x), before, atol=1e-4)
    r1 = folded.get_submodule("body.a.dw").weight.abs().amax((1, 2, 3))
    r2 = folded.get_submodule("body.a.pw").weight.abs().amax((0, 2, 3))
    assert torch.allclose(r1, r2, rtol=1e-4)


def test_untraceable_model_is_quantized_unfolded(calib):
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow defeats symbolic tracing
                x = x * 1.0
            return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))

    with pytest.warns(UserWarning, match="cannot be traced"):
        q = lowbit.quantize(trained_like(Dynamic()), lowbit.PTQConfig(), calib)
    assert not q.lowbit.folded and isinstance(q.bn, nn.BatchNorm2d)
    assert q(calib[0]).shape == (32, 2)


def test_save_and_reload_give_identical_outputs(tmp_path, calib):
    from lowbit.models import build_model
    model = trained_like(build_model("digits_cnn"))
    cal = [torch.randn(16, 1, 8, 8) for _ in range(2)]
    q = lowbit.quantize(model, lowbit.PTQConfig(w_bits=4, a_bits=4, w_bit_alloc=True,
                                                a_bit_alloc=True, bias_correction="mean"), cal)
    path = lowbit.save_quantized(tmp_path / "q.pt", q, "digits_cnn")
    q2, payload = lowbit.load_quantized(path)
    assert payload["config"]["w_bits"] == 4
    assert torch.equal(q(cal[0]), q2(cal[0]))


# ---- bad input ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [dict(w_bits=0), dict(w_bits=17), dict(a_bits=33),
                                    dict(clip="nope"), dict(calib=0), dict(first_last_bits=20)])
def test_bad_config_is_a_config_error(kwargs, user_model, calib):
    with pytest.raises(ConfigError):
        lowbit.quantize(user_model, lowbit.PTQConfig(**kwargs), calib)


def test_empty_calibration_set(user_model):
    with pytest.raises(DataError, match="empty"):
        lowbit.quantize(user_model, lowbit.PTQConfig(), [])


def test_tiny_calibration_set_warns_but_works(user_model):
    with pytest.warns(UserWarning, match="only 1 calibration"):
        q = lowbit.quantize(user_model, lowbit.PTQConfig(), [torch.randn(1, 3, 12, 12)])
    assert torch.isfinite(q(torch.randn(2, 3, 12, 12))).all()


def test_nan_weights_name_the_layer(user_model, calib):
    user_model.body["b"][1].pw.weight.data[0, 0] = float("nan")
    with pytest.raises(NumericalError, match=r"body\.b\.1\.pw\.weight"):
        lowbit.quantize(user_model, lowbit.PTQConfig(), calib)


def test_a_bits_without_any_activation_to_quantize(user_model, calib):
    with pytest.raises(ConfigError, match="no layer has an input"):
        lowbit.quantize(user_model, lowbit.PTQConfig(a_bits=8, overrides={".*": {"a_bits": None}}),
                        calib)


def test_model_without_layers(calib):
    with pytest.raises(ConfigError, match="no Conv2d or Linear"):
        lowbit.quantize(nn.Sequential(nn.ReLU()), lowbit.PTQConfig(), calib)


def test_unknown_pattern_and_recipe_key(user_model, calib):
    with pytest.raises(ConfigError, match="matches no layer"):
        lowbit.quantize(user_model, lowbit.PTQConfig(skip=["nothing.here"]), calib)
    with pytest.raises(ConfigError, match="unknown PTQ key 'wbits'.*valid keys: w_bits"):
        lowbit.PTQConfig.from_dict({"wbits": 4})


def test_all_zero_channel_stays_exact(user_model, calib):
    user_model.group.weight.data[3] = 0.0
    q = lowbit.quantize(user_model, lowbit.PTQConfig(w_bits=4, a_bits=4), calib)
    w_q = q.group.quantized_weight()
    assert torch.isfinite(w_q).all() and torch.equal(w_q[3], torch.zeros_like(w_q[3]))


def test_uncalibrated_quantizer_names_itself():
    from lowbit.quant import QScheme
    q = AffineQuantizer(QScheme(4), name="layer1.conv.input")
    with pytest.raises(lowbit.errors.CalibrationError, match="layer1.conv.input"):
        q(torch.zeros(2))


def test_bn_clipping_oracle_12():
    beta, gamma = torch.tensor([0.1, -0.2]), torch.tensor([0.5, -1.0])
    lo, hi = bn_activation_range(beta, gamma, 6, signed_gamma=True)
    assert lo.item() == 0 and hi.item() == pytest.approx(3.1)
    assert bn_activation_range(beta, gamma, 6)[1].item() == pytest.approx(5.8)  # |gamma|


def test_ema_oracle_13():
    r = ema_update(None, torch.tensor(1.0), 0.01)
    assert r.item() == 1.0 and ema_update(r, torch.tensor(2.0), 0.01).item() == pytest.approx(1.01)
    assert ema_update(r, torch.tensor(2.0), 0.1).item() == pytest.approx(1.1)


def test_bn_clipping_takes_ranges_from_the_feeding_batchnorm():
    model = build_model("psg_resnet32", num_classes=100)
    trained_like(model)
    x = torch.randn(32, 3, 32, 32)
    q = lowbit.quantize(model, lowbit.PTQConfig(w_bits=8, a_bits=4, clip="bn", fold_bn=False,
                                                bn_signed_gamma=True), [x])
    bn = model.layer1[0].bn1                           # feeds layer1.0.conv2 through a ReLU
    expected = (bn.bias + 6 * bn.weight).max().item()
    quantizer = q.layer1[0].conv2.input_quantizer
    assert quantizer.scale.item() == pytest.approx(expected / 15, rel=1e-5)
    residual = model.layer1[0].bn2                     # after the add: the block's own BN
    got = q.layer1[1].conv1.input_quantizer.scale.item() * 15
    assert got == pytest.approx((residual.bias + 6 * residual.weight).max().item(), rel=1e-5)
    assert q.conv1.input_quantizer.quant_min.item() < 0          # the image: min-max, signed
    assert any("bn clipping: 32 inputs" in n for n in q.lowbit.notes)
    folded = lowbit.quantize(model, lowbit.PTQConfig(w_bits=8, a_bits=4, clip="bn"), [x])
    assert folded.get_submodule("layer1.0.conv2").input_quantizer.scale.item() == pytest.approx(
        (bn.bias + 6 * bn.weight.abs()).max().item() / 15, rel=1e-5)
