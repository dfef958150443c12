"""Datasets as uint8 arrays, the CIFAR-10 conversion, and a resumable data order.

Images live as uint8 ``[N, C, H, W]`` with int64 labels (docs/architecture.md) and become floats in
``[-1, 1]`` only when a batch is drawn. On disk a dataset is one compressed ``.npz``
(``images``, ``labels``, ``num_classes``, ``name``) plus a JSON manifest beside it holding the
npz's SHA-256, so a stale or damaged file is caught at load time.

CIFAR-10 comes from the official python tarball (method-notes b.5 trains on its 50,000 training
images); the MD5 is checked before anything is unpickled. The scikit-learn handwritten digits are
the documented offline dataset for CPU demos and are only ever used when asked for by name.

The data order replaces EDM's ``InfiniteSampler`` (a windowed shuffle) with concatenated per-epoch
permutations: every epoch visits each image once, and the order from any stream position can be
recomputed from ``(seed, position)`` alone, which is what exact resume needs.
"""

from __future__ import annotations

import gzip
import json
import pickle
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aot_model.checks import check_choice, check_int
from aot_model.files import (
    DamagedFileError,
    atomic_path,
    check_digest,
    file_digest,
    read_json,
    read_npz,
)
from aot_model.progress import progress_bar

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_SPLITS = {
    "train": tuple(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)),
    "test": ("cifar-10-batches-py/test_batch",),
}
CIFAR10_RESOLUTION = 32
_CIFAR10_PIXELS = 3 * CIFAR10_RESOLUTION**2
_CHUNK = 1 << 20

# A fetcher downloads `url` to the local file `dest` (e.g. a boto3 download for "s3").
Fetcher = Callable[[str, Path], None]


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """An image classification dataset held in memory."""

    images: np.ndarray  # uint8 [N, C, H, W]
    labels: np.ndarray  # int64 [N], values in [0, num_classes)
    num_classes: int  # the width of `one_hot`
    name: str  # short identifier, e.g. "cifar10-train"

    def __post_init__(self):
        if not isinstance(self.images, np.ndarray) or self.images.dtype != np.uint8:
            raise ValueError("images must be a uint8 numpy array")
        if self.images.ndim != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {self.images.shape}")
        if not isinstance(self.labels, np.ndarray) or self.labels.dtype != np.int64:
            raise ValueError("labels must be an int64 numpy array")
        if self.labels.shape != (len(self.images),):
            raise ValueError(
                f"labels must have shape ({len(self.images)},), got {self.labels.shape}"
            )
        check_int("num_classes", self.num_classes, 1)
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes})")
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("name must be a non-empty string")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])

    def to_float(self, indices) -> torch.Tensor:
        """Images at ``indices`` as float32 in ``[-1, 1]`` (x / 127.5 - 1), ``[n, C, H, W]``."""
        return torch.from_numpy(self.images[indices]).float() / 127.5 - 1

    def one_hot(self, indices) -> torch.Tensor:
        """Labels at ``indices`` as float32 one-hot rows, ``[n, num_classes]``."""
        labels = torch.from_numpy(np.asarray(self.labels[indices]))
        return torch.nn.functional.one_hot(labels, self.num_classes).float()


# --------------------------------------------------------------------------------------------
# Saved datasets.


