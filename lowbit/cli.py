"""Command line: ``lowbit demo | eval | quantize | train | export | plot-weights | recipes``.

User mistakes (``LowbitError``) print one line on stderr and exit 2; nothing already written is
touched, because every output is written to a temporary name and renamed at the end.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lowbit.errors import ConfigError, LowbitError


def _bits_or_none(text: str):
    if text.lower() in ("none", "off", "fp", "32"):
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer number of bits or 'none', got {text!r}")


def _add_data_args(p, model_required=True):
    p.add_argument("--model", required=model_required,
                   help="registry name (resnet20, resnet32, psg_resnet32, vgg16_bn, ...) "
                        "or package.module:factory (with a lowbit checkpoint: allows the model "
                        "code it names to run)")
    p.add_argument("--checkpoint", help="weights file (torch.load weights_only) or lowbit checkpoint")
    p.add_argument("--data", required=True, help="cifar10=PATH, cifar100=PATH, mnist=PATH, "
                                                  "folder=PATH or digits")
    p.add_argument("--limit", type=int, help="evaluate on the first N test images only")
    p.add_argument("--batch-size", type=int, default=500)
    _add_folder_args(p)


def _add_folder_args(p):
    p.add_argument("--input-size", type=int, help="folder=PATH: resize the shorter side to "
                   "SIZE/0.875 and center-crop SIZE x SIZE (torchvision's evaluation transform)")
    p.add_argument("--workers", type=int, help="folder=PATH: image-decoding processes (up to 4)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lowbit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train a small CNN on the embedded digits and quantize it")
    demo.add_argument("--out", default="reports/demo")
    demo.add_argument("--epochs", type=int, default=30)
    demo.add_argument("--seed", type=int, default=0)

    ev = sub.add_parser("eval", help="top-1 accuracy of a float or quantized checkpoint")
    _add_data_args(ev, model_required=False)
    ev.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    ev.add_argument("--runtime", choices=["onnxruntime", "openvino"],
                    help="for an .onnx file: the runtime that runs it (default onnxruntime; an "
                         "OpenVINO .xml always runs in OpenVINO)")
    ev.add_argument("--threads", type=int, help="the runtime's threads for .onnx / .xml (1)")

    q = sub.add_parser("quantize", help="post-training quantization (Banner et al. 2019 and more)")
    _add_data_args(q)
    q.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where calibration, "
                   "AdaRound and evaluation run (default cpu); quantized.pt is saved for the CPU")
    q.add_argument("--out", required=True, help="folder for report.json, report.md, quantized.pt")
    q.add_argument("--recipe", help="packaged recipe name or YAML path; flags below override it")
    q.add_argument("--w-bits", type=int)
    q.add_argument("--a-bits", type=_bits_or_none, default=argparse.SUPPRESS,
                   help="activation bits, or 'none' to keep activations in float")
    q.add_argument("--clip", help="activation range: minmax, ema, percentile, mse, aciq-laplace, "
                                  "aciq-gauss, bn (data-free, beta + 6 gamma of the feeding BN)")
    q.add_argument("--w-clip", help="weight range: minmax, percentile, mse")
    q.add_argument("--percentile", type=float)
    q.add_argument("--bit-alloc", action="store_true", help="per-channel bit allocation of "
                   "weights and activations (activations become per-channel)")
    q.add_argument("--w-bit-alloc", action="store_true")
    q.add_argument("--a-bit-alloc", action="store_true")
    q.add_argument("--a-per-channel", action="store_true")
    q.add_argument("--w-symmetric", action="store_true")
    q.add_argument("--bias-correction", nargs="?", const="mean",
                   help="weight bias correction: mean (default) or mean_std")
    q.add_argument("--empirical-bias-correction", action="store_true",
                   help="match each layer's mean output to the float model on calibration data")
    q.add_argument("--equalize", action="store_true", help="cross-layer equalization (DFQ)")
    q.add_argument("--adaround", nargs="?", type=int, const=1000, metavar="ITERS",
                   help="learn the weight rounding (AdaRound), ITERS steps per layer (1000); "
                        "replaces the recipe's weight bias correction")
    q.add_argument("--no-fold-bn", action="store_true")
    q.add_argument("--calib", type=int, help="calibration images drawn from the training split")
    q.add_argument("--calib-batch-size", type=int,
                   help="images per calibration batch (64); the result does not depend on it")
    q.add_argument("--calib-memory", help="memory for cached activations during calibration "
                   "(2GiB); beyond it they are spilled to a temporary file (TMPDIR)")
    q.add_argument("--first-last-bits", type=_bits_or_none, default=argparse.SUPPRESS,
                   help="bits of the first and last layer (default 8), or 'none' for the target")
    q.add_argument("--skip", action="append", help="layer name or regex left in float (repeatable)")
    q.add_argument("--seed", type=int)
    q.add_argument("--size-budget", help="mixed precision: the packed file's size, e.g. 120KiB "
                   "(bits per layer chosen by sensitivity, lowbit export writes that size)")
    q.add_argument("--avg-bits", type=float, help="mixed precision: mean weight width")
    q.add_argument("--bops-budget", type=float, help="mixed precision: bit operations per "
                   "image, sum of MACs x weight bits x input bits")
    q.add_argument("--size-entropy", choices=["huffman"], help="mixed precision: --size-budget "
                   "counts the Huffman-coded file (lowbit export --entropy huffman)")
    q.add_argument("--sensitivity", help="mixed precision estimator: hessian (HAWQ-V2 trace, "
                   "default) or output (measured logit KL)")

    t = sub.add_parser("train", help="train or fine-tune: float, STE QAT, LSQ, PSG, k-means, "
                                     "binary / ternary (resumable; torchrun for data parallelism)")
    _add_data_args(t)
    t.add_argument("--out", required=True, help="run folder: checkpoint.pt, metrics, report.json, "
                                                "model.pt")
    t.add_argument("--method", default="fp", help="fp, qat, lsq, psg, kmeans, bc, bc-stochastic, "
                                                   "bnn, bwn, xnor, twn or ttq")
    t.add_argument("--recipe", help="YAML with 'method', method keys and a 'train' mapping; "
                                    "flags override it")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--plan", help="qat / lsq: fine-tune the per-layer widths of a mixed-precision "
                                  "`lowbit quantize` report.json")
    t.add_argument("--w-bits", type=int)
    t.add_argument("--a-bits", type=_bits_or_none, default=argparse.SUPPRESS)
    t.add_argument("--lambda-s", type=float, help="PSG gradient scale (150)")
    t.add_argument("--sparse", action="store_true", help="PSG towards 0 (sparse training)")
    t.add_argument("--epochs", type=int)
    t.add_argument("--train-batch-size", type=int, help="training batch (128)")
    t.add_argument("--lr", type=float)
    t.add_argument("--optimizer", help="sgd or adam")
    t.add_argument("--schedule", help="cosine, multistep or constant")
    t.add_argument("--milestones", type=lambda s: [int(v) for v in s.split(",")],
                   help="comma-separated epoch counts: multistep decays there, cosine restarts")
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--distill", action="store_true", help="knowledge distillation from the FP model")
    t.add_argument("--no-augment", action="store_true")
    pad = t.add_mutually_exclusive_group()
    pad.add_argument("--reflect-pad", action="store_true", help="reflection padding for the crop "
                     "(default for models trained that way: psg_resnet32)")
    pad.add_argument("--zero-pad", action="store_true", help="zero padding for the crop (default "
                     "for the other models)")
    t.add_argument("--train-limit", type=int, help="train on N seeded training images")
    t.add_argument("--seed", type=int)
    t.add_argument("--device", help="cpu or cuda")
    t.add_argument("--threads", type=int, help="torch CPU threads")
    t.add_argument("--compile", action="store_true", help="compile the training step with "
                   "torch.compile (eager, with a warning, where it fails)")
    t.add_argument("--channels-last", action="store_true", help="NHWC memory order for "
                   "weights and inputs")

    ex = sub.add_parser("export", help="write a quantized checkpoint as a packed file (codes at "
                                       "their real width; lowbit.load_packed reads it) or as a "
                                       "QDQ ONNX model checked in onnxruntime")
    ex.add_argument("--checkpoint", required=True, help="quantized.pt from lowbit quantize, or "
                                                        "model.pt from lowbit train")
    ex.add_argument("--format", default="lowbit", choices=["lowbit", "onnx", "openvino"],
                    help="lowbit: packed file; onnx: QDQ ONNX; openvino: OpenVINO IR (.xml + "
                         ".bin) of the same QDQ graph")
    ex.add_argument("--out", required=True, help="the file to write, e.g. model.lowbit")
    ex.add_argument("--entropy", choices=["huffman"], help="packed file: Huffman-code the weight "
                    "codes (pruned k-means weights sparse, by relative index, where smaller)")
    ex.add_argument("--input-shape", help="C,H,W of one input for ONNX (default: the model's)")
    ex.add_argument("--model", help="the package.module:factory the checkpoint names, to allow "
                                    "running that model code (registry and torchvision models "
                                    "need no flag)")
    ex.add_argument("--data", help="with --format onnx: export fully quantized (every tensor an "
                                   "integer, as integer runtimes need), calibrated on this "
                                   "dataset's training images")
    ex.add_argument("--calib", type=int, default=256, help="calibration images for --data (256)")
    ex.add_argument("--int8-weights", action="store_true", help="onnx / openvino: store <= 4-bit "
                    "weight codes as int8, so int8 runtimes run them on their int8 kernels")
    _add_folder_args(ex)

    pw = sub.add_parser("plot-weights", help="per-layer weight histograms of models on the "
                                             "quantization grid (PNG + HTML)")
    pw.add_argument("--model", required=True)
    pw.add_argument("--checkpoints", nargs="+", required=True, metavar="[LABEL=]PATH",
                    help="one or more weight files, e.g. sgd=a.pth psgd=b.pth")
    pw.add_argument("--w-bits", type=int, default=4)
    pw.add_argument("--out", required=True)

    bi = sub.add_parser("bench-infer", help="images/s of lowbit's int8 model (onnxruntime) against "
                                            "FP32 eager and the int8 peers (PyTorch FX, "
                                            "onnxruntime quantize_static), in one run")
    _add_data_args(bi)
    bi.add_argument("--recipe", default="ptq-int8-deploy", help="lowbit's PTQ recipe")
    bi.add_argument("--threads", default="1", help="comma-separated thread counts, e.g. 1,2")
    bi.add_argument("--batch-sizes", default="1,128")
    bi.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    bi.add_argument("--out", help="also write the results as JSON here")
    bi.add_argument("--runners", help="comma-separated runner names (default: every runner "
                    "whose packages are installed; the fp32 eager baseline is always run)")
    bi.add_argument("--binary", metavar="FILE", help="also time this XNOR-Net or BNN model (its "
                    "packed file or model.pt) on the XNOR-popcount kernel, as 'xnor popcount'")

    sub.add_parser("recipes", help="list the packaged recipes")
    return parser


def _config_from_args(args):
    from lowbit.methods.ptq import PTQConfig
    from lowbit.recipes import read_recipe

    values = read_recipe(args.recipe) if args.recipe else {}
    if values.pop("method", "ptq") != "ptq":
        raise ConfigError("lowbit quantize runs PTQ recipes only")
    flags = {"w_bits": args.w_bits, "clip": args.clip, "w_clip": args.w_clip,
             "percentile": args.percentile, "calib": args.calib, "seed": args.seed,
             "bias_correction": args.bias_correction,
             "calib_batch_size": args.calib_batch_size, "calib_memory": args.calib_memory,
             "size_budget": args.size_budget, "avg_bits": args.avg_bits,
             "bops_budget": args.bops_budget, "sensitivity": args.sensitivity,
             "size_entropy": args.size_entropy}
    values.update({k: v for k, v in flags.items() if v is not None})
    for flag in ("a_bits", "first_last_bits"):  # given on the command line (None = 'none')
        if flag in vars(args):
            values[flag] = vars(args)[flag]
    for flag, key in (("bit_alloc", "w_bit_alloc"), ("bit_alloc", "a_bit_alloc"),
                      ("w_bit_alloc", "w_bit_alloc"), ("a_bit_alloc", "a_bit_alloc"),
                      ("a_per_channel", "a_per_channel"), ("w_symmetric", "w_symmetric"),
                      ("equalize", "equalize"),
                      ("empirical_bias_correction", "empirical_bias_correction")):
        if getattr(args, flag):
            values[key] = True
    if args.bit_alloc and values.get("a_bits", 8) is None:
        values.pop("a_bit_alloc", None)  # --bit-alloc means "whatever is quantized"
    if args.adaround is not None:
        values.update(w_round="adaround", round_iters=args.adaround)
        if args.bias_correction is None:
            values["bias_correction"] = None
    if args.no_fold_bn:
        values["fold_bn"] = False
    if args.skip:
        values["skip"] = list(values.get("skip", [])) + args.skip
    return PTQConfig.from_dict(values)


def _mixed_summary(mixed: dict | None) -> str:
    """report.md's mixed-precision paragraph (empty for one width everywhere)."""
    if not mixed:
        return ""
    budget = ", ".join(f"{k} {v:g}" for k, v in mixed["budget"].items())
    predicted = mixed["predicted"]
    measured = mixed.get("measured_bytes")
    how = mixed["estimator"] + (f", trace by {mixed['trace']}" if "trace" in mixed else "")
    return (f"Mixed precision under {budget} ({how} sensitivity): packed file "
            f"{predicted['size_bytes']} bytes predicted"
            + (f", {measured} measured" if measured is not None else "")
            + f"; mean weight width {predicted['avg_bits']:.2f} bits; "
            f"{predicted['bops'] / 1e9:.3f} G bit operations per image.\n\n")


