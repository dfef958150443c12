"""Sampler sweeps: the same per-image seeds sampled at every (steps, rho, solver, guidance) point.

The AOT README reports FID at three EDM Heun settings (method-notes d.1): 18 steps with rho = 7
(EDM's default, NFE 35), 14 steps with rho = 90 (NFE 27) and 15 steps with rho = 72 (NFE 29).
:func:`run_sweep` regenerates the same latents (and labels) from the same seeds at every point, so
points differ only by the sampler, quantises images as EDM does, writes one compressed ``.npz``
and one PNG grid per point, optionally scores them, and writes a CSV and JSON table. Points with a
discriminator-guidance weight (method-notes g.4) sample through
:class:`aot_model.guidance.Guidance`;
NFE still counts denoiser calls, and the discriminator's forward + backward passes per image are
reported beside it (``disc_calls``).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import operator
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.optimize
import torch
from torch import Tensor

from aot_model import devices, distributed
from aot_model.checks import check_choice, check_int
from aot_model.files import atomic_write, read_json
from aot_model.metrics import format_seeds
from aot_model.plots import save_image_grid
from aot_model.progress import progress_bar
from aot_model.sampling import SOLVERS, Correction, heun_sampler, latents_from_seeds, sigma_steps

PRECISIONS = ("fp32", "bf16")  # of the network's evaluations while sampling (sampling.fast_net)
Scorer = Callable[[np.ndarray, Sequence[int]], dict]
GuideFactory = Callable[[float], Correction]  # weight -> hook with ``second_order`` and ``calls``


@dataclass(frozen=True)
class SweepPoint:
    """One sampler setting: ``num_steps`` noise levels, schedule exponent ``rho``, ``solver``, and
    the discriminator-guidance weight (0 = unguided)."""

    num_steps: int
    rho: float
    solver: str = "heun"
    guidance_weight: float = 0.0

    def __post_init__(self):
        check_int("num_steps", self.num_steps, 2)
        if not 0.0 < self.rho < math.inf:
            raise ValueError(f"rho must be a finite number > 0, got {self.rho}")
        check_choice("solver", self.solver, SOLVERS)
        if not math.isfinite(self.guidance_weight):
            raise ValueError(f"guidance_weight must be a finite number, got {self.guidance_weight}")

    @property
    def nfe(self) -> int:
        """Network evaluations: 2N - 1 for Heun (the last step is Euler), N for Euler."""
        return 2 * self.num_steps - 1 if self.solver == "heun" else self.num_steps

    def named(self, stem: str, *, spaced: bool = False) -> str:
        """``stem`` and each axis that is off by default where it is on: ``"_w2"`` for guidance
        weight 2 (``" w=2"`` spaced, for people). Every name of a point, or of a group of points
        (series, report column), ends so, so points differing there never share a name."""
        on = [("w", self.guidance_weight)]  # a new axis that is off by default: one more pair
        return stem + "".join(f" {k}={v:g}" if spaced else f"_{k}{v:g}" for k, v in on if v)

    @property
    def tag(self) -> str:
        """File-name fragment, e.g. ``"heun_s18_r7"`` (``"heun_s18_r7_w2"`` when guided)."""
        return self.named(f"{self.solver}_s{self.num_steps}_r{self.rho:g}")

    @property
    def series(self) -> str:
        """The score-vs-NFE curve the point lies on, named by every axis but the step count, e.g.
        ``"heun_rho7"`` (``"heun_rho7_w2"``): dvc metrics and MLflow keys."""
        return self.named(f"{self.solver}_rho{self.rho:g}")

    @property
    def label(self) -> str:
        """For people, e.g. ``"heun steps=18 rho=7"`` (``"heun steps=18 rho=7 w=2"``)."""
        return self.named(f"{self.solver} steps={self.num_steps} rho={self.rho:g}", spaced=True)

    @property
    def unguided(self) -> SweepPoint:
        """The same point without guidance: where a guided point is compared with its model."""
        return replace(self, guidance_weight=0.0)

    @property
    def order(self) -> tuple:
        """Tables list points by rho, then NFE (then tag, so that ties have one order)."""
        return self.rho, self.nfe, self.tag


@dataclass(frozen=True)
class SweepRow:
    """One point of a sweep as its table (``<name>_sweep.json``, ``.csv``) records it; ``point``
    is its key. What a table lacks (no scorer, no guidance, a hand-made table) is None and is
    not written."""

    point: SweepPoint
    model: str | None = None
    disc_calls: float | None = None  # discriminator forward + backward passes per image
    num_images: int | None = None
    seeds: str | None = None
    seconds: float | None = None
    img_per_s: float | None = None
    precision: str | None = None
    float32_precision: dict | None = None
    images: str | None = None
    grid: str | None = None
    metric: str | None = None
    score: float | None = None
    score_seconds: float | None = None
    score_info: dict | None = None
    base_model: str | None = None  # of a guided sweep: the unguided model it guides
    second_order: bool | None = None  # whether the guidance also corrects Heun's corrector

    @classmethod
    def from_dict(cls, row: Mapping) -> SweepRow:
        """The row :meth:`to_dict` wrote (its ``nfe`` follows from the point)."""
        axes = {f.name for f in fields(SweepPoint)}
        point = SweepPoint(**{k: v for k, v in row.items() if k in axes})
        return cls(point, **{k: v for k, v in row.items() if k not in axes and k != "nfe"})

    def to_dict(self) -> dict:
        """Model, the point's axes (solver first, as the tables have it) and NFE, then the rest."""
        p = self.point
        row = {"model": self.model, "solver": p.solver, **vars(p), "nfe": p.nfe}
        row |= {k: v for k, v in vars(self).items() if k != "point"}  # model: same value, place
        return {k: v for k, v in row.items() if v is not None}


