"""Evaluation: Fréchet distances on clean-fid features, ODE-trajectory curvature, and plots.

Fréchet distance
    FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
    Equilibrium", Sec. 4 / the FID equation) between Gaussians fitted to feature sets:
    ``||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^{1/2})``, computed in float64 with
    ``scipy.linalg.sqrtm`` exactly as clean-fid and EDM's ``fid.py`` do (methods.md b.7).

Feature extractors (:class:`FeatureExtractor`), fed in memory with uint8 ``[N, C, H, W]`` batches:

* :func:`inception_extractor`: clean-fid's TorchScript Inception-v3 (``inception-2015-12-05.pt``)
  in clean-fid's "clean" mode: each image is PIL-bicubic-resized to 299x299 in float
  (``cleanfid.resize.build_resizer("clean")``) and the 2048-d pool features are read with
  ``cleanfid.fid.get_batch_features``, the same path as ``cleanfid.fid.get_model_features``.
  Grey images are replicated to RGB, as PIL's ``convert("RGB")`` does in clean-fid's folder path.
  The weights are never replaced by another network: if they are missing a
  ``FileNotFoundError`` says where to put them.
* :func:`feature_net_extractor`: a compact CNN classifier trained on the dataset itself
  (:func:`train_feature_net`), for offline work on small data. Its penultimate-layer activations
  are the features, computed at the images' native resolution (mode ``"native"``: no 299 resize,
  which would only interpolate a 16x16 image). Distances with it are *not* FID; callers name them
  ``fd_<dataset>`` (e.g. ``fd_digits``) and :func:`score` refuses the name "fid" for them.

Every score (:func:`score`, :func:`fid_protocol`) carries its provenance: metric name, feature
network and the SHA-256 of its weights file, mode, SHA-256 of the reference-statistics file,
number of images and the seeds.

Trajectory curvature (:func:`trajectory_stats`)
    methods.md a.8 item 5: the AOT paper's own curvature metric (its Sec. 5.4) could not be read.
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

import math
import os
import platform
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from cleanfid import fid as cleanfid_fid
from cleanfid.downloads_helper import check_download_inception, inception_url
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.resize import build_resizer
from matplotlib.figure import Figure
from PIL import Image
from scipy import linalg
from torch import Tensor, nn

from aot_model.files import atomic_write, file_digest

INCEPTION_FILENAME = "inception-2015-12-05.pt"
INCEPTION_URL = inception_url
INCEPTION_ENV = "AOT_INCEPTION_WEIGHTS"
# clean-fid hard-codes this folder (cleanfid.features.feature_extractor).
CLEANFID_INCEPTION_DIR = Path("./" if platform.system() == "Windows" else "/tmp")
MODES = ("clean", "native")

ImageBatch = np.ndarray | Tensor


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


def fid_from_features(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``[N1, D]``, ``[N2, D]``."""
    return frechet_distance(*feature_stats(feats1), *feature_stats(feats2))


# --------------------------------------------------------------------------------------------
# Feature extractors