def _normalization(model_spec: str, dataset, trust_model_code: bool | str = True):
    from lowbit.models import resolve_model

    norm = resolve_model(model_spec, trust_model_code).normalization
    return norm if norm is not None else dataset.normalization()


def _load_lowbit_file(path, dataset, trust):
    """``(model, spec)`` from a packed file, a quantized checkpoint or a ``lowbit train``
    model.pt; None for a file of plain weights."""
    from lowbit.checkpoint import is_quantized_checkpoint, load_quantized
    from lowbit.data import Batches
    from lowbit.deploy.packed import is_packed_file, load_packed
    from lowbit.io import load_torch
    from lowbit.training.run import is_trained_checkpoint, load_trained

    if is_packed_file(path):
        model, payload = load_packed(path, trust_model_code=trust)
        return model, payload["model"]
    payload = load_torch(path)
    if is_quantized_checkpoint(payload):
        model, payload = load_quantized(path, trust_model_code=trust)
        return model, payload["model"]
    if is_trained_checkpoint(payload):
        spec = payload.get("model")
        example = next(iter(Batches(dataset.test, _normalization(spec, dataset, trust), 8)))[0]
        return load_trained(payload, example, path, trust_model_code=trust), spec
    return None


def cmd_eval(args) -> int:
    from lowbit.devices import resolve_device
    from lowbit.data import Batches, load_dataset
    from lowbit.evaluate import evaluate
    from lowbit.models import build_model

    if not args.checkpoint and not args.model:
        raise ConfigError("eval needs --model (with an optional --checkpoint) or a lowbit checkpoint")
    dataset = load_dataset(args.data, args.input_size, args.workers)
    if args.checkpoint and str(args.checkpoint).endswith((".onnx", ".xml")):
        return _eval_onnx(args, dataset)
    trust = args.model or False  # a file's own model code runs only if --model names it
    loaded = _load_lowbit_file(args.checkpoint, dataset, trust) if args.checkpoint else None
    if loaded is not None:
        model, spec = loaded
    else:
        if not args.model:
            raise ConfigError(f"{args.checkpoint} holds plain weights: give --model too")
        spec = args.model
        model = build_model(spec, args.checkpoint)
    model = _on_binary_kernel(model, args.device)
    # the spec was loaded above (registry, torchvision, or trusted), so resolving it is safe
    test = Batches(dataset.test, _normalization(spec, dataset, spec), args.batch_size)
    top1 = evaluate(model.to(resolve_device(args.device)), test, args.limit)
    n = min(len(dataset.test), args.limit or len(dataset.test))
    print(f"top-1 {top1:.2f}% on {n} {dataset.name} test images")
    return 0