# The AOT README's settings (method-notes d.1): EDM default, then the unconditional and
# conditional AOT-tuned schedules.
PAPER_POINTS = (SweepPoint(18, 7.0), SweepPoint(14, 90.0), SweepPoint(15, 72.0))


def sweep_grid(
    steps: Sequence[int],
    rhos: Sequence[float],
    solvers: Sequence[str] = ("heun",),
    weights: Sequence[float] = (0.0,),
) -> list[SweepPoint]:
    """Every combination of ``steps`` x ``rhos`` x ``solvers`` x guidance ``weights``, nested in
    that order."""
    grid = itertools.product(steps, rhos, solvers, weights)
    return [SweepPoint(n, float(r), s, float(w)) for n, r, s, w in grid]


def to_uint8(images: Tensor) -> Tensor:
    """EDM's quantisation of [-1, 1] images: ``(x·127.5 + 128).clip(0, 255)`` truncated to uint8."""
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)


def run_sweep(
    net: Callable,
    points: Sequence[SweepPoint],
    seeds: Sequence[int],
    *,
    out_dir: str | Path,
    img_shape: Sequence[int],
    label_dim: int = 0,
    batch_size: int = 64,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    device: torch.device | str = "cpu",
    scorer: Scorer | None = None,
    name: str = "model",
    progress: bool = True,
    guide: GuideFactory | None = None,
    precision: str = "fp32",
) -> list[SweepRow]:
    """Sample ``seeds`` at every point, save, optionally score, and tabulate.

    Parameters
    ----------
    net : callable
        The denoiser ``net(x, sigma, class_labels) -> D(x; sigma)`` on ``device`` (e.g. an
        ``EDMPrecond`` in eval mode).
    points : sequence of SweepPoint
    seeds : sequence of int
        One per image; the same latents (and labels) are used at every point.
    out_dir : str or Path
        Receives ``<name>_<tag>.npz`` (``images`` uint8 ``[N, C, H, W]``, ``seeds``, ``labels``
        when conditional, and the sampler settings as the sampler reported using them: the
        time steps ``sigmas`` and the ``num_steps``, ``sigma_min``, ``sigma_max``, ``rho`` they
        imply, see :func:`used_settings`), ``<name>_<tag>.png`` (first 64 images) and
        ``<name>_sweep.csv`` / ``<name>_sweep.json`` (rewritten after every point).
    img_shape : sequence of int
        ``(C, H, W)`` of one image.
    label_dim : int
        Number of classes; 0 for unconditional. Labels are drawn per seed (``latents_from_seeds``).
    batch_size : int
        Images per sampler call; results do not depend on it.
    sigma_min, sigma_max : float
        Schedule ends (EDM: 0.002 and 80).
    device : torch.device or str
    scorer : callable or None
        ``scorer(images, seeds) -> dict`` with at least ``metric`` and ``value``, e.g.
        ``lambda im, s: metrics.score(extractor, [im], ref, num_images=len(im), seeds=s,
        metric="fd_digits")``. Build it (and its feature network) before calling, so a missing
        weights file stops the sweep before any sampling.
    name : str
        Model name used in file names and the table.
    progress : bool
        Show a progress bar (:func:`aot_model.progress.progress_bar`).
    guide : callable or None
        ``guide(weight) -> hook`` for points with a guidance weight, e.g.
        ``lambda w: Guidance(discriminator, w)``; the hook's ``second_order`` and ``calls``
        attributes are read. Required when a point is guided.
    precision : {"fp32", "bf16"}
        What ``net`` evaluates in: ``"bf16"`` when it is :func:`aot_model.sampling.fast_net`'s
        autocast path. Recorded in every row and ``.npz``, beside ``float32_precision``.

    Returns
    -------
    list of SweepRow
        One per point, with ``metric, score, score_seconds, score_info`` when scored;
        ``disc_calls`` is 0 unguided.
    """
    seeds = _check_sweep_args(points, seeds, img_shape, label_dim, batch_size, sigma_min, sigma_max)
    check_choice("precision", precision, PRECISIONS)
    if guide is None and any(p.guidance_weight for p in points):
        raise ValueError("guided sweep points need guide= (a weight -> Guidance factory)")
    out_dir, rank, world_size = Path(out_dir), distributed.rank(), distributed.world_size()
    batches = seed_batches(seeds, batch_size, world_size)
    # A hook counts its calls on its own rank's batches, one per sampler step and batch.
    own_batches = sum(1 for b in batches[rank::world_size] if b)
    total = len(points) * sum(1 for b in batches if b)
    rows = []
    with progress_bar(total=total, disable=not progress or rank != 0, unit="batch") as bar:
        for point in points:
            bar.set_description(f"{name} {point.tag}")
            start = time.perf_counter()
            images, labels, schedules = [], [], []
            hook = guide(point.guidance_weight) if point.guidance_weight else None
            for batch in generate_images(
                net,
                point,
                seeds,
                img_shape=img_shape,
                label_dim=label_dim,
                batch_size=batch_size,
                sigma_min=sigma_min,
                sigma_max=sigma_max,
                device=device,
                correction=hook,
            ):
                images.append(batch.images)
                labels.append(batch.labels)
                schedules.append(batch.sigmas)
                bar.update()
            if rank != 0:  # sampled its share for rank 0, which writes and scores
                continue
            images = np.concatenate(images)
            labels = None if label_dim == 0 else np.concatenate(labels)
            seconds = time.perf_counter() - start
            stem = out_dir / f"{name}_{point.tag}"
            settings = {
                **used_settings(schedules, point, sigma_min, sigma_max),
                "guidance_weight": point.guidance_weight,
                "precision": precision,
            }
            save_images(stem.with_suffix(".npz"), images, seeds, labels, settings)
            save_image_grid(images, stem.with_suffix(".png"))
            scored = {} if scorer is None else _score_point(scorer, images, seeds)
            row = SweepRow(
                point,
                model=name,
                disc_calls=0 if hook is None else hook.calls / own_batches,
                num_images=len(images),
                seeds=format_seeds(seeds),
                seconds=seconds,
                img_per_s=len(images) / seconds,
                precision=precision,
                float32_precision=devices.float32_precision(),  # TF32 changes the samples
                images=str(stem.with_suffix(".npz")),
                grid=str(stem.with_suffix(".png")),
                **scored,
            )
            rows.append(row)
            write_table(rows, out_dir / f"{name}_sweep")
    return rows


