"""Evaluation: Fréchet distances with provenance, and ODE-trajectory curvature.

Fréchet distance
    FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
    Equilibrium", Sec. 4 / the FID equation) between Gaussians fitted to feature sets:
    ``||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^{1/2})``, computed in float64 with
    ``scipy.linalg.sqrtm`` exactly as clean-fid and EDM's ``fid.py`` do (method-notes b.7).

    The features come from an :class:`aot_model.features.FeatureExtractor` (Inception-v3 for FID,
    or a small feature net for ``fd_<dataset>``). Reference statistics are saved and loaded here
    (:func:`reference_stats`, :func:`save_stats`, :func:`load_stats`); every score
    (:func:`score`, :func:`fid_protocol`) carries its provenance: metric name, feature network and
    the SHA-256 of its weights file, mode, SHA-256 of the reference-statistics file, number of
    images and the seeds (:func:`format_seeds`).

Trajectory curvature (:func:`trajectory_stats`)
    method-notes a.8 item 5: the AOT paper's own curvature metric (its Sec. 5.4) could not be read.
    This module reports three quantities from the sampler's actual trajectory x_0..x_N:

    * curvature at t_{i+1}: ``1 - cos`` of the angle between successive step directions
      ``d_i = (x_{i+1} - x_i) / (t_{i+1} - t_i)``, per image then averaged (and the angle itself);
      0 for a straight path. This is the "angle between successive Heun directions" of a.8, using
      the directions actually taken (after Heun's correction), so it measures the path, not the
      solver's internal slopes;
    * denoiser drift at t_i: ``||D(x_i; t_i) - x_N||``, how far the denoiser's prediction still
      is from the final sample (constant prediction = straight path under the EDM ODE);
    * straightness per trajectory: ``||x_N - x_0|| / sum_i ||x_{i+1} - x_i||``, 1 for a straight
      path and < 1 otherwise.

    The sampler stores ``xs`` in float32, so 1 - cos has a rounding floor of about
    ``(6e-8 · ||x|| / ||x_{i+1} - x_i||)² / 2``; it only matters for steps far smaller than x.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import linalg

from aot_model import devices
from aot_model.features import FeatureExtractor, ImageBatch
from aot_model.files import atomic_write, file_digest, read_npz

# --------------------------------------------------------------------------------------------
# Fréchet distance


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017).

    ``d² = ||mu1 - mu2||² + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2})`` in float64, with
    ``scipy.linalg.sqrtm``; if the product is singular (non-finite root), ``eps`` is added to both
    diagonals, and the real part of the root is kept, as in clean-fid and EDM.

    Parameters
    ----------
    mu1, mu2 : array ``[D]``
    sigma1, sigma2 : array ``[D, D]``
        Covariances (symmetric positive semi-definite).
    eps : float
        Diagonal offset of the singular-product fallback.

    Returns
    -------
    float
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    dim = mu1.shape[0]
    if mu1.shape != (dim,) or mu2.shape != (dim,):
        raise ValueError(f"mu1 and mu2 must both have shape [D], got {mu1.shape} and {mu2.shape}")
    if sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"sigma1 and sigma2 must have shape [{dim}, {dim}], got {sigma1.shape} and "
            f"{sigma2.shape}"
        )
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = eps * np.eye(dim)
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        # A large imaginary part means the inputs were not covariances, not rounding.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"sigma1 @ sigma2 has no real square root (max imaginary part "
                f"{np.abs(covmean.imag).max():.3g}); are both PSD covariances?"
            )
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (float64) of ``features`` ``[N, D]``, N >= 2."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must have shape [N, D] with N >= 2, got {features.shape}")
    return features.mean(axis=0), np.atleast_2d(np.cov(features, rowvar=False))


# --------------------------------------------------------------------------------------------
# Reference statistics and scores


def reference_stats(extractor: FeatureExtractor, images: ImageBatch) -> dict:
    """Feature mean and covariance of reference images (e.g. the training set).

    Parameters
    ----------
    extractor : FeatureExtractor
    images : uint8 ``[N, C, H, W]``

    Returns
    -------
    dict
        ``mu`` ``[D]``, ``sigma`` ``[D, D]`` (float64), ``count``, ``extractor``,
        ``extractor_sha256``, ``mode``.
    """
    mu, sigma = feature_stats(extractor.features([images]))
    return {
        "mu": mu,
        "sigma": sigma,
        "count": len(images),
        "extractor": extractor.name,
        "extractor_sha256": extractor.sha256,
        "mode": extractor.mode,
    }


_STATS_META = ("count", "extractor", "extractor_sha256", "mode")


def save_stats(path: str | Path, stats: Mapping) -> str:
    """Write reference statistics to an ``.npz`` atomically; returns the file's SHA-256."""
    missing = [k for k in ("mu", "sigma", *_STATS_META) if k not in stats]
    if missing:
        raise ValueError(f"stats lack the keys {missing}; build them with reference_stats")
    arrays = {"mu": np.asarray(stats["mu"]), "sigma": np.asarray(stats["sigma"])}
    arrays.update({k: np.asarray(stats[k]) for k in _STATS_META})
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def load_stats(path: str | Path) -> dict:
    """Read statistics written by :func:`save_stats`, plus ``sha256`` of the file.

    clean-fid's own reference files (only ``mu`` and ``sigma``) load too; their metadata is None.
    """
    data = read_npz(
        path,
        ("mu", "sigma"),
        optional=_STATS_META,
        what="reference statistics (mu, sigma)",
        remedy="rebuild them with the reference step",
    )
    stats = {"mu": data["mu"], "sigma": data["sigma"]}
    stats.update({k: data[k].item() if k in data else None for k in _STATS_META})
    stats["sha256"] = file_digest(path)
    return stats