def _on_binary_kernel(model, device: str):
    """An XNOR-Net or BNN model with its binary convolutions on the popcount kernel (the same
    outputs as its float form, :func:`lowbit.deploy.deploy_xnor`) when it runs on the CPU."""
    from lowbit.deploy import xnor

    if device != "cpu" or not any(xnor.binary_conv(m) for m in model.modules()):
        return model
    deployed = xnor.deploy_xnor(model)
    count = sum(isinstance(m, xnor.XNORPopcountConv2d) for m in deployed.modules())
    if count:
        path = xnor.kernel_path() if xnor.extension() is not None else "pure-torch"
        print(f"{count} binary layers run on the popcount kernel ({path} path)")
    return deployed


def _binary_runner(path: str, dataset):
    """The XNOR-Net or BNN model in ``path`` (a packed file or a trained model.pt) on the
    popcount kernel, for bench-infer."""
    from lowbit.deploy import xnor

    loaded = _load_lowbit_file(path, dataset, False)
    if loaded is None or not any(xnor.binary_conv(m) for m in loaded[0].modules()):
        raise ConfigError(f"--binary {path} holds no XNOR-Net or BNN model (train one with "
                          "--method xnor or bnn)")
    return _on_binary_kernel(loaded[0], "cpu")


def _eval_onnx(args, dataset) -> int:
    from lowbit.data import Batches
    from lowbit.deploy.onnx_export import OnnxRunner, read_onnx
    from lowbit.evaluate import evaluate

    if not args.model:
        raise ConfigError("an ONNX or OpenVINO file needs --model for its input normalization")
    runtime = args.runtime or ("openvino" if str(args.checkpoint).endswith(".xml")
                               else "onnxruntime")
    if runtime == "openvino":
        from lowbit.deploy.openvino_runtime import OpenVinoRunner

        run = OpenVinoRunner(args.checkpoint, threads=args.threads or 1)
    elif str(args.checkpoint).endswith(".xml"):
        raise ConfigError(f"{args.checkpoint} is OpenVINO IR: use --runtime openvino")
    else:
        run = OnnxRunner(read_onnx(args.checkpoint), threads=args.threads or 1)
    test = Batches(dataset.test, _normalization(args.model, dataset), args.batch_size)
    top1 = evaluate(run, test, args.limit)
    n = min(len(dataset.test), args.limit or len(dataset.test))
    print(f"top-1 {top1:.2f}% on {n} {dataset.name} test images ({runtime})")
    return 0