def save_dataset(
    ds: ImageDataset, path: str | Path, *, source: str = "", source_checksum: str = ""
) -> dict:
    """Write ``ds`` to ``path`` (must end in ``.npz``) and a JSON manifest beside it (same stem,
    ``.json``), atomically; return the manifest.

    Both files are written to temporary files in the same directory, fsynced, and only then
    renamed over the targets, so an exception leaves any existing dataset untouched and no
    partial file behind. Should the process die between the two renames, the manifest's SHA-256
    no longer matches and :func:`load_dataset` refuses the pair. ``source`` (URL or description)
    and ``source_checksum`` (e.g. ``"md5:c58f..."``) are recorded in the manifest as given.
    """
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"path must end in .npz, got {str(path)!r}")
    # Nested: neither target is replaced unless both files were written.
    with atomic_path(path.with_suffix(".json")) as tmp_json, atomic_path(path) as tmp_npz:
        with open(tmp_npz, "wb") as f:
            np.savez_compressed(
                f,
                images=ds.images,
                labels=ds.labels,
                num_classes=np.int64(ds.num_classes),
                name=np.str_(ds.name),
            )
        manifest = {
            "name": ds.name,
            "count": len(ds),
            "shape": list(ds.images.shape),
            "num_classes": ds.num_classes,
            "class_histogram": np.bincount(ds.labels, minlength=ds.num_classes).tolist(),
            "sha256": file_digest(tmp_npz),
            "source": source,
            "source_checksum": source_checksum,
        }
        tmp_json.write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def load_dataset(path: str | Path) -> ImageDataset:
    """Read a dataset written by :func:`save_dataset`.

    When the JSON manifest exists beside the npz, the npz's SHA-256 and the array shape are
    checked against it first. A missing file raises FileNotFoundError; a damaged, truncated or
    foreign one raises `aot_model.files.DamagedFileError` (a ValueError) naming it.
    """
    path = Path(path)
    remedy = "rebuild it (and its .json manifest) with the prepare step"
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}; {remedy}")
    manifest_path = path.with_suffix(".json")
    manifest = None
    if manifest_path.exists():
        manifest = read_json(manifest_path, what="dataset manifest", remedy=remedy)
        if "sha256" in manifest:
            check_digest(path, manifest["sha256"], recorded_in=manifest_path, remedy=remedy)
    arrays = read_npz(
        path, ("images", "labels", "num_classes", "name"), what="a saved dataset", remedy=remedy
    )
    ds = ImageDataset(
        arrays["images"], arrays["labels"], int(arrays["num_classes"]), str(arrays["name"])
    )
    if manifest is not None and list(ds.images.shape) != manifest.get("shape"):
        raise DamagedFileError(
            f"{path} holds images of shape {list(ds.images.shape)}, its manifest "
            f"{manifest_path} says {manifest.get('shape')}; {remedy}"
        )
    return ds


# --------------------------------------------------------------------------------------------
# CIFAR-10.


