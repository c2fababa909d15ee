"""Mixed precision under a budget (ALGORITHMS.md 8.3): the exact Gauss-Newton trace and
Hutchinson's estimate against the brute-force Hessian, the integer program against brute force, the two sensitivity estimators against each
other, and budgets met by the real packed file."""
import itertools
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.cli import main
from lowbit.data import Batches
from lowbit.deploy import IntegerEngine, OnnxRunner, export_packed, load_packed, lower, to_onnx
from lowbit.errors import ConfigError
from lowbit.methods.mixed_precision import (gauss_newton_exact, gauss_newton_traces, greedy,
                                            hessian_traces, solve)
from lowbit.methods.ptq import SIZE_MARGIN_BYTES, PTQConfig


def _hessian_trace(model, name, x):
    """Tr of the cross entropy's Hessian in layer ``name``'s weight, by
    ``torch.autograd.functional.hessian`` (the labels do not enter it)."""
    layer = model.get_submodule(name)
    w0, y = layer.weight.detach().clone(), model(x).argmax(1)

    def loss(w):
        saved = layer.weight
        del layer.weight
        layer.weight = w
        out = F.cross_entropy(model(x), y)
        layer.weight = saved
        return out
    return float(torch.autograd.functional.hessian(loss, w0).reshape(w0.numel(), -1).trace())


@pytest.mark.parametrize("batches", [1, 4])
def test_hutchinson_trace_matches_the_exact_hessian_trace(batches):
    """The samples are dealt over the batches; the estimate is the trace over all images."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(40, 6)
    assert gauss_newton_exact(model, ["0", "2"]) == "1 (Tanh) is not piecewise linear"
    estimate = hessian_traces(model, ["0", "2"], list(x.chunk(batches)), samples=3000)
    for name in ("0", "2"):
        assert estimate[name] == pytest.approx(_hessian_trace(model, name, x), rel=0.05)


def _relu_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 6, 3, stride=2, groups=2), nn.ReLU6(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Linear(24, 5))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2)
    return model.eval()


@pytest.mark.parametrize("batches", [1, 3])
def test_gauss_newton_trace_is_the_exact_hessian_trace_of_a_relu_network(batches):
    """Grouped, strided and padded convolutions, batch norm, ReLU6, max pooling: the network is
    piecewise linear in each weight, so the Gauss-Newton trace is the Hessian's own."""
    model, names = _relu_cnn(), ["0", "3", "7"]
    x = torch.randn(24, 3, 11, 11)
    assert gauss_newton_exact(model, names) == ""
    traces = gauss_newton_traces(model, names, list(x.chunk(batches)))
    for name in names:
        assert traces[name] == pytest.approx(_hessian_trace(model, name, x), rel=1e-4)


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.head = nn.Linear(3, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.relu(self.inner(torch.relu(self.inner(x)))))


def test_gauss_newton_says_why_it_is_not_exact():
    """A smooth activation or a layer called twice (its Hessian has cross terms between the
    calls' second derivatives) falls back to Hutchinson."""
    silu = nn.Sequential(nn.Linear(3, 3), nn.SiLU(), nn.Linear(3, 2))
    assert gauss_newton_exact(silu, ["0", "2"]) == "1 (SiLU) is not piecewise linear"
    assert gauss_newton_exact(_Shared(), ["inner", "head"]) == "inner is called 2 times"
    training = _relu_cnn().train()
    assert "BatchNorm2d" in gauss_newton_exact(training, ["0"])


def _problem(seed):
    g = torch.Generator().manual_seed(seed)
    cands = [(2, 8), (4, 8), (8, 8)]
    omega = {f"l{i}": {c: float(torch.rand(1, generator=g)) / c[0] for c in cands}
             for i in range(4)}
    sizes = {f"l{i}": int(torch.randint(50, 500, (1,), generator=g)) for i in range(4)}
    costs = {"size_bytes": {n: {c: sizes[n] * c[0] for c in cands} for n in omega}}
    return omega, costs, sum(sizes.values()) * 4


