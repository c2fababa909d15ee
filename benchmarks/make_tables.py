"""Regenerate BENCHMARKS.md from the JSON files in benchmarks/results/.

    python benchmarks/make_tables.py
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

from lowbit.models import MODELS as MODEL_INFO
from ptq_ablation import ADAROUND_LABEL, BEST_LABEL, DEPLOY_LABEL

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODELS = {"resnet20": "ResNet-20 (CIFAR-10)", "resnet32": "ResNet-32 (CIFAR-10)",
          "psg_resnet32": "ResNet-32 (CIFAR-100, PSG checkpoint)"}

CLASSES = {"resnet20": 10, "resnet32": 10, "psg_resnet32": 100}


def _load(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _labels(res: dict, models: list[str]) -> list[str]:
    labels = []
    for m in models:
        labels += [k for k in res[m] if k not in labels]
    return labels


OTHER_PAD = ("†: trained on crops padded unlike the checkpoint's own training (zeros where it "
             "used reflection), the first ResNet-32 runs; see the crop-padding note under weight "
             "sharing.")


def _pad_legend(res: dict, models: list[str]) -> list[str]:
    marked = any(_other_pad(r, m) for m in models for r in res[m].values())
    return ["", OTHER_PAD] if marked else []


def _other_pad(r: dict, model: str) -> bool:
    """Whether a trained row padded its crops unlike the checkpoint was trained."""
    return "train" in r and r["train"].get("reflect_pad") != MODEL_INFO[model].reflect_pad


def _row(label: str, cells) -> str:
    return f"| {label} | " + " | ".join(cells) + " |"


def _header(first: str, columns) -> list[str]:
    columns = list(columns)
    return [_row(first, columns), "|---|" + "---|" * len(columns)]


def _table(res: dict, models: list[str], cell) -> list[str]:
    """One row per label, one ``cell(result, model)`` per model ("-" where a model lacks the
    row)."""
    return [_row(label, ("-" if label not in res[m] else cell(res[m][label], m) for m in models))
            for label in _labels(res, models)]


def _commits(res: dict, models: list[str]) -> str:
    found = {r.get("commit", res.get("meta", {}).get("commit")) for m in models
             for r in res[m].values()}
    return ", ".join(f"`{c}`" for c in sorted(filter(None, found)))


def targets_section(res: dict) -> list[str]:
    """The issue's targets, computed from the ablation rows."""
    models = [m for m in MODELS if m in res]
    top1 = lambda m, label: res[m].get(label, {}).get("top1")
    lines = ["## Targets", "", *_header("target", (MODELS[m] for m in models))]
    lines.append(_row("W8A8 - FP32 (target: within 0.3)", (
        f"{top1(m, 'W8A8 baseline') - top1(m, 'FP32'):+.2f}" for m in models)))
    for label, shown in (("W4A4 all combined", "Banner's all combined"), (BEST_LABEL, "lowbit best"),
                         (DEPLOY_LABEL, "lowbit deployable (ptq-w4a4-deploy)"),
                         (ADAROUND_LABEL, "lowbit best + AdaRound")):
        cells = []
        for m in models:
            base, fp, q = top1(m, "W4A4 baseline (per-ch act)"), top1(m, "FP32"), top1(m, label)
            cells.append("-" if None in (base, fp, q) else f"{100 * (q - base) / (fp - base):.0f}%")
        lines.append(_row(f"W4A4 gap recovered vs the per-channel baseline, {shown} "
                          "(target: 67%)", cells))
    lines.append(_row("W4A4 deployable (ptq-w4a4-deploy) - FP32 (target: within 1.0 on CIFAR-10, "
                      "2.5 on CIFAR-100)", (
                          "-" if top1(m, DEPLOY_LABEL) is None else
                          f"{top1(m, DEPLOY_LABEL) - top1(m, 'FP32'):+.2f}" for m in models)))
    return lines


def ablation_section(res: dict) -> list[str]:
    models = [m for m in MODELS if m in res]
    labels = _labels(res, models)
    lines = [
        "## PTQ ablation (Banner et al. 2019, Table 1 layout)", "",
        f"Command: `python benchmarks/ptq_ablation.py`; rows computed at {_commits(res, models)}. "
        "Calibration: 1,024 training images (seeded); top-1 % on the full 10k test set. "
        "Activations are quantized at the input of every Conv / Linear (residual-add outputs "
        "stay float, like Brevitas's layerwise mode; PyTorch and onnxruntime also quantize "
        "them). First conv and last linear at 8 bits unless the row says every layer. "
        "\"all combined\" = per-channel activations + ACIQ (Laplace) + bit allocation of weights "
        "and activations + weight bias correction (mean), the paper's recipe. \"lowbit best\" adds "
        "cross-layer equalization, MSE weight ranges with mean+std weight correction, and "
        "empirical bias correction; \"+ AdaRound\" learns each weight's rounding against the "
        "float layer's output instead of the weight correction (Nagel et al. 2020), its "
        "reconstruction error accumulated over all 1,024 images as a quadratic form. The "
        "deployable row is the `ptq-w4a4-deploy` recipe: per-tensor activations and integer "
        "weights (no float weight correction), so the integer engine and onnxruntime run it "
        "exactly. Calibration streams in 64-image batches (`calib_batch_size`); rows at commits "
        "from `6004069` on use the streaming calibration. Against the one-batch pass (the same "
        "configs run once with the code of `767cc36`, by hand, not by a committed script) its "
        "min-max rows differ by at most 3 test images (W8A8 91.84 vs 91.81, W4A4 per-tensor "
        "87.31 vs 87.30, W8A4 per-channel 90.75 both).", "",
        *_header("setting", (MODELS[m] for m in models)),
    ]
    for label in labels:
        lines.append(_row(label, ("-" if label not in res[m] else f"{res[m][label]['top1']:.2f}"
                                  for m in models)))
    lines += ["", "Calibration seconds (one `quantize` call: BN folding, every pass, finalization) "
              "and the fake-quant / FP32 ratio of full-test-set evaluation times, 2 threads. "
              "Other work shared the machine during these runs (the AdaRound rows ran beside "
              "two training benchmarks), so these are rough; the speed section has the careful "
              "measurement:", "",
              *_header("setting", (f"{MODELS[m]}: calib s, eval ratio" for m in models))]
    for label in labels[1:]:
        cells = []
        for m in models:
            r, fp = res[m].get(label), res[m].get("FP32")
            cells.append("-" if r is None or fp is None else
                         f"{r['calib_seconds']:.1f}, {r['eval_seconds'] / fp['eval_seconds']:.2f}")
        lines.append(_row(label, cells))
    return lines


def peers_section(res: dict, ablation: dict) -> list[str]:
    models = [m for m in MODELS if m in res]

    def cell(r):
        return "-" if r is None else f"{r['top1']:.2f} ({r['calib_seconds']:.0f} s)"

    lines = [
        "## Peers: same checkpoints, calibration images and first/last-layer policy", "",
        f"Command: `python benchmarks/ptq_peers.py`; rows computed at {_commits(res, models)}. "
        "Top-1 % on the full 10k test set, calibration seconds in parentheses (the whole tool "
        "call). Which tensors each tool quantizes: PyTorch FX and onnxruntime quantize every "
        "Conv / Linear input *and* every residual-add output; Brevitas's layerwise mode and "
        "lowbit quantize the input of every Conv / Linear and leave residual adds in float. "
        "PyTorch: per-channel symmetric weights, per-tensor activations. onnxruntime: QDQ, "
        "per-channel weights, int4 weights / uint4 activations; entropy with 2,048 histogram "
        "bins (at onnxruntime's defaults, 128 histogram and 128 quantized bins, its KL search "
        "has a single candidate, the whole range, so it returns the min-max ranges; "
        "`quantize_static` passes no bin count through, so the benchmark wraps the calibrator "
        "factory). Brevitas 0.13.4: its `brevitas_examples` PTQ "
        "pipeline, per-channel weights, asymmetric activations (symmetric ones lose about 5 "
        "points: it treats inputs after a functional ReLU as signed).", "",
        *_header("tool, setting", (MODELS[m] for m in models)),
    ]
    for label in _labels(res, models):
        lines.append(_row(label, (cell(res[m].get(label)) for m in models)))
    for label, shown in (("W4A4 all combined", "W4A4 lowbit, Banner's all combined"),
                         (BEST_LABEL, BEST_LABEL), (DEPLOY_LABEL, DEPLOY_LABEL),
                         (ADAROUND_LABEL, ADAROUND_LABEL)):
        lines.append(_row(shown, (cell(ablation.get(m, {}).get(label)) for m in models)))
    return lines


