"""Pictures of an evaluation: score against NFE, curvature against sigma, image grids.

Files are written atomically (:func:`aot_model.files.atomic_write`); figures are built on
:class:`matplotlib.figure.Figure` directly, without pyplot's global state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image
from torch import Tensor

from aot_model.features import ImageBatch
from aot_model.files import atomic_write
from aot_model.metrics import TrajectoryStats


def plot_score_vs_nfe(
    results: Mapping[str, Sequence[tuple[int, float]]],
    *,
    metric: str = "FID",
    path: str | Path | None = None,
) -> Figure:
    """Score against NFE, one line per model.

    Parameters
    ----------
    results : mapping model name -> sequence of (nfe, score)
    metric : str
        y-axis label, e.g. "FID" or "fd_digits".
    path : str, Path or None
        Also write a PNG there.
    """
    fig = Figure(figsize=(5, 3.5), layout="constrained")
    ax = fig.add_subplot()
    for name, points in results.items():
        nfe, value = zip(*sorted(points), strict=True)
        ax.plot(nfe, value, marker="o", label=name)
    ax.set(xlabel="NFE", ylabel=metric, title=f"{metric} vs NFE")
    ax.grid(alpha=0.3)
    ax.legend()
    return _maybe_save(fig, path)


def plot_curvature_vs_sigma(
    stats: Mapping[str, TrajectoryStats], *, path: str | Path | None = None
) -> Figure:
    """Curvature (1 - cos between successive steps) and denoiser drift against sigma, log x."""
    fig = Figure(figsize=(9, 3.5), layout="constrained")
    ax_curv, ax_drift = fig.subplots(1, 2)
    for name, s in stats.items():
        ax_curv.plot(s.sigmas[1:-1], s.curvature, marker="o", label=name)
        ax_drift.plot(s.sigmas[:-1], s.drift, marker="o", label=name)
    ax_curv.set(xscale="log", xlabel="sigma", ylabel="1 - cos(d_i, d_i+1)", title="curvature")
    ax_drift.set(xscale="log", xlabel="sigma", ylabel="||D(x_i) - x_N||", title="denoiser drift")
    for ax in (ax_curv, ax_drift):
        ax.invert_xaxis()  # sampling runs from high to low sigma
        ax.grid(alpha=0.3)
        ax.legend()
    return _maybe_save(fig, path)


def plot_discriminator_history(
    history: Sequence[Mapping[str, float]],
    chosen_epoch: int,
    *,
    metric: str = "score",
    path: str | Path | None = None,
) -> Figure:
    """Discriminator training per epoch: loss, accuracy (train and held-out) and the guided-sample
    score used to choose the checkpoint (the chosen epoch marked)."""
    epochs = [row["epoch"] for row in history]
    panels = [("loss", ("loss", "heldout_loss")), ("accuracy", ("accuracy", "heldout_accuracy"))]
    if all("score" in row for row in history):
        panels.append((f"guided {metric}", ("score",)))
    fig = Figure(figsize=(4 * len(panels), 3.2), layout="constrained")
    for ax, (title, keys) in zip(
        fig.subplots(1, len(panels), squeeze=False)[0], panels, strict=True
    ):
        for key in keys:
            ax.plot(epochs, [row[key] for row in history], marker="o", label=key)
        ax.axvline(chosen_epoch, color="grey", linestyle="--", label=f"chosen ({chosen_epoch})")
        ax.set(xlabel="epoch", title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    return _maybe_save(fig, path)


def _maybe_save(fig: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        image_format = Path(path).suffix.lstrip(".") or "png"
        atomic_write(path, lambda f: fig.savefig(f, format=image_format, dpi=120))
    return fig


def save_image_grid(images: ImageBatch, path: str | Path, *, max_images: int = 64) -> Path:
    """Write the first ``max_images`` uint8 images ``[N, C, H, W]`` (C = 1 or 3) as a PNG grid.

    The grid is ``ceil(sqrt(n))`` images wide, pixels copied exactly (no resampling).
    """
    images = images.cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be uint8 [N, 1|3, H, W], got {images.dtype} {images.shape}")
    if len(images) == 0 or max_images < 1:
        raise ValueError(f"need >= 1 image and max_images >= 1, got {len(images)}, {max_images}")
    images = images[:max_images]
    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for k, img in enumerate(images):
        r, q = divmod(k, cols)
        grid[r * h : (r + 1) * h, q * w : (q + 1) * w] = img.transpose(1, 2, 0)
    image = Image.fromarray(grid[..., 0] if c == 1 else grid)
    atomic_write(path, lambda f: image.save(f, format="PNG"))
    return Path(path)