@pytest.mark.parametrize("seed", range(5))
def test_integer_program_finds_the_brute_force_optimum(seed):
    omega, costs, limit = _problem(seed)
    chosen = solve(omega, costs, {"size_bytes": limit})
    best = min((dict(zip(omega, combo)) for combo in itertools.product(*map(list, omega.values()))
                if sum(costs["size_bytes"][n][c] for n, c in zip(omega, combo)) <= limit),
               key=lambda plan: sum(omega[n][c] for n, c in plan.items()))
    value = lambda plan: sum(omega[n][c] for n, c in plan.items())  # noqa: E731
    assert value(chosen) == pytest.approx(value(best))
    fallback = greedy(omega, costs, {"size_bytes": limit})
    assert sum(costs["size_bytes"][n][c] for n, c in fallback.items()) <= limit
    assert value(fallback) >= value(best) - 1e-12


def test_greedy_says_when_nothing_fits():
    omega, costs, _ = _problem(0)
    with pytest.raises(ConfigError, match="no bit widths fit the budget"):
        greedy(omega, costs, {"size_bytes": 10})


@pytest.fixture(scope="module")
def digits_calib(digits_fp):
    data, model = digits_fp
    return model, [x for x, _ in Batches(data.train, data.normalization(), 64)], data


def test_the_two_estimators_agree_on_what_is_sensitive(digits_calib):
    from scipy.stats import spearmanr

    model, calib, _ = digits_calib
    tables = {}
    for estimator in ("hessian", "output"):
        config = PTQConfig(w_bits=4, a_bits=8, calib=256, avg_bits=4.0, sensitivity=estimator,
                           w_candidates=[2, 3, 4, 8])
        tables[estimator] = lowbit.quantize(model, config, calib).lowbit.mixed["sensitivity"]
    keys = [(n, c) for n in tables["output"] for c in tables["output"][n]]
    rho = spearmanr([tables["hessian"][n][c] for n, c in keys],
                    [tables["output"][n][c] for n, c in keys]).statistic
    assert rho > 0.7


def test_size_budget_is_met_by_the_exported_file(digits_calib, tmp_path):
    model, calib, _ = digits_calib
    uniform3 = lowbit.quantize(model, PTQConfig(w_bits=3, a_bits=8, calib=256), calib)
    budget = export_packed(uniform3, tmp_path / "u3.lowbit", "digits_cnn").stat().st_size
    config = PTQConfig(w_bits=4, a_bits=8, calib=256, size_budget=budget)
    q = lowbit.quantize(model, config, calib)
    size = export_packed(q, tmp_path / "mixed.lowbit", "digits_cnn").stat().st_size
    assert size <= budget
    widths = {b.w_bits for b in q.lowbit.plan.values()}
    plan = list(q.lowbit.plan)
    assert q.lowbit.plan[plan[0]].w_bits == 8 and q.lowbit.plan[plan[-1]].w_bits == 8  # policy
    assert len(widths) > 1 and q.lowbit.mixed["measured_bytes"] <= budget
    assert 0 < q.lowbit.mixed["search_seconds"] < q.lowbit.calibration_seconds
    smaller = lowbit.quantize(model, PTQConfig(w_bits=4, a_bits=8, calib=256,
                                               size_budget=int(budget * 0.9)), calib)
    assert export_packed(smaller, tmp_path / "s.lowbit", "digits_cnn").stat().st_size \
        <= int(budget * 0.9)
    with pytest.raises(ConfigError, match="cannot be met: the narrowest widths allowed"):
        lowbit.quantize(model, PTQConfig(w_bits=4, a_bits=8, calib=256,
                                         size_budget=int(budget * 0.5)), calib)
    # just below the narrowest plan, with the 8-bit first / last layer counted at 8 bits
    uniform2 = lowbit.quantize(model, PTQConfig(w_bits=2, a_bits=8, calib=256), calib)
    narrowest = export_packed(uniform2, tmp_path / "u2.lowbit", "digits_cnn").stat().st_size
    with pytest.raises(ConfigError, match="cannot be met: the narrowest widths allowed"):
        lowbit.quantize(model, PTQConfig(w_bits=4, a_bits=8, calib=256,
                                         size_budget=narrowest - 64), calib)


