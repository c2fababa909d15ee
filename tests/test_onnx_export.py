"""QDQ ONNX export: onnxruntime reproduces the simulation; integer types at the real width;
refusals name the layer."""
import onnx
import pytest
import torch
from onnx import TensorProto

import lowbit
from lowbit.cli import main
from lowbit.data.core import Batches
from lowbit.deploy.onnx_export import OnnxRunner, export_onnx, to_onnx
from lowbit.errors import ExportError
from lowbit.evaluate import agreement
from tests.user_models import Branchy, UserNet, trained_like


def _digits(digits_fp, **cfg):
    d, fp = digits_fp
    q = lowbit.quantize(fp, lowbit.PTQConfig(**cfg), Batches(d.train, d.normalization(), 256))
    return q, Batches(d.test, d.normalization(), 250)


@pytest.mark.parametrize("cfg", [dict(w_bits=8, a_bits=8),
                                 dict(w_bits=4, a_bits=4, w_clip="mse", clip="mse"),
                                 dict(w_bits=3, a_bits=3, w_symmetric=True, a_symmetric=True),
                                 dict(w_bits=4, a_bits=8, w_bit_alloc=True,
                                      bias_correction="mean_std")])
def test_onnxruntime_reproduces_the_simulation(digits_fp, cfg):
    q, test = _digits(digits_fp, **cfg)
    result = agreement(q, OnnxRunner(to_onnx(q, (1, 1, 8, 8))), test)
    assert result["top1_agreement"] >= 99.5
    assert abs(result["top1"] - result["top1_reference"]) <= 0.3


def test_weights_are_stored_at_their_width(digits_fp):
    q, _ = _digits(digits_fp, w_bits=4, a_bits=4)
    model = to_onnx(q, (1, 1, 8, 8))
    kinds = {t.name: t.data_type for t in model.graph.initializer}
    assert kinds["3.weight_codes"] == TensorProto.UINT4      # a 4-bit inner layer
    assert kinds["3.weight_zero_point"] == TensorProto.UINT4
    assert kinds["0.weight_codes"] in (TensorProto.UINT8, TensorProto.INT8)  # first: 8 bits
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("Conv") == 3 and "Gemm" in ops
    made_by = {out: n.op_type for n in model.graph.node for out in n.output}
    for n in model.graph.node:  # every layer reads a dequantized input, weight and bias
        if n.op_type in ("Conv", "Gemm"):
            assert [made_by[i] for i in n.input] == ["DequantizeLinear"] * 3


def test_residual_grouped_and_mean_pooled_model_exports(tmp_path, calib):
    q = lowbit.quantize(trained_like(UserNet()), lowbit.PTQConfig(w_bits=8, a_bits=8), calib)
    path = export_onnx(q, tmp_path / "user.onnx", (1, 3, 12, 12))
    onnx.checker.check_model(onnx.load(str(path)))
    x = torch.randn(32, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    a, b = q(x), OnnxRunner(path)(x)
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.95
    assert (a - b).abs().max() <= 0.05 * (a.max() - a.min())


def test_export_failures_name_the_layer(digits_fp, calib):
    q, _ = _digits(digits_fp, w_bits=8, a_bits=8, a_per_channel=True)
    with pytest.raises(ExportError, match="per-channel activation"):
        to_onnx(q, (1, 1, 8, 8))

    q = lowbit.quantize(Branchy().eval(), lowbit.PTQConfig(w_bits=8, a_bits=8), calib)
    with pytest.raises(ExportError, match="torch.fx.wrap"):
        to_onnx(q, (1, 3, 12, 12))


def test_cli_exports_and_evaluates_onnx(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--model", "digits_cnn", "--data", "digits", "--w-bits", "4",
                 "--a-bits", "8", "--out", str(out)]) == 0
    assert main(["export", "--checkpoint", str(out / "quantized.pt"), "--format", "onnx",
                 "--out", str(tmp_path / "m.onnx")]) == 0
    assert "runs in onnxruntime" in capsys.readouterr().out
    assert main(["eval", "--model", "digits_cnn", "--checkpoint", str(tmp_path / "m.onnx"),
                 "--data", "digits"]) == 0
    assert "onnxruntime" in capsys.readouterr().out
    assert main(["export", "--checkpoint", str(out / "quantized.pt"), "--format", "onnx",
                 "--data", "digits", "--calib", "64", "--out", str(tmp_path / "full.onnx")]) == 0
    assert "fully quantized" in capsys.readouterr().out
    quantized = [sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(tmp_path / f)).graph.node)
                 for f in ("m.onnx", "full.onnx")]
    assert quantized[1] > quantized[0]  # the last ReLU, which feeds pooling, is an integer too
    assert main(["export", "--checkpoint", str(out / "quantized.pt"), "--format", "onnx",
                 "--data", "digits", "--calib", "0", "--out", str(tmp_path / "bad.onnx")]) == 2
    assert "--calib must be a positive" in capsys.readouterr().err
    assert not (tmp_path / "bad.onnx").exists()