def speed_section(res: dict) -> list[str]:
    meta = res["meta"]
    lines = ["## PTQ cost on ResNet-20", "",
             f"Command: `{meta['command']}` at commit `{meta['commit']}`"
             + (f", {meta['cpu']}" if "cpu" in meta else "")
             + (f", {meta['training_paused']} training runs paused (SIGSTOP) while timing"
                if meta.get("training_paused") else ", nothing else running") + ". "
             f"Calibration: one `lowbit.quantize` call on {meta['calib_images']} images (best of "
             f"{meta['repeats']}). Ratio: fake-quant / FP32 evaluation time on "
             f"{meta['test_images']} test images, alternated in one process, best of "
             f"{meta['repeats']} each.", "",
             "| threads | recipe | calibration s | FP32 eval s | fake-quant eval s | ratio |",
             "|---|---|---|---|---|---|"]
    for threads, rows in res.items():
        if threads == "meta":
            continue
        for label, r in rows.items():
            lines.append(f"| {threads} | {label} | {r['calib_seconds']:.2f} | "
                         f"{r['fp_eval_seconds']:.2f} | {r['q_eval_seconds']:.2f} | "
                         f"{r['eval_ratio']:.2f} |")
    return lines


def _rate_note(rate: dict) -> str:
    """'(N steps at lr 0.01 cut the grid SSE by a / b / c % at lambda_s x / y / z, psg_rate.py)'"""
    if not rate:
        return ""
    after = rate["sse4_after"]
    cuts = " / ".join(f"{100 * (v / rate['start_sse4'] - 1):+.1f}%" for v in after.values())
    lambdas = " / ".join(f"{float(k):g}" for k in after)
    note = (f" ({rate['meta']['steps']} steps at lr 0.01 change the 4-bit grid SSE by {cuts} at "
            f"lambda_s {lambdas}")
    if {"150.0", "600.0"} <= after.keys():
        pull = {k: math.log(rate["start_sse4"] / after[k]) for k in ("150.0", "600.0")}
        note += f": {pull['600.0'] / pull['150.0']:.1f}x the per-step pull for 4x lambda_s"
    return note + f"; `{rate['meta']['command']}`)"


def _long_run_progress(key: str) -> str:
    """The epochs reached by the runs of a PSG schedule that train in ``benchmarks/long_runs``
    (checkpoints committed, so a later session resumes them), with their last test top-1."""
    found = []
    for variant in ("sgd", "psgd"):
        run = key if variant == "psgd" else key.rsplit(",lambda=", 1)[0]
        folder = ROOT / "benchmarks" / "long_runs" / \
            f"psg-{variant}-{run.replace(',', '-').replace('=', '')}"
        metrics = folder / "metrics.json"
        if metrics.is_file() and json.loads(metrics.read_text()):
            last = json.loads(metrics.read_text())[-1]
            found.append(f"{variant.upper()} at epoch {last['epoch']} (FP test top-1 "
                         f"{last['test_top1']:.2f})")
    if not found:
        return ""
    return (" Their checkpoints are committed in `benchmarks/long_runs/` (no session's machine "
            "outlives it), so the next session goes on from them: " + ", ".join(found) + ". A "
            "run resumed on another machine continues equal within seed noise, not bit for "
            "bit (its CPU's float kernels may differ).")


def psg_section(res: dict, rate: dict) -> list[str]:
    meta = res.get("meta", {})
    lines = ["## PSG reproduction (CIFAR-100 ResNet-32)", "",
             "Command: `python benchmarks/psg_train.py` (per schedule below). Both runs "
             "start from the reference's epoch-82 SGD checkpoint and use the same schedule and "
             "seed (SGD, momentum 0.9, lr 0.01 with one x0.1 decay, weight decay 1e-4, batch "
             "128, reflection-padded crop and flip); PSGD adds the gradient scaling lambda_s "
             "(in the schedule's key) towards the 4-bit grid. The pull onto the grid grows "
             f"faster than lambda_s (about as (lr lambda_s)^2 per step){_rate_note(rate)}, so the "
             "compressed schedule scales lambda_s by 4 to make 2 epochs at lr 0.01 stand for "
             "many of the paper's 41. PTQ on the PSG grid (symmetric, restricted range, per tensor, "
             "BN unfolded; first and last layer at 8 bits below 4 bits). W4A4: activations at 4 bits from "
             "BN clipping (beta + 6 gamma, signed gamma as the reference; the image in float). "
             "Top-1 % on the full 10k test set. The paper's run (68 epochs) is "
             f"`{meta.get('paper_command', '')}`.", ""]
    for key, runs in res.items():
        if key == "meta":
            continue
        command = meta.get("commands", {}).get(key)
        lines += [f"Schedule `{key}`" + (f" (`{command}`)" if command else "") + ":", "",
                  "| model | FP | W4A32 | W3A32 | W2A32 | W4A4 BN-clip | grid SSE 4/3/2 bit |",
                  "|---|---|---|---|---|---|---|"]
        rows = [("start", "epoch-82 checkpoint", runs.get("start"))]
        for name, shown in (("sgd", "SGD"), ("psgd", "PSGD")):
            along = runs.get(f"{name} along the run", {})
            rows += [(name, f"{shown} after epoch {e}", along[e]) for e in sorted(along, key=int)]
            rows.append((name, shown, runs.get(name)))
        for name, shown, r in rows:
            if r is None:
                continue
            sse = r["grid_sse_total"]
            lines.append(f"| {shown} | {r['fp']:.2f} | {r['w4a32']:.2f} | {r['w3a32']:.2f} | "
                         f"{r['w2a32']:.2f} | {r['w4a4_bn_clip']:.2f} | {sse['4bit']:.1f} / "
                         f"{sse['3bit']:.1f} / {sse['2bit']:.1f} |")
        if not all(name in runs for name in ("sgd", "psgd")):
            lines += ["", "Still training: rerunning the schedule's command resumes the runs "
                          "from their last epoch." + _long_run_progress(key)]
        lines.append("")
    lines.append("Per-layer histograms and SSE: `benchmarks/results/psg_weights/index.html`.")
    return lines


def qat_section(res: dict) -> list[str]:
    models = [m for m in MODELS if m in res]
    lines = ["## QAT: LSQ and STE fake quantization vs PTQ", "",
             "Command: `python benchmarks/qat_train.py`. Fine-tuned from the FP checkpoints: "
             "ResNet-20 on the 10,000-image CIFAR-10 training batch in ../shared, the PSG "
             "ResNet-32 on CIFAR-100. First / last layer at 8 bits. Compressed CPU schedules "
             "(epochs in the table): SGD momentum 0.9, lr 0.01 cosine, weight decay 1e-4 "
             "(2.5e-5 at 2 bits), batch 128, crop (padded as the checkpoint was trained) and "
             "flip. Top-1 % on the full 10k test set. "
             "Variants: `lsq` / `qat` the paper settings; `+kd` distillation from the float "
             "model with lr 0.002 and half the epochs; `+mse` every LSQ step starting at its "
             "least quantization MSE (`lsq_init: mse`, the recipe `lsq-w4a4-finetune`); `+bn` "
             "the float BN statistics kept (lr 0.001, a third of the epochs); `3x` three times "
             "the `+kd` epochs, `lr 0.01` at the paper's lr; `long` and `30 ep` the `+kd+mse` "
             "run for 30 epochs, evaluated every 5 (issue 19's long schedules; `--runs "
             "benchmarks/long_runs`: resumable across sessions). STE QAT's min-max "
             "weight range at 2 bits has the levels 0 and +-max|w| per channel, so most weights "
             "fall on 0.", "",
             *_header("setting", (MODELS[m] for m in models))]

    def cell(r, m):
        return f"{r['top1']:.2f}" + ("†" if _other_pad(r, m) else "") + (
            f" ({len(r['epochs'])} ep)" if "epochs" in r else "")
    return lines + _table(res, models, cell) + _pad_legend(res, models) + \
        _lsq_target_notes(res, models)


def _lsq_target_notes(res: dict, models: list[str]) -> list[str]:
    """The best LSQ W4A4 run per model against FP (target: within 1 point)."""
    notes = []
    for m in models:
        runs = {k: r for k, r in res[m].items() if k.startswith("W4A4 lsq")}
        if not runs:
            continue
        label, best = max(runs.items(), key=lambda kv: kv[1]["top1"])
        gap = res[m]["FP32"]["top1"] - best["top1"]
        notes.append(f"- {MODELS[m]}: best LSQ W4A4 `{label[5:]}` {best['top1']:.2f}, "
                     f"{gap:.2f} below FP (target: within 1 point: "
                     f"{'met' if gap <= 1 else 'not met'}).")
        for label, r in runs.items():
            base = label.rsplit(" seed ", 1)[0]
            if base != label and base in runs:
                tops = (runs[base]["top1"], r["top1"])
                mean_gap = res[m]["FP32"]["top1"] - sum(tops) / 2
                notes.append(f"  - `{base[5:]}` with seeds {runs[base]['train']['seed']} and "
                             f"{r['train']['seed']}: {tops[0]:.2f} / {tops[1]:.2f}; seeds "
                             f"alone move it by {abs(tops[0] - tops[1]):.2f}; the mean is "
                             f"{mean_gap:.2f} below FP.")
    return ["", *notes] if notes else []


