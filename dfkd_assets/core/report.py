"""Human-readable outputs: evaluation table (markdown), confusion-matrix and sample-grid PNGs.

Matplotlib runs with the Agg backend (no display); figures are written atomically.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from dfkd_assets.core.io import atomic_write_bytes, encode_png


def image_grid(images: np.ndarray, cols: int = 8, pad: int = 2) -> np.ndarray:
    """uint8 [N,H,W,3] -> one uint8 grid image (white padding)."""
    n, h, w, _ = images.shape
    cols = max(1, min(cols, n))
    rows = (n + cols - 1) // cols
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = im
    return grid


def write_grid(path: Path, images: np.ndarray, cols: int = 8, min_cell: int = 64) -> None:
    if images.shape[1] < min_cell:  # upscale tiny images so a person can see them
        k = int(np.ceil(min_cell / images.shape[1]))
        images = images.repeat(k, axis=1).repeat(k, axis=2)
    atomic_write_bytes(path, encode_png(image_grid(images, cols)))


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_confusion_png(path: Path, cm: np.ndarray, classes: list[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(classes)
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * k, 1.0 + 0.6 * k), dpi=100)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black", fontsize=8)
    save_figure(fig, path)


def write_curves_png(path: Path, curves: list[list[float]], title: str, ylabel: str = "loss") -> None:
    """One line per curve (e.g. the InfoNCE loss of each learned style)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for i, c in enumerate(curves):
        ax.plot(range(1, len(c) + 1), c, lw=1, label=f"style {i}" if len(curves) <= 10 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(curves) <= 10:
        ax.legend(fontsize=7)
    save_figure(fig, path)


def write_fewshot_png(path: Path, summary: dict, title: str) -> None:
    """Accuracy vs shots, one panel per domain, one line (mean +- std over seeds) per starting point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = list(dict.fromkeys(d for _, d, _ in summary))
    starts = list(dict.fromkeys(s for s, _, _ in summary))
    fig, axes = plt.subplots(1, len(domains), figsize=(3.2 * len(domains), 3), dpi=100, squeeze=False)
    for ax, d in zip(axes[0], domains):
        for s in starts:
            ks = sorted(k for s2, d2, k in summary if (s2, d2) == (s, d))
            m = np.array([summary[(s, d, k)][0] for k in ks])
            e = np.array([summary[(s, d, k)][1] for k in ks])
            ax.errorbar(ks, m, yerr=e, marker="o", capsize=3, label=s)
        ax.set_title(d, fontsize=9)
        ax.set_xlabel("shots per class")
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("top-1")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def write_round_curve_png(path: Path, series: dict[str, list[tuple[int, float]]], title: str) -> None:
    """Accuracy against images per class, one line per domain (a point per retraining round)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name, points in series.items():
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", lw=2 if name == "mean" else 1, label=name)
    ax.set_xlabel("synthetic images per class")
    ax.set_ylabel("student top-1")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    """Lay out, render to PNG in memory and write atomically (a reader never sees half a plot); closes `fig`."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