def cmd_quantize(args) -> int:
    from lowbit.checkpoint import save_quantized
    from lowbit.devices import resolve_device
    from lowbit.data import Batches, load_dataset
    from lowbit.evaluate import evaluate
    from lowbit.io import write_json, write_text
    from lowbit.methods.ptq import quantize
    from lowbit.models import build_model
    from lowbit.report import (float_size_bytes, format_table, layer_stats, markdown_table,
                               quantized_size_bytes)

    config = _config_from_args(args)
    device = resolve_device(args.device)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    dataset = load_dataset(args.data, args.input_size, args.workers)
    model = build_model(args.model, args.checkpoint).to(device)
    norm = _normalization(args.model, dataset)
    calib = Batches(dataset.train.subset(min(config.calib, len(dataset.train)), config.seed), norm,
                    config.calib_batch_size)
    test = Batches(dataset.test, norm, args.batch_size)
    fp_top1 = evaluate(model, test, args.limit, desc="eval fp")
    qmodel = quantize(model, config, calib)
    q_top1 = evaluate(qmodel, test, args.limit, desc="eval quantized")
    qmodel = qmodel.cpu()  # reports and the saved file are the CPU's
    fp_bytes, q_bytes = float_size_bytes(model), quantized_size_bytes(qmodel)
    n = min(len(dataset.test), args.limit or len(dataset.test))
    headers = ["model", "w_bits", "a_bits", "top-1 %", "size KiB", "x smaller"]
    rows = [["fp32", 32, 32, fp_top1, fp_bytes / 1024, 1.0],
            ["quantized", "mixed" if qmodel.lowbit.mixed else config.w_bits,
             config.a_bits or 32, q_top1, q_bytes / 1024,
             fp_bytes / q_bytes]]
    table = format_table(headers, rows)
    info = qmodel.lowbit
    report = {
        "model": args.model, "checkpoint": args.checkpoint, "data": args.data, "test_images": n,
        "fp_top1": fp_top1, "q_top1": q_top1, "w_bits": config.w_bits, "a_bits": config.a_bits,
        "fp_bytes": fp_bytes, "q_bytes": q_bytes, "calibration_seconds": info.calibration_seconds,
        "bn_folded": info.folded, "equalized_pairs": info.equalized_pairs, "notes": info.notes,
        "config": config.to_dict(),
        "plan": {k: {"w_bits": b.w_bits, "a_bits": b.a_bits} for k, b in info.plan.items()},
        "layers": layer_stats(qmodel),
        "mixed_precision": info.mixed,
    }
    layer_rows = [[r["layer"], r["w_bits"], r["a_bits"], r["weight_mse"], r["weight_sqnr_db"]]
                  for r in report["layers"]]
    md = (f"# lowbit quantize: {args.model}\n\n{markdown_table(headers, rows)}\n\n"
          f"Calibration: {config.calib} training images, {info.calibration_seconds:.1f} s. "
          f"Evaluated on {n} test images.\n\n{_mixed_summary(info.mixed)}## Layers\n\n"
          + markdown_table(["layer", "w_bits", "a_bits", "weight MSE", "weight SQNR dB"], layer_rows))
    save_quantized(out / "quantized.pt", qmodel, args.model)
    write_json(out / "report.json", report)
    write_text(out / "report.md", md + "\n")
    print(table)
    print(f"wrote {out / 'report.json'}, {out / 'report.md'}, {out / 'quantized.pt'}")
    return 0


