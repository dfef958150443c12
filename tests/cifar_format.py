"""Tiny tarballs in the official CIFAR-10 python format: the real conversion code runs here."""

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np

from aot_model.files import file_digest

PER_BATCH = {"data_batch_1": 6, "data_batch_2": 5, "data_batch_3": 6, "data_batch_4": 4}
PER_BATCH |= {"data_batch_5": 5, "test_batch": 7}
TARBALL = "cifar-10-python.tar.gz"


def cifar_md5(path) -> str:
    return file_digest(path, "md5")


def cifar_row(image: np.ndarray) -> np.ndarray:
    """The CIFAR-10 row layout written out: the R plane, then G, then B, each row-major."""
    return np.concatenate([image[0].ravel(), image[1].ravel(), image[2].ravel()])


def write_tarball(path, batches: dict) -> None:
    """A CIFAR-format tarball: one pickled dict {b"data", b"labels", ...} per batch member.

    The official files are protocol-2 pickles from Python 2; protocol 4 stores the same objects
    with the same NumPy globals.
    """
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in batches.items():
            raw = pickle.dumps(payload, protocol=4)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


def make_cifar_tarball(folder: Path, seed: int = 0):
    """A 33-image CIFAR-format tarball in ``folder``: (path, md5, batches, expected arrays)."""
    rng = np.random.default_rng(seed)
    batches, expected = {}, {}
    for name, n in PER_BATCH.items():
        images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n).tolist()
        data = np.stack([cifar_row(im) for im in images])
        batches[name] = {b"batch_label": b"x", b"labels": labels, b"data": data}
        expected[name] = (images, np.array(labels, dtype=np.int64))
    path = Path(folder) / TARBALL
    write_tarball(path, batches)
    return path, cifar_md5(path), batches, expected
