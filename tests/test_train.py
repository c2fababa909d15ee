"""The training engine: augmentation, schedules, distillation, metrics files, exact resume,
refusal of foreign checkpoints, divergence, and DDP agreement."""
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lowbit.data.core import Dataset
from lowbit.data.digits import load_digits
from lowbit.errors import CheckpointError, ConfigError, NumericalError
from lowbit.methods import training_method
from lowbit.models import build_model
from lowbit.training import TrainConfig, train
from lowbit.training.augment import pad_crop_flip
from lowbit.training.engine import calibrate, distillation_loss

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    return Dataset("digits", d.train.head(320), d.test.head(100), 10), d.normalization()


def small_config(**kw):
    # 8x8 digits do not survive CIFAR's crop-and-flip: augmentation only where a test needs it
    return TrainConfig(**{**dict(epochs=3, batch_size=32, lr=0.05, seed=3, augment=False), **kw})


def test_pad_crop_flip_moves_whole_images():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    out = pad_crop_flip(x, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2,) * 4)
    for i in range(2):  # each output is one window of the padded image, maybe flipped
        windows = [padded[i, :, dy:dy + 6, dx:dx + 6] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)
    again = pad_crop_flip(x, torch.Generator().manual_seed(0), pad=2)
    assert torch.equal(out, again)


def test_pad_crop_flip_statistics():
    x = torch.zeros(4000, 1, 4, 4)
    x[:, :, :, 0] = 1  # a bright left column
    out = pad_crop_flip(x, torch.Generator().manual_seed(1), pad=0)
    flipped = (out[:, 0, 0, 3] == 1).float().mean().item()
    assert abs(flipped - 0.5) < 0.03
    reflect = pad_crop_flip(torch.ones(8, 1, 4, 4), torch.Generator(), pad=2, reflect=True)
    assert torch.equal(reflect, torch.ones(8, 1, 4, 4))  # reflection never brings in zeros


def test_distillation_loss_limits():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 10, generator=g), torch.randn(16, 10, generator=g)
    y = torch.randint(10, (16,), generator=g)
    ce = torch.nn.functional.cross_entropy(s, y)
    assert torch.allclose(distillation_loss(s, t, y, 4.0, 0.0), ce)
    assert distillation_loss(t, t, y, 4.0, 1.0).abs().item() < 1e-6  # student == teacher


def test_training_learns_and_writes_metrics(tmp_path, digits):
    data, norm = digits
    torch.manual_seed(0)
    result = train(build_model("digits_cnn"), data, norm, small_config(epochs=4), out=tmp_path)
    rows = json.loads((tmp_path / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["test_top1"] > 50
    assert (tmp_path / "metrics.csv").read_text().count("\n") == 5
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert result.checkpoint.is_file()


def test_calibration_pass_normalises_like_training_and_keeps_running_statistics():
    """BinaryConnect's +-1 weights make the float BN running statistics wrong; the pass that
    initialises the last layer's input range must see what the training steps will see."""
    torch.manual_seed(0)
    fp = build_model("digits_cnn").eval()
    model = training_method("bc", {}).prepare(fp, torch.randn(8, 1, 8, 8))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]
    x = torch.randn(64, 1, 8, 8)
    calibrate(model, x)
    assert not model.training
    for m, saved in zip(norms, before):
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in saved.items())
    last = [m for m in model.modules() if hasattr(m, "input_quantizer")][-1].input_quantizer
    seen = {}
    last.register_forward_hook(lambda mod, inp, out: seen.setdefault("x", inp[0]))
    with torch.no_grad():
        model.train()(x)
    assert torch.isclose(last.running_max, seen["x"].max(), rtol=1e-4)
    assert torch.isclose(last.running_min, seen["x"].min(), rtol=1e-4)


def test_cosine_and_multistep_schedules(digits):
    data, norm = digits
    rows = train(build_model("digits_cnn"), data, norm,
                 small_config(schedule="multistep", milestones=[2], epochs=3)).metrics
    assert [r["lr"] for r in rows] == pytest.approx([0.05, 0.05, 0.005])
    rows = train(build_model("digits_cnn"), data, norm, small_config(epochs=2)).metrics
    assert rows[0]["lr"] == pytest.approx(0.05) and rows[1]["lr"] == pytest.approx(0.025)