def _training_from_args(args):
    from lowbit.models import model_info
    from lowbit.policy import plan_overrides
    from lowbit.recipes import read_recipe
    from lowbit.training import TrainConfig

    values = read_recipe(args.recipe) if args.recipe else {}
    method = values.pop("method", "fp") if args.method == "fp" else args.method
    train_values = values.pop("train", {}) or {}
    if not isinstance(train_values, dict):
        raise ConfigError("the recipe's 'train' entry must be a mapping of training keys")
    method_flags = {"w_bits": args.w_bits, "lambda_s": args.lambda_s,
                    "sparse": True if args.sparse else None}
    if "a_bits" in vars(args):
        method_flags["a_bits"] = args.a_bits
    values.update({k: v for k, v in method_flags.items() if v is not None or k == "a_bits"})
    if args.plan:
        if method not in PLAN_METHODS:
            raise ConfigError(f"--plan fine-tunes a mixed-precision plan with "
                              f"{' or '.join(PLAN_METHODS)}, not {method}")
        values["overrides"] = {**(values.get("overrides") or {}),
                               **plan_overrides(_read_plan(args.plan))}
    train_flags = {"epochs": args.epochs, "batch_size": args.train_batch_size, "lr": args.lr,
                   "optimizer": args.optimizer, "schedule": args.schedule,
                   "milestones": args.milestones, "weight_decay": args.weight_decay,
                   "seed": args.seed, "device": args.device,
                   "distill": True if args.distill else None,
                   "augment": False if args.no_augment else None,
                   "reflect_pad": True if args.reflect_pad else False if args.zero_pad else None,
                   "compile": True if args.compile else None,
                   "channels_last": True if args.channels_last else None}
    train_values.update({k: v for k, v in train_flags.items() if v is not None})
    train_values.setdefault("reflect_pad", model_info(args.model).reflect_pad)
    return method, values, TrainConfig.from_dict(train_values)