def score(
    extractor: FeatureExtractor,
    images: Iterable[ImageBatch],
    ref_stats: Mapping,
    *,
    num_images: int,
    seeds: Sequence[int] | str | None = None,
    metric: str | None = None,
) -> dict:
    """Fréchet distance of the first ``num_images`` generated images to ``ref_stats``.

    Parameters
    ----------
    extractor : FeatureExtractor
        Must be the one the reference statistics were computed with (checked by SHA-256).
    images : iterable of uint8 batches ``[B, C, H, W]``
        Consumed only up to ``num_images`` images.
    ref_stats : dict
        From :func:`load_stats` (or :func:`reference_stats`).
    num_images : int
        Images to score (EDM uses 50,000); fewer available is an error.
    seeds : sequence of int, str or None
        The seeds the images came from, recorded compactly (e.g. ``"0-49999"``).
    metric : str or None
        Name of the score; None means "fid", which only the Inception extractor may use. Name
        other extractors' scores ``fd_<dataset>``.

    Returns
    -------
    dict
        ``metric``, ``value``, ``feature_net``, ``feature_net_sha256``, ``mode`` (for FID the
        clean-fid mode: ``clean`` or ``legacy_tensorflow``), ``ref_stats_sha256``, ``ref_source``
        (where the reference statistics came from, when known), ``ref_count``, ``num_images``,
        ``seeds``, ``float32_precision`` (the TF32 switches the features were computed under,
        `devices.float32_precision`).
    """
    metric = _check_score_args(extractor, ref_stats, num_images, seeds, metric)
    feats = extractor.features(_take(images, num_images))
    if len(feats) < num_images:
        raise ValueError(f"num_images={num_images} but the images ran out after {len(feats)}")
    value = frechet_distance(*feature_stats(feats), ref_stats["mu"], ref_stats["sigma"])
    return {
        "metric": metric,
        "value": value,
        "feature_net": extractor.name,
        "feature_net_sha256": extractor.sha256,
        "mode": extractor.mode,
        "ref_stats_sha256": ref_stats.get("sha256"),
        "ref_source": ref_stats.get("source"),
        "ref_count": ref_stats.get("count"),
        "num_images": num_images,
        "seeds": seeds if seeds is None or isinstance(seeds, str) else format_seeds(seeds),
        "float32_precision": devices.float32_precision(),
    }


