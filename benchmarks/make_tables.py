"""Regenerate BENCHMARKS.md from the JSON files in benchmarks/results/.

    python benchmarks/make_tables.py
"""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODELS = {"resnet20": "ResNet-20 (CIFAR-10)", "resnet32": "ResNet-32 (CIFAR-10)",
          "psg_resnet32": "PSG ResNet150 (CIFAR-100)"}


def ablation_section() -> str:
    path = RESULTS / "ptq_ablation.json"
    if not path.is_file():
        return ""
    res = json.loads(path.read_text())
    meta = res.get("meta", {})
    models = [m for m in MODELS if m in res]
    labels = []
    for m in models:
        labels += [k for k in res[m] if k not in labels]
    lines = [
        "## PTQ ablation (Banner et al. 2019, Table 1 layout)",
        "",
        f"Command: `{meta.get('command')}`, rows computed at commit(s) "
        f"{', '.join(sorted({'`%s`' % r.get('commit', meta.get('commit')) for m in models for r in res[m].values()}))}, "
        f"{meta.get('threads')} thread(s), {meta.get('machine')}. Calibration: "
        f"{meta.get('calib_images')} training images; top-1 % on the full 10k test set. "
        "Activations are quantized at the input of every Conv / Linear (residual-add outputs "
        "stay float, like Brevitas's layerwise mode; PyTorch and onnxruntime also quantize "
        "them). First conv and last linear at 8 bits unless the row says every layer. "
        "\"all combined\" = per-channel activations + ACIQ (Laplace) + bit allocation of weights "
        "and activations + weight bias correction (mean). \"-\" = not run yet.",
        "",
        "| setting | " + " | ".join(MODELS[m] for m in models) + " |",
        "|---|" + "---|" * len(models),
    ]
    for label in labels:
        cells = []
        for m in models:
            r = res[m].get(label)
            cells.append("-" if r is None else f"{r['top1']:.2f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Calibration seconds (quantize call, 1,024 images, includes BN folding and "
              "every pass) and fake-quant / FP evaluation time on the 10k test set, same run:", "",
              "| setting | " + " | ".join(f"{MODELS[m]} calib s | eval ratio" for m in models) + " |",
              "|---|" + "---|---|" * len(models)]
    for label in labels[1:]:
        cells = []
        for m in models:
            r, fp = res[m].get(label), res[m].get("FP32")
            if r is None or fp is None:
                cells += ["-", "-"]
            else:
                cells += [f"{r['calib_seconds']:.1f}", f"{r['eval_seconds'] / fp['eval_seconds']:.2f}"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def peers_section() -> str:
    path = RESULTS / "ptq_peers.json"
    if not path.is_file():
        return ""
    res = json.loads(path.read_text())
    ablation = json.loads((RESULTS / "ptq_ablation.json").read_text()) \
        if (RESULTS / "ptq_ablation.json").is_file() else {}
    meta = res.get("meta", {})
    models = [m for m in MODELS if m in res]
    labels = []
    for m in models:
        labels += [k for k in res[m] if k not in labels]
    lowbit_rows = ["W4A4 all combined", "W4A4 lowbit best: all combined + CLE + MSE weights + "
                   "mean-std & empirical BC", "W4A4 lowbit per-tensor act: CLE + MSE + mean-std & "
                   "empirical BC"]
    lines = [
        "## Peers: the same checkpoints, calibration images and first/last-layer policy",
        "",
        f"Command: `{meta.get('command')}` at commit `{meta.get('commit')}`; top-1 % on the full "
        "10k test set, calibration seconds in parentheses (whole tool call, same machine, "
        "not run concurrently with each other). Which tensors each tool quantizes: PyTorch FX "
        "and onnxruntime quantize every Conv / Linear input *and* every residual-add output; "
        "Brevitas's layerwise mode and lowbit quantize the input of every Conv / Linear and "
        "leave residual adds in float. PyTorch: per-channel symmetric weights, per-tensor "
        "activations; onnxruntime: QDQ, per-channel weights, int4 weights / uint4 activations "
        "(entropy at onnxruntime's default 128 bins: `quantize_static` does not pass a bin "
        "count through); Brevitas 0.13.4: its `brevitas_examples` PTQ pipeline, per-channel "
        "weights, asymmetric activations (see the script's docstring).",
        "",
        "| tool, setting | " + " | ".join(MODELS[m] for m in models) + " |",
        "|---|" + "---|" * len(models),
    ]
    def cell(r):
        return "-" if r is None else f"{r['top1']:.2f} ({r['calib_seconds']:.0f} s)"
    for label in labels:
        if label == "meta":
            continue
        lines.append(f"| {label} | " + " | ".join(cell(res[m].get(label)) for m in models) + " |")
    for label in lowbit_rows:
        lines.append(f"| lowbit {label} | " + " | ".join(
            cell(None if ablation.get(m, {}).get(label) is None else
                 {"top1": ablation[m][label]["top1"],
                  "calib_seconds": ablation[m][label]["calib_seconds"]}) for m in models) + " |")
    return "\n".join(lines) + "\n"


def speed_section() -> str:
    path = RESULTS / "ptq_speed.json"
    if not path.is_file():
        return ""
    res = json.loads(path.read_text())
    meta = res.pop("meta")
    lines = ["## PTQ cost on ResNet-20", "",
             f"Command: `{meta['command']}` at commit `{meta['commit']}`. Calibration: one "
             f"`lowbit.quantize` call on {meta['calib_images']} images (best of "
             f"{meta['repeats']}). Evaluation ratio: fake-quant / FP32 time on "
             f"{meta['test_images']} test images, alternated in the same process, best of "
             f"{meta['repeats']} each.", "",
             "| threads | recipe | calibration s | FP32 eval s | fake-quant eval s | ratio |",
             "|---|---|---|---|---|---|"]
    for threads, rows in res.items():
        for label, r in rows.items():
            lines.append(f"| {threads} | {label} | {r['calib_seconds']:.2f} | "
                         f"{r['fp_eval_seconds']:.2f} | {r['q_eval_seconds']:.2f} | "
                         f"{r['eval_ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main():
    text = ["# lowbit benchmarks", "",
            "Generated by `python benchmarks/make_tables.py` from `benchmarks/results/*.json`; "
            "each section names the script and commit that produced it.", "",
            ablation_section(), peers_section(), speed_section()]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(text))


if __name__ == "__main__":
    main()
