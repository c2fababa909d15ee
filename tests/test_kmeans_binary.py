"""K-means weight sharing and binary / ternary quantizers: oracles 15, 16, 18, 19 of
ALGORITHMS.md section 6, scikit-learn agreement, Huffman lengths and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

from lowbit.errors import ConfigError
from lowbit.quant.binary import (IdentitySTE, SignSTE, TTQTernarize, binarize, bwn_alpha,
                                 stochastic_binarize, twn_ternarize, xnor_input_scale)
from lowbit.quant.kmeans import cluster_weights, huffman_bits, initial_centroids, kmeans_1d

W = torch.tensor([[2.09, -0.98, 1.48, 0.09], [0.05, -0.14, -1.08, 2.12],
                  [-0.91, 1.92, 0.0, -1.03], [1.87, 0.0, 1.53, 1.49]])
G = torch.tensor([[-0.03, -0.01, 0.03, 0.02], [-0.01, 0.01, -0.02, 0.12],
                  [-0.01, 0.02, 0.04, 0.01], [-0.07, -0.02, 0.01, -0.02]])


def test_bwn_oracle_15():
    alpha = W.abs().mean()
    assert alpha.item() == pytest.approx(1.04875, abs=1e-5)
    assert (W - binarize(W)).pow(2).sum().item() == pytest.approx(9.2832, abs=1e-3)
    assert (W - alpha * binarize(W)).pow(2).sum().item() == pytest.approx(9.2452, abs=1e-3)
    assert bwn_alpha(W).flatten().tolist() == pytest.approx(W.abs().mean(1).tolist())


def test_twn_and_ttq_threshold_oracle_15():
    t = twn_ternarize(W)
    assert (0.7 * W.abs().mean()).item() == pytest.approx(0.73413, abs=1e-5)
    assert t.abs().max().item() == pytest.approx(1.5, abs=1e-4)
    assert int((t != 0).sum()) == 11
    assert (W - t).pow(2).sum().item() == pytest.approx(2.0932, abs=1e-3)
    assert (0.05 * W.abs().max()).item() == pytest.approx(0.106, abs=1e-4)


def test_kmeans_oracle_16():
    centroids, labels = kmeans_1d(W.flatten(), 4, "linear")
    assert centroids.tolist() == pytest.approx([-1.0, 0.0, 1.5, 2.0], abs=1e-6)
    assert (W.flatten() - centroids[labels]).pow(2).sum().item() == pytest.approx(0.0932, abs=1e-4)
    codebook = centroids.clone().requires_grad_(True)
    (codebook[labels.reshape(4, 4)] * G).sum().backward()   # W_ij = C[I_ij]
    assert codebook.grad.tolist() == pytest.approx([-0.03, 0.04, 0.02, 0.04], abs=1e-6)


def test_kmeans_matches_sklearn_with_the_same_initialisation():
    from sklearn.cluster import KMeans

    g = torch.Generator().manual_seed(0)
    # no cluster empties here: an empty one keeps its centroid in lowbit (so linear init keeps
    # its large-weight centroids) while scikit-learn moves it to a far point
    w = torch.cat([torch.randn(3000, generator=g) * 0.05, torch.rand(600, generator=g) - 0.5])
    for k in (4, 8, 16):
        init = initial_centroids(w, k, "linear")
        ours, _ = kmeans_1d(w.double(), k, "linear", max_iter=1000)
        sk = KMeans(k, init=init.double().numpy()[:, None], n_init=1, max_iter=1000, tol=0)
        sk.fit(w.double().numpy()[:, None])
        theirs = torch.from_numpy(sk.cluster_centers_[:, 0]).sort().values
        assert torch.allclose(ours, theirs, atol=1e-6), k


def test_pruned_weights_stay_zero_and_per_channel_codebooks():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 3, 3, 3, generator=g)
    mask = w.abs() < 0.3
    codebook, idx, k = cluster_weights(w, 2, per_channel=True, prune_mask=mask)
    assert codebook.shape == (4, 4) and k == 4
    assert (idx[mask] == -1).all() and (idx[~mask] >= 0).all()
    assert torch.unique(codebook[0]).numel() == 4


def test_fewer_distinct_weights_than_clusters_warns_and_is_exact():
    w = torch.tensor([0.5, 0.5, -0.25, 0.5])
    with pytest.warns(UserWarning, match="2 distinct weights for 16 clusters"):
        codebook, idx, k = cluster_weights(w, 4)
    assert k == 2 and torch.equal(codebook[0][idx], w)
    with pytest.warns(UserWarning, match="0 distinct"):
        _, idx, k = cluster_weights(torch.zeros(3, 3), 2, prune_mask=torch.ones(3, 3, dtype=bool))
    assert k == 1 and (idx == -1).all()
    with pytest.warns(UserWarning):
        codebook, idx, _ = cluster_weights(torch.zeros(8), 3)        # an all-zero layer
    assert torch.equal(codebook[0][idx], torch.zeros(8))
    with pytest.raises(ConfigError):
        cluster_weights(w, 0)


def test_huffman_lengths():
    assert huffman_bits(torch.tensor([0, 0, 0, 0])) == 4
    # counts 5, 2, 1, 1 -> lengths 1, 2, 3, 3
    assert huffman_bits(torch.tensor([0] * 5 + [1] * 2 + [2, 3])) == 5 + 4 + 3 + 3
    probs = torch.tensor([0.5, 0.25, 0.125, 0.125])
    symbols = torch.multinomial(probs, 4000, replacement=True, generator=torch.Generator()
                                .manual_seed(0))
    entropy = -(probs * probs.log2()).sum().item()
    assert huffman_bits(symbols) / 4000 == pytest.approx(entropy, abs=0.05)


def test_binarization_semantics_oracle_18():
    assert binarize(torch.tensor([0.0, -0.0, 1e-9, -1e-9])).tolist() == [1.0, 1.0, 1.0, -1.0]
    g = torch.Generator().manual_seed(0)
    draws = stochastic_binarize(torch.full((100_000,), 0.2), g)
    assert (draws == 1).float().mean().item() == pytest.approx(0.6, abs=0.005)
    assert (stochastic_binarize(torch.tensor([1.0, 3.0] * 500), g) == 1).all()
    assert (stochastic_binarize(torch.tensor([-1.0, -3.0] * 500), g) == -1).all()
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5], requires_grad=True)
    SignSTE.apply(x).sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 1, 0]
    w = torch.tensor([0.3, -2.0], requires_grad=True)
    IdentitySTE.apply(w, binarize(w.detach())).sum().backward()
    assert w.grad.tolist() == [1, 1]


def test_xnor_input_scale_is_a_box_filtered_channel_mean():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, 6, generator=g)
    k = xnor_input_scale(x, 3, 1, 1)
    a = x.abs().mean(1, keepdim=True)
    ref = F.conv2d(a, torch.full((1, 1, 3, 3), 1 / 9), padding=1)
    assert torch.allclose(k, ref, atol=1e-6) and k.shape == (2, 1, 6, 6)
    w = torch.randn(4, 5, 3, 3, generator=g)
    approx = F.conv2d(binarize(x), binarize(w), padding=1) * k * bwn_alpha(w).reshape(1, -1, 1, 1)
    exact = F.conv2d(x, w, padding=1)
    assert F.cosine_similarity(approx.flatten(), exact.flatten(), dim=0) > 0.5


def test_ttq_gradients_oracle_19():
    w = torch.tensor([0.9, -0.8, 0.01, -0.02, 0.5], requires_grad=True)
    w_p = torch.tensor(1.3, requires_grad=True)
    w_n = torch.tensor(0.7, requires_grad=True)
    out = TTQTernarize.apply(w, w_p, w_n, 0.05)
    assert out.tolist() == pytest.approx([1.3, -0.7, 0.0, 0.0, 1.3])
    g = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    out.backward(g)
    assert w_p.grad.item() == pytest.approx(0.1 + 0.5)
    assert w_n.grad.item() == pytest.approx(-0.2)
    assert w.grad.tolist() == pytest.approx([1.3 * 0.1, 0.7 * 0.2, 0.3, 0.4, 1.3 * 0.5])
    # the same values and scale gradients as plain autograd on the formula
    wp2, wn2 = w_p.detach().clone().requires_grad_(True), w_n.detach().clone().requires_grad_(True)
    d = 0.05 * w.detach().abs().max()
    ref = wp2 * (w.detach() > d) - wn2 * (w.detach() < -d)
    ref.backward(g)
    assert wp2.grad.item() == pytest.approx(w_p.grad.item())
    assert wn2.grad.item() == pytest.approx(w_n.grad.item())
    assert math.isfinite(out.sum().item())