def digits_runner(data, norm, method=None, **defaults):
    """``run(out=None, callbacks=(), resume=False, until_epoch=None, **config)``: trains the
    digits CNN from one seeded initialisation (config keys over ``small_config(**defaults)``)."""
    torch.manual_seed(0)
    init = build_model("digits_cnn").state_dict()

    def run(out=None, callbacks=(), resume=False, until_epoch=None, **config):
        model = build_model("digits_cnn")
        model.load_state_dict(init)
        trainer = training_method(*method) if method else None
        return train(model, data, norm, small_config(**{**defaults, **config}), method=trainer,
                     out=out, resume=resume, callbacks=callbacks, until_epoch=until_epoch)
    return run


def kill_in_epoch_2(epoch, step, loss):
    if epoch == 1 and step == 4:
        raise KeyboardInterrupt


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module):
    a, b = a.state_dict(), b.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("method", [None, ("qat", {"w_bits": 3, "a_bits": 3}),
                                    ("psg", {"w_bits": 3, "ema_momentum": 0.1}),
                                    ("bc-stochastic", {})])
def test_killed_run_resumes_to_identical_weights(tmp_path, digits, method):
    """Killed mid-epoch and resumed from the last epoch's checkpoint: the same final state as
    a run never interrupted (float with distillation; QAT and PSG state; a sampling method)."""
    run = digits_runner(*digits, method, distill=method is None, augment=True)
    full = run(tmp_path / "a").model
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", callbacks=[kill_in_epoch_2])
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    resumed = run(tmp_path / "b", resume=True).model
    assert_same_state(full, resumed)
    rows = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert [r["epoch"] for r in rows] == [1, 2, 3]


def test_until_epoch_then_resume_equals_one_run(tmp_path, digits):
    """A long run trained in segments (evaluations along the way) ends bit-identical to one
    uninterrupted run of the same schedule."""
    run = digits_runner(*digits, augment=True)
    full = run(tmp_path / "a").model
    first = run(tmp_path / "b", until_epoch=1)
    assert len(first.metrics) == 1 and "test_top1" in first.metrics[0]
    assert_same_state(full, run(tmp_path / "b", resume=True).model)


def test_resume_refuses_another_config_or_model(tmp_path, digits):
    data, norm = digits
    train(build_model("digits_cnn"), data, norm, small_config(epochs=1), out=tmp_path)
    with pytest.raises(CheckpointError, match="lr: 0.05 in the checkpoint, 0.1 now"):
        train(build_model("digits_cnn"), data, norm, small_config(epochs=2, lr=0.1),
              out=tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="model"):
        train(build_model("resnet20", num_classes=10), data, norm, small_config(epochs=2),
              out=tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="not found"):
        train(build_model("digits_cnn"), data, norm, small_config(), out=tmp_path / "none",
              resume=True)


def _close(a: dict, b: dict, atol: float) -> bool:
    return a.keys() == b.keys() and all(
        torch.allclose(a[k].float(), b[k].float(), atol=atol) for k in a)


@pytest.mark.parametrize("method", [None, ("qat", {"w_bits": 4, "a_bits": 4})])
def test_compiled_channels_last_run_matches_eager_and_resumes_exactly(tmp_path, digits, method,
                                                                       monkeypatch):
    """``compile`` and ``channels_last`` change how the step is computed, not what it computes
    (weights within float rounding of eager after 3 epochs), and a compiled run killed
    mid-epoch resumes bit-identical to an uninterrupted compiled run."""
    from lowbit.training import engine

    monkeypatch.setattr(engine, "COMPILE_BACKEND", "aot_eager")  # graph capture, no C++ build
    run = digits_runner(*digits, method, augment=True, compile=True, channels_last=True)
    eager = run(compile=False).model.state_dict()
    full = run(tmp_path / "a").model
    assert _close(full.state_dict(), eager, 1e-4)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", callbacks=[kill_in_epoch_2])
    assert_same_state(full, run(tmp_path / "b", resume=True).model)


