"""Every method on a real torchvision architecture (MobileNetV3-small: depthwise convs,
Hardswish, squeeze-excite) and exported by every path its codes allow; the full matrix over all
architectures is ``benchmarks/method_matrix.py``."""
import warnings

import pytest
import torch
from onnx import TensorProto

import lowbit
from lowbit.data.core import Dataset, Split
from lowbit.deploy import IntegerEngine, OnnxRunner, deploy_xnor, export_packed, load_packed, \
    lower, to_onnx
from lowbit.errors import LowbitError
from lowbit.methods import TRAINING_METHODS, training_method
from lowbit.methods.psg import PSGMethod, ptq_config
from lowbit.nn.binary import SignActivation
from lowbit.training import estimate_bn_statistics

AFFINE = ("qat", "lsq", "psg", "ptq-w8a8", "ptq-w4a4-deploy")
FLOAT_INPUTS = ("bc", "bc-stochastic", "bwn", "twn")  # +-1 / ternary codes on float inputs


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    split = Split(torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=g),
                  torch.randint(0, 10, (32,), generator=g))
    return Dataset("synthetic", split, split, 10)


def _run(tv, data, method):
    torch.manual_seed(0)
    norm = data.normalization()
    calib = [x for x, _ in lowbit.data.Batches(data.train, norm, 16)]
    # BN statistics from the data: a random network then keeps its activations' scale, so its
    # logits vary with the input
    model = estimate_bn_statistics(tv.get_model("mobilenet_v3_small", num_classes=10), calib)
    if method.startswith("ptq-"):
        recipe = lowbit.load_recipe(method, round_iters=20)  # AdaRound's steps: seconds, not minutes
        return lowbit.quantize(model, recipe, calib), None, calib
    trainer = training_method(method)
    config = lowbit.TrainConfig(epochs=1, batch_size=16, optimizer="adam", lr=1e-4,
                                augment=False)
    q = trainer.finalize(lowbit.train(model, data, norm, config, method=trainer).model).eval()
    if isinstance(trainer, PSGMethod):  # PSG's deployable: PTQ on the grid it trained for
        return lowbit.quantize(q, ptq_config(trainer.config), calib), None, calib
    return q, {"method": method, "method_config": trainer.config.to_dict(),
               "input_shape": [3, 32, 32]}, calib


@pytest.mark.parametrize("method", [*TRAINING_METHODS, "ptq-w8a8", "ptq-w4a4-deploy"])
def test_every_method_runs_and_exports_on_mobilenet_v3(torchvision_models, images, method,
                                                       tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q, trained, calib = _run(torchvision_models, images, method)
    x = calib[0]
    with torch.no_grad():
        path = export_packed(q, tmp_path / "m.lowbit", "torchvision:mobilenet_v3_small", 10,
                             trained=trained)
        back, _ = load_packed(path)  # by name: no trust needed for torchvision's builders
        assert torch.equal(back(x), q(x))
        if method in AFFINE:
            lowering = lower(q, calib)
            x = torch.cat(calib)
            exact = lowering.simulation(torch.float64)(x)  # float32 rounding noise removed
            assert exact.std(0).mean() > 1e-3  # a live network: its logits vary with the input
            top1 = lambda out: (out.argmax(1) == exact.argmax(1)).float().mean()  # noqa: E731
            if method != "psg":  # PSG deploys W4A32: float inputs, which the engine refuses
                engine = IntegerEngine(lowering)
                assert top1(engine(x)) >= 0.95  # the engine's sums are exact
            # onnxruntime computes smooth activations and requantization in float32: as close
            # to the exact simulation as the float32 simulation itself
            ort = OnnxRunner(to_onnx(lowering, (1, 3, 32, 32)))(x)
            assert top1(ort) >= top1(lowering.simulation()(x)) - 0.1
        elif method in FLOAT_INPUTS:  # weights as INT4 codes in {-1, 0, 1}: ONNX, no engine
            model = to_onnx(q, (1, 3, 32, 32))
            assert any(t.data_type == TensorProto.INT4 for t in model.graph.initializer)
            x = torch.cat(calib)
            exact = lower(q).simulation(torch.float64)(x)
            top1 = lambda out: (out.argmax(1) == exact.argmax(1)).float().mean()  # noqa: E731
            assert top1(OnnxRunner(model)(x)) >= top1(q(x)) - 0.1
            with pytest.raises(LowbitError, match="input is not quantized"):
                IntegerEngine(q)
        else:  # not affine integer codes: ONNX refuses by name
            with pytest.raises(LowbitError, match=r"features\.|classifier\."):
                to_onnx(q, (1, 3, 32, 32))
    if method in ("bnn", "xnor"):  # depthwise convs kept at 8 bits, and said so
        assert any("depthwise convs kept at 8 bits" in str(w.message) for w in caught)
        depthwise = [m for m in q.modules() if getattr(m, "groups", 1) > 1]
        assert depthwise and not any(isinstance(m.input_quantizer, SignActivation)
                                     for m in depthwise)
    if method == "xnor":
        with torch.no_grad():
            assert torch.equal(deploy_xnor(q)(x).argmax(1), q(x).argmax(1))