class FeatureExtractor:
    """A feature network fed with uint8 image batches through clean-fid's feature path.

    Parameters
    ----------
    name : str
        Identifier recorded with scores, e.g. ``"inception_v3"``.
    model : callable
        ``model(x) -> [B, D]`` for float32 ``x`` ``[B, in_channels, H, W]`` with values in
        [0, 255] on ``device`` (clean-fid's convention).
    sha256 : str
        SHA-256 of the weights file, recorded with scores.
    mode : {"clean", "native"}
        "clean": clean-fid's PIL-bicubic float resize to 299x299; "native": no resize.
    in_channels : int
        Channels the model takes; 1-channel images are replicated when it takes 3.
    resolution : int or None
        Required input height and width in "native" mode; None accepts any size.
    device : torch.device or str
    batch_size : int
        Images per forward pass.
    resize_threads : int
        Threads for the "clean" resize (PIL releases the GIL while resizing); on a GPU the
        single-threaded resize, a few hundred images/s per core, would limit throughput.
    """

    def __init__(
        self,
        name: str,
        model: Callable[[Tensor], Tensor],
        *,
        sha256: str,
        mode: str,
        in_channels: int,
        resolution: int | None = None,
        device: torch.device | str = "cpu",
        batch_size: int = 64,
        resize_threads: int = 1,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if batch_size < 1 or resize_threads < 1:
            raise ValueError(
                f"batch_size and resize_threads must be >= 1, got {batch_size}, {resize_threads}"
            )
        self.name = name
        self.model = model
        self.sha256 = sha256
        self.mode = mode
        self.in_channels = in_channels
        self.resolution = resolution
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.resize_threads = resize_threads
        self._resize = build_resizer("clean") if mode == "clean" else None

    def features(self, batches: Iterable[ImageBatch]) -> np.ndarray:
        """Features of every image in ``batches``.

        Parameters
        ----------
        batches : iterable of uint8 arrays or tensors ``[B, C, H, W]``
            E.g. a generator that samples and quantises one batch at a time.

        Returns
        -------
        np.ndarray, float32, ``[N, D]``
        """
        chunks = [self._batch_features(batch) for batch in batches]
        if not chunks:
            raise ValueError("batches must hold at least one image batch, got none")
        return np.concatenate(chunks)

    def _batch_features(self, batch: ImageBatch) -> np.ndarray:
        images = self._check_batch(batch)
        chunks = []
        for start in range(0, len(images), self.batch_size):
            x = self._prepare(images[start : start + self.batch_size])
            chunks.append(cleanfid_fid.get_batch_features(x, self.model, self.device))
        return np.concatenate(chunks)

    def _check_batch(self, batch: ImageBatch) -> np.ndarray:
        images = batch.cpu().numpy() if isinstance(batch, Tensor) else np.asarray(batch)
        if images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0:
            raise ValueError(
                f"images must be a non-empty uint8 batch [B, C, H, W], got dtype {images.dtype} "
                f"shape {images.shape}"
            )
        channels = images.shape[1]
        if channels == 1 and self.in_channels == 3:
            images = np.repeat(images, 3, axis=1)
        elif channels != self.in_channels:
            raise ValueError(f"{self.name} takes {self.in_channels}-channel images, got {channels}")
        if self.resolution is not None and images.shape[2:] != (self.resolution,) * 2:
            raise ValueError(
                f"{self.name} takes {self.resolution}x{self.resolution} images, got "
                f"{images.shape[2]}x{images.shape[3]}"
            )
        return images

    def _prepare(self, images: np.ndarray) -> Tensor:
        """uint8 ``[B, C, H, W]`` -> float32 in [0, 255], resized as clean-fid does in "clean"."""
        if self._resize is None:
            return torch.from_numpy(images.astype(np.float32))
        with ThreadPoolExecutor(self.resize_threads) as pool:
            resized = list(pool.map(self._resize, images.transpose(0, 2, 3, 1)))
        return torch.from_numpy(np.stack(resized).transpose(0, 3, 1, 2).astype(np.float32))


def resolve_inception_weights(
    weights_path: str | Path | None = None, *, download: bool = True
) -> Path:
    """Find clean-fid's ``inception-2015-12-05.pt``; call it before any sampling work.

    Looks, in order, at ``weights_path``, the ``AOT_INCEPTION_WEIGHTS`` environment variable
    (each a file of that name or a folder holding it), then clean-fid's own location
    (``/tmp/inception-2015-12-05.pt`` on Linux), which clean-fid downloads when ``download``
    is true and the machine is online.

    Returns
    -------
    Path
        The weights file.

    Raises
    ------
    FileNotFoundError
        Naming the file, where clean-fid looks for it, the URL and how to supply it.
    """
    given = weights_path if weights_path is not None else os.environ.get(INCEPTION_ENV)
    if given:
        path = Path(given)
        path = path / INCEPTION_FILENAME if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(_missing_inception_message(f"{path} (not found)"))
        if path.name != INCEPTION_FILENAME:
            raise FileNotFoundError(_missing_inception_message(f"{path} has another file name"))
        return path
    default = CLEANFID_INCEPTION_DIR / INCEPTION_FILENAME
    if default.is_file():
        return default
    if not download:
        raise FileNotFoundError(_missing_inception_message(f"{default} (not found)"))
    try:
        return Path(check_download_inception(fpath=str(CLEANFID_INCEPTION_DIR)))
    except OSError as err:  # urllib's URLError is an OSError
        raise FileNotFoundError(_missing_inception_message(f"download failed: {err}")) from err


def _missing_inception_message(what: str) -> str:
    return (
        f"The Inception weights for FID, {INCEPTION_FILENAME}, are missing: {what}. clean-fid "
        f"looks for {CLEANFID_INCEPTION_DIR / INCEPTION_FILENAME} and downloads it from "
        f"{INCEPTION_URL} when online. To supply it offline, download that URL on a machine with "
        f"internet and either copy the file to {CLEANFID_INCEPTION_DIR / INCEPTION_FILENAME}, "
        f"pass weights_path=/path/to/{INCEPTION_FILENAME}, or set "
        f"{INCEPTION_ENV}=/path/to/{INCEPTION_FILENAME} (the file name must stay "
        f"{INCEPTION_FILENAME}). No other network is substituted; for offline work on small "
        f"data use train_feature_net and report fd_<dataset>, not FID."
    )


def inception_extractor(
    weights_path: str | Path | None = None,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    download: bool = True,
    resize_threads: int | None = None,
) -> FeatureExtractor:
    """clean-fid's Inception-v3 in "clean" mode (the standard FID feature network).

    See :func:`resolve_inception_weights` for where the weights come from. The TorchScript file is
    loaded by clean-fid's ``InceptionV3W`` (``torch.jit.load``; it is not a pickle).
    ``resize_threads`` defaults to the number of CPUs.
    """
    path = resolve_inception_weights(weights_path, download=download)
    model = InceptionV3W(str(path.parent), download=False, resize_inside=False)
    return FeatureExtractor(
        "inception_v3",
        model.to(device).eval(),
        sha256=file_digest(path),
        mode="clean",
        in_channels=3,
        device=device,
        batch_size=batch_size,
        resize_threads=resize_threads or os.cpu_count() or 1,
    )


class FeatureNet(nn.Module):
    """Compact CNN classifier; its global-average-pooled activations are the features.

    Two 3x3 conv blocks at full resolution, 2x average pooling, two more blocks at twice the width,
    global average pooling (the ``2·width``-d features), then a linear classifier. GroupNorm keeps
    every image's features independent of the batch.

    Parameters
    ----------
    img_channels, img_resolution, num_classes, width : int
    """

    def __init__(self, img_channels: int, img_resolution: int, num_classes: int, width: int = 32):
        super().__init__()
        self.config = {
            "img_channels": img_channels,
            "img_resolution": img_resolution,
            "num_classes": num_classes,
            "width": width,
        }
        for key, value in self.config.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive int, got {value!r}")
        if img_resolution < 2:
            raise ValueError(f"img_resolution must be >= 2 (one 2x pooling), got {img_resolution}")
        self.body = nn.Sequential(
            _conv_block(img_channels, width),
            _conv_block(width, width),
            nn.AvgPool2d(2),
            _conv_block(width, 2 * width),
            _conv_block(2 * width, 2 * width),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations ``[B, 2·width]`` of float images ``[B, C, H, W]`` in [0, 255]."""
        return self.body(x / 127.5 - 1.0)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``[B, num_classes]`` of float images in [0, 255]."""
        return self.head(self.features(x))


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(min(8, cout), cout), nn.SiLU()
    )


def train_feature_net(
    dataset,
    *,
    epochs: int = 30,
    seed: int = 0,
    batch_size: int = 64,
    lr: float = 2e-3,
    width: int = 32,
    holdout_fraction: float = 0.2,
    device: torch.device | str = "cpu",
) -> tuple[FeatureNet, dict]:
    """Train a :class:`FeatureNet` classifier on ``dataset`` with Adam and cross-entropy.

    A random ``holdout_fraction`` of the images (drawn from ``seed``) is kept out of training and
    used to report accuracy; initialisation and shuffling also derive from ``seed`` only.

    Parameters
    ----------
    dataset : ImageDataset
        ``images`` uint8 ``[N, C, H, W]`` (square), ``labels`` int ``[N]``, ``num_classes``.
    epochs, seed, batch_size, lr, width, holdout_fraction, device

    Returns
    -------
    net : FeatureNet, in eval mode
    info : dict
        ``train_accuracy``, ``heldout_accuracy``, ``num_train``, ``num_heldout``, ``epochs``,
        ``seed``.
    """
    images, labels = np.asarray(dataset.images), np.asarray(dataset.labels)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"dataset.images must be uint8 [N, C, H, H], got {images.shape}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must lie in (0, 1), got {holdout_fraction}")
    num_heldout = round(holdout_fraction * len(images))
    if not 1 <= num_heldout < len(images):
        raise ValueError(f"holdout_fraction={holdout_fraction} leaves an empty split")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(images), generator=generator).numpy()
    x = torch.from_numpy(images).float().to(device)
    y = torch.from_numpy(labels.astype(np.int64)).to(device)
    train_idx, heldout_idx = order[num_heldout:], order[:num_heldout]
    with torch.random.fork_rng(devices=[]):  # seed the initialisation without touching global RNG
        torch.manual_seed(seed)
        net = FeatureNet(images.shape[1], images.shape[2], int(dataset.num_classes), width)
    net = net.to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for _ in range(epochs):
        perm = train_idx[torch.randperm(len(train_idx), generator=generator).numpy()]
        for start in range(0, len(perm), batch_size):
            idx = perm[start : start + batch_size]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    net.eval()
    info = {
        "train_accuracy": _accuracy(net, x[train_idx], y[train_idx]),
        "heldout_accuracy": _accuracy(net, x[heldout_idx], y[heldout_idx]),
        "num_train": len(train_idx),
        "num_heldout": num_heldout,
        "epochs": epochs,
        "seed": seed,
    }
    return net, info