@pytest.mark.parametrize("recipe", ["ptq-w4a4-best", "ptq-w4a4-deploy"])
def test_size_prediction_holds_with_per_channel_inputs_and_bit_allocation(recipe, digits_calib,
                                                                          tmp_path):
    """Banner's recipe stores per-channel input qparams and per-channel width lists: the
    prediction must count them (it once missed them and overshot by 8%)."""
    model, calib, _ = digits_calib
    uniform = lowbit.quantize(model, lowbit.load_recipe(recipe, w_bits=3, calib=128), calib)
    budget = export_packed(uniform, tmp_path / "u3.lowbit", "digits_cnn").stat().st_size
    q = lowbit.quantize(model, lowbit.load_recipe(recipe, calib=128, size_budget=budget), calib)
    size = export_packed(q, tmp_path / "mixed.lowbit", "digits_cnn").stat().st_size
    assert size <= budget
    # never under: the prediction adds a fixed margin for the header (names, width fields),
    # which is most of its error on this 10 KB file; on the ResNets it is within 1%
    assert 0 <= q.lowbit.mixed["predicted"]["size_bytes"] - size <= SIZE_MARGIN_BYTES + 0.01 * size


def test_size_budget_can_count_the_huffman_coded_file(digits_calib, tmp_path):
    model, calib, _ = digits_calib
    uniform = lowbit.quantize(model, PTQConfig(w_bits=3, a_bits=8, calib=256), calib)
    budget = export_packed(uniform, tmp_path / "u3.lowbit", "digits_cnn",
                           entropy="huffman").stat().st_size
    plain = lowbit.quantize(model, PTQConfig(w_bits=4, a_bits=8, calib=256, size_budget=budget),
                            calib)
    coded = lowbit.quantize(model, PTQConfig(w_bits=4, a_bits=8, calib=256, size_budget=budget,
                                             size_entropy="huffman"), calib)
    size = export_packed(coded, tmp_path / "h.lowbit", "digits_cnn",
                         entropy="huffman").stat().st_size
    assert size <= budget
    assert 0 <= coded.lowbit.mixed["predicted"]["size_bytes"] - size <= SIZE_MARGIN_BYTES \
        + 0.01 * size
    bits = lambda q: sum(b.w_bits for b in q.lowbit.plan.values())  # noqa: E731
    assert bits(coded) > bits(plain)  # the coded file leaves room for wider layers
    with pytest.raises(ConfigError, match="size_entropy"):
        PTQConfig(size_entropy="zip").validate()


def test_average_bits_and_bops_budgets(digits_calib):
    model, calib, _ = digits_calib
    q = lowbit.quantize(model, PTQConfig(w_bits=4, a_bits=8, calib=256, avg_bits=3.5), calib)
    layers = {n: model.get_submodule(n).weight.numel() for n in q.lowbit.plan}
    mean = sum(q.lowbit.plan[n].w_bits * k for n, k in layers.items()) / sum(layers.values())
    assert mean <= 3.5 and mean == pytest.approx(q.lowbit.mixed["predicted"]["avg_bits"])
    full = lowbit.quantize(model, PTQConfig(w_bits=8, a_bits=8, calib=256, avg_bits=8,
                                            a_candidates=[4, 8]), calib)
    bops = full.lowbit.mixed["predicted"]["bops"]
    q = lowbit.quantize(model, PTQConfig(w_bits=8, a_bits=8, calib=256, bops_budget=bops / 3,
                                         a_candidates=[4, 6, 8]), calib)
    assert q.lowbit.mixed["predicted"]["bops"] <= bops / 3
    assert any(b.a_bits in (4, 6) for b in q.lowbit.plan.values())


@pytest.mark.parametrize("values, message", [
    ({"size_budget": "lots"}, "memory size"), ({"avg_bits": 0}, "avg_bits"),
    ({"a_candidates": [4], "a_bits": None}, "a_candidates"), ({"w_candidates": [17]}, "w_candidates entry"), ({"w_candidates": []}, "at least one"),
    ({"sensitivity": "fisher"}, "sensitivity must be one of")])
def test_bad_budget_settings(values, message):
    with pytest.raises(ConfigError, match=message):
        PTQConfig(**values).validate()


