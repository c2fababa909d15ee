"""Batch-norm folding by graph tracing (torch.fx).

A BN fed by a conv (or linear) whose output has no other user is folded into it:
``W' = W gamma / sqrt(var + eps)``, ``b' = (b - mu) gamma / sqrt(var + eps) + beta``
(Jacob et al. 2018; Banner et al. 2019 fold before quantizing). PyTorch's
``torch.fx.experimental.optimization.fuse`` does exactly this, so lowbit calls it.
"""
from __future__ import annotations

import os
import traceback
import warnings
from pathlib import Path

import torch
from torch import fx, nn
from torch.fx.experimental.optimization import fuse

from lowbit.nn.layers import QUANT_LAYERS


class _Tracer(fx.Tracer):
    """FX's tracer, keeping lowbit's quantized layers whole (one ``call_module`` node each, which
    the deploy backends read) wherever they sit in the model."""

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return isinstance(m, QUANT_LAYERS) or super().is_leaf_module(m, qualified_name)


def trace(model: nn.Module) -> tuple[fx.GraphModule | None, str]:
    """``(graph_module, "")`` or ``(None, reason)`` when the model cannot be traced."""
    if isinstance(model, fx.GraphModule):
        return model, ""
    try:
        tracer = _Tracer()
        graph = tracer.trace(model)
        return fx.GraphModule(tracer.root, graph, type(model).__name__), ""
    except Exception as e:  # fx raises TraceError, TypeError, NotImplementedError, ...
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}{_where(e)}"


def _where(error: Exception) -> str:
    """`` at FILE:LINE (code)``: the model's own line where tracing failed (the last frame
    outside torch), or "" if none."""
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if f"{os.sep}torch{os.sep}" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {Path(f.filename).name}:{f.lineno} ({(f.line or '').strip()[:80]})"


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, str]:
    """Return ``(model with BN folded, "")``; if tracing fails, ``(model, reason)`` unchanged and a
    warning saying it will be quantized unfolded. Modules keep their qualified names."""
    traced, reason = trace(model)
    if traced is None:
        warnings.warn(f"model cannot be traced ({reason}); quantizing it without BN folding",
                      stacklevel=2)
        return model, reason
    with torch.no_grad():
        folded = fuse(traced.eval(), inplace=True, no_trace=True)
    return folded, ""
