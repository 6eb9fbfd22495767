"""PNG figures: perturbation grids, accuracy against radius and against training time."""

from __future__ import annotations

import io
import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.lines as mlines  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from rat_tf import files  # noqa: E402


def _visible(v: np.ndarray) -> np.ndarray:
    """Scale one perturbation to [0, 1] so its pattern is visible (0 maps to mid-grey)."""
    m = float(np.max(np.abs(v))) or 1.0
    img = 0.5 + 0.5 * v / m
    return img[..., 0] if img.shape[-1] == 1 else img


MAX_PNG_BYTES = 200_000  # figures stay small enough to keep in a repository


def perturbation_grid(perturbations: np.ndarray | Sequence[np.ndarray], path: str,
                      titles: Sequence[str] | None = None, row_labels: Sequence[str] | None = None,
                      dpi: int = 80, max_bytes: int = MAX_PNG_BYTES) -> str:
    """Write a PNG grid of perturbations [K,H,W,C] (or several rows of them), scaled to be seen.

    Several rows (e.g. before and after RAT) are passed as a list of [K,H,W,C] arrays. A file
    over ``max_bytes`` is re-saved with fewer colours (see :func:`fit_png`).
    """
    rows = [np.asarray(perturbations)] if np.ndim(perturbations[0]) == 3 else [
        np.asarray(p) for p in perturbations]
    k = rows[0].shape[0]
    fig, axes = plt.subplots(len(rows), k, figsize=(1.1 * k, 1.2 * len(rows) + 0.2), squeeze=False)
    for r, row in enumerate(rows):
        for c in range(k):
            ax = axes[r][c]
            ax.imshow(_visible(row[c]), cmap="gray" if row.shape[-1] == 1 else None, vmin=0,
                      vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0 and titles is not None:
                ax.set_title(str(titles[c]), fontsize=8)
        if row_labels is not None:
            axes[r][0].set_ylabel(row_labels[r], fontsize=8)
    return _save(fig, path, dpi, max_bytes)


def _save(fig: plt.Figure, path: str, dpi: int, max_bytes: int | None = None) -> str:
    """Render ``fig`` in memory (shrunk to fit ``max_bytes`` if given), write it atomically."""
    try:
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    png = buf.getvalue() if max_bytes is None else _shrunk(buf.getvalue(), max_bytes)
    return files.write_bytes(path, png, ".png")


def _shrunk(png: bytes, max_bytes: int) -> bytes:
    """PNG bytes re-encoded with ever fewer palette colours until they fit in ``max_bytes``."""
    if len(png) <= max_bytes:
        return png
    from PIL import Image  # a matplotlib dependency

    with Image.open(io.BytesIO(png)) as img:
        rgb = img.convert("RGB")
    for colors in (128, 64, 32, 16):
        buf = io.BytesIO()
        rgb.quantize(colors=colors).save(buf, format="png", optimize=True)
        png = buf.getvalue()
        if len(png) <= max_bytes:
            break
    return png


def fit_png(path: str, max_bytes: int = MAX_PNG_BYTES) -> str:
    """Re-save a PNG larger than ``max_bytes`` with ever fewer palette colours until it fits."""
    if os.path.getsize(path) <= max_bytes:
        return path
    with open(path, "rb") as f:
        png = f.read()
    return files.write_bytes(path, _shrunk(png, max_bytes), ".png")


def _accuracy_axes(fig: plt.Figure, ax: plt.Axes, xlabel: str, ylabel: str, title: str,
                   path: str, dpi: int, handles: Sequence | None = None) -> str:
    """Label an accuracy plot (y in [0, 1]), add grid and legend (``handles``: to the right
    of the axes, off the data), write it."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.01)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if handles is None:
        ax.legend(fontsize=8)
    else:
        ax.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _save(fig, path, dpi)


def accuracy_vs_radius(curves: Mapping[str, Mapping[float, float]], path: str,
                       xlabel: str = "L-inf radius", title: str = "FGSM accuracy",
                       dpi: int = 80,
                       points: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]]
                       | None = None
                       ) -> str:
    """Write a PNG of accuracy against attack radius, one line per model ({name: {eps: acc}}).

    ``points``: per model, stronger attacks as markers {attack: [(eps, accuracy), ...]}, in
    the colour of the model's line (e.g. PGD and AutoAttack).
    """
    fig, ax = plt.subplots(figsize=(5.6 if points else 4.5, 3.2))
    markers, lines = {}, []
    for name, curve in curves.items():
        eps = sorted(float(e) for e in curve)
        (line,) = ax.plot(eps, [curve[e] if e in curve else curve[str(e)] for e in eps],
                          marker="o", label=name)
        lines.append(line)
        for attack, xy in (points or {}).get(name, {}).items():
            if not xy:
                continue
            marker = markers.setdefault(attack, "sxD^v"[len(markers) % 5])
            ax.plot([e for e, _ in xy], [a for _, a in xy], marker=marker, linestyle="none",
                    color=line.get_color(), markersize=7)
    if not markers:
        return _accuracy_axes(fig, ax, xlabel, "accuracy", title, path, dpi)
    # one entry per model (its colour) and one per attack (its marker)
    keys = [mlines.Line2D([], [], color="grey", marker=m, linestyle="none", markersize=7,
                          label=attack) for attack, m in markers.items()]
    return _accuracy_axes(fig, ax, xlabel, "accuracy", title, path, dpi, handles=lines + keys)


def accuracy_vs_time(curves: Mapping[str, Sequence[tuple[float, float]]], path: str,
                     goal: float | None = None, title: str = "test accuracy against time",
                     dpi: int = 80) -> str:
    """Write a PNG of test accuracy against training minutes, one line per run
    ({name: [(seconds, accuracy), ...]}); ``goal`` draws a horizontal line."""
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    for name, xy in curves.items():
        ax.plot([t / 60.0 for t, _ in xy], [a for _, a in xy], marker="o", label=name)
    if goal is not None:
        ax.axhline(goal, color="grey", linestyle="--", label=f"goal {100 * goal:.0f}%")
    return _accuracy_axes(fig, ax, "training minutes", "test accuracy", title, path, dpi)
