"""The packed file: bit-identical reload, real size, and refusal of bad files."""
import copy
import json

import pytest
import torch

import lowbit
from lowbit.data.core import Batches
from lowbit.deploy.packed import export_packed, load_packed
from lowbit.errors import CheckpointError, ConfigError
from lowbit.report import quantized_size_bytes


@pytest.mark.parametrize("cfg", [dict(w_bits=8, a_bits=8), dict(w_bits=4, a_bits=4),
                                 dict(w_bits=2, a_bits=8, w_bit_alloc=True, a_bit_alloc=True,
                                      bias_correction="mean_std"),
                                 dict(w_bits=3, a_bits=None, w_per_channel=False,
                                      w_symmetric=True)])
def test_packed_reload_is_bit_identical_and_real_size(tmp_path, digits_fp, cfg):
    d, fp = digits_fp
    calib = Batches(d.train, d.normalization(), 256)
    q = lowbit.quantize(fp, lowbit.PTQConfig(**cfg), calib)
    path = export_packed(q, tmp_path / "m.lowbit", "digits_cnn")
    back, header = load_packed(path)
    x = next(iter(Batches(d.test, d.normalization(), 200)))[0]
    assert torch.equal(back(x), q(x))
    ideal = quantized_size_bytes(q)
    size = path.stat().st_size
    assert size <= 1.02 * ideal + 16 * 1024, (size, ideal)
    assert header["model"] == "digits_cnn" and header["version"] == 1


def test_tampered_truncated_and_newer_files_are_refused(tmp_path, digits_fp):
    d, fp = digits_fp
    q = lowbit.quantize(fp, lowbit.PTQConfig(w_bits=4, a_bits=8),
                        Batches(d.train, d.normalization(), 256))
    path = export_packed(q, tmp_path / "m.lowbit", "digits_cnn")
    raw = bytearray(path.read_bytes())
    tampered = tmp_path / "tampered.lowbit"
    raw2 = bytearray(raw)
    raw2[-5] ^= 0xFF
    tampered.write_bytes(bytes(raw2))
    with pytest.raises(CheckpointError, match="checksum"):
        load_packed(tampered)
    truncated = tmp_path / "truncated.lowbit"
    truncated.write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_packed(truncated)
    length = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8:8 + length])
    meta["__metadata__"]["version"] = "99"
    blob = json.dumps(meta).encode()
    blob += b" " * ((-len(blob)) % 8)
    newer = tmp_path / "newer.lowbit"
    newer.write_bytes(len(blob).to_bytes(8, "little") + blob + bytes(raw[8 + length:]))
    with pytest.raises(CheckpointError, match="version 99"):
        load_packed(newer)
    with pytest.raises(CheckpointError, match="not found"):
        load_packed(tmp_path / "missing.lowbit")


def test_uncalibrated_layer_is_named(tmp_path, digits_fp):
    d, fp = digits_fp
    q = lowbit.quantize(fp, lowbit.PTQConfig(w_bits=4, a_bits=8),
                        Batches(d.train, d.normalization(), 256))
    q.get_submodule("3").weight_quantizer.scale = torch.empty(0)
    with pytest.raises(ConfigError, match="3: the weight quantizer was never calibrated"):
        export_packed(q, tmp_path / "x.lowbit", "digits_cnn")
    assert not (tmp_path / "x.lowbit").exists()


@pytest.mark.filterwarnings("ignore:.*distinct weights")
@pytest.mark.parametrize("method, values", [
    ("kmeans", {"w_bits": 3, "prune": 0.3}), ("kmeans", {"w_bits": 2, "per_channel": True}),
    ("bc", {}), ("bwn", {}), ("twn", {}), ("ttq", {}), ("xnor", {}), ("bnn", {}),
    ("lsq", {"w_bits": 4, "a_bits": 4}), ("lsq", {"w_bits": 2, "a_bits": 2,
                                                  "w_per_channel": True}),
    ("qat", {"w_bits": 4, "a_bits": 8})])
def test_trained_models_pack_bit_identically(tmp_path, digits_fp, method, values):
    from lowbit.methods import training_method

    d, fp = digits_fp
    trainer = training_method(method, values)
    x = next(iter(Batches(d.test, d.normalization(), 200)))[0]
    model = trainer.prepare(copy.deepcopy(fp).eval(), x[:8])
    model.train()
    model(x)  # let data-initialised quantizers (LSQ steps, EMA ranges, TTQ scales) settle
    model.eval()
    trained = {"method": method, "method_config": trainer.config.to_dict(),
               "input_shape": [1, 8, 8]}
    path = export_packed(model, tmp_path / "m.lowbit", "digits_cnn", 10, trained=trained)
    back, header = load_packed(path)
    assert torch.equal(back(x), model(x))
    if method == "xnor":  # the popcount deployment of the rebuilt model too
        from lowbit.deploy import deploy_xnor
        assert torch.equal(deploy_xnor(back)(x), model(x))
    ideal = quantized_size_bytes(model)
    assert path.stat().st_size <= 1.02 * ideal + 16 * 1024, (path.stat().st_size, ideal)