def compress_section(res: dict, qat: dict, bn: dict) -> list[str]:
    """The compression table, with LSQ / STE QAT / PTQ at similar bits from qat_train below."""
    res = {m: {**rows, **{f"{label} (qat_train)": r for label, r in qat.get(m, {}).items()
                          if label != "FP32"}}
           for m, rows in res.items() if m in MODELS}
    models = [m for m in MODELS if m in res]
    lines = ["## Weight sharing and binary / ternary networks", "",
             "Command: `python benchmarks/compress_train.py`. Fine-tuned from the FP checkpoints "
             "(ResNet-20 on the 10,000-image CIFAR-10 batch, the PSG ResNet-32 on CIFAR-100) "
             "with the same budget per model (epochs in the table), Adam with cosine decay, "
             "crop (padded as the checkpoint was trained) and flip; "
             "first and last layer at 8 bits. Top-1 % on the full 10k test set; size in KiB as "
             "stored (codes, codebooks and scales; k-means also with Huffman-coded indices).", "",
             *_header("method", (MODELS[m] for m in models))]

    def cell(r, m):
        notes = [f"{r['bytes'] / 1024:.0f} KiB"] if "bytes" in r else []
        if r.get("huffman_bytes"):
            notes.append(f"Huffman {r['huffman_bytes'] / 1024:.0f}")
        if "epochs" in r:
            notes.append(f"{len(r['epochs'])} ep")
        top1 = f"{r['top1']:.2f}" + ("†" if _other_pad(r, m) else "")
        return f"{top1} ({', '.join(notes)})" if notes else top1
    return lines + _table(res, models, cell) + _pad_legend(res, models) + \
        _padding_notes(res, models, bn) + \
        _compress_notes(res.get("resnet20", {})) + _codebook_notes(res, models) + \
        _binary_activation_notes(res, models)


def _padding_notes(res: dict, models: list[str], bn: dict) -> list[str]:
    """What the crop padding does to BN statistics alone (bn_padding.py), and the rows trained
    again with the checkpoint's own padding (their first, other-padded result)."""
    notes = []
    for m in models:
        if m not in bn:
            continue
        own = bn[m]["checkpoint padding"]
        other = "zero" if own == "reflection" else "reflection"
        notes.append(
            f"- Crop padding, {MODELS[m]} (trained on {own}-padded crops): re-estimating its "
            f"BatchNorm statistics over {bn['meta']['steps']} training batches with no weight "
            f"changed (`{bn['meta']['command']}`) moves FP {bn[m]['FP32']:.2f} to "
            f"{bn[m]['none']:.2f} without augmentation, {bn[m][f'{own}-padded crop + flip']:.2f} "
            f"on {own}-padded crops and {bn[m][f'{other}-padded crop + flip']:.2f} on "
            f"{other}-padded ones. Every fine-tuning run re-estimates these statistics, so "
            "the padding bounds what any method can reach.")
        again = [(label, r) for label, r in res[m].items()
                 if "reflect_pad" in r.get("superseded", {}).get("train", {})]
        if again:
            notes.append(
                f"- {MODELS[m]} rows trained again with the checkpoint's own padding (first "
                "result with the other padding -> now): " + "; ".join(
                    f"{label} {r['superseded']['top1']:.2f} -> {r['top1']:.2f}"
                    for label, r in again) + ".")
    return ["", *notes] if notes else []


def _codebook_notes(res: dict, models: list[str]) -> list[str]:
    """Per-layer against per-channel k-means codebooks at 4 bits, where both were run."""
    notes = []
    for m in models:
        r = res[m]
        labels = ("k-means 4-bit", "k-means 4-bit per-channel")
        if not all(k in r and f"{k}, no fine-tuning" in r for k in labels):
            continue
        fp = r["FP32"]["top1"]
        layer, channel = (r[k] for k in labels)
        gaps = {k: fp - r[k]["top1"] for k in r if k.startswith("k-means 4-bit")}
        tuned = [k for k in gaps if not k.endswith("no fine-tuning")]
        best = min(tuned, key=gaps.get)
        apart = abs(min(gaps[k] for k in tuned if "per-channel" in k)
                    - min(gaps[k] for k in tuned if "per-channel" not in k))
        notes.append(
            f"- {MODELS[m]}, k-means 4-bit: one codebook per layer is "
            f"{gaps[labels[0] + ', no fine-tuning']:.2f} below FP before fine-tuning "
            f"and {gaps[labels[0]]:.2f} after; one codebook per output channel "
            f"{gaps[labels[1] + ', no fine-tuning']:.2f} before and {gaps[labels[1]]:.2f} after. "
            f"Best fine-tuned: `{best}`, {gaps[best]:.2f} below FP (target: within 0.5: "
            f"{'met' if gaps[best] <= 0.5 else 'not met'}). With this budget fine-tuning "
            "recovers "
            f"{gaps[labels[0] + ', no fine-tuning'] - gaps[labels[0]]:.2f} points from layer "
            "codebooks and "
            f"{gaps[labels[1] + ', no fine-tuning'] - gaps[labels[1]]:.2f} from channel ones: "
            f"after fine-tuning the best of each are {apart:.2f} apart, so the channels' head "
            "start is nearly used up. Channel codebooks cost "
            f"{(channel['bytes'] - layer['bytes']) / 1024:.0f} KiB more "
            f"({channel['bytes'] / 1024:.0f} against {layer['bytes'] / 1024:.0f} KiB): 16 "
            "float32 centroids per channel weigh almost as much as the 4-bit indices of a "
            "16-channel 3x3 layer.")
    return ["", *notes] if notes else []


def _compress_notes(r: dict) -> list[str]:
    """What the ResNet-20 rows say against the literature, with their numbers."""
    top = {k: v["top1"] for k, v in r.items()}
    notes = []
    if {"bc", "bwn"} <= top.keys():
        notes.append(
            f"- BinaryConnect ({top['bc']:.2f}) matches BWN ({top['bwn']:.2f}), unlike XNOR-Net's "
            "AlexNet table where BWN's alpha is worth 21 points: here every binary convolution "
            "feeds a BatchNorm, which absorbs a per-filter scale, so both train the same "
            "function class and differ only in their updates.")
        train = [e["train_top1"] for e in r["bwn"]["epochs"]]
        if len(train) >= 2:
            notes.append(
                f"- BWN is {r['FP32']['top1'] - top['bwn']:.2f} below FP, where the literature "
                "has it close to FP after full training: its training accuracy was still "
                f"rising ({train[-2]:.1f}% -> {train[-1]:.1f}% over the last two epochs) and "
                "stays below the float model's test accuracy: this budget under-trains it "
                "(whether full training closes the gap is not measured here).")
    if {"ttq", "twn", "ttq t=0.1"} <= top.keys() and all(
            "start" in r[k] for k in ("ttq", "twn", "ttq t=0.1")):
        start = {k: r[k]["start"] for k in ("ttq", "twn", "ttq t=0.1")}
        notes.append(
            f"- TTQ at the paper's threshold t = 0.05 ({top['ttq']:.2f}) is below TWN "
            f"({top['twn']:.2f}): 0.05 max|W| zeroes {start['ttq']['zero_share']:.0%} of these "
            f"weights against TWN's {start['twn']['zero_share']:.0%} and starts further from the "
            f"float weights (relative squared error {start['ttq']['weight_error']:.3f} against "
            f"{start['twn']['weight_error']:.3f}). At t = 0.1, which zeroes "
            f"{start['ttq t=0.1']['zero_share']:.0%} (error "
            f"{start['ttq t=0.1']['weight_error']:.3f}), TTQ reaches {top['ttq t=0.1']:.2f}: with "
            "this short budget the ternary methods are ordered by their starting error, and "
            "TTQ's learned scales do not make up the difference.")
    if {"xnor", "bnn", "bwn"} <= top.keys():
        last = {k: r[k]["epochs"][-1]["train_top1"] for k in ("xnor", "bnn")}
        notes.append(
            f"- Binary activations cost the most, as in the literature: XNOR-Net {top['xnor']:.2f} "
            f"and BNN {top['bnn']:.2f} against BWN {top['bwn']:.2f} (training accuracy "
            f"{last['xnor']:.1f}% / {last['bnn']:.1f}% in the last of "
            f"{len(r['xnor']['epochs'])} epochs: they need far longer training than this "
            "budget). XNOR-Net does not beat BNN here, unlike its AlexNet table: the BatchNorm "
            "after each binary convolution absorbs alpha (as BC = BWN shows), which leaves the "
            "K map as the only difference, and Bethge et al. 2019 (\"Back to Simplicity\") "
            "likewise find scaling factors not crucial once BatchNorm is used; XNOR-Net's "
            "reference code drops K altogether.")
    return ["", *notes] if notes else []