PLAN_METHODS = ("qat", "lsq")  # the methods with per-layer affine widths


def _read_plan(path: str) -> dict:
    """The per-layer ``[w_bits, a_bits]`` of a mixed-precision ``lowbit quantize`` report.json."""
    import json

    try:
        report = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"--plan {path}: no such file") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"--plan {path} is not a JSON report: {e}") from None
    mixed = report.get("mixed_precision") if isinstance(report, dict) else None
    bits = mixed.get("bits") if isinstance(mixed, dict) else None
    if not isinstance(bits, dict) or not bits or not all(
            isinstance(v, list) and len(v) == 2 and isinstance(v[0], int)
            and (v[1] is None or isinstance(v[1], int)) for v in bits.values()):
        raise ConfigError(f"--plan {path} holds no mixed-precision plan (mixed_precision.bits); "
                          "write one with lowbit quantize --size-budget, --avg-bits or "
                          "--bops-budget")
    return bits


def cmd_train(args) -> int:
    import torch

    from lowbit.training.run import run_training

    if args.threads:
        torch.set_num_threads(args.threads)
    method, values, config = _training_from_args(args)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    if not args.resume and (out / "checkpoint.pt").exists():
        raise ConfigError(f"{out} already holds a run: pass --resume to continue it, or "
                          "choose another --out")
    report = run_training(model_spec=args.model, checkpoint=args.checkpoint, data_spec=args.data,
                          method=method, method_values=values, config=config, out=out,
                          resume=args.resume, train_limit=args.train_limit, test_limit=args.limit,
                          input_size=args.input_size, workers=args.workers)
    extra = "".join(f", {k} {v:.2f}%" for k, v in report.items() if k.startswith("ptq_"))
    size = f"{report['bytes'] / 1024:.1f} KiB (float {report['fp_bytes'] / 1024:.1f} KiB" + (
        f", Huffman-coded {report['huffman_bytes'] / 1024:.1f} KiB" if "huffman_bytes" in report
        else "") + ")"
    print(f"{method}: top-1 {report['top1']:.2f}% after {len(report['epochs'])} epochs "
          f"(float {report['fp_top1']:.2f}%{extra}), {size}; wrote {out}")
    return 0


def _input_shape(args, spec: str) -> tuple:
    from lowbit.models import resolve_model

    if args.input_shape:
        try:
            return tuple(int(v) for v in args.input_shape.split(","))
        except ValueError:
            raise ConfigError(f"--input-shape must be C,H,W integers, got {args.input_shape!r}") \
                from None
    shape = resolve_model(spec, args.model or False).input_shape
    if shape is None:
        raise ConfigError(f"model {spec!r} has no known input shape: give --input-shape C,H,W")
    return shape