def _check_sweep_args(
    points: Sequence[SweepPoint],
    seeds: Sequence[int],
    img_shape: Sequence[int],
    label_dim: int,
    batch_size: int,
    sigma_min: float,
    sigma_max: float,
) -> list[int]:
    """Reject bad sweep input before any sampling; returns the seeds as a list of ints."""
    if not points or not all(isinstance(p, SweepPoint) for p in points):
        raise ValueError("points must be a non-empty sequence of SweepPoint")
    seeds = [operator.index(s) for s in seeds]
    if not seeds or min(seeds) < 0:
        raise ValueError("seeds must be a non-empty sequence of ints >= 0")
    if len(img_shape) != 3 or min(img_shape) < 1:
        raise ValueError(f"img_shape must be (C, H, W) of positive ints, got {tuple(img_shape)}")
    if label_dim < 0 or batch_size < 1:
        raise ValueError(f"need label_dim >= 0 and batch_size >= 1, got {label_dim}, {batch_size}")
    for point in points:  # validates sigma_min/sigma_max with every rho
        last = float(sigma_steps(point.num_steps, sigma_min, sigma_max, point.rho)[-2])
        # Eq. 5 interpolates sigma^(1/rho): at small rho the end point cancels away (rho 1/3 with
        # 18 steps ends at 0.0019979, rho 0.1 at 0), and used_settings would refuse the point
        # only after sampling it.
        if not math.isclose(last, sigma_min, rel_tol=1e-6):
            raise ValueError(
                f"point {point.tag}: Eq. 5 with rho {point.rho:g} ends at {last:.7g}, not "
                f"sigma_min {sigma_min:g} (rounding at small rho); use a larger rho"
            )
    return seeds


