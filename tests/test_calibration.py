"""Streaming layer-by-layer calibration: batch-size independence, spilling, segments, bad input."""
from pathlib import Path

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import ConfigError, DataError
from lowbit.methods.calibration import calibration_images
from lowbit.quant.observer import EMA_CHUNK, RangeObserver
from lowbit.quant.ranges import channel_sample, ema_update, minmax_range
from lowbit.methods.activation_store import ActivationStore, MemoryBudget, parse_bytes
from lowbit.transforms import trace
from lowbit.transforms.segments import segments
from tests.user_models import Neck, UserNet, trained_like

RECIPES = {
    "minmax": dict(w_bits=8, a_bits=8),
    "percentile": dict(w_bits=4, a_bits=4, clip="percentile", percentile=99.0),
    "mse + equalize + bias correction": dict(w_bits=4, a_bits=4, clip="mse", w_clip="mse",
                                             equalize=True, empirical_bias_correction=True),
    "aciq + per-channel bit allocation": dict(w_bits=4, a_bits=4, clip="aciq-laplace",
                                              w_bit_alloc=True, a_bit_alloc=True,
                                              bias_correction="mean"),
    "ema": dict(w_bits=8, a_bits=8, clip="ema"),
    "adaround": dict(w_bits=3, a_bits=4, clip="mse", w_round="adaround", round_iters=20),
}


def images(n=150, size=12, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def quantized_state(model, x, **config):
    q = lowbit.quantize(model, lowbit.PTQConfig(calib=len(x), **config), [x])
    return q, q.state_dict()


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("net", [UserNet, Neck])
def test_one_batch_and_many_batches_give_the_same_model(recipe, net):
    """Every range estimator, the equalization, both bias corrections and AdaRound read
    statistics that do not depend on how the calibration set is batched (exactly: see the
    observer tests). End to end the layer inputs still carry float32 noise, because PyTorch's
    CPU convolutions sum in a different order for different batch sizes (a 1x1 convolution of
    6 images is not bitwise a slice of the same convolution of 150): ranges agree to 1e-4."""
    model, x = trained_like(net()), images()
    _, whole = quantized_state(model, x, calib_batch_size=len(x), **RECIPES[recipe])
    _, batched = quantized_state(model, x, calib_batch_size=16, **RECIPES[recipe])
    assert whole.keys() == batched.keys()
    for key in whole:
        if key.endswith("input_quantizer.scale"):
            assert torch.allclose(whole[key], batched[key], rtol=1e-4, atol=0), key
        elif key.endswith("input_quantizer.zero_point"):
            assert (whole[key] - batched[key]).abs().max() <= 1, key
        elif key.endswith("weight"):  # AdaRound's choices: the same but for a near-tie or two
            changed = (whole[key] != batched[key]).float().mean()
            assert changed <= 0.01, key


def test_spilled_calibration_equals_in_memory_and_says_so():
    model, x = trained_like(Neck()), images()
    config = RECIPES["mse + equalize + bias correction"]
    _, memory = quantized_state(model, x, calib_batch_size=32, **config)
    q, spilled = quantized_state(model, x, calib_batch_size=32, calib_memory=0, **config)
    for key in memory:
        assert torch.equal(memory[key], spilled[key]), key
    assert any("spilled to disk" in note for note in q.lowbit.notes)


def test_streaming_ranges_equal_the_whole_tensor_statistics():
    """The observer over batches: min-max and the EMA over 64-image chunks equal the one-tensor
    computation; where every value fits, the sample is the whole tensor in order."""
    x = torch.randn(150, 4, 3, 3)
    seen = RangeObserver(len(x), per_channel=True)
    for part in x.split(29):
        seen.update(part)
    lo, hi = minmax_range(x, 1)
    assert torch.equal(seen.exact[0], lo) and torch.equal(seen.exact[1], hi)
    assert torch.equal(seen.sample, channel_sample(x, 1))
    e_lo = e_hi = None
    for chunk in x.split(EMA_CHUNK):
        c_lo, c_hi = minmax_range(chunk, 1)
        e_lo, e_hi = ema_update(e_lo, c_lo, 0.01), ema_update(e_hi, c_hi, 0.01)
    assert torch.allclose(seen.ema_range[0], e_lo) and torch.allclose(seen.ema_range[1], e_hi)


def test_a_large_input_is_sampled_to_a_fixed_size_whatever_the_batching():
    x = torch.randn(40, 2, 64, 64)
    samples = []
    for size in (40, 7):
        seen = RangeObserver(len(x), per_channel=False, max_total=1000)
        for part in x.split(size):
            seen.update(part)
        samples.append(seen.sample)
    assert samples[0].shape == (1, 1000) and torch.equal(samples[0], samples[1])


def test_segments_chain_to_the_whole_network():
    """Each segment hands one tensor to the next; run in a chain they compute the model."""
    model = trained_like(Neck())
    traced, _ = trace(model)
    x = images(4, 16)
    layers = {name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    graphs = segments(traced, x, layers)
    assert len(graphs) > 1
    y = x
    for graph in graphs:
        y = torch.fx.GraphModule(model, graph)(y)
    assert torch.equal(y, model(x))


def test_an_untraceable_model_is_calibrated_as_one_segment():
    class Branching(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)

        def forward(self, x):
            y = torch.relu(self.a(x))
            return self.b(y) if y.sum() > 0 else self.b(-y)  # data-dependent: FX cannot trace

    with pytest.warns(UserWarning, match="cannot be traced"):
        q, _ = quantized_state(Branching().eval(), images(64), calib_batch_size=16)
    assert any("without segments" in note for note in q.lowbit.notes)
    assert q.b.input_quantizer.calibrated


def test_calibration_images_are_regrouped_and_capped():
    budget = MemoryBudget(1 << 30)
    store = calibration_images([(images(50), None), images(50), images(50)], 120, 32, budget)
    assert [len(b) for b in store] == [32, 32, 32, 24] and len(store) == 120
    assert torch.equal(torch.cat(list(store)), torch.cat([images(50)] * 3)[:120])


def test_store_keeps_batches_in_memory_then_on_disk():
    with MemoryBudget(3 * 10 * 4) as budget:  # room for the first batch only
        store = ActivationStore(budget, "test rows")
        data = torch.arange(60.0).reshape(20, 3)
        for part in data.split(10):
            store.append(part)
        assert budget.spilled == 10 * 3 * 4 and budget.used == 10 * 3 * 4
        assert torch.equal(torch.cat(list(store)), data) and len(store) == 20
        files = list(Path(budget._dir.name).iterdir())
        assert len(files) == 1
        store.clear()
        assert budget.used == 0 and not files[0].exists()


def test_too_little_disk_for_the_cache_names_the_need(monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: usage(1, 1, 0))
    with pytest.raises(DataError, match=r"cannot cache .* needs .* GiB .* free"):
        quantized_state(trained_like(UserNet()), images(40), calib_memory=0)


@pytest.mark.parametrize("value, expected", [("2GiB", 2 ** 31), ("512 MB", 512 * 10 ** 6),
                                             (1024, 1024), ("1.5k", 1536), ("0", 0)])
def test_memory_sizes_parse(value, expected):
    assert parse_bytes(value) == expected


@pytest.mark.parametrize("bad", [dict(calib_memory="lots"), dict(calib_memory=-1),
                                 dict(calib_batch_size=0), dict(calib_batch_size=2.5)])
def test_bad_streaming_settings_are_config_errors(bad):
    with pytest.raises(ConfigError):
        lowbit.PTQConfig(**bad).validate()
