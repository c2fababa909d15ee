"""OpenVINO as a runtime of lowbit's QDQ export: it reproduces the simulation, runs int8 where
the weights are symmetric (and says so), and the CLI exports / evaluates its IR."""
import sys

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.data.core import Batches
from lowbit.deploy.onnx_export import to_onnx
from lowbit.errors import ConfigError
from lowbit.evaluate import agreement
from tests.user_models import UserNet, trained_like

pytest.importorskip("openvino")
from lowbit.deploy.openvino_runtime import OpenVinoRunner, save_openvino  # noqa: E402

SYMMETRIC = dict(w_bits=7, a_bits=8, w_symmetric=True, first_last_bits=None)


@pytest.mark.parametrize("cfg", [SYMMETRIC, dict(w_bits=8, a_bits=8)], ids=["sym", "asym"])
def test_openvino_reproduces_the_simulation(digits_fp, cfg):
    d, fp = digits_fp
    q = lowbit.quantize(fp, lowbit.PTQConfig(**cfg), Batches(d.train, d.normalization(), 256))
    result = agreement(q, OpenVinoRunner(to_onnx(q, (1, 1, 8, 8))),
                       Batches(d.test, d.normalization(), 250))
    assert result["top1_agreement"] >= 99.5 and result["max_logit_diff_steps"] <= 1.0
    assert abs(result["top1"] - result["top1_reference"]) <= 0.3


@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_only_with_symmetric_weights(calib, symmetric):
    """The module docstring's claim, checked on OpenVINO's execution graph: symmetric weights
    give int8 convolutions, asymmetric ones f32 convolutions of dequantized weights."""
    config = SYMMETRIC if symmetric else dict(w_bits=8, a_bits=8, first_last_bits=None)
    q = lowbit.quantize(trained_like(UserNet()), lowbit.PTQConfig(**config), calib)
    runner = OpenVinoRunner(to_onnx(q, (1, 3, 12, 12), calib=calib))
    convs = runner.precisions()["Convolution"]
    if symmetric:
        assert set(convs) <= {"u8", "i8"} and runner.int8_share() == 1.0
    else:
        assert convs.get("f32", 0) >= 1
    x = calib[0]
    assert (runner(x).argmax(1) == q(x).argmax(1)).float().mean() >= 0.9


def test_static_batch_pads_and_splits(calib):
    q = lowbit.quantize(trained_like(UserNet()), lowbit.PTQConfig(**SYMMETRIC), calib)
    model = to_onnx(q, (1, 3, 12, 12), calib=calib)
    x = calib[0][:11]
    dynamic = OpenVinoRunner(model, batch="dynamic")(x)
    static = OpenVinoRunner(model, batch=4)(x)  # 4 + 4 + 3 (padded)
    assert static.shape == dynamic.shape and torch.allclose(static, dynamic, atol=1e-5)


def test_each_batch_size_gets_its_static_model(calib, monkeypatch):
    """The default runner compiles one static-shape model per batch size it sees (up to
    STATIC_SHAPES, then the dynamic one), and each returns the dynamic model's logits; the
    returned logits are a copy, not the request's buffer that the next call overwrites."""
    from lowbit.deploy import openvino_runtime

    q = lowbit.quantize(trained_like(UserNet()), lowbit.PTQConfig(**SYMMETRIC), calib)
    model = to_onnx(q, (1, 3, 12, 12), calib=calib)
    dynamic = OpenVinoRunner(model, batch="dynamic")
    monkeypatch.setattr(openvino_runtime, "STATIC_SHAPES", 2)
    runner = OpenVinoRunner(model)
    x = calib[0]
    first = runner(x[:1])
    for n in (1, 5, 1, 3, 7):
        assert torch.allclose(runner(x[:n]), dynamic(x[:n]), atol=1e-5)
    assert sorted(runner.requests, key=str) == [1, 5, None]  # 3 and 7 ran on the dynamic model
    assert torch.allclose(first, dynamic(x[:1]), atol=1e-5)
    with pytest.raises(ConfigError, match="batch must be"):
        OpenVinoRunner(model, batch=0)


def test_ir_is_written_whole_and_reloads(tmp_path, calib):
    q = lowbit.quantize(trained_like(UserNet()), lowbit.PTQConfig(**SYMMETRIC), calib)
    model = to_onnx(q, (1, 3, 12, 12), calib=calib)
    path = save_openvino(model, tmp_path / "m.xml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.xml"]
    x = calib[1]
    assert torch.equal(OpenVinoRunner(path)(x), OpenVinoRunner(model)(x))
    with pytest.raises(ConfigError, match="ends in .xml"):
        save_openvino(model, tmp_path / "m.onnx")


def test_cli_exports_and_evaluates_openvino(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--model", "digits_cnn", "--data", "digits", "--recipe",
                 "ptq-int8-deploy", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["export", "--checkpoint", str(out / "quantized.pt"), "--format", "openvino",
                 "--data", "digits", "--calib", "64", "--out", str(tmp_path / "m.xml")]) == 0
    stdout = capsys.readouterr().out
    assert "runs in OpenVINO, 100% of its conv / linear layers in int8" in stdout
    assert main(["eval", "--model", "digits_cnn", "--checkpoint", str(tmp_path / "m.xml"),
                 "--data", "digits"]) == 0
    assert "(openvino)" in capsys.readouterr().out
    assert main(["export", "--checkpoint", str(out / "quantized.pt"), "--format", "onnx",
                 "--out", str(tmp_path / "m.onnx")]) == 0
    assert main(["eval", "--model", "digits_cnn", "--checkpoint", str(tmp_path / "m.onnx"),
                 "--data", "digits", "--runtime", "openvino", "--threads", "2"]) == 0
    assert "(openvino)" in capsys.readouterr().out
    assert main(["eval", "--model", "digits_cnn", "--checkpoint", str(tmp_path / "m.xml"),
                 "--data", "digits", "--runtime", "onnxruntime"]) == 2
    assert "use --runtime openvino" in capsys.readouterr().err


def test_missing_openvino_is_one_clear_error(monkeypatch, calib):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(ConfigError, match="pip install openvino"):
        OpenVinoRunner("model.onnx")


def test_four_bit_weights_run_on_int8_kernels_when_stored_as_int8(calib):
    """W4A8: INT4 weights are dequantized to float by OpenVINO; the same codes stored as int8
    run its int8 convolutions. The outputs agree to within the rounding of the requantized
    activations (a code here and there), and both follow the simulation."""
    q = lowbit.quantize(trained_like(UserNet()),
                        lowbit.PTQConfig(w_bits=4, a_bits=8, w_symmetric=True,
                                         first_last_bits=None), calib)
    four = OpenVinoRunner(to_onnx(q, (1, 3, 12, 12), calib=calib))
    eight = OpenVinoRunner(to_onnx(q, (1, 3, 12, 12), calib=calib, int8_weights=True))
    assert eight.int8_share() == 1.0 and four.int8_share() < 1.0
    x = calib[0]
    a, b, sim = four(x), eight(x), q(x)
    step = (sim.max() - sim.min()) / 255  # an 8-bit output step
    assert (a - b).abs().max() <= 2 * step
    assert (b.argmax(1) == sim.argmax(1)).float().mean() >= 0.9