def _check_tarball(path: str | Path, md5: str) -> Path:
    """``path`` as a Path, once it is known to exist and to have MD5 ``md5``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 tarball not found: {path}")
    got = file_digest(path, "md5")
    if got != md5:
        raise ValueError(
            f"MD5 mismatch for {path}: expected {md5}, got {got}. The file is truncated, "
            f"corrupt or not the expected archive; delete it and fetch it again (official "
            f"CIFAR-10: {CIFAR10_URL}), or pass md5= matching the archive you mean to use."
        )
    return path


def _download_url(url: str, dest: Path) -> None:
    """Stream an http(s) or file URL into ``dest`` with a progress bar.

    An unreachable URL raises ConnectionError saying how to proceed offline.
    """
    try:
        response = urllib.request.urlopen(url, timeout=60)
    except (urllib.error.URLError, TimeoutError) as error:
        reason = getattr(error, "reason", error)
        raise ConnectionError(
            f"could not download {url} ({reason}); fetch the file where the network allows it "
            "and set data.source to its local path (or an s3:// copy)"
        ) from None
    with response, open(dest, "wb") as f:
        total = int(response.headers.get("Content-Length") or 0) or None
        with progress_bar(total=total, unit="B", unit_scale=True, desc=dest.name) as bar:
            while chunk := response.read(_CHUNK):
                f.write(chunk)
                bar.update(len(chunk))


def fetch_cifar10(
    source: str | Path,
    dest_dir: str | Path,
    *,
    md5: str = CIFAR10_MD5,
    fetchers: Mapping[str, Fetcher] | None = None,
) -> Path:
    """Resolve ``source`` to a local CIFAR-10 tarball whose MD5 (default: the official
    archive's) has been verified; see :func:`fetch_file` for ``source``, ``dest_dir`` and
    ``fetchers``."""
    if not (isinstance(md5, str) and len(md5) == 32 and all(c in "0123456789abcdef" for c in md5)):
        raise ValueError(f"md5 must be 32 lowercase hex digits, got {md5!r}")
    return fetch_file(
        source,
        dest_dir,
        check=lambda path: _check_tarball(path, md5),
        fetchers=fetchers,
        default_name="cifar10.tar.gz",
    )


def fetch_file(
    source: str | Path,
    dest_dir: str | Path,
    *,
    check: Callable[[Path], object],
    fetchers: Mapping[str, Fetcher] | None = None,
    default_name: str,
) -> Path:
    """Resolve ``source`` to a local file that passed ``check``, downloading it at most once.

    ``source`` is an ``http(s)://`` or ``file://`` URL (downloaded with urllib), a URL whose
    scheme has an entry in ``fetchers`` (``fetchers["s3"](url, dest_path)``: the pipeline passes
    a boto3 downloader, so the core never imports boto3), or a local path (checked and returned
    in place, not copied). Downloads go to ``dest_dir``, named after the URL's last path
    component (else ``default_name``), through a temporary file renamed into place only once it
    passes ``check``. ``check(path)`` raises ValueError (or FileNotFoundError) for a file that
    must not be used; a file already in ``dest_dir`` that fails it is downloaded again.
    """
    fetchers = fetchers or {}
    url = urllib.parse.urlsplit(str(source))
    if not url.scheme:
        check(Path(source))
        return Path(source)
    fetch = _download_url if url.scheme in ("http", "https", "file") else fetchers.get(url.scheme)
    if fetch is None:
        raise ValueError(
            f"source {str(source)!r} has scheme {url.scheme!r}; supported: http, https, file, a "
            f"local path, or a scheme given in fetchers (got {sorted(fetchers)})"
        )
    dest = Path(dest_dir) / (Path(url.path).name or default_name)
    if dest.is_file():
        try:
            check(dest)
            return dest
        except ValueError:
            pass  # damaged or another file under the same name: fetch it again
    with atomic_path(dest) as tmp:  # renamed into place only once it passes the check
        fetch(str(source), tmp)
        check(tmp)
    return dest


class _ArrayUnpickler(pickle.Unpickler):
    """Resolves only the globals a pickled NumPy array needs; anything else is refused.

    Defence in depth on top of the MD5 check: a dict of bytes, lists and uint8 arrays (the
    CIFAR-10 batch format) needs nothing more.
    """

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _read_batch(tar: tarfile.TarFile, member: str) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 batch: uint8 ``[n, 3, 32, 32]`` images and int64 ``[n]`` labels."""
    try:
        file = tar.extractfile(member)
    except KeyError:
        raise ValueError(
            f"{tar.name} has no member {member!r}; expected the cifar-10-python.tar.gz layout"
        ) from None
    try:
        # The official batches are Python 2 pickles; encoding="bytes" keeps their str keys and
        # array buffers as bytes.
        batch = _ArrayUnpickler(file, encoding="bytes").load()
    except pickle.UnpicklingError as e:
        raise ValueError(f"{member} is not a CIFAR-10 batch pickle: {e}") from e
    if not isinstance(batch, dict) or not {b"data", b"labels"} <= batch.keys():
        raise ValueError(f"{member} lacks the keys b'data' and b'labels'")
    data, labels = batch[b"data"], np.asarray(batch[b"labels"], dtype=np.int64)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise ValueError(f"{member}: b'data' must be a 2-D uint8 array")
    if data.shape[1] != _CIFAR10_PIXELS or labels.shape != (len(data),):
        raise ValueError(
            f"{member}: expected data [n, {_CIFAR10_PIXELS}] and labels [n], got "
            f"{data.shape} and {labels.shape}"
        )
    # Each row is three 32x32 planes (R, G, B), each stored row-major.
    return data.reshape(-1, 3, 32, 32), labels


def convert_cifar10(
    tarball: str | Path, split: str = "train", *, md5: str = CIFAR10_MD5
) -> ImageDataset:
    """Read one CIFAR-10 split straight out of the official python tarball, MD5 ``md5``.

    ``split`` "train" is ``data_batch_1..5`` (50,000 images), "test" is ``test_batch`` (10,000);
    the result holds uint8 ``[N, 3, 32, 32]`` images, labels in 0..9, name ``"cifar10-<split>"``.
    """
    check_choice("split", split, CIFAR10_SPLITS)
    # Pickle is the official CIFAR-10 format and unpickling untrusted bytes can run code, so the
    # archive's MD5 is verified before any member is unpickled.
    tarball = _check_tarball(tarball, md5)
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            batches = [_read_batch(tar, member) for member in CIFAR10_SPLITS[split]]
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise ValueError(
            f"{tarball} is truncated or corrupt ({type(e).__name__}: {e}); delete it and fetch "
            "it again"
        ) from e
    images, labels = map(np.concatenate, zip(*batches, strict=True))
    return ImageDataset(images, labels, num_classes=10, name=f"cifar10-{split}")


def load_cifar10(
    source: str | Path,
    dest_dir: str | Path,
    split: str = "train",
    *,
    md5: str = CIFAR10_MD5,
    fetchers: Mapping[str, Fetcher] | None = None,
) -> ImageDataset:
    """:func:`fetch_cifar10` then :func:`convert_cifar10`; see those for the arguments."""
    check_choice("split", split, CIFAR10_SPLITS)
    tarball = fetch_cifar10(source, dest_dir, md5=md5, fetchers=fetchers)
    return convert_cifar10(tarball, split, md5=md5)


# --------------------------------------------------------------------------------------------
# Handwritten digits (offline demo dataset).


def load_digits(resolution: int = 16, channels: int = 1) -> ImageDataset:
    """scikit-learn's bundled handwritten digits: 1,797 real 8x8 images of 10 classes.

    Pixel values 0..16 are scaled to 0..255, resized to ``resolution`` by bilinear
    interpolation (``torch.nn.functional.interpolate``, ``align_corners=False``, antialiased when
    downsampling), rounded to uint8, and replicated to ``channels``. This is the offline dataset
    of the CPU demo; nothing substitutes it for CIFAR-10. Result: uint8
    ``[1797, channels, resolution, resolution]`` (``channels`` 3 repeats the grey in R, G and B),
    name ``"digits-<res>x<res>"``.
    """
    check_int("resolution", resolution, 1)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    from sklearn.datasets import load_digits as sklearn_digits  # slow import; only needed here

    digits = sklearn_digits()
    x = torch.from_numpy(digits.images).to(torch.float64)[:, None] * (255.0 / 16.0)
    # At the native 8x8, bilinear interpolation is the identity.
    x = torch.nn.functional.interpolate(
        x,
        size=(resolution, resolution),
        mode="bilinear",
        align_corners=False,
        antialias=resolution < x.shape[-1],
    )
    images = x.round().clamp(0, 255).to(torch.uint8).expand(-1, channels, -1, -1)
    return ImageDataset(
        images=np.ascontiguousarray(images.numpy()),
        labels=digits.target.astype(np.int64),
        num_classes=10,
        name=f"digits-{resolution}x{resolution}",
    )


# --------------------------------------------------------------------------------------------
# Deterministic, resumable data order.


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of epoch ``epoch``: a permutation of ``range(n)`` seeded by ``(seed, epoch)``."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(int(n))


def ordered_indices(
    n: int, seed: int, start: int, count: int, *, rank: int = 0, world_size: int = 1
) -> np.ndarray:
    """Positions ``start .. start + count - 1`` of the infinite data stream, or one rank's share.

    The stream concatenates ``epoch_permutation(n, seed, 0)``, ``(n, seed, 1)``, ... . With
    ``world_size > 1`` the window ``[start, start + count)`` is split by stride: rank ``r`` gets
    window elements ``r, r + world_size, ...``; the shares are disjoint and together form the
    window, so the global batch does not depend on how many ranks share it.

    ``n`` is the dataset size, ``start`` the global stream position (images consumed so far by all
    ranks together), ``count`` the global window length (a multiple of ``world_size``). Returns
    int64 ``[count // world_size]`` dataset indices.
    """
    checks = [("n", n, 1), ("seed", seed, 0), ("start", start, 0), ("count", count, 0)]
    for name, value, minimum in [*checks, ("rank", rank, 0), ("world_size", world_size, 1)]:
        check_int(name, value, minimum, numpy=True)
    if rank >= world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if count % world_size:
        raise ValueError(f"count ({count}) must be a multiple of world_size ({world_size})")
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    first, last = start // n, (start + count - 1) // n
    stream = np.concatenate([epoch_permutation(n, seed, e) for e in range(first, last + 1)])
    offset = start - first * n
    return stream[offset : offset + count][rank::world_size].astype(np.int64)
