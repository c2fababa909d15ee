"""Every deploy path on the CNNs users ship: torchvision's own architectures and a neck with
every op kind, through one lowering to the simulation, the integer engine and onnxruntime."""
import pytest
import torch
from onnx import TensorProto
from torch import nn

import lowbit
from lowbit.deploy import IntegerEngine, OnnxRunner, lower, to_onnx
from lowbit.deploy.lowering import KINDS
from lowbit.errors import CalibrationError, ConfigError, DataError, ExportError, ModelError
from tests.deploy_checks import assert_kernels_exact
from tests.user_models import Branchy, ConvThen, Neck, UserNet, trained_like

ARCHITECTURES = ["mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
                 "resnet18", "resnet50", "shufflenet_v2_x1_0", "regnet_x_400mf",
                 "squeezenet1_1"]
SIZE = 32


def _batches(n, seed, size=SIZE):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, size, size, generator=g) for _ in range(n)]


def _quantized(model, w_bits=8, size=SIZE):
    return lowbit.quantize(trained_like(model), lowbit.PTQConfig(w_bits=w_bits, a_bits=8),
                           _batches(8, 0, size))


def _check_agreement(q, lowering, x):
    sim = lowering.simulation()(x)
    engine = IntegerEngine(lowering)
    onnx_out = OnnxRunner(to_onnx(lowering, (1, *x.shape[1:])))(x)
    step = (sim.max() - sim.min()) / 255
    for name, out in (("engine", engine(x)), ("onnxruntime", onnx_out)):
        steps = (out - sim).abs() / step
        assert (out.argmax(1) == sim.argmax(1)).float().mean() >= 0.9, name
        assert steps.median() <= 1.0, name
    assert_kernels_exact(lowering, engine, x)
    # With float32 noise removed (the float64 simulation on the model's own weight codes), the
    # engine computes the simulation exactly: every code equal, the logits to float32 precision.
    exact = lowering.simulation(torch.float64)(x)
    assert (engine(x) - exact).abs().max() <= 1e-3 * step


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_torchvision_architectures_deploy_fully_quantized(torchvision_models, name):
    q = _quantized(torchvision_models.get_model(name, num_classes=10))
    lowering = lower(q, _batches(2, 1))
    region = [n for n in lowering.graph_module.graph.nodes
              if n in lowering.quantized and n.op != "output" and n.target != "chunk"]
    assert all(lowering.kinds[n] in KINDS for n in region)      # every op has an integer form
    assert all(n in lowering.grids or lowering.kinds[n] == "meta" or n in lowering.fused
               or all(u.op == "output" for u in n.users) for n in region)  # all integers
    x = _batches(4, 2)
    x = torch.cat(x)
    assert torch.allclose(lower(q).simulation()(x), q(x), atol=1e-5)  # simulation form: itself
    _check_agreement(q, lowering, x)


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0"])
def test_four_bit_weights_export_as_int4(torchvision_models, name):
    q = _quantized(torchvision_models.get_model(name, num_classes=10), w_bits=4)
    lowering = lower(q, _batches(2, 1))
    model = to_onnx(lowering, (1, 3, SIZE, SIZE))
    four = [t for t in model.graph.initializer if t.name.endswith("weight_codes")
            and t.data_type in (TensorProto.INT4, TensorProto.UINT4)]
    layers = [m for m in q.modules() if isinstance(m, lowbit.nn.QUANT_LAYERS)]
    assert len(four) == len(layers) - 2  # all but the 8-bit first and last layers
    _check_agreement(q, lowering, torch.cat(_batches(4, 2)))


def test_a_neck_with_every_op_kind_deploys():
    model = Neck()
    q = _quantized(model, size=16)
    assert any(isinstance(m, nn.BatchNorm2d) for m in q.modules())  # after an add: unfolded
    lowering = lower(q, _batches(2, 1, 16))
    assert {"lut", "add", "mul", "concat", "avgpool", "maxpool", "resize", "move", "clamp",
            "layer"} <= set(lowering.kinds.values())
    _check_agreement(q, lowering, torch.cat(_batches(4, 2, 16)))
    with pytest.raises(ModelError, match="calibration batches"):  # needs the fully quantized form
        IntegerEngine(q)(_batches(1, 3, 16)[0])


def test_what_cannot_be_deployed_is_named(calib):
    with pytest.warns(UserWarning, match="cannot be traced"):
        q = lowbit.quantize(Branchy().eval(), lowbit.PTQConfig(w_bits=8, a_bits=8), calib)
    with pytest.raises(ModelError, match=r"torch.fx.wrap.*|y.sum\(\) > 0"):
        IntegerEngine(q)

    cumulative = ConvThen(lambda y: torch.cumsum(y, 1))
    q = lowbit.quantize(cumulative.eval(), lowbit.PTQConfig(w_bits=8, a_bits=8), calib)
    with pytest.raises(ModelError, match="cumsum: the integer engine has no integer form of "
                                         "cumsum"):
        IntegerEngine(q, calib)(calib[0])
    assert OnnxRunner(to_onnx(q, (1, 3, 12, 12), calib=calib))(calib[0]).shape == (32, 2)
    with pytest.raises(ExportError, match=r"rejects an input of shape \(1, 5, 12, 12\)"):
        to_onnx(q, (1, 5, 12, 12))


def test_bad_calibration_for_the_fully_quantized_form_is_one_clear_error(calib):
    q = lowbit.quantize(trained_like(UserNet()), lowbit.PTQConfig(w_bits=8, a_bits=8), calib)
    with pytest.raises(DataError, match="calibration data .* is empty"):
        lower(q, [])
    with pytest.raises(CalibrationError, match="NaN or Inf"):
        lower(q, [torch.full((2, 3, 12, 12), float("nan"))])
    with pytest.raises(ConfigError, match="act_bits must be in 2..16"):
        lower(q, calib, act_bits=1)


@pytest.mark.parametrize("a_bits", [8, 4])
def test_a_residual_stream_is_written_once_on_its_conv_grid(calib, a_bits):
    """Rule 3: a block input read by a depthwise conv and by the block's residual add is
    written on the conv's input grid (no second, calibrated grid, so no requantization pair in
    the ONNX file) when that grid has 8 bits; a 4-bit conv grid is not forced onto the add."""
    config = lowbit.PTQConfig(w_bits=8, a_bits=a_bits, clip="percentile", first_last_bits=None)
    q = lowbit.quantize(trained_like(UserNet()), config, calib)  # grids unlike min-max ones
    lowering = lower(q, calib)
    stem_out = next(n for n in lowering.graph_module.graph.nodes if n.target == "stem.2")
    conv_grid = lowering.layer_grid(next(iter(n for n in stem_out.users
                                              if n.target == "body.a.dw")))
    model = to_onnx(lowering, (1, 3, 12, 12))
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    requantized = [n for n in model.graph.node if n.op_type == "QuantizeLinear"
                   and producers.get(n.input[0]) == "DequantizeLinear"]
    if a_bits == 8:
        assert lowering.output_grid(stem_out) == conv_grid and not requantized
    else:
        assert lowering.output_grid(stem_out) != conv_grid and requantized
        assert lowering.output_grid(stem_out).qmax - lowering.output_grid(stem_out).qmin == 255
    _check_agreement(q, lowering, calib[0])
