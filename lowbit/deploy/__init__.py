"""Deployment: from a fake-quant model to real low-bit artefacts (packed files; the integer
engine, ONNX export and fast kernels follow)."""
from lowbit.deploy.bitpack import pack_bits, pack_rows, unpack_bits, unpack_rows
from lowbit.deploy.packed import export_packed, load_packed

__all__ = ["pack_bits", "pack_rows", "unpack_bits", "unpack_rows", "export_packed",
           "load_packed"]