class Batch(NamedTuple):
    """One batch of :func:`generate_images`: uint8 ``images`` ``[B, C, H, W]``, int64 ``labels``
    ``[B]`` (None when unconditional) and the time steps ``sigmas`` ``[N + 1]`` (float64) the
    sampler actually used."""

    images: np.ndarray
    labels: np.ndarray | None
    sigmas: np.ndarray


def used_settings(
    schedules: Sequence[np.ndarray], point: SweepPoint, sigma_min: float, sigma_max: float
) -> dict:
    """The schedule the sampler used, as provenance: ``sigmas`` and the settings it implies.

    ``num_steps``, ``sigma_max`` and ``sigma_min`` are read off the time steps (t_0, t_{N-1});
    ``rho`` is recovered from t_1 by inverting Eq. 5 (t_1 falls monotonically in rho). Raises
    RuntimeError if the batches disagree or the schedule is not the one ``point``, ``sigma_min``
    and ``sigma_max`` ask for, so a sampler that ignores a setting cannot go unrecorded.
    """
    sigmas = schedules[0]
    if any(not np.array_equal(s, sigmas) for s in schedules[1:]):
        raise RuntimeError(f"{point.tag}: the sampler used different time steps across batches")
    used = {
        "solver": point.solver,
        "num_steps": len(sigmas) - 1,
        "sigma_min": float(sigmas[-2]),
        "sigma_max": float(sigmas[0]),
        "rho": _schedule_rho(sigmas, point.rho),
    }
    asked = {**vars(point), "sigma_min": sigma_min, "sigma_max": sigma_max}
    # The solver is the point's own; the numbers are read back from the time steps.
    wrong = {
        k: (asked[k], used[k])
        for k in ("num_steps", "sigma_min", "sigma_max", "rho")
        if not math.isclose(used[k], asked[k], rel_tol=1e-6)
    }
    if wrong:
        raise RuntimeError(f"{point.tag}: the sampler used other settings (asked, used): {wrong}")
    return {**used, "sigmas": sigmas}


def _schedule_rho(sigmas: np.ndarray, default: float) -> float:
    """rho of an Eq. 5 schedule from its t_1, to 7 digits; ``default`` when N = 2 (rho then
    changes nothing) or the schedule is degenerate."""
    n = len(sigmas) - 1
    if n < 3 or not sigmas[0] > sigmas[1] > sigmas[n - 1] > 0:  # N = 2, or underflow at tiny rho
        return default
    log_ratio, n_minus_1 = math.log(sigmas[n - 1] / sigmas[0]), n - 1
    target = math.log(sigmas[1] / sigmas[0])

    def gap(log_rho: float) -> float:
        # log(t_1 / t_0) = rho * log(1 + ((t_{N-1}/t_0)^(1/rho) - 1) / (N - 1)), overflow-free
        rho = math.exp(log_rho)
        return rho * math.log1p(math.expm1(log_ratio / rho) / n_minus_1) - target

    # |gap| shrinks to 0 as rho grows (the log-uniform limit): search a wide bracket.
    log_rho = scipy.optimize.brentq(gap, math.log(1e-3), math.log(1e6), xtol=1e-13)
    return float(f"{math.exp(log_rho):.7g}")