@torch.no_grad()
def _accuracy(net: FeatureNet, x: Tensor, y: Tensor, batch_size: int = 512) -> float:
    correct = sum(
        (net(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
        for i in range(0, len(x), batch_size)
    )
    return correct / len(x)


def save_feature_net(path: str | Path, net: FeatureNet) -> str:
    """Write ``{"config", "state_dict"}`` atomically to ``path``; returns the file's SHA-256."""
    payload = {"config": dict(net.config), "state_dict": net.state_dict()}
    return atomic_write(path, lambda f: torch.save(payload, f))


def load_feature_net(path: str | Path, device: torch.device | str = "cpu") -> FeatureNet:
    """Load a :func:`save_feature_net` file (``torch.load(weights_only=True)``), in eval mode."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or set(payload) != {"config", "state_dict"}:
        raise ValueError(f"{path} is not a feature-net file (keys 'config' and 'state_dict')")
    net = FeatureNet(**payload["config"])
    net.load_state_dict(payload["state_dict"])
    return net.to(device).eval()


def feature_net_extractor(
    path: str | Path, *, device: torch.device | str = "cpu", batch_size: int = 256
) -> FeatureExtractor:
    """A :class:`FeatureExtractor` on a saved :class:`FeatureNet`, native resolution."""
    net = load_feature_net(path, device)
    return FeatureExtractor(
        "feature_net",
        net.features,
        sha256=file_digest(path),
        mode="native",
        in_channels=net.config["img_channels"],
        resolution=net.config["img_resolution"],
        device=device,
        batch_size=batch_size,
    )


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
    with np.load(path, allow_pickle=False) as data:
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
        ``metric``, ``value``, ``feature_net``, ``feature_net_sha256``, ``mode``,
        ``ref_stats_sha256``, ``ref_count``, ``num_images``, ``seeds``.
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
        "ref_count": ref_stats.get("count"),
        "num_images": num_images,
        "seeds": seeds if seeds is None or isinstance(seeds, str) else format_seeds(seeds),
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


def fid_protocol(
    extractor: FeatureExtractor,
    generate: Callable[[range], Iterable[ImageBatch]],
    ref_stats: Mapping,
    *,
    num_images: int = 50_000,
    num_blocks: int = 3,
    metric: str | None = None,
) -> dict:
    """EDM's protocol (methods.md b.7): score seed blocks 0..n-1, n..2n-1, ...; min and mean.

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
    for block in range(num_blocks):
        seeds = range(block * num_images, (block + 1) * num_images)
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


# --------------------------------------------------------------------------------------------
# Plots and image grids


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