def cmd_export(args) -> int:
    import torch

    from lowbit.checkpoint import is_quantized_checkpoint, load_quantized
    from lowbit.deploy.packed import export_packed
    from lowbit.io import load_torch
    from lowbit.report import quantized_size_bytes
    from lowbit.training.run import is_trained_checkpoint, load_trained

    trust = args.model or False  # a file's own model code runs only if --model names it
    payload = load_torch(args.checkpoint)
    trained = None
    if is_quantized_checkpoint(payload):
        qmodel, payload = load_quantized(args.checkpoint, trust_model_code=trust)
    elif is_trained_checkpoint(payload):
        if payload.get("method") == "fp":
            raise ConfigError(f"{args.checkpoint} is a float model: quantize it first "
                              "(lowbit quantize), then export the quantized checkpoint")
        shape = _input_shape(args, payload.get("model"))
        qmodel = load_trained(payload, torch.zeros(1, *shape), args.checkpoint,
                              trust_model_code=trust)
        trained = {"method": payload["method"], "method_config": payload["method_config"],
                   "input_shape": list(shape)}
    else:
        raise ConfigError(f"{args.checkpoint} is neither a quantized checkpoint (lowbit quantize) "
                          "nor a trained model (lowbit train's model.pt)")
    if args.format in ("onnx", "openvino"):
        if args.entropy:
            raise ConfigError(f"--entropy codes the packed file (--format lowbit), not "
                              f"{args.format}")
        return _export_onnx(qmodel, payload, args)
    path = export_packed(qmodel, Path(args.out), payload["model"], payload.get("num_classes"),
                         trained=trained, entropy=args.entropy)
    size, ideal = path.stat().st_size, quantized_size_bytes(qmodel)
    coded = ", weight codes Huffman-coded" if args.entropy else ""
    print(f"wrote {path}: {size / 1024:.1f} KiB (ideal {ideal / 1024:.1f} KiB at fixed widths, "
          f"{100 * (size - ideal) / ideal:+.1f}%{coded})")
    return 0


def _export_onnx(qmodel, payload, args) -> int:
    import torch

    from lowbit.deploy.onnx_export import OnnxRunner, export_onnx

    shape = _input_shape(args, payload["model"])
    calib = None
    if args.data:
        from lowbit.data import Batches, load_dataset

        if args.calib < 1:
            raise ConfigError(f"--calib must be a positive number of images, got {args.calib}")
        dataset = load_dataset(args.data, args.input_size, args.workers)
        calib = Batches(dataset.train.subset(min(args.calib, len(dataset.train)), 0),
                        _normalization(payload["model"], dataset, args.model or False), 256)
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
    form = "fully quantized" if calib is not None else "the simulation's QDQ"
    if args.format == "openvino":
        from lowbit.deploy.onnx_export import to_onnx
        from lowbit.deploy.openvino_runtime import OpenVinoRunner, save_openvino

        path = save_openvino(to_onnx(qmodel, (1, *shape), calib=calib,
                                     int8_weights=args.int8_weights), Path(args.out))
        runner = OpenVinoRunner(path)
        size = path.stat().st_size + path.with_suffix(".bin").stat().st_size
        runtime = (f"OpenVINO, {100 * runner.int8_share():.0f}% of its conv / linear layers in "
                   "int8")
    else:
        path = export_onnx(qmodel, Path(args.out), (1, *shape), calib=calib,
                           int8_weights=args.int8_weights)
        runner, size, runtime = OnnxRunner(path), path.stat().st_size, "onnxruntime"
    same = (runner(x).argmax(1) == qmodel(x).argmax(1)).float().mean().item()
    print(f"wrote {path} ({form}): {size / 1024:.1f} KiB, runs in {runtime} "
          f"(top-1 agrees with the simulation on {100 * same:.0f}% of 4 random inputs)")
    return 0


def cmd_plot_weights(args) -> int:
    from lowbit.models import build_model
    from lowbit.quant.psg import check_psg_bits
    from lowbit.report.weights import plot_weights

    check_psg_bits(args.w_bits)
    models = {}
    for item in args.checkpoints:
        label, _, path = item.rpartition("=")
        models[label or Path(path).stem] = build_model(args.model, path)
    page = plot_weights(models, args.w_bits, Path(args.out))
    print(f"wrote {page}")
    return 0


def cmd_recipes(_args) -> int:
    from lowbit.recipes import HERE, recipe_names

    for name in recipe_names():
        first = (HERE / f"{name}.yaml").read_text().splitlines()[0].lstrip("# ")
        print(f"{name:20s} {first}")
    return 0