def test_fully_quantized_graph_runs_integer_kernels_and_keeps_accuracy(tmp_path, calib):
    import onnxruntime as ort

    q = lowbit.quantize(trained_like(UserNet()),
                        lowbit.PTQConfig(w_bits=7, a_bits=8, w_symmetric=True,
                                         first_last_bits=None), calib)
    model = to_onnx(q, (1, 3, 12, 12), calib=calib)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("QLinearAdd") == 3 and "Add" not in ops       # the residual adds
    assert ops.count("QLinearConv") == 8 and "Conv" not in ops
    assert "QLinearGlobalAveragePool" in ops and "ReduceMean" not in ops  # x.mean((2, 3))
    assert "MatMulIntegerToFloat" in ops  # the classifier reads integers too
    x = torch.randn(64, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    a, b = q(x), OnnxRunner(model)(x)
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.9
    assert (a - b).abs().max() <= 0.1 * (a.max() - a.min())


class LinearBottlenecks(torch.nn.Module):
    """MobileNetV2's pattern: a residual stream without ReLU (signed activations) read by the
    next block's first conv and by its residual add."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU6(),
                          nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8)) for _ in range(2))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x.mean((2, 3)))


def test_signed_activations_are_written_as_uint8_and_run_integer_kernels(tmp_path, calib):
    """A signed 8-bit grid is exported as uint8 codes with the zero point moved by 128 (the same
    q - Z), which onnxruntime's x86 kernels take: every conv and add of the signed residual
    stream runs as QLinearConv / QLinearAdd, and the logits follow the simulation."""
    import onnxruntime as ort

    q = lowbit.quantize(trained_like(LinearBottlenecks()),
                        lowbit.PTQConfig(w_bits=7, a_bits=8, w_symmetric=True,
                                         first_last_bits=None), calib)
    model = to_onnx(q, (1, 3, 12, 12), calib=calib)
    initializers = {t.name: t for t in model.graph.initializer}
    zero_points = [initializers[n.input[2]] for n in model.graph.node
                   if n.op_type == "QuantizeLinear" and n.input[2] in initializers]
    assert zero_points and all(z.data_type == TensorProto.UINT8 for z in zero_points)
    assert any(onnx.numpy_helper.to_array(z) != 0 for z in zero_points)  # signed ranges shifted
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("QLinearConv") == 5 and ops.count("QLinearAdd") == 2
    assert "Conv" not in ops and "Add" not in ops
    x = torch.randn(64, 3, 12, 12, generator=torch.Generator().manual_seed(3))
    sim = lowbit.deploy.lower(q, calib).simulation()(x)
    out = OnnxRunner(model)(x)
    assert (out.argmax(1) == sim.argmax(1)).float().mean() >= 0.95
    assert (out - sim).abs().max() <= 2 * (sim.max() - sim.min()) / 255


def test_bench_infer_reports_every_runner(tmp_path, capsys):
    import importlib.util
    import json

    from lowbit.deploy.bench import available_runners

    out = tmp_path / "bench.json"
    fast = ["lowbit int8", "pytorch fx int8", "onnxruntime qdq int8"]
    if importlib.util.find_spec("openvino"):
        fast += ["lowbit int8 (openvino)", "fp32 (openvino)"]
    assert main(["bench-infer", "--model", "digits_cnn", "--data", "digits", "--batch-sizes",
                 "1,8", "--rounds", "1", "--limit", "64", "--out", str(out),
                 "--runners", ",".join(fast)]) == 0
    result = json.loads(out.read_text())
    assert set(result["timing"]["threads=1 batch=8"]) == {"fp32 eager", *fast}
    assert all(v > 0 for v in result["timing"]["threads=1 batch=1"].values())
    if importlib.util.find_spec("openvino"):
        assert set(result["precisions"]["lowbit int8 (openvino)"]["Convolution"]) == {"u8"}
    assert set(available_runners()) >= {"fp32 eager", "lowbit int8", "pytorch fx int8"}
    assert main(["bench-infer", "--model", "digits_cnn", "--data", "digits",
                 "--threads", "0"]) == 2
    assert main(["bench-infer", "--model", "digits_cnn", "--data", "digits",
                 "--runners", "tflite"]) == 2
    assert "unknown runner 'tflite'" in capsys.readouterr().err


def test_a_failing_peer_is_left_out_of_the_speed_race_by_name():
    """A peer's own quantizer failing on a model removes that peer (with a warning naming it
    and the error); a failure of lowbit's own runner is not hidden."""
    from lowbit.deploy.bench import images_per_second

    def fails(x):
        raise ValueError("Input partition has more than one output node")

    runs = {"fp32 eager": lambda x: x * 2, "pytorch pt2e int8 (inductor)": fails}
    with pytest.warns(UserWarning, match="pt2e int8 \\(inductor\\) left out: ValueError: Input"):
        speed = images_per_second(runs, torch.zeros(2, 3), rounds=1, seconds=0.01)
    assert list(speed) == list(runs) == ["fp32 eager"] and speed["fp32 eager"] > 0
    with pytest.raises(ValueError):
        images_per_second({"lowbit int8": fails}, torch.zeros(2, 3), rounds=1, seconds=0.01)