def _binary_activation_notes(res: dict, models: list[str]) -> list[str]:
    """Where a model's binary-activation runs are still near chance, say how near."""
    notes = []
    for m in models:
        r = res[m]
        if not {"xnor", "bnn", "bwn"} <= r.keys():
            continue
        last = {k: r[k]["epochs"][-1] for k in ("xnor", "bnn")}
        if max(e["train_top1"] for e in last.values()) > 20:
            continue
        notes.append(
            f"- {MODELS[m]}: after {len(r['xnor']['epochs'])} epoch(s), XNOR-Net "
            f"({r['xnor']['top1']:.2f}) and BNN ({r['bnn']['top1']:.2f}) are still close to "
            f"chance, far below BWN ({r['bwn']['top1']:.2f}): binarizing every activation of "
            "the float network destroys its features, and their mean training loss over the "
            f"last epoch is "
            f"{last['xnor']['train_loss']:.2f} / {last['bnn']['train_loss']:.2f} where a uniform "
            f"guess scores ln {CLASSES[m]} = {math.log(CLASSES[m]):.2f}: at this budget the two "
            "cannot be ordered.")
        longer = {k: r[f"{k}, 3x budget"] for k in ("xnor", "bnn") if f"{k}, 3x budget" in r}
        for k, row in longer.items():
            curve = " -> ".join(f"{e['train_top1']:.1f}%" for e in row["epochs"])
            notes.append(
                f"  - {k.upper()} with three times the budget ({len(row['epochs'])} epochs): "
                f"{row['top1']:.2f}, training accuracy {curve}.")
        if len(longer) == 2:
            gain = {k: longer[k]["top1"] - r[k]["top1"] for k in longer}
            climbing = all(e[-1]["train_top1"] > e[-2]["train_top1"]
                           for e in (row["epochs"] for row in longer.values()))
            notes.append(
                f"  - Tripling the budget lifts XNOR-Net by {gain['xnor']:.2f} and BNN by "
                f"{gain['bnn']:.2f} points"
                + (" and both are still climbing" if climbing else "")
                + ": the K map does not separate them here either, as on ResNet-20.")
    return ["", *notes] if notes else []


def packed_section(res: dict) -> list[str]:
    lines = ["## Packed files: real size", "",
             f"Command: `{res['meta']['command']}` at commit `{res['meta']['commit']}`. PTQ "
             "(min-max, per-channel weights, first / last layer at 8 bits), exported with "
             "`lowbit export`; ideal = code bits + qparams + every float tensor at 32 bits "
             "(target: file within 2% + 16 KiB of it); reloaded with `lowbit.load_packed` and "
             "compared with the fake-quant model on 64 test images. k-means, ternary, binary "
             "and LSQ rows are the methods' quantizers prepared on the float weights (the size "
             "does not depend on fine-tuning).", "",
             "| model | setting | FP32 KiB | ideal KiB | file KiB | file / ideal | bit-identical |",
             "|---|---|---|---|---|---|---|"]
    for model, rows in res.items():
        if model == "meta":
            continue
        fp = rows["FP32"]["bytes"]
        for label, r in rows.items():
            if label == "FP32":
                continue
            lines.append(f"| {model} | {label} | {fp / 1024:.1f} | {r['ideal_bytes'] / 1024:.1f} "
                         f"| {r['file_bytes'] / 1024:.1f} | "
                         f"{r['file_bytes'] / r['ideal_bytes']:.3f} | {r['bit_identical']} |")
    return lines


def cost_section(res: dict) -> list[str]:
    lines = ["## Training-step cost", "",
             f"Command: `{res['meta']['command']}`. One SGD step on a batch of 128, methods "
             "interleaved round by round in one process; median step time as a ratio to the "
             "float step (targets: STE and LSQ <= 1.5, PSG <= 1.1). The run shared the machine "
             "with three training / PTQ benchmarks; interleaving exposes every method to the "
             "same load, but absolute seconds are inflated.", "",
             "| model | threads | FP step s | STE QAT | LSQ | PSG |", "|---|---|---|---|---|---|"]
    for model, rows in res.items():
        if model == "meta":
            continue
        for threads, r in rows.items():
            ratio = r["ratio"]
            lines.append(f"| {model} | {threads.split('=')[1]} | {r['fp_step_seconds']:.2f} | "
                         f"{ratio['qat']:.2f} | {ratio['lsq']:.2f} | {ratio['psg']:.2f} |")
    return lines


