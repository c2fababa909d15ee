"""Deployment: from a fake-quant model to real low-bit artefacts: packed files, the integer-only
engine, QDQ ONNX export, the int8 inference benchmark and XNOR-popcount inference. The engine,
the ONNX writer and the fully quantized simulation all read one :func:`lower`-ing of the model."""
from lowbit.deploy.bitpack import pack_bits, pack_rows, unpack_bits, unpack_rows
from lowbit.deploy.integer import IntegerEngine
from lowbit.deploy.lowering import Lowering, lower
from lowbit.deploy.onnx_export import OnnxRunner, export_onnx, to_onnx
from lowbit.deploy.packed import export_packed, load_packed
from lowbit.deploy.xnor import deploy_xnor

__all__ = ["pack_bits", "pack_rows", "unpack_bits", "unpack_rows", "export_packed",
           "load_packed", "IntegerEngine", "OnnxRunner", "export_onnx", "to_onnx",
           "deploy_xnor", "lower", "Lowering"]
