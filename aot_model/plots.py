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
    results: Mapping[str, Sequence[tuple[int, float] | tuple[int, float, float]]],
    *,
    metric: str = "FID",
    path: str | Path | None = None,
) -> Figure:
    """Score against NFE, one line per model; a shaded band of +- std where points carry one.

    ``results`` maps model name -> (nfe, score) or (nfe, mean, std) points; ``metric`` labels the
    y axis (e.g. "FID"); with ``path``, the figure is also written there (PNG by default).
    """
    fig = Figure(figsize=(5, 3.5), layout="constrained")
    ax = fig.add_subplot()
    for name, points in results.items():
        columns = [np.array(c, dtype=float) for c in zip(*sorted(points), strict=True)]
        (line,) = ax.plot(columns[0], columns[1], marker="o", label=name)
        if len(columns) == 3:
            low, high = columns[1] - columns[2], columns[1] + columns[2]
            ax.fill_between(columns[0], low, high, color=line.get_color(), alpha=0.2, lw=0)
    bands = any(len(point) == 3 for points in results.values() for point in points)
    title = f"{metric} vs NFE" + (" (mean +- std over seeds)" if bands else "")
    # Scores fall by orders of magnitude from few to many steps; on a linear axis the differences
    # at high NFE, where models are compared, would be invisible.
    ax.set(xlabel="NFE", ylabel=metric, title=title, yscale="log")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return _maybe_save(fig, path)


def plot_curvature_vs_sigma(
    stats: Mapping[str, TrajectoryStats | Sequence[TrajectoryStats]],
    *,
    path: str | Path | None = None,
) -> Figure:
    """Curvature (1 - cos between successive steps) and denoiser drift against sigma, log x.

    A model given as a sequence of stats (e.g. one per training seed, same sampler) is drawn as
    its mean with a shaded band of +- std."""
    fig = Figure(figsize=(9, 3.5), layout="constrained")
    ax_curv, ax_drift = fig.subplots(1, 2)
    for name, runs in stats.items():
        runs = [runs] if isinstance(runs, TrajectoryStats) else list(runs)
        sigmas = runs[0].sigmas
        for ax, x, field in (
            (ax_curv, sigmas[1:-1], "curvature"),
            (ax_drift, sigmas[:-1], "drift"),
        ):
            values = np.stack([getattr(r, field) for r in runs])
            mean = values.mean(0)
            (line,) = ax.plot(x, mean, marker="o", label=name)
            if len(runs) > 1:
                std = values.std(0, ddof=1)
                ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
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
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, keys) in zip(axes, panels, strict=True):
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


def save_image_grid(
    images: ImageBatch,
    path: str | Path,
    *,
    max_images: int = 64,
    scale: int = 3,
    gap: int = 2,
    gap_value: int = 255,
) -> Path:
    """Write the first ``max_images`` uint8 images ``[N, C, H, W]`` (C = 1 or 3) as a PNG grid.

    The grid is ``ceil(sqrt(n))`` images wide; each image is enlarged ``scale`` times by pixel
    repetition (no interpolation, so pixels stay exact) and cells are separated by ``gap``
    pixels of value ``gap_value`` (white by default), so small images stay readable.
    """
    images = images.cpu().numpy() if isinstance(images, Tensor) else np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be uint8 [N, 1|3, H, W], got {images.dtype} {images.shape}")
    if len(images) == 0 or max_images < 1:
        raise ValueError(f"need >= 1 image and max_images >= 1, got {len(images)}, {max_images}")
    if scale < 1 or gap < 0 or not 0 <= gap_value <= 255:
        raise ValueError(
            f"need scale >= 1, gap >= 0 and gap_value in [0, 255], got {scale}, {gap}, {gap_value}"
        )
    images = images[:max_images].repeat(scale, axis=2).repeat(scale, axis=3)
    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap, c), gap_value, dtype=np.uint8)
    for k, img in enumerate(images):
        r, q = divmod(k, cols)
        top, left = r * (h + gap), q * (w + gap)
        grid[top : top + h, left : left + w] = img.transpose(1, 2, 0)
    image = Image.fromarray(grid[..., 0] if c == 1 else grid)
    atomic_write(path, lambda f: image.save(f, format="PNG"))
    return Path(path)