def agreement_section(res: dict) -> list[str]:
    meta = res["meta"]
    lines = ["## Deployment: integer engine, onnxruntime, OpenVINO and XNNPACK against the "
             "simulation", "",
             f"Command: `{meta['command']}` (last at commit `{meta['commit']}`"
             + (f", {meta['cpu']}" if "cpu" in meta else "") + "), full "
             "CIFAR-10 test set. The integer engine (`lowbit.deploy.IntegerEngine`) runs int32 "
             "accumulators and fixed-point requantization; onnxruntime and OpenVINO run lowbit's "
             "QDQ export (float residual adds, as the simulation). Logit differences are in 8-bit "
             "output steps (the simulation's logit range / 255). \"int8 layers\" is the share of "
             "conv / linear layers OpenVINO's execution graph ran in u8 / i8: it needs symmetric "
             "weights (zero point 0), so the W8A8 row (asymmetric per-channel min-max weights) "
             "runs dequantized in f32, and the int8 deploy recipe (symmetric 7-bit weights) in "
             "int8. \"vs float64\": top-1 agreement with the same simulation run in float64; the "
             "\"float32 simulation\" row is the float32 simulation's own distance to it, the "
             "noise floor of a float32 reference (a float32 sum that lands an activation on the "
             "other side of a rounding boundary changes its code, and the change propagates). "
             "\"xnnpack\" is ExecuTorch's XNNPACK running the fully quantized lowering "
             "(`lowbit.deploy.executorch_runtime`; every tensor an integer, free grids calibrated "
             "on 256 training images), compared with that lowering's own simulation; it runs "
             "only 8-bit activations with symmetric weights, and the settings it refuses say why. "
             "Targets: top-1 agreement >= 99.9% (ResNet-20, W8A8 and W4A4), each runtime's "
             "top-1 within 0.1 of the simulation.", "",
             "| model | setting | runtime | simulation top-1 | runtime top-1 | top-1 agreement % "
             "| vs float64 % | images within one step % | max diff (steps) | int8 layers | commit |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for model, settings in res.items():
        if model == "meta":
            continue
        for setting, engines in settings.items():
            for engine, r in engines.items():
                if "refused" in r:
                    lines.append(f"| {model} | {setting} | {engine} | refused: {r['refused']} "
                                 f"|||||||`{r['commit']}` |")
                    continue
                counts = r.get("precisions")
                share = "-" if counts is None else "{}/{}".format(
                    sum(n for c in counts.values() for p, n in c.items() if p in ("u8", "i8")),
                    sum(sum(c.values()) for c in counts.values()))
                vs64 = f"{r['vs_float64']['top1_agreement']:.2f}" if "vs_float64" in r else "-"
                lines.append(f"| {model} | {setting} | {engine} | {r['top1_reference']:.2f} | "
                             f"{r['top1']:.2f} | {r['top1_agreement']:.2f} | {vs64} | "
                             f"{r['within_one_step']:.1f} | {r['max_logit_diff_steps']:.1f} | "
                             f"{share} | `{r.get('commit', meta['commit'])}` |")
    return lines


def any_cnn_section(res: dict) -> list[str]:
    meta = res["meta"]
    pairs = ("engine vs simulation", "onnxruntime vs simulation", "onnxruntime vs engine",
             "engine vs float64 simulation", "onnxruntime vs float64 simulation",
             "float32 vs float64 simulation")
    lines = ["## Deployment on torchvision architectures (fully quantized)", "",
             "Commands: " + ", ".join(f"`{c}` ({size})" for size, c in meta["commands"].items())
             + f"; last at commit `{meta['commit']}`, {meta['cpu']}. Each "
             "model is torchvision's own definition, trained here from scratch on the 10,000 "
             "CIFAR-10 training images of `../shared` (4 epochs unless the row names more; no "
             "ImageNet weights can be downloaded), then quantized by PTQ (W8A8 or W4A8, first / last layer 8-bit) and "
             "lowered once (`lowbit.deploy.lower` with calibration: every tensor an integer). "
             "The simulation, the integer engine and onnxruntime all read that lowering. "
             "Compared on 1,000 CIFAR-10 test images at 32 px (rows \"at 224 px\": 50 test images "
             "resized to 224 px, batch-norm statistics re-estimated at that size): top-1 agreement % / largest logit "
             "difference in 8-bit output steps (the reference's logit range / 255). The float64 "
             "simulation is the exact simulation: the same graph in double precision on the "
             "model's own weight codes and integer biases (`Lowering.simulation(torch.float64)`). "
             "The engine's integer sums are exact, so from commit `53917cc` on it matches that "
             "one code for code (0.0 steps); the float32 simulation's own distance to it is the "
             "noise floor of any float32 comparison (a float32 sum that lands a value on the "
             "other side of a rounding boundary changes its code, and the change spreads layer by "
             "layer). Rows before `53917cc` re-rounded the weights in float64 and kept the "
             "float32 bias, which moved near-tie codes: their float64 columns understate every "
             "agreement. Target: >= 99.9% agreement.", "",
             "| model | weights | FP top-1 | " + " | ".join(pairs) +
             " | export s | ONNX KiB | packed KiB | float KiB | commit |",
             "|---|---|---|" + "---|" * len(pairs) + "---|---|---|---|---|"]
    for model, rows in res.items():
        if model == "meta":
            continue
        for bits, r in rows.items():
            cells = [f"{r[p]['top1_agreement']:.1f} / {r[p]['max_logit_diff_steps']:.1f}"
                     if p in r else "-" for p in pairs]
            lines.append(f"| {model} | {bits} | {r['fp_top1']:.1f} | " + " | ".join(cells) +
                         f" | {r['export_seconds']:.1f} | {r['onnx_bytes'] / 1024:.0f} | "
                         f"{r['packed_bytes'] / 1024:.0f} | {r['float_bytes'] / 1024:.0f} | "
                         f"`{r.get('commit', meta['commit'])}` |")
    return lines


def calib_memory_section(res: dict) -> list[str]:
    meta = res["meta"]
    lines = ["## Streaming calibration at 224 px: peak memory and time", "",
             "Commands: " + ", ".join(f"`{c}`" for c in meta["commands"]) +
             f"; commit `{meta['commit']}`, {meta['cpu']}, {meta['threads']} thread. torchvision "
             "models at 224 px, random weights with batch-norm statistics settled on random "
             "images, calibrated on N seeded random images made batch by batch (64 per batch), "
             f"activation cache budget {meta['calib_memory']} (`--calib-memory`, spilled to a "
             "temporary file beyond it). Peak RSS is the process high-water mark (`ru_maxrss`, one "
             "process per run). \"minmax\" is W4A4 min-max; \"best\" is `ptq-w4a4-best` "
             "(per-channel activations, ACIQ, bit allocation, CLE, MSE weights, empirical bias "
             "correction); \"adaround\" is `ptq-w4a4-adaround` "
             f"with {meta['adaround_iters']} steps per layer. Rows from `d8e4778` on ran beside a "
             "training run at nice 19, so their seconds are an upper bound. Before streaming (one batch), "
             "ResNet-18 min-max needed 1.08 GB at 64 images and 2.59 GB at 256, growing by about "
             "6 MB per image (issue 15). With streaming, memory grows only until the cache "
             "reaches the budget, then stays flat. Rows marked `767cc36` ran from the uncommitted "
             "working tree that was committed as `6004069` (the first streaming commit).", "",
             "| model | recipe | images | peak RSS GB | seconds | spilled | commit |",
             "|---|---|---|---|---|---|---|"]
    for model, rows in res.items():
        if model == "meta":
            continue
        for label, r in sorted(rows.items(), key=lambda kv: (kv[0].split()[0], kv[1]["images"])):
            spilled = next((n.split(", ")[-1].split(" of ")[0] for n in r["notes"]
                            if "spilled" in n), "-")
            lines.append(f"| {model} | {label.split()[0]} | {r['images']} | "
                         f"{r['peak_rss_gb']:.2f} | {r['seconds']:.0f} | {spilled} | "
                         f"`{r['commit']}` |")
    return lines


def mobilenet_section(res: dict) -> list[str]:
    """The MobileNetV2 CIFAR-100 PTQ table (benchmarks/mobilenet_ptq.py) and its targets."""
    meta, rows = res["meta"], res["mobilenet_v2_cifar_050"]
    fp = rows["FP32"]["top1"]
    source = rows["FP32"]["source"]
    lines = ["## MobileNetV2 on CIFAR-100: lowbit PTQ against every peer", "",
             f"Commands: `{meta['train_command']}` (the float model, out of git), "
             f"`{meta['command']}`; {meta['cpu']}, {meta['threads']} thread. torchvision's "
             "MobileNetV2 layout at width 0.5 with a CIFAR stem (`mobilenet_v2_cifar_050`), "
             f"trained here by `lowbit train --method fp`; float model: {source}"
             + ("" if source == "model.pt" else " (training unfinished: these rows only try the "
                "pipeline; they are not the table's figures)") +
             ". Calibration: the same 1,024 seeded training images for every tool; top-1 on "
             + (f"the first {meta['limit']:,}" if meta.get("limit") else "all 10,000") +
             " test images; first conv and classifier at 8 bits. Peers: PyTorch FX (histogram "
             "observers), onnxruntime `quantize_static` (percentile; entropy with 2,048 bins), "
             "Brevitas's PTQ pipeline (CLE + bias correction + MSE), NNCF `nncf.quantize` run in "
             "OpenVINO (int8 only: its PTQ has no 4-bit activations).", "",
             "| setting | tool | top-1 | vs FP | calibration s | commit |", "|---|---|---|---|---|---|"]
    order = ["FP32", "W8A8", "W7A8", "W4A8", "W4A4", "W3A3", "W2A4"]
    ranked = sorted(rows.items(), key=lambda kv: (order.index(kv[0].split()[0]),
                                                   " lowbit " not in kv[0]))
    for label, r in ranked:
        bits, _, tool = label.partition(" ")
        lines.append(f"| {bits if tool else '-'} | {tool or label} | {r['top1']:.2f} | "
                     f"{r['top1'] - fp:+.2f} | {r['calib_seconds']:.0f} | `{r['commit']}` |")

    def best(prefix: str, lowbit: bool) -> list[float]:
        return [r["top1"] for k, r in rows.items()
                if k.startswith(prefix) and (" lowbit " in k) == lowbit]
    w8a8, w4a8 = best("W8A8 lowbit ptq-w8a8", True), best("W4A8 lowbit", True)
    ours, peers = best("W4A4", True), best("W4A4", False)
    checks = []
    if w8a8:
        checks.append(f"W8A8 per-tensor within 0.5 of FP: {w8a8[0] - fp:+.2f}")
    if w4a8:
        checks.append(f"W4A8 within 2.0: {max(w4a8) - fp:+.2f}")
    if ours and peers:
        checks.append(f"every lowbit W4A4 row ahead of the best peer W4A4 ({max(peers):.2f}): "
                      f"worst lowbit W4A4 {min(ours):.2f}")
    return lines + ["", "Targets: " + "; ".join(checks) + "."] if checks else lines


def runtime_speed_section(res: dict) -> list[str]:
    """Images/s per runner (benchmarks/runtime_speed.py) with the issue-16 target ratios."""
    meta = res["meta"]
    commands = list(dict.fromkeys(row.get("command", meta["command"])
                                  for model, row in res.items() if model != "meta"))
    lines = ["## CPU runtimes on real model sizes", "",
             f"Commands: {', '.join(f'`{c}`' for c in commands)}, best of {meta['rounds']} "
             "interleaved rounds, training paused. Each cell: images/s (x FP32 eager in the same "
             "rounds). ResNet-20: "
             "the trained CIFAR-10 checkpoint, top-1 on the full test set; torchvision models at "
             "224 px with random weights (speed only). lowbit int8 is `ptq-int8-deploy` "
             "(symmetric 7-bit weights, uint8 activations) exported fully quantized; \"int8 "
             "layers\" counts the conv / linear layers OpenVINO's execution graph ran in u8 / i8. "
             "OpenVINO compiles a static-shape model per batch size (from commit `3ee8180`; "
             "before, one dynamic-batch model). \"lowbit int8 "
             "(xnnpack)\" runs the same lowering on ExecuTorch's XNNPACK "
             "(`lowbit.deploy.executorch_runtime`). \"Compute\": the "
             "network's multiply-accumulates per image, the microseconds per image that OpenVINO's "
             "execution graph spends in its convolutions at batch 1, one thread (its PERF_COUNT "
             "counters), and the MAC rates that gives and that the fastest peer's whole run "
             "reaches. Targets: lowbit int8 (the fastest of its onnxruntime, OpenVINO and "
             "XNNPACK runs) "
             ">= 1.2x the fastest of PyTorch int8 (FX, PT2E, ExecuTorch) and onnxruntime "
             "`quantize_static`; lowbit in OpenVINO within 5% of NNCF in OpenVINO.", ""]
    pytorch_peers = ("pytorch fx int8", "pytorch pt2e int8 (inductor)", "executorch int8 (xnnpack)",
                     "onnxruntime qdq int8")
    for model, row in res.items():
        if model == "meta":
            continue
        settings = list(row["timing"])
        names = list(dict.fromkeys(n for t in row["timing"].values() for n in t))
        top1 = row.get("top1", {})
        lines += [f"**{model}** ({'x'.join(map(str, row['input']))}; {row['cpu']}; commit "
                  f"`{row['commit']}`)", "",
                  "| runner | " + " | ".join(settings) + (" | top-1 |" if top1 else " |"),
                  "|---" * (len(settings) + 1 + bool(top1)) + "|"]
        for name in names:
            cells = []
            for setting in settings:
                t = row["timing"][setting]
                cells.append(f"{t[name]:.0f} ({t[name] / t['fp32 eager']:.2f}x)" if name in t
                             else "-")
            extra = f" | {top1[name]:.2f}" if top1 and name in top1 else (" | -" if top1 else "")
            lines.append(f"| {name} | " + " | ".join(cells) + extra + " |")
        checks = []
        for setting in settings:
            t = row["timing"][setting]
            peers = [t[n] for n in pytorch_peers if n in t]
            if "lowbit int8" in t and peers:
                fastest = max(t.get(n, 0) for n in ("lowbit int8", "lowbit int8 (openvino)",
                                                     "lowbit int8 (xnnpack)"))
                part = f"{setting}: lowbit / fastest peer {fastest / max(peers):.2f}x"
                if "nncf int8 (openvino)" in t and "lowbit int8 (openvino)" in t:
                    part += (f", lowbit / NNCF in OpenVINO "
                             f"{t['lowbit int8 (openvino)'] / t['nncf int8 (openvino)']:.2f}x")
                checks.append(part)
        compute = ""
        if "openvino_us_batch1" in row and "threads=1 batch=1" in row["timing"]:
            t, macs = row["timing"]["threads=1 batch=1"], row["macs"]
            conv = sum(us for kind, us in row["openvino_us_batch1"].items() if "onv" in kind)
            total = sum(row["openvino_us_batch1"].values())
            peer = max((n for n in pytorch_peers if n in t), key=lambda n: t[n])
            compute = (
                f"Compute: {macs / 1e6:.1f} M MACs per image; at batch 1, one thread, OpenVINO "
                f"spends {conv:.0f} of its {total:.0f} us per image in convolutions "
                f"({macs / conv / 1e3:.0f} GMAC/s); the fastest peer there ({peer}) runs the "
                f"whole network at {macs * t[peer] / 1e9:.0f} GMAC/s, so 1.2x it needs "
                f"{1.2 * macs * t[peer] / 1e9:.0f} GMAC/s.")
        precisions = row.get("precisions", {})
        layers = [f"{n} {sum(v for c in pr.values() for k, v in c.items() if k in ('u8', 'i8'))}"
                  f"/{sum(sum(c.values()) for c in pr.values())}" for n, pr in precisions.items()]
        lines += ["", "Ratios: " + "; ".join(checks) + "." if checks else "", compute,
                  "int8 layers: " + ", ".join(layers) + "." if layers else ""]
        if row.get("left_out"):
            lines.append("Left out (the peer failed on this model): " + "; ".join(
                f"{name}: {why}" for name, why in row["left_out"].items()) + ".")
        if "w4a8_bytes" in row:
            b = row["w4a8_bytes"]
            lines.append("W4A8 file sizes: " + ", ".join(f"{k} {v / 1024:.0f} KiB"
                                                         for k, v in b.items()) + ".")
        lines.append("")
    return lines


def matrix_section(res: dict) -> list[str]:
    meta = res["meta"]
    archs = [a for a in res if a != "meta"]
    methods = list(dict.fromkeys(m for a in archs for m in res[a]))

    def mark(r: dict) -> str:
        if r["method"] != "ok":
            return "refused"
        paths = [p for p in ("packed", "onnx", "engine", "xnor_kernel") if r.get(p) == "ok"]
        return "+".join({"packed": "P", "onnx": "O", "engine": "E", "xnor_kernel": "X"}[p]
                        for p in paths) or "none"

    lines = ["## Every method on every architecture", "",
             f"Command: `{meta['command']}` at commit `{meta['commit']}`, {meta['cpu']}. Each "
             f"cell: the deploy paths that accepted the model after the method ran on "
             f"{meta['images']} CIFAR-10 images (one epoch for training methods; AdaRound at "
             f"{meta['round_iters']} steps per layer): P packed file reloaded bit-identical, O "
             "ONNX in onnxruntime (fully quantized), E integer engine, X XNOR-popcount kernel. A "
             "path missing from a cell refused the model with a one-line reason (in the JSON): "
             "sign inputs (BNN, XNOR), TTQ's two scales and k-means codebooks have no QDQ form; "
             "float inputs (W4A32 PSG, BC / BWN / TWN) and per-channel activations (Banner) no "
             "integer engine."]
    reruns = {a: {r.get("commit") for r in res[a].values()} - {meta["commit"]} for a in archs}
    reruns = {a: c for a, c in reruns.items() if c}
    if reruns:
        lines[-1] += " Cells rerun at later commits (`--archs`, `--methods`): " + ", ".join(
            f"{a} at {', '.join(f'`{c}`' for c in sorted(c))}" for a, c in reruns.items()) + "."
    lines += ["", "| method | " + " | ".join(archs) + " |", "|---|" + "---|" * len(archs)]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(mark(res[a][m]) if m in res[a] else "-"
                                              for a in archs) + " |")
    notes = sorted({n for a in archs for r in res[a].values() for n in r.get("notes", [])})
    if notes:
        lines += ["", "Kept at higher precision by policy:", ""] + [f"- {n}" for n in notes[:12]]
    return lines


