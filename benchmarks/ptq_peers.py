"""Peer PTQ tools on the same checkpoints, calibration images and first/last-layer policy.

    python benchmarks/ptq_peers.py [--models resnet20,...] [--bits 4,4] [--limit N]

* PyTorch FX PTQ (``torch.ao.quantization``): per-channel symmetric weights, activations with
  MinMaxObserver or HistogramObserver placed by FX at every quantizable op output (residual
  adds included), evaluated as ``convert_to_reference_fx``'s model (the prepared model alone
  leaves weights in float).
* onnxruntime ``quantize_static``: QDQ, per-channel weights, MinMax / Percentile / Entropy
  calibration, int4 weights and uint4 activations (int8 for the first conv and last Gemm via
  TensorQuantOverrides); quantizes every Conv / Gemm / Add output.
* Brevitas (optional ``bench`` extra), its own PTQ pipeline from ``brevitas_examples``, layerwise
  backend (inputs of every Conv / Linear; residual adds stay float, like lowbit), asymmetric
  activations: with symmetric ones Brevitas treats the inputs after the models' functional
  ``F.relu`` as signed and loses about 5 points at W4A4 on ResNet-20 (83.4 vs 88.5, 1,000 images).
Results go to benchmarks/results/ptq_peers.json (resumable).
"""
from __future__ import annotations

import argparse
import importlib
import copy
import json
import tempfile
import time
import warnings
from pathlib import Path

import torch

import lowbit
from ptq_ablation import MODELS_TO_RUN, commit, load_benchmark

RESULTS = Path(__file__).resolve().parent / "results" / "ptq_peers.json"
TOOLS = [("pytorch-fx", "minmax"), ("pytorch-fx", "histogram"), ("onnxruntime", "minmax"),
         ("onnxruntime", "percentile"), ("onnxruntime", "entropy-2048"), ("brevitas", "stats"),
         ("brevitas", "cle+bc"), ("brevitas", "cle+bc+mse")]
TOOLS_SHORT = [("pytorch-fx", "histogram"), ("onnxruntime", "percentile"), ("brevitas", "cle+bc")]
FIRST_LAST = {"resnet20": ("conv1", "linear"), "resnet32": ("conv1", "linear"),
              "psg_resnet32": ("conv1", "fc")}


def torch_fx_ptq(model, calib, w_bits, a_bits, first_last, observer):
    from torch.ao.quantization import (FakeQuantize, HistogramObserver, MinMaxObserver,
                                       PerChannelMinMaxObserver, QConfig, QConfigMapping,
                                       disable_fake_quant, disable_observer, enable_fake_quant)
    from torch.ao.quantization.quantize_fx import convert_to_reference_fx, prepare_fx

    def qconfig(wb, ab):
        obs = HistogramObserver if observer == "histogram" else MinMaxObserver
        act = FakeQuantize.with_args(observer=obs, quant_min=0, quant_max=2**ab - 1,
                                     dtype=torch.quint8, qscheme=torch.per_tensor_affine)
        wt = FakeQuantize.with_args(observer=PerChannelMinMaxObserver, quant_min=-(2 ** (wb - 1)),
                                    quant_max=2 ** (wb - 1) - 1, dtype=torch.qint8,
                                    qscheme=torch.per_channel_symmetric, ch_axis=0)
        return QConfig(activation=act, weight=wt)

    mapping = QConfigMapping().set_global(qconfig(w_bits, a_bits))
    for name in first_last:
        mapping.set_module_name(name, qconfig(8, 8))
    x = torch.cat([b[0] for b in calib])
    prepared = prepare_fx(model.eval(), mapping, (x[:1],))
    prepared.apply(disable_fake_quant)
    with torch.no_grad():
        for chunk in x.split(256):
            prepared(chunk)
    prepared.apply(enable_fake_quant)
    prepared.apply(disable_observer)
    # The prepared (PTQ-flow) model only observes weights; PyTorch applies their quantization at
    # convert time, so evaluate its reference model: float ops on quantized-dequantized weights.
    return convert_to_reference_fx(prepared)


