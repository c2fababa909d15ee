"""``device=`` / ``--device``: checked once, and PTQ runs on the device it is given.

This machine has no GPU: the CUDA runs are skipped here and run where one is present."""
import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.devices import cpu_threads, module_device, resolve_device
from lowbit.errors import ConfigError
from lowbit.methods.activation_store import ActivationStore, MemoryBudget
from lowbit.quant.observer import RangeObserver
from tests.user_models import UserNet, trained_like

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_devices_are_resolved_or_refused_in_one_line():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ConfigError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    with pytest.raises(ConfigError, match="not supported"):
        resolve_device("meta")


@no_cuda
def test_cuda_without_a_gpu_is_a_config_error(capsys, tmp_path):
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        lowbit.TrainConfig(device="cuda").validate()
    code = main(["quantize", "--model", "digits_cnn", "--data", "digits", "--device", "cuda",
                 "--out", str(tmp_path / "q")])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "CUDA is not available" in err
    assert not (tmp_path / "q").exists()


def test_module_device():
    assert module_device(torch.nn.ReLU()) == torch.device("cpu")
    assert module_device(torch.nn.Linear(2, 2)) == torch.device("cpu")


def test_explicit_cpu_device_is_the_default_bitwise(calib):
    model = trained_like(UserNet())
    config = lowbit.load_recipe("ptq-w4a4-deploy", round_iters=10, calib_batch_size=48)
    a = lowbit.quantize(model, config, calib)
    b = lowbit.quantize(model, config, calib, device="cpu")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


@needs_cuda
@pytest.mark.parametrize("recipe", ["ptq-w8a8", "ptq-w4a4-best", "ptq-w4a4-deploy"])
def test_quantize_on_cuda_matches_the_cpu(recipe, calib):
    """The same recipe on the GPU: the same grid up to float summation order, the result back
    on the CPU where the model was."""
    model = trained_like(UserNet())
    config = lowbit.load_recipe(recipe, round_iters=20)
    cpu = lowbit.quantize(model, config, calib)
    gpu = lowbit.quantize(model, config, calib, device="cuda")
    assert module_device(gpu) == torch.device("cpu")
    x = calib[0]
    ref = cpu(x)
    assert (gpu(x) - ref).pow(2).mean() <= 1e-3 * ref.pow(2).mean()
    on_gpu = lowbit.quantize(model.cuda(), config, calib)  # default: where the model is
    assert module_device(on_gpu).type == "cuda"
    assert lowbit.evaluate(on_gpu, [(x, cpu(x).argmax(1))]) >= 95.0


@needs_cuda
def test_spilled_batches_come_back_to_their_device():
    with MemoryBudget(0) as budget:
        store = ActivationStore(budget, "test")
        store.append(torch.ones(4, 3, device="cuda"))
        assert budget.spilled and next(iter(store)).device.type == "cuda"


@needs_cuda
def test_observer_state_is_on_the_cpu():
    seen = RangeObserver(8, per_channel=True, max_total=16)
    seen.update(torch.randn(8, 3, 5, 5, device="cuda"))
    assert seen.sample.device.type == "cpu" and seen.exact[0].device.type == "cpu"


def test_thread_counts_beyond_the_machine_are_clamped_with_a_warning():
    import os
    available = len(os.sched_getaffinity(0))
    assert cpu_threads(1) == 1
    with pytest.warns(UserWarning, match=f"using {available}"):
        assert cpu_threads(available + 7) == available