def generate_images(
    net: Callable,
    point: SweepPoint,
    seeds: Sequence[int],
    *,
    img_shape: Sequence[int],
    label_dim: int = 0,
    batch_size: int = 64,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    device: torch.device | str = "cpu",
    correction: Correction | None = None,
    labels: Sequence[int] | None = None,
) -> Iterator[Batch]:
    """Sample ``seeds`` at ``point`` in batches of :class:`Batch` (images, labels and the time
    steps used), in seed order. Image k depends on ``seeds[k]`` (and ``labels[k]``) alone.
    ``correction``: the sampler hook for a guided point (its ``second_order`` attribute, when
    present, also corrects the Heun corrector). ``labels``: the class of each image of a
    conditional model, instead of the one drawn from its seed.

    Batches are :func:`seed_batches`'. Under torchrun each rank samples its share, batches
    ``rank, rank + W, ...`` as EDM's ``generate.py`` deals them, and every rank yields all
    batches (gathered after each round of W), so the images are those of one process."""
    if bool(point.guidance_weight) != (correction is not None):
        raise ValueError(
            f"point {point.tag}: a correction hook is needed exactly when guidance_weight != 0"
        )
    if labels is not None and len(labels) != len(seeds):
        raise ValueError(f"got {len(labels)} labels for {len(seeds)} seeds")
    rank, world_size = distributed.rank(), distributed.world_size()
    batches = seed_batches(seeds, batch_size, world_size)
    chosen = [None] * len(batches)
    if labels is not None:  # cut as the seeds are: the cut depends on the count alone
        chosen = seed_batches(labels, batch_size, world_size)
    for start in range(0, len(batches), world_size):
        own, own_labels = batches[start + rank], chosen[start + rank]
        sampled = _sample_batch(net, point, own, img_shape, label_dim, sigma_min, sigma_max,
                                device, correction, own_labels) if own else None  # fmt: skip
        for batch in distributed.all_gather_object(sampled):
            if batch is not None:  # an empty batch: fewer seeds than batches
                yield batch


def seed_batches(seeds: Sequence[int], batch_size: int, world_size: int = 1) -> list[list[int]]:
    """EDM ``generate.py``'s batches: ``seeds`` in order, cut into ``ceil(n / (batch_size * W))
    * W`` near-equal batches (``torch.tensor_split``: the first ones one seed longer, the last
    ones empty when there are fewer seeds than batches), dealt to ranks ``0..W-1`` in turn."""
    num_batches = math.ceil(len(seeds) / (batch_size * world_size)) * world_size
    return [b.tolist() for b in torch.as_tensor(list(seeds)).tensor_split(num_batches)]


def _sample_batch(
    net, point, seeds, img_shape, label_dim, sigma_min, sigma_max, device, correction, labels
) -> Batch:
    """One :class:`Batch` of :func:`generate_images`: ``seeds`` sampled at ``point``."""
    latents, class_labels = latents_from_seeds(seeds, img_shape, label_dim=label_dim, device=device)
    if labels is not None and class_labels is not None:  # drawn all the same: latents unchanged
        class_labels = torch.nn.functional.one_hot(torch.as_tensor(labels), label_dim)
        class_labels = class_labels.to(latents)
    out = heun_sampler(
        net,
        latents,
        class_labels,
        num_steps=point.num_steps,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        rho=point.rho,
        solver=point.solver,
        correction=correction,
        correct_heun=getattr(correction, "second_order", False),
    )
    labels = None if class_labels is None else class_labels.argmax(1).cpu().numpy()
    return Batch(to_uint8(out.images).cpu().numpy(), labels, out.sigmas.cpu().numpy())


def save_images(
    path: Path, images: np.ndarray, seeds: list[int], labels: np.ndarray | None, settings: dict
) -> str:
    """One compressed ``.npz``: ``images`` uint8, ``seeds``, ``labels`` (when given) and each
    ``settings`` entry as its own array (provenance). Returns the file's SHA-256."""
    arrays = {"images": images, "seeds": np.asarray(seeds, dtype=np.int64)}
    if labels is not None:
        arrays["labels"] = labels.astype(np.int64)
    arrays.update({k: np.asarray(v) for k, v in settings.items()})
    return atomic_write(path, lambda f: np.savez_compressed(f, **arrays))


def _score_point(scorer: Scorer, images: np.ndarray, seeds: list[int]) -> dict:
    start = time.perf_counter()
    info = scorer(images, seeds)
    return {
        "metric": info["metric"],
        "score": info["value"],
        "score_seconds": time.perf_counter() - start,
        "score_info": info,
    }


def write_table(rows: Sequence[SweepRow], stem: str | Path) -> None:
    """Write ``rows`` to ``<stem>.json`` (everything) and ``<stem>.csv`` (scalar columns)."""
    stem, rows = Path(stem), [row.to_dict() for row in rows]
    text = json.dumps(rows, indent=2) + "\n"
    atomic_write(stem.with_suffix(".json"), lambda f: f.write(text.encode()))
    columns = [k for k, v in rows[0].items() if not isinstance(v, dict | list)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    csv_text = buffer.getvalue()
    atomic_write(stem.with_suffix(".csv"), lambda f: f.write(csv_text.encode()))


def read_table(path: str | Path, *, remedy: str = "run the sweep (again)") -> list[SweepRow]:
    """The rows of a ``<name>_sweep.json`` that :func:`write_table` wrote."""
    rows = read_json(path, what="sweep table", remedy=remedy, kind=list)
    return [SweepRow.from_dict(row) for row in rows]
