"""Evaluation plots logged as run artifacts under plots/: confusion matrices and predicted-vs-gold scatter."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch


def pyplot():
    """matplotlib's pyplot on the file-only backend (no display on a training machine)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out_png: str | Path, suptitle: str = "", dpi: int = 120) -> Path:
    """Lay out, write (folders made), and close the figure, so a plotting loop does not hold them all."""
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=dpi)
    pyplot().close(fig)
    return Path(out_png)


def plot_confusion(confusion: torch.Tensor, labels: Sequence[str], out_png: str | Path) -> Path:
    """Row-normalised confusion matrix (gold rows, predicted columns), each cell annotated."""
    plt = pyplot()
    norm = confusion.double() / confusion.sum(dim=1, keepdim=True).clamp(min=1)
    size = max(5.0, 0.45 * len(labels) + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    for i in range(len(labels)):
        for j in range(len(labels)):
            if confusion[i, j]:
                ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=5,
                        color="white" if norm[i, j] > 0.5 else "black")  # fmt: skip
    return save_figure(fig, out_png)


def plot_scatter(pred: torch.Tensor, gold: torch.Tensor, out_png: str | Path, title: str = "") -> Path:
    """Predicted against gold scores, with the diagonal and KLUE-STS's 3.0 threshold on both axes."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(gold.numpy(), pred.numpy(), s=8, alpha=0.6)
    lo = float(min(gold.min(), pred.min(), 0.0))
    hi = float(max(gold.max(), pred.max(), 5.0))
    ax.plot([lo, hi], [lo, hi], color="gray", lw=0.8)
    ax.axhline(3.0, color="red", lw=0.5, ls="--")
    ax.axvline(3.0, color="red", lw=0.5, ls="--")
    ax.set_xlabel("gold score")
    ax.set_ylabel("predicted score")
    if title:
        ax.set_title(title, fontsize=9)
    return save_figure(fig, out_png)
