"""Mixed precision against uniform widths at the same packed size (issue 18): the three CIFAR
checkpoints, lowbit's best PTQ recipe (``ptq-w4a4-best``) at weights 2 / 3 / 4 / 6 / 8 bits with
4-bit activations as the uniform points, and the same recipe with widths per layer chosen under
a ``size_budget`` equal to each uniform file's size (and half-way sizes) as the mixed-precision
frontier. Sizes are the real packed files (``lowbit export``); top-1 on the full test set.

    python benchmarks/mixed_precision.py [--models resnet20,resnet32,psg_resnet32]
        [--estimators hessian,output] [--threads 1]

Targets: at the size of uniform W3A4, mixed precision >= uniform W4A4 - 0.5 on ResNet-20 and
ResNet-32, and >= uniform W3A4 + 2 on the PSG ResNet-32. Writes
``benchmarks/results/mixed_precision.json`` row by row (a rerun skips finished rows) and
``benchmarks/results/mixed_precision_<model>.png`` (top-1 against packed size).
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
import warnings
from pathlib import Path

import regex
import torch

import lowbit
from lowbit.deploy import export_packed
from lowbit.methods import training_method
from lowbit.errors import ConfigError

from ptq_ablation import commit, load_benchmark, record  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "mixed_precision.json"
UNIFORM = (2, 3, 4, 6, 8)


def packed_bytes(qmodel, spec: str) -> int:
    with tempfile.TemporaryDirectory() as folder:
        return export_packed(qmodel, Path(folder) / "m.lowbit", spec).stat().st_size


def run(name: str, label: str, model, config, calib, test, done: dict,
        spec: str | None = None) -> dict:
    """One PTQ row of ``name`` (``spec``: the model's spec for the packed file, default
    ``name``)."""
    spec = spec or name
    if label in done:
        return done[label]
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            q = lowbit.quantize(model, config, calib)
        except ConfigError as e:  # a budget below the narrowest plan: recorded as such
            row = {"error": str(e), "config": config.to_dict(), "commit": commit()}
            record(RESULTS, name, label, row)
            print(name, label, e, flush=True)
            done[label] = row
            return row
    seconds = time.perf_counter() - t
    row = {"top1": lowbit.evaluate(q, test), "bytes": packed_bytes(q, spec),
           "bits": {n: b.w_bits for n, b in q.lowbit.plan.items()},
           "quantize_seconds": seconds, "config": config.to_dict(), "commit": commit()}
    if q.lowbit.mixed:
        row["predicted_bytes"] = q.lowbit.mixed["predicted"]["size_bytes"]
        row["estimator"] = q.lowbit.mixed["estimator"]
        if "trace" in q.lowbit.mixed:
            row["trace"] = q.lowbit.mixed["trace"]
        row["search_seconds"] = q.lowbit.mixed["search_seconds"]
    record(RESULTS, name, label, row)
    print(name, label, f"{row['top1']:.2f}", row["bytes"], f"{seconds:.0f} s", flush=True)
    done[label] = row
    return row


def plot(name: str, rows: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    uniform = sorted((r["bytes"], r["top1"], label) for label, r in rows.items()
                     if label.startswith("uniform"))
    ax.plot([u[0] / 1024 for u in uniform], [u[1] for u in uniform], "o", color="black",
            label="uniform W{2,3,4,6,8}A4")
    for u in uniform:
        ax.annotate(u[2].split()[1], (u[0] / 1024, u[1]), textcoords="offset points",
                    xytext=(4, -10), fontsize=8)
    for estimator, style in (("hessian", "-s"), ("output", "--^")):
        mixed = sorted((r["bytes"], r["top1"]) for label, r in rows.items()
                       if label.startswith(f"mixed {estimator}") and "error" not in r)
        if mixed:
            ax.plot([m[0] / 1024 for m in mixed], [m[1] for m in mixed], style,
                    label=f"mixed precision ({estimator})")
    ax.set_xlabel("packed file (KiB)")
    ax.set_ylabel("top-1 %")
    ax.set_title(f"{name}: ptq-w4a4-best, 4-bit activations")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS.parent / f"mixed_precision_{name}.png", dpi=120)
    plt.close(fig)


LSQ_EPOCHS = 3


def lsq_rows(args, results: dict) -> None:
    """LSQ fine-tuning (``lsq-w4a4-finetune``: MSE step init, distillation, SGD 2e-3 cosine,
    ``LSQ_EPOCHS`` epochs) of the uniform W2 / W3 / W4 A4 models and of the mixed plans the
    output estimator chose at the W3A4 size and half-way from W2 (``lowbit train --plan``),
    each measured as its packed file (LSQ weights are per-tensor, so these files differ from
    the PTQ ones). Resumable runs in ``benchmarks/runs/mixed-lsq-*``."""
    from lowbit.models import MODELS
    from lowbit.recipes import read_recipe
    from lowbit.training import TrainConfig, train

    from ptq_ablation import training_data  # noqa: E402

    for name in args.models.split(","):
        model, _, test = load_benchmark(name)
        data, norm = training_data(name)
        example = next(iter(test))[0][:8]
        ptq = results[name]
        sizes = [ptq[f"uniform W{b}A4"]["bytes"] for b in (2, 3)]
        plans = {f"uniform W{b}A4": {"w_bits": b} for b in (2, 3, 4)}
        for budget in ((sizes[0] + sizes[1]) // 2, sizes[1]):  # the rows keep weight widths
            plans[f"mixed output {budget}"] = {"overrides": {
                regex.escape(n): {"w_bits": w}
                for n, w in ptq[f"mixed output {budget}"]["bits"].items()}}
        recipe = read_recipe("lsq-w4a4-finetune")
        train_values = {**recipe.pop("train"), "epochs": LSQ_EPOCHS,
                        "reflect_pad": MODELS[name].reflect_pad, "seed": 0,
                        "eval_every": LSQ_EPOCHS}
        recipe.pop("method")
        done = results.get(f"{name} lsq", {})
        for label, values in plans.items():
            if label in done:
                continue
            method = training_method("lsq", {**recipe, **values})
            slug = label.replace(" ", "-")
            out = ROOT / "benchmarks" / "runs" / f"mixed-lsq-{name}-{slug}"
            result = train(model, data, norm, TrainConfig.from_dict(train_values),
                           method=method, out=out, resume=(out / "checkpoint.pt").is_file())
            trained = {"method": "lsq", "method_config": method.config.to_dict(),
                       "input_shape": list(example.shape[1:])}
            with tempfile.TemporaryDirectory() as folder:
                size = export_packed(result.model.eval(), Path(folder) / "m.lowbit", name, 10,
                                     trained=trained).stat().st_size
            row = {"top1": result.metrics[-1]["test_top1"], "bytes": size,
                   "bits": {n: b.w_bits for n, b in method.plan.items()},
                   "train": train_values, "commit": commit()}
            record(RESULTS, f"{name} lsq", label, row)
            print(name, "lsq", label, row["top1"], size, flush=True)


def search_cost(args, results: dict) -> None:
    """Seconds of sensitivity + solve per estimator (the issue's search cost, excluding the
    calibration), at the W3A4 size's budget, on an otherwise idle machine."""
    for name in args.models.split(","):
        model, calib, _ = load_benchmark(name)
        budget = results[name]["uniform W3A4"]["bytes"]
        row = {"threads": args.threads, "commit": commit()}
        for estimator in args.estimators.split(","):
            config = lowbit.load_recipe("ptq-w4a4-best", size_budget=budget, sensitivity=estimator)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                q = lowbit.quantize(model, config, calib)
            row[estimator] = q.lowbit.mixed["search_seconds"]
            row[f"{estimator} quantize"] = q.lowbit.calibration_seconds
            print(name, estimator, f"search {row[estimator]:.1f} s", flush=True)
        record(RESULTS, "search_cost", name, row)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet20,resnet32,psg_resnet32")
    ap.add_argument("--estimators", default="hessian,output")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--recipe", default="ptq-w4a4-best", help="the PTQ recipe of every row; "
                    "another than the default is recorded as '<model> <recipe>'")
    ap.add_argument("--widths", default=",".join(map(str, UNIFORM)),
                    help="uniform weight widths (the budgets come from W2 / W3 / W4 if run)")
    ap.add_argument("--lsq", action="store_true", help="LSQ fine-tuning of uniform and mixed "
                    "plans (after the PTQ rows)")
    ap.add_argument("--search-cost", action="store_true", help="only time the search "
                    "(sensitivity + solve) of each estimator at the W3A4 size, quietly")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if args.search_cost:
        return search_cost(args, results)
    if args.lsq:
        return lsq_rows(args, results)
    widths = [int(w) for w in args.widths.split(",")]
    for name in args.models.split(","):
        model, calib, test = load_benchmark(name)
        key = name if args.recipe == "ptq-w4a4-best" else f"{name} {args.recipe}"
        done = results.get(key, {})
        rows = {}
        for bits in widths:
            config = lowbit.load_recipe(args.recipe, w_bits=bits,
                                        **({"bias_correction": "mean"} if bits == 2 and
                                           args.recipe == "ptq-w4a4-best" else {}))
            rows[f"uniform W{bits}A4"] = run(key, f"uniform W{bits}A4", model, config, calib,
                                             test, done, spec=name)
        sizes = {b: rows[f"uniform W{b}A4"]["bytes"] for b in (2, 3, 4) if b in widths}
        budgets = set(sizes.values())
        if 2 in sizes:  # uniform W2's own size is just out of reach (the 256-byte margin)
            budgets.add(int(sizes[2] * 1.01))
        budgets |= {(sizes[a] + sizes[b]) // 2 for a, b in ((2, 3), (3, 4))
                    if a in sizes and b in sizes}
        for estimator in args.estimators.split(","):
            for budget in sorted(budgets):
                label = f"mixed {estimator} {budget}"
                config = lowbit.load_recipe(args.recipe, size_budget=budget,
                                            sensitivity=estimator)
                rows[label] = run(key, label, model, config, calib, test, done, spec=name)
        if key == name:
            plot(name, rows)
    command = (f"python benchmarks/mixed_precision.py --models {args.models} "
               f"--estimators {args.estimators}")
    meta = json.loads(RESULTS.read_text()).get("meta", {}) if RESULTS.is_file() else {}
    if args.recipe == "ptq-w4a4-best":
        meta.update({"machine": platform.processor() or platform.machine(),
                     "threads": args.threads, "command": command})
    else:  # the other recipes' commands, listed under the table
        meta.setdefault("other_recipes", {})[args.recipe] = \
            f"{command} --recipe {args.recipe} --widths {args.widths}"
    record(RESULTS, "meta", None, meta)


if __name__ == "__main__":
    main()
