"""K-means and binary / ternary methods through the training engine on the embedded digits."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.data.core import Batches
from lowbit.errors import ConfigError
from lowbit.methods import training_method
from lowbit.nn import QuantConv2d
from lowbit.nn.binary import ScaledBinaryWeight, SignActivation, XNORConv2d
from lowbit.quant.binary import binarize, bwn_alpha, xnor_input_scale
from lowbit.report import float_size_bytes, huffman_size_bytes, quantized_size_bytes
from lowbit.training import TrainConfig, train


def _finetune(d, fp, name, values, epochs=2, lr=1e-3):
    config = TrainConfig(epochs=epochs, batch_size=64, optimizer="adam", lr=lr, augment=False)
    method = training_method(name, values)
    result = train(copy.deepcopy(fp), d, d.normalization(), config, method=method)
    return method, result


def test_kmeans_fine_tuning_keeps_indices_and_trains_centroids(digits_fp):
    d, fp = digits_fp
    method = training_method("kmeans", {"w_bits": 2, "first_last_bits": None, "prune": 0.3})
    model = method.prepare(copy.deepcopy(fp).eval(), torch.randn(4, 1, 8, 8))
    before = {n: (m.weight_quantizer.indices.clone(), m.weight_quantizer.codebook.detach().clone())
              for n, m in model.named_modules() if isinstance(m, QuantConv2d)}
    for name, m in model.named_modules():
        if isinstance(m, QuantConv2d):
            w = m.quantized_weight()
            assert torch.unique(w).numel() <= 5            # 4 centroids and the pruned zero
            assert (w[m.weight_quantizer.indices < 0] == 0).all()
    # linear init on bell-shaped weights: the middle clusters are crowded, Huffman codes them short
    assert huffman_size_bytes(model) < quantized_size_bytes(model)
    test = Batches(d.test, d.normalization(), 500)
    ptq_top1 = lowbit.evaluate(model, test)
    _, result = _finetune(d, fp, "kmeans", {"w_bits": 2, "first_last_bits": None, "prune": 0.3})
    tuned = result.model
    for name, m in tuned.named_modules():
        if isinstance(m, QuantConv2d):
            assert torch.equal(m.weight_quantizer.indices, before[name][0])      # frozen
            assert not torch.equal(m.weight_quantizer.codebook.detach(), before[name][1])
    assert result.metrics[-1]["test_top1"] >= ptq_top1 - 1.0
    assert quantized_size_bytes(tuned) < float_size_bytes(fp) / 6


@pytest.mark.filterwarnings("ignore:.*distinct weights for 256 clusters")  # the 8-bit first layer
def test_kmeans_recentre_sets_centroids_to_cluster_means(digits_fp):
    d, fp = digits_fp
    method, result = _finetune(d, fp, "kmeans", {"w_bits": 3, "update": "recentre"}, epochs=1)
    for m in result.model.modules():
        if isinstance(m, QuantConv2d):
            q = m.weight_quantizer
            rows = q.indices.reshape(1, -1)
            w = m.weight.detach().reshape(1, -1)
            for k in range(q.codebook.shape[1]):
                members = w[rows == k]
                if members.numel():
                    assert q.codebook[0, k].item() == pytest.approx(members.mean().item(),
                                                                    abs=1e-5)


@pytest.mark.parametrize("kind", ["bc", "bc-stochastic", "bnn", "bwn", "xnor", "twn", "ttq"])
def test_every_binary_kind_trains_and_is_small(kind, digits_fp):
    d, fp = digits_fp
    method, result = _finetune(d, fp, kind, {}, epochs=1, lr=3e-3)
    model = result.model
    assert torch.isfinite(torch.tensor(result.metrics[-1]["train_loss"]))
    inner = [m for n, m in model.named_modules() if isinstance(m, QuantConv2d)][1:]
    assert inner and all(method.plan[n].w_bits == 1 for n in list(method.plan)[1:-1])
    if kind in ("bc", "bc-stochastic", "bnn"):
        assert all(m.weight.abs().max() <= 1.0 for m in inner)             # latent clipping
    if kind in ("bnn", "xnor"):
        assert all(isinstance(m.input_quantizer, SignActivation) for m in inner)
        assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    if kind == "xnor":
        assert all(isinstance(m, XNORConv2d) for m in inner)
    for m in inner:  # distinct magnitudes: per filter for BWN / XNOR, per layer otherwise
        w = m.quantized_weight().detach().abs()
        rows = w.reshape(w.shape[0], -1) if kind in ("bwn", "xnor") else w.reshape(1, -1)
        assert max(r.unique().numel() for r in rows) <= (3 if kind in ("twn", "ttq") else 1)
    assert quantized_size_bytes(model) < float_size_bytes(fp)


def test_xnor_convolution_equals_its_float_formula():
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, stride=2)
    layer = XNORConv2d.from_float(conv, ScaledBinaryWeight(), SignActivation())
    x = torch.randn(2, 4, 9, 9, generator=g)
    expected = F.conv2d(binarize(x), bwn_alpha(conv.weight) * binarize(conv.weight), None, 2, 1) \
        * xnor_input_scale(x, 3, 2, 1) + conv.bias.reshape(1, -1, 1, 1)
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_ttq_scales_are_trained(digits_fp):
    d, fp = digits_fp
    method, result = _finetune(d, fp, "ttq", {}, epochs=1, lr=3e-3)
    q = [m.weight_quantizer for m in result.model.modules() if isinstance(m, QuantConv2d)][1]
    assert q.initialized and q.w_p.item() > 0 and q.w_n.item() > 0
    assert q.w_p.item() != pytest.approx(q.w_n.item())


def test_bad_method_settings():
    with pytest.raises(ConfigError, match="unknown binary key"):
        training_method("bnn", {"w_bits": 1})
    with pytest.raises(ConfigError):
        training_method("kmeans", {"w_bits": 0})
    with pytest.raises(ConfigError):
        training_method("kmeans", {"prune": 1.0})
    with pytest.raises(ConfigError):
        training_method("ttq", {"ttq_threshold": 0})