def _check_score_args(
    extractor: FeatureExtractor,
    ref_stats: Mapping,
    num_images: int,
    seeds: Sequence[int] | str | None,
    metric: str | None,
) -> str:
    """Validate :func:`score`'s arguments before any feature is computed; returns the metric."""
    is_inception = extractor.name == "inception_v3"
    if metric is None and not is_inception:
        raise ValueError(f"metric must be given for extractor {extractor.name!r}, e.g. 'fd_digits'")
    metric = metric or "fid"
    if metric.lower() == "fid" and not is_inception:
        raise ValueError(f"metric 'fid' is reserved for Inception features, got {extractor.name!r}")
    if num_images < 2:
        raise ValueError(f"num_images must be >= 2, got {num_images}")
    if seeds is not None and not isinstance(seeds, str) and len(seeds) != num_images:
        raise ValueError(f"seeds must hold num_images={num_images} seeds, got {len(seeds)}")
    for key, want in (("extractor_sha256", extractor.sha256), ("mode", extractor.mode)):
        if ref_stats.get(key) is not None and ref_stats[key] != want:
            raise ValueError(
                f"ref_stats were computed with {key}={ref_stats[key]!r}, the extractor has {want!r}"
            )
    return metric


def _take(batches: Iterable[ImageBatch], num_images: int) -> Iterator[ImageBatch]:
    """Yield batches until ``num_images`` images are out, cutting the last one short."""
    left = num_images
    for batch in batches:
        yield batch[:left]
        left -= len(batch)
        if left <= 0:  # stop before the next batch is generated
            return


def format_seeds(seeds: Iterable[int]) -> str:
    """Compact seed list in EDM's notation: ``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    parts, run = [], []
    for s in (int(s) for s in seeds):
        if run and s == run[-1] + 1:
            run.append(s)
            continue
        if run:
            parts.append(_format_run(run))
        run = [s]
    if run:
        parts.append(_format_run(run))
    return ",".join(parts)


def _format_run(run: list[int]) -> str:
    return str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}"


def seed_blocks(num_images: int, num_blocks: int) -> list[range]:
    """EDM's seed blocks: ``0..n-1``, ``n..2n-1``, ... (``num_blocks`` of ``num_images``)."""
    return [range(b * num_images, (b + 1) * num_images) for b in range(num_blocks)]


def fid_protocol(
    extractor: FeatureExtractor,
    generate: Callable[[range], Iterable[ImageBatch]],
    ref_stats: Mapping,
    *,
    num_images: int = 50_000,
    num_blocks: int = 3,
    metric: str | None = None,
) -> dict:
    """EDM's protocol (method-notes b.7): score seed blocks 0..n-1, n..2n-1, ...; min and mean.

    Parameters
    ----------
    generate : callable
        ``generate(seeds) -> iterable of uint8 batches`` for a ``range`` of seeds.
    num_images : int
        Images per block.
    num_blocks : int
        Number of seed blocks (EDM: 3, reporting the minimum).
    extractor, ref_stats, metric
        As in :func:`score`.

    Returns
    -------
    dict
        ``metric``, ``min``, ``mean``, ``values`` (one per block), ``blocks`` (their seeds) and the
        provenance of :func:`score`.
    """
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
    _check_score_args(extractor, ref_stats, num_images, None, metric)
    runs = []
    for seeds in seed_blocks(num_images, num_blocks):
        images = generate(seeds)
        runs.append(
            score(extractor, images, ref_stats, num_images=num_images, seeds=seeds, metric=metric)
        )
    values = [run["value"] for run in runs]
    provenance = {k: v for k, v in runs[0].items() if k not in ("value", "seeds")}
    return {
        **provenance,
        "min": min(values),
        "mean": float(np.mean(values)),
        "values": values,
        "blocks": [run["seeds"] for run in runs],
    }