def infer_section(res: dict) -> list[str]:
    top1 = res["top1"]
    lines = ["## Inference speed (int8)", "",
             f"Command: `{res['meta']['command']}` at commit `{res['meta']['commit']}` "
             f"({res['model']}, lowbit recipe `{res['recipe']}`, machine `{res['machine']}`, "
             "other benchmarks paused). Images/s, best of 5 interleaved rounds, and the ratio "
             "to FP32 eager in the same rounds; top-1 on the full CIFAR-10 test set "
             f"(lowbit's simulation: {top1['lowbit simulation']:.2f}%).", "",
             "| runner | top-1 | " + " | ".join(res["timing"]) + " |",
             "|---|---|" + "---|" * len(res["timing"])]
    for name in top1:
        if name == "lowbit simulation":
            continue
        cells = []
        for timing in res["timing"].values():
            cells.append(f"{timing[name]:.0f} ({timing[name] / timing['fp32 eager']:.2f}x)")
        lines.append(f"| {name} | {top1[name]:.2f} | " + " | ".join(cells) + " |")
    return lines


def xnor_section(res: dict) -> list[str]:
    meta, agree = res["meta"], res["agreement"]
    paths = list(next(iter(res["gemm"].values()))["paths_s"]) if res["gemm"] else []
    lines = ["## XNOR-popcount inference", "",
             f"Command: `{meta['command']}` at commit `{meta['commit']}`, {meta['cpu']}, "
             f"{meta['threads']} thread, compiled kernel: {meta['compiled_kernel']} (the network "
             f"ran its `{meta['kernel_path']}` path). Binary GEMM: the kernel on each vector "
             "path this CPU has (float epilogue included) against PyTorch's FP32 matmul, best "
             "of interleaved rounds. Targets (issue 17): GEMM >= 4x FP32 on AVX2, >= 6x on "
             "AVX-512; the XNOR ResNet-20 >= 1.5x lowbit's int8 (the faster of its onnxruntime "
             "and OpenVINO runs) at batch 128 and batch 1. \"xnor popcount\" has each "
             "convolution's BatchNorm, residual add and the next binary layer's packed input "
             "fused into the kernel's epilogue; \"unfused\" runs them as separate modules; "
             "\"no K\" is the fused network without XNOR-Net's K (`input_scale: false`), whose "
             "block-internal convolutions write their signs from integer thresholds."
             + (f" {meta['paused_training_runs']} training runs were paused (SIGSTOP) while "
                "timing." if meta.get("paused_training_runs") else ""), "",
             "| binary GEMM (pixels x K bits x outputs) | FP32 matmul ms | " +
             " | ".join(f"{p} ms (x FP32)" for p in paths) + " |",
             "|---|---|" + "---|" * len(paths)]
    for shape, r in res["gemm"].items():
        lines.append(f"| {shape} | {1e3 * r['fp32_s']:.2f} | " + " | ".join(
            f"{1e3 * r['paths_s'][p]:.2f} ({r['fp32_s'] / r['paths_s'][p]:.1f}x)"
            for p in paths) + " |")
    for key in ("network_batch128", "network_batch1"):
        net = res[key]
        base = max(v for name, v in net.items() if name.startswith("lowbit int8"))
        lines += ["", f"| ResNet-20, batch {key.removeprefix('network_batch')} | images/s | "
                  "vs the faster lowbit int8 (target for XNOR: 1.5x) |", "|---|---|---|"]
        for name, value in net.items():
            lines.append(f"| {name} | {value:.0f} | {value / base:.2f}x |")
    lines += ["", f"The deployed XNOR network against its float simulation on 128 test images: "
              f"max |difference| {agree['max_abs_diff']:.2g} (logit range "
              f"{agree['logit_range']:.1f}), same top-1: {agree['top1_equal']}."]
    for key in ("breakdown_batch128", "breakdown_batch1"):
        if key in res:
            parts = [(name, ms) for name, ms in res[key].items() if ms >= 0.01][:8]
            lines += ["", f"Where a fused forward's time goes, batch "
                      f"{key.removeprefix('breakdown_batch')} (cProfile, ms per forward; "
                      "popcount convolutions: pack, im2col, GEMM and epilogue with their Python "
                      "call; `python`: the rest of the interpreter's own time): " +
                      ", ".join(f"{name} {ms:.2f}" for name, ms in parts) + "."]
    int8 = res["network_batch128"].get("lowbit int8 (openvino)")
    if int8:
        macs = 40.6e6  # ResNet-20's multiply-accumulates per image
        lines += ["", f"Why the network target is out of reach here: OpenVINO's int8 ResNet-20 "
                  f"runs {int8:.0f} images/s at batch 128, {macs * int8 / 1e9:.0f} GMAC/s on one "
                  "core, about what VNNI's 64 int8 MACs per 512-bit instruction allow. "
                  "VPOPCNTDQ does 512 binary MACs per XNOR-AND-popcount-add, but "
                  "XNOR-Net's K (a float per output pixel) makes every output a float "
                  "(`dot * alpha * K + b`, BatchNorm, the residual, then the sign and |.| "
                  "for the next K: about 18 vector instructions per 8 outputs, more than "
                  "int8's requantization), and at ResNet-20's 144-576-bit receptive fields "
                  "that epilogue costs as much as the popcounts. Since the outputs must stay "
                  "bit-identical to the float simulation, no algebra may fold it into an "
                  "integer threshold. Without K (the \"no K\" row) one exists: the float "
                  "epilogue then takes only the 2 x 9C + 1 integer dots, so evaluating it at "
                  "every one gives the exact edge where each channel's sign flips; but only "
                  "the block-internal convolutions can use it, the real-valued residual "
                  "stream keeps a float epilogue on the others, and the network gains "
                  "about a tenth."]
    return lines


