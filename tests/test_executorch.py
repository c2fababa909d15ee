"""ExecuTorch + XNNPACK as a runtime of lowbit's fully quantized lowering: it follows the
simulation, runs each batch size as its own program, and refuses what XNNPACK's int8 kernels
cannot run, by name."""
import pytest
import torch

import lowbit
from lowbit.deploy import lower
from lowbit.errors import ExportError
from tests.user_models import UserNet, trained_like

pytest.importorskip("executorch")
pytest.importorskip("torchao")
from lowbit.deploy.executorch_runtime import ExecuTorchRunner, to_executorch  # noqa: E402

INT8 = dict(w_bits=7, a_bits=8, w_symmetric=True, first_last_bits=None)


def test_xnnpack_follows_the_simulation(calib):
    """Residual adds, depthwise and grouped convs, mean pooling, the output layer: logits
    within a few 8-bit output steps of the float32 simulation (a code that lands on the other
    side of a rounding boundary in either one moves, and the change propagates), the same
    top-1 on nearly every image, and each batch size its own program."""
    q = lowbit.quantize(trained_like(UserNet()), lowbit.PTQConfig(**INT8), calib)
    lowering = lower(q, calib)
    runner = ExecuTorchRunner(lowering)
    x = torch.cat(calib)
    sim = lowering.simulation()(x)
    out = torch.cat([runner(part) for part in x.split(16)])
    step = (sim.max() - sim.min()) / 255
    assert (out - sim).abs().max() <= 3 * step
    assert (out.argmax(1) == sim.argmax(1)).float().mean() >= 0.95
    assert torch.equal(runner(x[:3]), runner(x[:3])) and len(runner.programs) == 2  # 16 and 3
    assert isinstance(to_executorch(lowering, (1, 3, 12, 12)), bytes)


@pytest.mark.parametrize("config, message", [
    (dict(INT8, a_bits=4), "full 8-bit activation grids"),
    (dict(INT8, w_symmetric=False), "symmetric weight codes"),
])
def test_what_xnnpack_cannot_run_is_refused_by_name(calib, config, message):
    q = lowbit.quantize(trained_like(UserNet()), lowbit.PTQConfig(**config), calib)
    with pytest.raises(ExportError, match=message):
        to_executorch(q, (1, 3, 12, 12), calib)


def test_the_simulation_form_is_refused(calib):
    q = lowbit.quantize(trained_like(UserNet()), lowbit.PTQConfig(**INT8), calib)
    with pytest.raises(ExportError, match="fully quantized form"):
        to_executorch(lower(q), (1, 3, 12, 12))


def test_bench_skips_a_lowbit_runtime_that_refuses_the_model(calib):
    """A 4-bit-activation model has no XNNPACK form: the speed race goes on without that runner,
    with a warning naming it."""
    from lowbit.deploy.bench import runners

    q = lowbit.quantize(trained_like(UserNet()), lowbit.PTQConfig(**dict(INT8, a_bits=4)), calib)
    with pytest.warns(UserWarning, match="lowbit int8 \\(xnnpack\\) skipped: .*8-bit"):
        runs = runners(UserNet(), q, calib, (1, 3, 12, 12), 1,
                       ["fp32 eager", "lowbit int8", "lowbit int8 (xnnpack)"])
    assert sorted(runs) == ["fp32 eager", "lowbit int8"]