def test_compile_failure_falls_back_to_eager_with_one_warning(digits, monkeypatch):
    from lowbit.training import engine

    def broken(graph, example_inputs):
        raise RuntimeError("no compiler here")
    monkeypatch.setattr(engine, "COMPILE_BACKEND", broken)
    run = digits_runner(*digits)
    results = []
    for compile_ in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results.append(run(compile=compile_).model)
        messages = [str(w.message) for w in caught if "torch.compile" in str(w.message)]
        assert len(messages) == int(compile_), messages
    assert "no compiler here" in messages[0]
    assert_same_state(*results)


def test_compiled_with_inductor_matches_eager(digits):
    """The real backend (inductor, C++ on the CPU): one epoch within float rounding of eager."""
    run = digits_runner(*digits, epochs=1)
    states = [run(compile=compile_).model.state_dict() for compile_ in (False, True)]
    assert _close(states[0], states[1], 1e-4)


@pytest.mark.parametrize("field, value", [("settings", ["lr"]), ("epoch", "1"),
                                          ("rng", torch.zeros(3)), ("metrics", {"a": 1}),
                                          ("optimizer", {"state": 7, "param_groups": [{}]}),
                                          ("signature", {"x": "shape"}),
                                          ("state_dict", {"conv1.weight": 3})])
def test_resume_refuses_a_crafted_checkpoint(tmp_path, digits, field, value):
    """A resume file is read as untrusted data: a field of the wrong type or content is one
    CheckpointError, and the file is left as it was."""
    data, norm = digits
    train(build_model("digits_cnn"), data, norm, small_config(epochs=1), out=tmp_path)
    path = tmp_path / "checkpoint.pt"
    ck = torch.load(path, weights_only=True)
    torch.save({**ck, field: value}, path)
    before = path.read_bytes()
    with pytest.raises(CheckpointError):
        train(build_model("digits_cnn"), data, norm, small_config(epochs=2), out=tmp_path,
              resume=True)
    assert path.read_bytes() == before


def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(tmp_path, digits):
    data, norm = digits
    model = build_model("digits_cnn")

    def explode(epoch, step, loss):  # weights turn NaN in the second epoch
        if epoch == 1:
            for p in model.parameters():
                p.data.fill_(float("nan"))
    with pytest.raises(NumericalError, match="diverged at epoch 2"):
        train(model, data, norm, small_config(epochs=2), out=tmp_path, callbacks=[explode])
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values() if v.is_floating_point())


def test_nan_weights_name_the_parameter(digits):
    data, norm = digits
    model = build_model("digits_cnn")
    with torch.no_grad():
        model[3].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NumericalError, match="3.weight contains NaN"):
        train(model, data, norm, small_config(epochs=1))


@pytest.mark.parametrize("kw", [dict(epochs=0), dict(optimizer="rmsprop"), dict(lr=0.0),
                                dict(schedule="step"), dict(kd_alpha=2.0)])
def test_bad_training_settings(kw):
    with pytest.raises(ConfigError):
        TrainConfig(**kw).validate()


DDP_SCRIPT = """
import sys, torch
from lowbit.data.core import Dataset
from lowbit.data.digits import load_digits
from lowbit.methods import training_method
from lowbit.models import build_model
from lowbit.training import TrainConfig, train
from lowbit.training.distributed import world
torch.set_num_threads(1)
d = load_digits()
data = Dataset("digits", d.train.head(256), d.test.head(64), 10)
torch.manual_seed(int(sys.argv[2]) + world()[0])  # different init per rank: DDP must fix it
method = training_method(sys.argv[3], {"w_bits": 4, "a_bits": 4}) if sys.argv[3] != "fp" else None
model = train(build_model("digits_cnn"), data, d.normalization(),
              TrainConfig(epochs=2, batch_size=64, lr=0.05, augment=True), method=method).model
torch.save(model.state_dict(), f"{sys.argv[1]}/rank{world()[0]}.pt")
"""


@pytest.mark.parametrize("method", ["fp", "qat"])
def test_ddp_ranks_agree(tmp_path, method):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29517", str(script), str(tmp_path), "0", method],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert any("input_quantizer.running_max" in k for k in a) == (method == "qat")
    for k in a:
        assert torch.equal(a[k], b[k]), k