# --------------------------------------------------------------------------------------------
# Trajectory curvature


@dataclass(frozen=True)
class TrajectoryStats:
    """Curvature summaries of a batch of sampler trajectories (see the module docstring).

    Attributes
    ----------
    sigmas : np.ndarray ``[N + 1]``
        t_0..t_N.
    curvature : np.ndarray ``[N - 1]``
        Mean over images of ``1 - cos(d_i, d_{i+1})``, located at ``sigmas[1:-1]`` (t_{i+1}).
    angle : np.ndarray ``[N - 1]``
        Mean angle between d_i and d_{i+1} in radians, same locations.
    drift : np.ndarray ``[N]``
        Mean ``||D(x_i; t_i) - x_N||`` (L2 over all pixels), located at ``sigmas[:-1]``.
    straightness : np.ndarray ``[B]``
        ``||x_N - x_0|| / sum_i ||x_{i+1} - x_i||`` per trajectory.
    """

    sigmas: np.ndarray
    curvature: np.ndarray
    angle: np.ndarray
    drift: np.ndarray
    straightness: np.ndarray

    def summary(self) -> dict:
        """Scalars for logging: mean curvature, mean angle (degrees), mean straightness."""
        return {
            "curvature_mean": float(self.curvature.mean()),
            "angle_deg_mean": float(np.degrees(self.angle.mean())),
            "straightness_mean": float(self.straightness.mean()),
        }


def trajectory_stats(output) -> TrajectoryStats:
    """Curvature, denoiser drift and straightness of sampler trajectories, in float64.

    Parameters
    ----------
    output : SamplerOutput
        From ``heun_sampler(..., return_trajectory=True)``: ``xs`` ``[N+1, B, ...]``,
        ``denoised`` ``[N, B, ...]``, ``sigmas`` ``[N+1]`` with N >= 2.

    Returns
    -------
    TrajectoryStats
    """
    if output.xs is None or output.denoised is None:
        raise ValueError("output has no trajectory; sample with return_trajectory=True")
    xs = output.xs.detach().cpu().double().flatten(2)  # [N+1, B, P]
    denoised = output.denoised.detach().cpu().double().flatten(2)  # [N, B, P]
    sigmas = output.sigmas.detach().cpu().double()
    num_steps = xs.shape[0] - 1
    if num_steps < 2 or denoised.shape[0] != num_steps or sigmas.shape != (num_steps + 1,):
        raise ValueError(
            f"need xs [N+1, B, ...], denoised [N, B, ...], sigmas [N+1] with N >= 2, got "
            f"{tuple(output.xs.shape)}, {tuple(output.denoised.shape)}, {tuple(sigmas.shape)}"
        )
    steps = xs[1:] - xs[:-1]
    directions = steps / (sigmas[1:] - sigmas[:-1])[:, None, None]
    unit = directions / directions.norm(dim=-1, keepdim=True)
    a, b = unit[:-1], unit[1:]
    # Stable forms: 1 - cos = |a - b|² / 2 and angle = 2 atan2(|a - b|, |a + b|) for unit a, b.
    one_minus_cos = 0.5 * (a - b).square().sum(-1)
    angle = 2.0 * torch.atan2((a - b).norm(dim=-1), (a + b).norm(dim=-1))
    drift = (denoised - xs[-1]).norm(dim=-1)
    straightness = (xs[-1] - xs[0]).norm(dim=-1) / steps.norm(dim=-1).sum(0)
    return TrajectoryStats(
        sigmas=sigmas.numpy(),
        curvature=one_minus_cos.mean(1).numpy(),
        angle=angle.mean(1).numpy(),
        drift=drift.mean(1).numpy(),
        straightness=straightness.numpy(),
    )
