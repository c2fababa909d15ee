"""Per-layer weight histograms of two models on the quantization grid (PSG's figure: weights
trained by SGD spread over the interval, by PSGD they pile up on the grid points), written as
PNG files and one HTML page, and the per-layer quantization error on that grid (the PSG
paper's Table A3 quantity: the sum of squared errors)."""
from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from lowbit.io import atomic_write, write_text  # noqa: E402
from lowbit.quant.psg import psg_grid_step, psg_quantize  # noqa: E402


def weight_layers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: m.weight.detach() for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear))}


def grid_sse(w: torch.Tensor, bits: int) -> float:
    """sum((w - Q(w))^2) on the symmetric restricted per-tensor grid of ``bits``."""
    return (w - psg_quantize(w, psg_grid_step(w.min(), w.max(), bits), bits)).pow(2).sum().item()


def layer_bits(names: list[str], bits: int) -> dict[str, int]:
    """The PSG reference's policy: first and last layer at 8 bits below 4 bits."""
    first_last = 8 if bits < 4 else bits
    return {n: first_last if i in (0, len(names) - 1) else bits for i, n in enumerate(names)}


def grid_errors(model: nn.Module, bits: int) -> dict[str, float]:
    layers = weight_layers(model)
    return {name: grid_sse(w, b) for (name, w), b in zip(layers.items(),
                                                         layer_bits(list(layers), bits).values())}


def plot_weights(models: dict[str, nn.Module], bits: int, out: Path, bins: int = 120) -> Path:
    """One PNG per layer (a histogram per model, grid points as vertical lines) and
    ``index.html`` showing them with each model's per-layer SSE; returns the HTML path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    layers = {label: weight_layers(m) for label, m in models.items()}
    names = list(next(iter(layers.values())))
    bits_of = layer_bits(names, bits)
    rows = []
    for name in names:
        b = bits_of[name]
        fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models), 3), squeeze=False)
        sse = {}
        for ax, (label, ws) in zip(axes[0], layers.items()):
            w = ws[name].flatten()
            step = psg_grid_step(w.min(), w.max(), b).item()
            ax.hist(w.numpy(), bins=bins, color="tab:blue")
            k = 2 ** (b - 1) - 1
            if k <= 16:
                for level in range(-k, k + 1):
                    ax.axvline(level * step, color="tab:red", lw=0.6, alpha=0.7)
            sse[label] = grid_sse(w, b)
            ax.set_title(f"{label}: {name} ({b}-bit SSE {sse[label]:.3g})", fontsize=8)
            ax.set_yscale("log")
        fig.tight_layout()
        png = f"{name.replace('.', '_')}.png"
        atomic_write(out / png, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
        plt.close(fig)
        cells = "".join(f"<td>{v:.4g}</td>" for v in sse.values())
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{b}</td>{cells}"
                    f"<td><img src='{png}' height='180'></td></tr>")
    heads = "".join(f"<th>{html.escape(label)} SSE</th>" for label in models)
    page = (f"<html><head><meta charset='utf-8'><title>lowbit weights</title></head><body>"
            f"<h1>Weights on the {bits}-bit grid</h1><p>Red lines: the symmetric grid of each "
            f"layer (per tensor, restricted range); log counts.</p><table border='1'>"
            f"<tr><th>layer</th><th>bits</th>{heads}<th>histograms</th></tr>"
            + "".join(rows) + "</table></body></html>\n")
    return write_text(out / "index.html", page)
