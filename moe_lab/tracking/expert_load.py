"""Expert-load matrices ([MoE layers, experts] token counts): .npy files and heatmaps.

A heatmap shows each expert's load as a share of the fair load of its layer (tokens / mean
tokens per expert): 1.0 is balanced, 0 is a dead expert. Blue is below fair share, red above, on
one fixed scale, so heatmaps of different runs can be compared side by side.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

# Colour scale of load / fair share; loads above VMAX saturate.
VMAX = 3.0


def check_matrix(matrix) -> np.ndarray:
    counts = np.asarray(matrix, dtype=np.float64)
    if counts.ndim != 2 or 0 in counts.shape:
        raise ValueError(f"expert load matrix: expected [moe_layers, experts], got shape "
                         f"{counts.shape}")
    return counts


def fair_share(counts: np.ndarray) -> np.ndarray:
    """tokens / mean tokens per expert, per layer (rows without tokens stay 0)."""
    mean = counts.mean(axis=1, keepdims=True)
    return np.divide(counts, mean, out=np.zeros_like(counts), where=mean > 0)


def save(directory: Path, step: int, counts: np.ndarray, layer_numbers: list[int],
         title: str = "") -> list[Path]:
    """directory/step_NNNNNNN.npy (the counts) and .png (the heatmap)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stem = directory / f"step_{step:07d}"
    np.save(stem.with_suffix(".npy"), counts)
    # Cells of ~0.35 inch, within 16 x 12 inches (a 60-expert, 24-layer model fills it).
    fig = Figure(figsize=(min(16.0, 1.6 + 0.35 * counts.shape[1]),
                          min(12.0, 1.0 + 0.35 * counts.shape[0])), layout="constrained")
    ax = fig.subplots()
    image = draw(ax, counts, layer_numbers, title or f"step {step}")
    fig.colorbar(image, ax=ax, label="load / fair share")
    fig.savefig(stem.with_suffix(".png"), dpi=100)
    return [stem.with_suffix(".npy"), stem.with_suffix(".png")]


def draw(ax, counts: np.ndarray, layer_numbers: list[int], title: str):
    """One heatmap on a matplotlib Axes; returns the image (for a colour bar)."""
    share = fair_share(counts)
    image = ax.imshow(share, cmap="RdBu_r", aspect="auto", interpolation="nearest",
                      norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=VMAX))
    layers = layer_numbers if len(layer_numbers) == counts.shape[0] else range(counts.shape[0])
    ax.set_yticks(range(counts.shape[0]), [f"layer {n:02d}" for n in layers], fontsize=7)
    step = max(1, counts.shape[1] // 16)
    ax.set_xticks(range(0, counts.shape[1], step))
    ax.tick_params(axis="x", labelsize=7)
    ax.set_xlabel("expert", fontsize=8)
    ax.set_title(title, fontsize=9)
    return image


def side_by_side(panels: list[tuple[str, np.ndarray, list[int]]], out: Path) -> Path:
    """One PNG with a heatmap per (title, counts, layer numbers), sharing one colour scale."""
    cols = min(len(panels), 4)
    rows = -(-len(panels) // cols)
    height = max(c.shape[0] for _, c, _ in panels)
    fig = Figure(figsize=(3.4 * cols + 0.8, (0.9 + 0.3 * height) * rows + 0.4),
                 layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    image = None
    for ax, (title, counts, layers) in zip(axes, panels):
        image = draw(ax, counts, layers, title)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.colorbar(image, ax=list(axes[:len(panels)]), label="load / fair share", shrink=0.9)
    fig.savefig(out, dpi=110)
    return Path(out)