def onnxruntime_ptq(model, calib, w_bits, a_bits, first_last, method):
    import onnx
    import onnxruntime as ort
    # the package's ``quantize`` attribute is a function, so fetch the module by its name
    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)

    tmp = Path(tempfile.mkdtemp())
    x = torch.cat([b[0] for b in calib])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x[:1],), tmp / "fp.onnx", dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
    graph = onnx.load(tmp / "fp.onnx").graph
    convs = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    first, last = convs[0], convs[-1]
    q8, w8 = [{"quant_type": QuantType.QUInt8}], [{"quant_type": QuantType.QInt8}]
    overrides = {first.input[0]: q8, first.input[1]: w8, last.input[0]: q8, last.input[1]: w8}

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": c.numpy()} for c in x.split(64)])

        def get_next(self):
            return next(self.batches, None)

    qtype = {4: (QuantType.QUInt4, QuantType.QInt4), 8: (QuantType.QUInt8, QuantType.QInt8)}
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy-2048": CalibrationMethod.Entropy}
    # The entropy calibrator's defaults (128 histogram bins, 128 quantized bins) leave its KL
    # search a single candidate, the whole range, so it returns min-max ranges; and
    # quantize_static does not pass bin counts through. Give it 2,048 bins (TensorRT's choice)
    # by wrapping the calibrator factory quantize_static calls.
    create = ort_quantize.create_calibrator
    if method == "entropy-2048":
        ort_quantize.create_calibrator = lambda *a, extra_options=None, **k: create(
            *a, extra_options={**(extra_options or {}), "num_bins": 2048}, **k)
    try:
        quantize_static(str(tmp / "fp.onnx"), str(tmp / "q.onnx"), Reader(),
                        quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=qtype[a_bits][0], weight_type=qtype[w_bits][1],
                        calibrate_method=methods[method],
                        extra_options={"TensorQuantOverrides": overrides,
                                       "ActivationSymmetric": False})
    finally:
        ort_quantize.create_calibrator = create
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(str(tmp / "q.onnx"), opts, providers=["CPUExecutionProvider"])

    def run(batch):
        return torch.from_numpy(session.run(None, {"input": batch.numpy()})[0])
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS_TO_RUN))
    ap.add_argument("--bits", default="4,4,4,8",
                    help="pairs w,a,w,a,...; every tool at W4A4, the best of each otherwise")
    ap.add_argument("--limit", type=int)
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    bits = [int(b) for b in args.bits.split(",")]
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results["meta"] = {"commit": commit(), "threads": torch.get_num_threads(), "limit": args.limit,
                       "command": "python benchmarks/ptq_peers.py"}
    for name in args.models.split(","):
        model, calib, test = load_benchmark(name)
        calib = list(calib)
        done = results.setdefault(name, {})
        for w_bits, a_bits in zip(bits[::2], bits[1::2]):
            for tool, variant in TOOLS if (w_bits, a_bits) == (4, 4) else TOOLS_SHORT:
                label = f"W{w_bits}A{a_bits} {tool} {variant}"
                if label in done:
                    continue
                t = time.perf_counter()
                if tool == "pytorch-fx":
                    fn = torch_fx_ptq(model, calib, w_bits, a_bits, FIRST_LAST[name], variant)
                elif tool == "brevitas":
                    fn = brevitas_ptq(model, calib, w_bits, a_bits, variant, FIRST_LAST[name][1],
                                      act_type="asym")
                else:
                    fn = onnxruntime_ptq(model, calib, w_bits, a_bits, FIRST_LAST[name], variant)
                calib_s = time.perf_counter() - t
                top1 = lowbit.evaluate(fn, test, args.limit)
                done[label] = {"top1": top1, "calib_seconds": calib_s, "commit": commit()}
                RESULTS.write_text(json.dumps(results, indent=1))
                print(f"{name:14s} {label:40s} {top1:6.2f}  calib {calib_s:6.1f}s", flush=True)


def _pad_classifier(model, attr: str):
    """Brevitas's example keeps the last layer at 8 bits only if it has 1000 outputs (ImageNet).
    Zero-padding the classifier to 1000 rows changes nothing else (weights are per output row,
    the input quantizer is per tensor); callers slice the logits back. ``attr`` may be a
    dotted path ("classifier.1")."""
    parent_name, _, leaf = attr.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, leaf)
    new = torch.nn.Linear(old.in_features, 1000)
    with torch.no_grad():
        new.weight.zero_()
        new.bias.zero_()
        new.weight[: old.out_features] = old.weight
        new.bias[: old.out_features] = old.bias
    setattr(parent, leaf, new)
    return old.out_features


def brevitas_ptq(model, calib, w_bits, a_bits, variant, last: str, act_type: str = "sym"):
    """Brevitas's own PTQ pipeline (brevitas_examples ptq_common), layerwise backend: inputs of
    every Conv / Linear quantized, residual adds left float. ``variant``: "stats" (percentile
    activations), "cle+bc" (graph equalization + bias correction), "cle+bc+mse" (MSE ranges)."""
    from brevitas.graph.quantize import preprocess_for_quantize
    from brevitas_examples.imagenet_classification.ptq import ptq_common as bx

    bx.tqdm = lambda it, *a, **k: it  # keep the benchmark log readable
    cle = variant != "stats"
    method = "mse" if variant.endswith("mse") else "stats"
    model = copy.deepcopy(model).eval()
    classes = _pad_classifier(model, last)
    prepared = preprocess_for_quantize(model, equalize_iters=20 if cle else 0,
                                       equalize_merge_bias=True, merge_bn=True)
    qmodel = bx.quantize_model(prepared, backend="layerwise", weight_bit_width=w_bits,
                               act_bit_width=a_bits, bias_bit_width=None,
                               weight_quant_granularity="per_channel", act_quant_percentile=99.999,
                               act_quant_type=act_type, scale_factor_type="float_scale",
                               quant_format="int", layerwise_first_last_bit_width=8,
                               weight_param_method=method, act_param_method=method)
    bx.calibrate(calib, qmodel)
    if cle:
        bx.apply_bias_correction(calib, qmodel)
    qmodel.eval()
    return lambda x: qmodel(x)[:, :classes]


if __name__ == "__main__":
    main()
