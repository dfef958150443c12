"""Feature networks for Fréchet distances, fed in memory with uint8 ``[N, C, H, W]`` batches.

:class:`FeatureExtractor` runs a network through clean-fid's feature path. Two are built here:

* :func:`inception_extractor`: clean-fid's TorchScript Inception-v3 (``inception-2015-12-05.pt``)
  in clean-fid's "clean" mode: each image is PIL-bicubic-resized to 299x299 in float
  (``cleanfid.resize.build_resizer("clean")``) and the 2048-d pool features are read with
  ``cleanfid.fid.get_batch_features``, the same path as ``cleanfid.fid.get_model_features``.
  Grey images are replicated to RGB, as PIL's ``convert("RGB")`` does in clean-fid's folder path.
  The weights are never replaced by another network: if they are missing a
  ``FileNotFoundError`` says where to put them (:func:`resolve_inception_weights`).
* :func:`feature_net_extractor`: a compact CNN classifier (:class:`FeatureNet`) trained on the
  dataset itself (:func:`train_feature_net`), for offline work on small data. Its
  penultimate-layer activations are the features, computed at the images' native resolution
  (mode ``"native"``: no 299 resize, which would only interpolate a 16x16 image). Distances with
  it are *not* FID; callers name them ``fd_<dataset>`` (e.g. ``fd_digits``) and
  :func:`aot_model.metrics.score` refuses the name "fid" for them.

Every extractor carries its name, mode and the SHA-256 of its weights file, which scores record.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import KW_ONLY, dataclass
from pathlib import Path

import numpy as np
import torch
from cleanfid.downloads_helper import check_download_inception, inception_url
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.resize import build_resizer
from torch import Tensor, nn

from aot_model.checks import check_choice, check_int
from aot_model.files import DamagedFileError, atomic_write, file_digest, load_torch_file
from aot_model.progress import progress_bar
from aot_model.rng import seeded

INCEPTION_FILENAME = "inception-2015-12-05.pt"
INCEPTION_URL = inception_url
INCEPTION_ENV = "AOT_INCEPTION_WEIGHTS"
# clean-fid hard-codes this folder (cleanfid.features.feature_extractor).
CLEANFID_INCEPTION_DIR = Path("./" if platform.system() == "Windows" else "/tmp")
INCEPTION_MODES = ("clean", "legacy_tensorflow")
MODES = (*INCEPTION_MODES, "native")
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # "<quota> <period>" or "max <period>"

ImageBatch = np.ndarray | Tensor


# --------------------------------------------------------------------------------------------
# Feature extractor


@dataclass(eq=False)
class FeatureExtractor:
    """A feature network fed with uint8 image batches through clean-fid's feature path.

    ``model(x) -> [B, D]`` takes float32 ``x`` ``[B, in_channels, H, W]`` with values in [0, 255]
    on ``device`` (clean-fid's convention); 1-channel images are replicated when it takes 3.
    ``name`` (e.g. ``"inception_v3"``) and ``sha256`` (of the weights file) are recorded with
    scores. ``mode`` "clean" is clean-fid's PIL-bicubic float resize to 299x299;
    "legacy_tensorflow" and "native" resize nothing here (in "legacy_tensorflow" the Inception
    graph resizes inside). ``resolution``: the required input height and width, None for any.
    ``batch_size`` images go through each forward pass. ``resize_threads`` threads run the
    "clean" resize (PIL releases the GIL while resizing); on a GPU the single-threaded resize, a
    few hundred images/s per core, would limit throughput.
    """

    name: str
    model: Callable[[Tensor], Tensor]
    _: KW_ONLY
    sha256: str
    mode: str
    in_channels: int
    resolution: int | None = None
    device: torch.device | str = "cpu"
    batch_size: int = 64
    resize_threads: int = 1

    def __post_init__(self):
        check_choice("mode", self.mode, MODES)
        if self.batch_size < 1 or self.resize_threads < 1:
            raise ValueError(
                f"batch_size and resize_threads must be >= 1, got {self.batch_size}, "
                f"{self.resize_threads}"
            )
        self.device = torch.device(self.device)
        self._resize = build_resizer("clean") if self.mode == "clean" else None

    def features(self, batches: Iterable[ImageBatch], *, progress: bool = True) -> np.ndarray:
        """float32 ``[N, D]`` features of every image in ``batches``, uint8 arrays or tensors
        ``[B, C, H, W]`` (e.g. a generator that samples and quantises one batch at a time);
        ``progress`` counts them on a progress bar (50k Inception images take minutes)."""
        chunks = []
        with progress_bar(desc=f"{self.name} features", unit="img", disable=not progress) as bar:
            for batch in batches:
                chunks.append(self._batch_features(batch))
                bar.update(len(chunks[-1]))
        if not chunks:
            raise ValueError("batches must hold at least one image batch, got none")
        return np.concatenate(chunks)

    def _batch_features(self, batch: ImageBatch) -> np.ndarray:
        # cleanfid.fid imports torchvision (and torch._dynamo): ~2 s that every `aot` process paid
        # at start-up, scoring or not.
        from cleanfid import fid as cleanfid_fid

        images = self._check_batch(batch)
        parts = [images[i : i + self.batch_size] for i in range(0, len(images), self.batch_size)]
        chunks = []
        # The next part is resized (PIL, which releases the GIL) while this one goes through the
        # network, instead of before it.
        with ThreadPoolExecutor(1) as ahead:
            pending = ahead.submit(self._prepare, parts[0])
            for following in [*parts[1:], None]:
                x = pending.result()
                if following is not None:
                    pending = ahead.submit(self._prepare, following)
                chunks.append(cleanfid_fid.get_batch_features(x, self.model, self.device))
        return np.concatenate(chunks)

    def _check_batch(self, batch: ImageBatch) -> np.ndarray:
        images = batch.cpu().numpy() if isinstance(batch, Tensor) else np.asarray(batch)
        if images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0:
            raise ValueError(
                f"images must be a non-empty uint8 batch [B, C, H, W], got dtype {images.dtype} "
                f"shape {images.shape}"
            )
        self.check_image_shape(images.shape[1:])
        if images.shape[1] == 1 and self.in_channels == 3:
            images = np.repeat(images, 3, axis=1)
        return images

    def check_image_shape(self, shape) -> None:
        """Raise ValueError unless images of ``shape`` (C, H, W) fit this extractor; grey images
        fit a 3-channel one (they are replicated)."""
        channels, height, width = shape
        if channels != self.in_channels and not (channels == 1 and self.in_channels == 3):
            raise ValueError(f"{self.name} takes {self.in_channels}-channel images, got {channels}")
        if self.resolution is not None and (height, width) != (self.resolution,) * 2:
            raise ValueError(
                f"{self.name} takes {self.resolution}x{self.resolution} images, got "
                f"{height}x{width}"
            )

    def _prepare(self, images: np.ndarray) -> Tensor:
        """uint8 ``[B, C, H, W]`` -> float32 in [0, 255], resized as clean-fid does in "clean"."""
        if self._resize is None:
            return torch.from_numpy(images.astype(np.float32))
        with ThreadPoolExecutor(self.resize_threads) as pool:
            resized = list(pool.map(self._resize, images.transpose(0, 2, 3, 1)))
        return torch.from_numpy(np.stack(resized).transpose(0, 3, 1, 2).astype(np.float32))


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a
    container's ``--cpus``), where ``os.cpu_count()`` counts every CPU of the host."""
    affinity = getattr(os, "sched_getaffinity", None)  # Linux only
    count = len(affinity(0)) if affinity else os.cpu_count() or 1
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()
        return max(1, min(count, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2, not Linux, or no quota (int("max") fails)
        return count


# --------------------------------------------------------------------------------------------
# Inception-v3 weights


def resolve_inception_weights(
    weights_path: str | Path | None = None, *, download: bool = True
) -> Path:
    """Find clean-fid's ``inception-2015-12-05.pt``; call it before any sampling work.

    Looks, in order, at ``weights_path``, the ``AOT_INCEPTION_WEIGHTS`` environment variable
    (each a file of that name or a folder holding it), then clean-fid's own location
    (``/tmp/inception-2015-12-05.pt`` on Linux), which clean-fid downloads when ``download``
    is true and the machine is online. Otherwise a FileNotFoundError names the file, where
    clean-fid looks for it, the URL and how to supply it.
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
    mode: str = "clean",
) -> FeatureExtractor:
    """clean-fid's Inception-v3 (the standard FID feature network).

    ``mode`` "clean": clean-fid's PIL-bicubic resize to 299x299 outside the network.
    "legacy_tensorflow": clean-fid's mode of that name, the protocol of EDM's ``fid.py`` and of
    the published CIFAR-10 FIDs (method-notes b.7): the images go in at their own size, as float
    0..255, and the TorchScript graph resizes them with its own TensorFlow-compatible bilinear
    resize (``InceptionV3W(resize_inside=True)``).

    See :func:`resolve_inception_weights` for where the weights come from. The TorchScript file is
    loaded by clean-fid's ``InceptionV3W`` (``torch.jit.load``; it is not a pickle).
    ``resize_threads`` defaults to `usable_cpus`.
    """
    check_choice("mode", mode, INCEPTION_MODES)
    path = resolve_inception_weights(weights_path, download=download)
    inside = mode == "legacy_tensorflow"
    model = InceptionV3W(str(path.parent), download=False, resize_inside=inside)
    return FeatureExtractor(
        "inception_v3",
        model.to(device).eval(),
        sha256=file_digest(path),
        mode=mode,
        in_channels=3,
        device=device,
        batch_size=batch_size,
        resize_threads=resize_threads or usable_cpus(),
    )


# --------------------------------------------------------------------------------------------
# Small feature network


class FeatureNet(nn.Module):
    """Compact CNN classifier; its global-average-pooled activations are the features.

    Two 3x3 conv blocks at full resolution, 2x average pooling, two more blocks at twice the width,
    global average pooling (the ``2·width``-d features), then a linear classifier. GroupNorm keeps
    every image's features independent of the batch.
    """

    def __init__(self, img_channels: int, img_resolution: int, num_classes: int, width: int = 32):
        super().__init__()
        check_int("img_channels", img_channels, 1)
        check_int("img_resolution", img_resolution, 2, reason="one 2x pooling")
        check_int("num_classes", num_classes, 1)
        check_int("width", width, 1)
        self.config = {
            "img_channels": img_channels,
            "img_resolution": img_resolution,
            "num_classes": num_classes,
            "width": width,
        }
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
    """Train a :class:`FeatureNet` classifier on an `ImageDataset` of square images with Adam and
    cross-entropy; returns the net (in eval mode) and ``info``: ``train_accuracy``,
    ``heldout_accuracy``, ``num_train``, ``num_heldout``, ``epochs``, ``seed``.

    A random ``holdout_fraction`` of the images (drawn from ``seed``) is kept out of training and
    used to report accuracy; initialisation and shuffling also derive from ``seed`` only.
    """
    images = dataset.images  # uint8 [N, C, H, W], checked by ImageDataset
    if images.shape[2] != images.shape[3]:
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
    y = torch.from_numpy(dataset.labels).to(device)
    train_idx, heldout_idx = order[num_heldout:], order[:num_heldout]
    with seeded(seed):  # seed the initialisation without touching the global RNG
        net = FeatureNet(images.shape[1], images.shape[2], dataset.num_classes, width).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)  # a new module is in train mode
    for _ in range(epochs):
        perm = train_idx[torch.randperm(len(train_idx), generator=generator).numpy()]
        for start in range(0, len(perm), batch_size):
            idx = perm[start : start + batch_size]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    net.eval()
    return net, {
        "train_accuracy": _accuracy(net, x[train_idx], y[train_idx]),
        "heldout_accuracy": _accuracy(net, x[heldout_idx], y[heldout_idx]),
        "num_train": len(train_idx),
        "num_heldout": num_heldout,
        "epochs": epochs,
        "seed": seed,
    }


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
    payload = load_torch_file(
        path, what="a feature-net file", remedy="rebuild it with the reference step"
    )
    if not isinstance(payload, dict) or set(payload) != {"config", "state_dict"}:
        raise DamagedFileError(f"{path} is not a feature-net file (keys 'config' and 'state_dict')")
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