def mixed_precision_section(res: dict) -> list[str]:
    """Uniform widths against mixed precision at the same packed size (mixed_precision.py)."""
    meta = res.get("meta", {})
    lines = ["## Mixed precision under a size budget", "",
             f"Command: `{meta.get('command', 'python benchmarks/mixed_precision.py')}` "
             f"({meta.get('machine', '?')}, {meta.get('threads', '?')} thread). The best PTQ "
             "recipe (`ptq-w4a4-best`, 4-bit activations, first / last layer 8-bit; 2-bit "
             "weights with mean bias correction) at one weight width everywhere, and with the "
             "widths per layer chosen under `size_budget` = a uniform file's size (and the "
             "sizes half-way, and 1% above uniform W2's, whose own size the prediction's 256-byte "
             "margin puts out of reach). Sizes are the real packed files; full test sets. "
             "Targets: at the W3A4 size, mixed >= uniform W4A4 - 0.5 (ResNet-20, ResNet-32) and "
             ">= uniform W3A4 + 2 (PSG ResNet-32); prediction within 1% of the file; search "
             "(sensitivity + solve) under 30 s for ResNet-20. \"hessian\" is the layer's "
             "quantization error weighted by the exact Gauss-Newton trace of the loss Hessian "
             "(one backward pass per class; these ReLU networks are piecewise linear, so it "
             "applies), \"output\" the measured logit KL of quantizing that layer alone. Times "
             "ran beside other jobs: upper bounds. Plots: "
             "`benchmarks/results/mixed_precision_<model>.png`.",
             "", "| model | row | packed KiB | predicted (error) | within budget | top-1 | weight "
             "widths (layers) | PTQ s |", "|---|---|---|---|---|---|---|---|"]
    summary = []
    for model, rows in res.items():
        if model in ("meta", "search_cost") or model.endswith(" lsq"):
            continue
        for label, r in sorted(rows.items(), key=lambda kv: kv[1].get("bytes", 0)):
            if "error" in r:
                lines.append(f"| {model} | {label} | - | - | refused: {r['error']} | - | - | - |")
                continue
            widths = _width_counts(r["bits"])
            predicted = (f"{r['predicted_bytes'] / 1024:.1f} "
                         f"({100 * (r['predicted_bytes'] - r['bytes']) / r['bytes']:+.2f}%)"
                         if "predicted_bytes" in r else "-")
            budget = r["config"].get("size_budget")
            within = "-" if budget is None else ("yes" if r["bytes"] <= int(budget) else
                                                 f"no (+{r['bytes'] - int(budget)} B)")
            lines.append(f"| {model} | {label} | {r['bytes'] / 1024:.1f} | {predicted} | "
                         f"{within} | {r['top1']:.2f} | {widths} | "
                         f"{r['quantize_seconds']:.0f} |")
        w3, w4 = rows.get("uniform W3A4"), rows.get("uniform W4A4")
        if w3 and w4:
            at_w3 = [r for label, r in rows.items() if label.startswith("mixed") and
                     "error" not in r and r["config"].get("size_budget") == w3["bytes"]]
            for r in at_w3:
                summary.append(f"- {model}, {r['estimator']} at the W3A4 size: {r['top1']:.2f} "
                               f"against uniform W3A4 {w3['top1']:.2f} ({r['top1'] - w3['top1']:+.2f})"
                               f" and uniform W4A4 {w4['top1']:.2f} ({r['top1'] - w4['top1']:+.2f})")
        summary += _frontier_check(model, rows)
    lines += ["", "At the size of uniform W3A4, and the frontier against every uniform point:",
              ""] + summary if summary else []
    for recipe, command in meta.get("other_recipes", {}).items():
        lines += ["", f"Rows `<model> {recipe}`: `{command}` (the same comparison with that "
                  "recipe for every row, uniform and mixed)."]
    lines += _lsq_rows(res)
    cost = res.get("search_cost", {})
    if cost:
        lines += ["", "Search cost (sensitivity + solve, excluding calibration; "
                  "`python benchmarks/mixed_precision.py --search-cost`, idle machine):", "",
                  "| model | threads | hessian s | output s | commit |", "|---|---|---|---|---|"]
        for model, r in cost.items():
            lines.append(f"| {model} | {r['threads']} | {r.get('hessian', 0):.1f} | "
                         f"{r.get('output', 0):.1f} | {r['commit']} |")
    return lines


def _width_counts(bits: dict) -> str:
    """``{layer: w_bits}`` as "width: layers, ...", narrowest first."""
    return ", ".join(f"{b}: {n}" for b, n in sorted(Counter(bits.values()).items()))


def _frontier_check(model: str, rows: dict) -> list[str]:
    """Whether each estimator's mixed model beats the uniform point whose size is its budget
    (the target: the curve lies above every uniform point)."""
    uniform = {r["bytes"]: (label, r["top1"]) for label, r in rows.items()
               if label.startswith("uniform")}
    lines = []
    for estimator in ("hessian", "output"):
        below = []
        for label, r in rows.items():
            budget = r.get("config", {}).get("size_budget")
            if (label.startswith(f"mixed {estimator}") and "error" not in r
                    and budget in uniform and uniform[budget][1] > r["top1"]):
                below.append(f"{uniform[budget][0]} ({r['top1']:.2f} < {uniform[budget][1]:.2f})")
        if any(label.startswith(f"mixed {estimator}") for label in rows):
            lines.append(f"- {model}, {estimator}: " + (
                "at or above every uniform point it was budgeted at" if not below else
                "below " + ", ".join(below)))
    return lines


def _lsq_rows(res: dict) -> list[str]:
    """LSQ fine-tuned uniform and mixed plans (``mixed_precision.py --lsq``)."""
    lines = []
    for model, rows in res.items():
        if not model.endswith(" lsq"):
            continue
        name = model.removesuffix(" lsq")
        epochs = next(iter(rows.values()))["train"]["epochs"]
        lines += ["", f"LSQ fine-tuning of {name} (`python benchmarks/mixed_precision.py "
                  f"--models {name} --lsq`: recipe `lsq-w4a4-finetune`, {epochs} epochs, "
                  "per-tensor weight steps, so the files are smaller than the PTQ ones; the "
                  "mixed rows fine-tune the output estimator's plans at the PTQ budget named, "
                  "via `lowbit train --plan`):", "",
                  "| plan | packed KiB | top-1 | weight widths (layers) |", "|---|---|---|---|"]
        for label, r in sorted(rows.items(), key=lambda kv: kv[1]["bytes"]):
            widths = _width_counts(r["bits"])
            lines.append(f"| {label} | {r['bytes'] / 1024:.1f} | {r['top1']:.2f} | {widths} |")
        uniform = sorted((r["bytes"], r["top1"]) for label, r in rows.items()
                         if label.startswith("uniform"))
        lines.append("")
        for label, r in rows.items():
            if not label.startswith("mixed"):
                continue
            # the uniform curve at this file's size, linear between neighbouring points
            left = max((u for u in uniform if u[0] <= r["bytes"]), default=None)
            right = min((u for u in uniform if u[0] >= r["bytes"]), default=None)
            if left and right and right[0] > left[0]:
                at = left[1] + (right[1] - left[1]) * (r["bytes"] - left[0]) / (right[0] - left[0])
                lines.append(f"- {label}: {r['top1']:.2f} at {r['bytes'] / 1024:.1f} KiB against "
                             f"the uniform line's {at:.2f} there ({r['top1'] - at:+.2f})")
    return lines


