"""Entropy-coded packed files (Deep Compression's Huffman stage): exact round trips of the
coder and of whole models, smaller files, and refusal of corrupt streams."""
import base64
import copy
import json
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from safetensors.torch import save as st_save

import lowbit
from lowbit.cli import main
from lowbit.data.core import Batches
from lowbit.deploy.entropy import MAX_GAP, decode_codes, encode_codes, from_relative_indices, \
    relative_indices
from lowbit.deploy.packed import _checksum, export_packed, load_packed
from lowbit.errors import CheckpointError, ConfigError
from lowbit.methods import training_method
from lowbit.quant.kmeans import huffman_bits

from tests import file_mutations as fm


@settings(max_examples=60, deadline=None)
@given(arrays(np.int64, st.integers(1, 3000), elements=st.integers(0, 16)),
       st.sampled_from([None, 16]))
def test_codes_round_trip_dense_and_sparse(codes, pruned):
    stream = encode_codes(codes, pruned)
    back = decode_codes(stream.header(), stream.codes, stream.gaps, pruned, "t")
    assert np.array_equal(back, codes)


def test_relative_indices_split_long_gaps_with_fillers():
    codes = np.full(1000, 7)
    codes[[0, 600, 999]] = [1, 2, 3]
    values, gaps = relative_indices(codes, 7)
    # 599 pruned before 600: two fillers of 256 positions, then a gap of 87; 398 before 999
    assert list(values) == [1, 7, 7, 2, 7, 3] and list(gaps) == [0, 255, 255, 87, 255, 142]
    assert np.array_equal(from_relative_indices(values, gaps, 1000, 7, "t"), codes)
    with pytest.raises(ConfigError, match="run past"):
        from_relative_indices(values, gaps, 999, 7, "t")


def test_huffman_stream_is_within_a_few_percent_of_the_ideal_code_length():
    rng = np.random.default_rng(0)
    codes = np.clip(np.round(rng.laplace(8, 1.5, 40000)), 0, 15).astype(np.int64)
    ideal = huffman_bits(torch.from_numpy(codes)) / 8  # an unlimited Huffman tree, no tables
    assert encode_codes(codes).nbytes <= 1.02 * ideal + 200


def test_widths_over_a_byte_are_left_bit_packed():
    assert encode_codes(np.array([0, 300, 5])) is None


@pytest.fixture(scope="module")
def pruned_kmeans(digits_fp):
    d, fp = digits_fp
    x = next(iter(Batches(d.test, d.normalization(), 256)))[0]
    method = training_method("kmeans", {"w_bits": 4, "prune": 0.7})
    model = method.prepare(copy.deepcopy(fp).eval(), x[:8]).eval()
    trained = {"method": "kmeans", "method_config": method.config.to_dict(),
               "input_shape": [1, 8, 8]}
    return model, trained, x


def test_pruned_kmeans_model_is_smaller_and_bit_identical(tmp_path, pruned_kmeans):
    model, trained, x = pruned_kmeans
    plain = export_packed(model, tmp_path / "p.lowbit", "digits_cnn", 10, trained=trained)
    coded = export_packed(model, tmp_path / "h.lowbit", "digits_cnn", 10, trained=trained,
                          entropy="huffman")
    back, header = load_packed(coded)
    assert torch.equal(back(x), model(x)) and header["version"] == 2
    codings = {e["entropy"]["coding"] for e in header["weights"].values()}
    assert "huffman-sparse" in codings  # 70% pruned: relative indices win on the big layers
    assert coded.stat().st_size < 0.8 * plain.stat().st_size
    assert load_packed(plain)[1]["version"] == 1  # files without entropy coding stay readable


@pytest.mark.parametrize("cfg", [dict(w_bits=4, a_bits=8),
                                 dict(w_bits=3, a_bits=4, w_bit_alloc=True, a_bit_alloc=True,
                                      bias_correction="mean_std")])
def test_affine_codes_are_huffman_coded_bit_identically(tmp_path, digits_fp, cfg):
    d, fp = digits_fp
    q = lowbit.quantize(fp, lowbit.PTQConfig(**cfg), Batches(d.train, d.normalization(), 256))
    plain = export_packed(q, tmp_path / "p.lowbit", "digits_cnn")
    coded = export_packed(q, tmp_path / "h.lowbit", "digits_cnn", entropy="huffman")
    x = next(iter(Batches(d.test, d.normalization(), 200)))[0]
    assert torch.equal(load_packed(coded)[0](x), q(x))
    assert coded.stat().st_size < plain.stat().st_size


def test_a_corrupt_stream_with_a_valid_checksum_is_refused(tmp_path, pruned_kmeans):
    model, trained, _ = pruned_kmeans
    path = export_packed(model, tmp_path / "h.lowbit", "digits_cnn", 10, trained=trained,
                         entropy="huffman")
    header, blobs, metadata = fm.packed_parts(path.read_bytes())
    key, offset, shape = next((k, o, s) for k, kind, o, s in header["index"]
                              if k.endswith(".codes") and kind == "uint8" and s[0] > 64)
    for damage in ("flip", "cut"):
        bad = {k: v.clone() for k, v in blobs.items()}
        if damage == "flip":
            bad["uint8"][offset + 20: offset + 40] ^= 0x5A
        else:  # the stream's end zeroed: it no longer holds the header's count of codes
            bad["uint8"][offset + shape[0] // 2: offset + shape[0]] = 0
        packed_header = zlib.compress(json.dumps(header).encode())
        out = tmp_path / f"{damage}.lowbit"
        out.write_bytes(st_save(bad, metadata={
            **metadata, "header": base64.b64encode(packed_header).decode(),
            "sha256": _checksum(bad, packed_header)}))
        with pytest.raises(CheckpointError, match="codes"):
            load_packed(out)


def test_cli_export_entropy(tmp_path, capsys, digits_fp):
    d, fp = digits_fp
    ckpt = tmp_path / "fp.pt"
    torch.save(fp.state_dict(), ckpt)
    assert main(["quantize", "--model", "digits_cnn", "--checkpoint", str(ckpt), "--data",
                 "digits", "--w-bits", "4", "--calib", "256", "--out", str(tmp_path / "q")]) == 0
    code = main(["export", "--checkpoint", str(tmp_path / "q" / "quantized.pt"), "--entropy",
                 "huffman", "--out", str(tmp_path / "m.lowbit")])
    out = capsys.readouterr()
    assert code == 0 and "Huffman-coded" in out.out, out.err
    code = main(["export", "--checkpoint", str(tmp_path / "q" / "quantized.pt"), "--entropy",
                 "huffman", "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "--entropy" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match="entropy must be one of"):
        export_packed(fp, tmp_path / "x.lowbit", "digits_cnn", entropy="lzma")