def test_cli_size_budget(capsys, tmp_path, digits_fp):
    data, model = digits_fp
    ckpt = tmp_path / "fp.pt"
    torch.save(model.state_dict(), ckpt)
    code = main(["quantize", "--model", "digits_cnn", "--checkpoint", str(ckpt), "--data",
                 "digits", "--w-bits", "4", "--calib", "256", "--size-budget", "8KiB",
                 "--out", str(tmp_path / "q")])
    out = capsys.readouterr()
    assert code == 0, out.err
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    assert report["mixed_precision"]["measured_bytes"] <= 8 * 1024
    assert "predicted" in (tmp_path / "q" / "report.md").read_text()
    code = main(["quantize", "--model", "digits_cnn", "--checkpoint", str(ckpt), "--data",
                 "digits", "--size-budget", "10", "--out", str(tmp_path / "tiny")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_lsq_fine_tunes_a_mixed_plan(capsys, tmp_path, digits_fp):
    """``lowbit train --method lsq --plan report.json``: the trained model's layers carry the
    plan's widths, and it exports as packed file, integer engine and ONNX alike."""
    from lowbit.training.run import load_trained

    data, model = digits_fp
    ckpt = tmp_path / "fp.pt"
    torch.save(model.state_dict(), ckpt)
    code = main(["quantize", "--model", "digits_cnn", "--checkpoint", str(ckpt), "--data",
                 "digits", "--w-bits", "4", "--calib", "256", "--avg-bits", "3",
                 "--out", str(tmp_path / "q")])
    assert code == 0, capsys.readouterr().err
    plan = json.loads((tmp_path / "q" / "report.json").read_text())["mixed_precision"]["bits"]
    assert len({w for w, _ in plan.values()}) > 2  # 8 at the ends and mixed between
    code = main(["train", "--model", "digits_cnn", "--checkpoint", str(ckpt), "--data", "digits",
                 "--method", "lsq", "--plan", str(tmp_path / "q" / "report.json"), "--epochs",
                 "1", "--train-limit", "256", "--no-augment", "--out", str(tmp_path / "lsq")])
    assert code == 0, capsys.readouterr().err
    trained = load_trained(torch.load(tmp_path / "lsq" / "model.pt", weights_only=False),
                           torch.zeros(1, 1, 8, 8))
    for name, (w, a) in plan.items():
        layer = trained.get_submodule(name)
        assert layer.weight_quantizer.bits == w and layer.input_quantizer.bits == a, name
    for fmt in ("lowbit", "onnx"):
        code = main(["export", "--checkpoint", str(tmp_path / "lsq" / "model.pt"), "--format",
                     fmt, "--out", str(tmp_path / f"m.{fmt}")])
        assert code == 0, capsys.readouterr().err
    x = torch.cat([x for x, _ in Batches(data.test, data.normalization(), 256)])
    assert torch.equal(load_packed(tmp_path / "m.lowbit")[0](x), trained(x))
    simulated = lower(trained).simulation()(x)
    agree = (OnnxRunner(tmp_path / "m.onnx")(x).argmax(1) == simulated.argmax(1)).float().mean()
    assert agree >= 0.99
    fully = lower(trained, [x[:256]])  # the BatchNorms stay: their outputs quantized too
    agree = (IntegerEngine(fully)(x).argmax(1) == fully.simulation()(x).argmax(1)).float().mean()
    assert agree >= 0.99


def test_a_mixed_ptq_model_runs_on_the_integer_engine_and_onnxruntime(digits_calib):
    model, calib, data = digits_calib
    q = lowbit.quantize(model, PTQConfig(w_bits=4, a_bits=8, calib=256, avg_bits=3.0), calib)
    assert len({b.w_bits for b in q.lowbit.plan.values()}) > 2
    x = torch.cat([x for x, _ in Batches(data.test, data.normalization(), 256)])
    lowering = lower(q)
    simulated = lowering.simulation()(x)
    assert torch.allclose(simulated, q(x), atol=1e-5)
    for out in (IntegerEngine(lowering)(x), OnnxRunner(to_onnx(lowering, (1, 1, 8, 8)))(x)):
        assert (out.argmax(1) == simulated.argmax(1)).float().mean() >= 0.99


@pytest.mark.parametrize("plan, message", [
    (None, "no such file"), ("{", "not a JSON report"), ('{"mixed_precision": null}', "no mixed"),
    ('{"mixed_precision": {"bits": {"conv1": [4]}}}', "no mixed")])
def test_bad_plan_files(plan, message, capsys, tmp_path, digits_fp):
    path = tmp_path / "report.json"
    if plan is not None:
        path.write_text(plan)
    code = main(["train", "--model", "digits_cnn", "--data", "digits", "--method", "lsq",
                 "--plan", str(path), "--epochs", "1", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    code = main(["train", "--model", "digits_cnn", "--data", "digits", "--method", "bnn",
                 "--plan", str(path), "--epochs", "1", "--out", str(tmp_path / "run")])
    assert code == 2 and "qat or lsq" in capsys.readouterr().err