def deep_compression_section(res: dict) -> list[str]:
    """Prune + k-means + Huffman, stage by stage, as Deep Compression's Table 1
    (deep_compression.py)."""
    meta = res.get("meta", {})
    lines = ["## Deep Compression: pruning, k-means and Huffman coding, stage by stage", "",
             f"Command: `{meta.get('command', 'python benchmarks/deep_compression.py')}` "
             f"({meta.get('machine', '?')}, {meta.get('threads', '?')} thread). Magnitude "
             "pruning and k-means weight sharing (first / last layer at 8 bits), centroids "
             "fine-tuned on the 10,000-image CIFAR-10 batch (Adam 1e-4, cosine), then the "
             "codes Huffman-coded (`lowbit export --entropy huffman`: DEFLATE's Huffman-only "
             "coder; pruned weights by relative index where smaller). Every size is the real "
             "packed file, and every top-1 is the model reloaded from that file (full test "
             "set). Ratio: float32 parameters and buffers over the file. Pruning and clustering "
             "share one fine-tuning run (the paper retrains after each).", "",
             "| model | stage | file KiB | ratio vs FP32 | top-1 | codings |",
             "|---|---|---|---|---|---|"]
    for model, rows in res.items():
        if model == "meta":
            continue
        settings = rows.get("settings", {})
        for label, r in rows.items():
            if not isinstance(r, dict) or "bytes" not in r:
                continue
            stage = label if label == "FP32" else \
                f"{label} (prune {settings.get('prune')}, {settings.get('w_bits')}-bit" + (
                    f", {settings.get('epochs')} epochs)" if "fine-tuned" in label else ")")
            lines.append(f"| {model} | {stage} | {r['bytes'] / 1024:.1f} | {r['ratio']:.1f}x | "
                         f"{r['top1']:.2f} | {', '.join(r.get('codings', ['-']))} |")
    return lines


def binary_recipe_section(res: dict) -> list[str]:
    """The modern binary recipe, one ingredient per row (benchmarks/binary_recipe.py)."""
    meta = res.get("meta", {})
    lines = ["## Binary networks: the modern recipe, ingredient by ingredient", "",
             f"Command: `{meta.get('command', 'python benchmarks/binary_recipe.py')}` "
             f"({meta.get('machine', '?')}, {meta.get('threads', '?')} threads). XNOR-Net "
             "weights and activations (first / last layer 8-bit) trained from the float "
             "checkpoint; every row adds one ingredient to the row above it, at the same budget "
             "(Adam, lr 1e-3, no weight decay, batch 128, cosine). Full 10k test set. Targets "
             "(issue 17): ResNet-20 / CIFAR-10 >= 80%, ResNet-32 / CIFAR-100 >= 55%.", "",
             "| model | row | epochs | top-1 | train top-1 (last epoch) | size KiB | commit |",
             "|---|---|---|---|---|---|---|"]
    curves = []
    for model, rows in res.items():
        if model == "meta":
            continue
        for label, r in rows.items():
            last = r["epochs"][-1]
            lines.append(f"| {model} | {label.rsplit(', ', 1)[0]} | {len(r['epochs'])} | "
                         f"{r['top1']:.2f} | {last['train_top1']:.1f} | {r['bytes'] / 1024:.0f} "
                         f"| {r.get('commit', '-')} |")
            tested = [f"{e['test_top1']:.1f}" for e in r["epochs"] if "test_top1" in e]
            curves.append(f"- {model}, {label}: test top-1 by epoch {' / '.join(tested)}")
    return lines + ["", "Training curves:", ""] + curves


def train_speed_section(res: dict) -> list[str]:
    modes = list(next(iter(res["methods"].values())))
    lines = ["## Training step: eager, channels_last, torch.compile", "",
             f"`{res['command']}` (commit {res['commit']}, {res['machine']}, "
             f"{res['threads']} thread). The engine's whole step (augmentation, forward, "
             f"backward, SGD update, method hooks) on the PSG ResNet-32, batch {res['batch']}; "
             "median seconds per step after 3 warm-up steps, the modes interleaved round by "
             "round; speed-up against eager in the same run. First step: the extra time of the "
             "first step (compilation; inductor's on-disk cache was warm from an earlier run "
             "for fp, so a first compile on a new machine takes longer). " +
             (f"Taken with {res['training_paused']} long training runs paused (SIGSTOP, "
              "`benchmarks/pause.py`)." if res.get("training_paused") else
              "Taken before the long runs' pause mechanism existed (`benchmarks/pause.py`); "
              "rerun with training paused to refresh."), ""]
    lines += _header("method", modes)
    for method, rows in res["methods"].items():
        lines.append(_row(method, [f"{r['seconds_per_step']:.2f} s ({r['speedup']:.2f}x; first "
                                   f"step +{r['compile_seconds']:.0f} s)"
                                   for r in rows.values()]))
    return lines


def safety_section(res: dict) -> list[str]:
    mutations = ["truncation", "byte flips", "header field", "state tensor"]
    lines = ["## Loading files safely: the mutation campaign", "",
             f"`{res['command']}` (commit {res['commit']}, {res['seconds']:.0f} s). Real files "
             "of each format, mutated as a hostile author would (truncation at and around every "
             "section boundary; 1-6 random byte flips; one header field replaced by an "
             "arbitrary value or removed, with the checksum / CRC rewritten to match; a state "
             "tensor replaced by one of another shape or dtype), each loaded through the API. "
             "Cells: loaded identical / refused with a LowbitError / anything else (another "
             "exception, a hang, a different model).", ""]
    lines += _header("format (bytes)", mutations)
    total = {"identical": 0, "refused": 0, "other": 0}
    for kind, rows in res["formats"].items():
        cells = []
        for m in mutations:
            c = rows.get(m)
            cells.append("-" if c is None else
                         f"{c.get('identical', 0)} / {c.get('refused', 0)} / {c.get('other', 0)}")
            for key in total:
                total[key] += (c or {}).get(key, 0)
        lines.append(_row(f"{kind} ({rows['bytes']:,})", cells))
    lines += ["", f"{sum(total.values()):,} files: {total['identical']:,} loaded identical, "
              f"{total['refused']:,} refused, {total['other']} anything else. Peak RSS grew "
              f"{res['rss_growth_mib']:.0f} MiB over the whole campaign. A byte-flip set that "
              "loads identical leaves the bytes lowbit reads unchanged (hypothesis often draws the "
              "same flip twice, which cancels)."]
    return lines


def main():
    ablation, peers, speed = _load("ptq_ablation"), _load("ptq_peers"), _load("ptq_speed")
    psg, qat, cost = _load("psg_train"), _load("qat_train"), _load("train_cost")
    psg_rate = _load("psg_rate")
    compress, packed = _load("compress_train"), _load("packed_size")
    agreement, infer = _load("deploy_agreement"), _load("bench_infer")
    xnor, bn_padding = _load("xnor_speed"), _load("bn_padding")
    safety, train_speed = _load("file_safety"), _load("train_speed")
    any_cnn, matrix = _load("deploy_any_cnn"), _load("method_matrix")
    calib_memory, mobilenet = _load("calib_memory"), _load("mobilenet_ptq")
    runtime_speed, binary_recipe = _load("runtime_speed"), _load("binary_recipe")
    mixed_precision, deep_compression = _load("mixed_precision"), _load("deep_compression")
    lines = ["# lowbit benchmarks", "",
             "Generated by `python benchmarks/make_tables.py` from `benchmarks/results/*.json`. "
             "Machine: the project's 2-vCPU x86-64 box, PyTorch 2.13.0 CPU; its CPU changes between "
             "sessions (AVX-512 with or without VNNI, or AVX2 only), so sections name the CPU "
             "they ran on where their JSON records it.", ""]
    for section in ((targets_section(ablation) if ablation else []),
                    (ablation_section(ablation) if ablation else []),
                    (peers_section(peers, ablation) if peers else []),
                    (speed_section(speed) if speed else []),
                    (calib_memory_section(calib_memory) if len(calib_memory) > 1 else []),
                    (mobilenet_section(mobilenet) if mobilenet.get("mobilenet_v2_cifar_050")
                     else []),
                    (psg_section(psg, psg_rate) if psg else []), (qat_section(qat) if qat else []),
                    (compress_section(compress, qat, bn_padding) if compress else []),
                    (mixed_precision_section(mixed_precision) if len(mixed_precision) > 1
                     else []),
                    (deep_compression_section(deep_compression) if len(deep_compression) > 1
                     else []),
                    (binary_recipe_section(binary_recipe) if len(binary_recipe) > 1 else []),
                    (cost_section(cost) if cost else []),
                    (train_speed_section(train_speed) if train_speed else []),
                    (packed_section(packed) if packed else []),
                    (agreement_section(agreement) if agreement.get("resnet20") else []),
                    (any_cnn_section(any_cnn) if len(any_cnn) > 1 else []),
                    (matrix_section(matrix) if len(matrix) > 1 else []),
                    (infer_section(infer) if infer else []),
                    (runtime_speed_section(runtime_speed) if len(runtime_speed) > 1 else []),
                    (xnor_section(xnor) if xnor else []),
                    (safety_section(safety) if safety else [])):
        if section:
            lines += section + [""]
    (ROOT / "BENCHMARKS.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