def cmd_demo(args) -> int:
    from lowbit.demo import run_demo

    run_demo(Path(args.out), epochs=args.epochs, seed=args.seed)
    return 0


def cmd_bench_infer(args) -> int:
    import platform

    import torch

    from lowbit.data import Batches, load_dataset
    from lowbit.deploy.bench import NEEDS, RUNNERS, available_runners, images_per_second, runners
    from lowbit.devices import cpu_threads
    from lowbit.evaluate import evaluate
    from lowbit.io import write_json
    from lowbit.methods.ptq import quantize
    from lowbit.models import build_model
    from lowbit.recipes import load_recipe

    def integers(text, what):
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            values = []
        if not values or min(values) < 1:
            raise ConfigError(f"--{what} must be positive integers separated by commas, got "
                              f"{text!r}")
        return values

    threads, sizes = integers(args.threads, "threads"), integers(args.batch_sizes, "batch-sizes")
    names = available_runners()
    if args.runners:
        asked = ["fp32 eager", *(n.strip() for n in args.runners.split(","))]
        unknown = [n for n in asked if n not in RUNNERS]
        if unknown:
            raise ConfigError(f"unknown runner {unknown[0]!r}; runners: {', '.join(RUNNERS)}")
        missing = [n for n in asked if n not in names]
        if missing:
            raise ConfigError(f"runner {missing[0]!r} needs {' and '.join(NEEDS[missing[0]])}: "
                              f"pip install {' '.join(NEEDS[missing[0]])}")
        names = list(dict.fromkeys(asked))
    config = load_recipe(args.recipe)
    dataset = load_dataset(args.data, args.input_size, args.workers)
    model = build_model(args.model, args.checkpoint).eval()
    norm = _normalization(args.model, dataset)
    calib = Batches(dataset.train.subset(min(config.calib, len(dataset.train)), config.seed),
                    norm, 256)
    test = Batches(dataset.test, norm, args.batch_size)
    binary = _binary_runner(args.binary, dataset) if args.binary else None  # before the PTQ
    qmodel = quantize(model, config, calib)
    example = next(iter(test))[0]
    if len(example) < max(sizes):
        raise ConfigError(f"--batch-size {args.batch_size} is smaller than the largest batch "
                          f"size to time ({max(sizes)})")
    result = {"model": args.model, "recipe": args.recipe, "machine": platform.processor()
              or platform.machine(), "timing": {}, "top1": {}}
    threads = list(dict.fromkeys(cpu_threads(t) for t in threads))  # clamped, with a warning
    for t in threads:
        torch.set_num_threads(t)
        runs = runners(model, qmodel, calib, (1, *example.shape[1:]), t, names)
        if binary is not None:
            runs["xnor popcount"] = binary
        if "precisions" not in result:  # which layers each OpenVINO model really ran in int8
            result["precisions"] = {name: run.precisions() for name, run in runs.items()
                                    if hasattr(run, "precisions")}
            for name, counts in result["precisions"].items():
                print(f"{name}: conv / linear layers by runtime precision {counts}")
        if not result["top1"]:
            result["top1"] = {name: evaluate(run, test, args.limit, desc=name)
                              for name, run in runs.items()}
            result["top1"]["lowbit simulation"] = evaluate(qmodel, test, args.limit)
        for size in sizes:
            speed = images_per_second(runs, example[:size], args.rounds)
            result["timing"][f"threads={t} batch={size}"] = speed
            base = speed["fp32 eager"]
            print(f"threads {t}, batch {size}:")
            for name, value in speed.items():
                print(f"  {name:22s} {value:8.0f} img/s  {value / base:5.2f}x fp32 eager   "
                      f"top-1 {result['top1'][name]:.2f}%")
    n = min(len(dataset.test), args.limit or len(dataset.test))
    print(f"top-1 on {n} test images; lowbit's simulation {result['top1']['lowbit simulation']:.2f}%")
    if args.out:
        write_json(Path(args.out), result)
    return 0


COMMANDS = {"demo": cmd_demo, "eval": cmd_eval, "quantize": cmd_quantize, "train": cmd_train,
            "export": cmd_export, "plot-weights": cmd_plot_weights, "recipes": cmd_recipes,
            "bench-infer": cmd_bench_infer}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except LowbitError as e:
        message = " ".join(str(e).split())  # one line, whatever the message holds
        print(f"lowbit {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lowbit {args.command}: interrupted; no output was overwritten", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
