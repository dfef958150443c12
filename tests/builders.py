"""Test inputs built on the spot: CIFAR-format tarballs (the real conversion code runs on them
offline) and a parameter set for pipeline runs of a few seconds."""

import dataclasses
import io
import math
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import torch

from aot_model.files import file_digest
from aot_model.networks import EDMPrecond
from aot_model.training import Component, TrainOptions

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


# 8x8 digits, a 2-level NCSN++ and a 2-point sweep: the whole pipeline in seconds.
TINY_PARAMS = {
    "data": {"dataset": "digits", "resolution": 8, "channels": 1},
    "network": {
        "arch": "ncsnpp",
        "model_channels": 8,
        "channel_mult": [1, 2],
        "num_blocks": 1,
        "attn_resolutions": [],
        "dropout": 0.0,
    },
    "train": {
        "duration_kimg": 0.512,
        "batch": 32,
        "lr_rampup_kimg": 0.1,
        "ema_halflife_kimg": 0.1,
        "augment_p": 0.0,
        "tick_kimg": 0.256,
        "snapshot_ticks": 1,
        "aot": {"pool_size": 128},
    },
    "variants": {"aot": {"aot": True}, "edm": {"aot": False}},
    "sweep": {"steps": [2, 4], "rho": [7.0], "num_images": 64, "batch_size": 64},
    "score": {"metric": "fd", "feature_epochs": 2},
    "guidance": {
        "variant": "aot",  # written out: dvc.yaml's guidance stages interpolate it from params.yaml
        "extractor": {
            "model_channels": 32,
            "channel_mult": [1, 2],
            "num_blocks": 1,
            "attn_resolutions": [4],
            "num_head_channels": 32,
            "epochs": 1,
            "batch": 64,
        },
        "head_channels": 32,
        "head_blocks": 1,
        "num_fakes": 64,
        "fake_steps": 2,
        "epochs": 2,
        "batch": 64,
        "select_images": 16,
        "select_steps": 2,
    },
}


def randomise_parameters(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Set every parameter and persistent buffer of ``net`` from a generator seeded with ``seed``.

    Tensors are drawn in sorted-name order, so the result depends neither on the module's own
    initialisation nor on its construction order. Weights get unit-variance outputs (no layer is
    near zero, unlike EDM's 1e-5 init of residual branches), biases 0.2 * N(0, 1), norm gains
    1 + 0.2 * N(0, 1), Fourier frequencies 4 * N(0, 1).
    """
    generator = torch.Generator().manual_seed(seed)
    state = net.state_dict()
    with torch.no_grad():
        for name in sorted(state):
            tensor = state[name]
            draw = torch.randn(tensor.shape, generator=generator)
            if name.endswith("map_noise.freqs"):
                tensor.copy_(draw * 4)
            elif tensor.ndim > 1:
                tensor.copy_(draw / math.sqrt(tensor[0].numel()))
            else:
                tensor.copy_(1.0 + 0.2 * draw if "norm" in name else 0.2 * draw)
    return net


# A training_loop run of a few steps on the `toy` images (tests/conftest.py).
TINY = {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1, "attn_resolutions": []}
TINY_NET = Component(EDMPrecond, {"arch": "ncsnpp", **TINY, "dropout": 0.1})
# 8 images per step in 2 micro-batches of 4; a pool of 12 feeds 3 micro-batches, so pools and
# optimizer steps do not line up; one step per tick.
RUN = TrainOptions(
    network=TINY_NET,
    cond=True,
    batch=8,
    batch_gpu=4,
    pool_size=12,
    lr_rampup_kimg=0.016,
    tick_kimg=0.008,
    seed=1,
)
STEP_KIMG = 0.008


def run_options(**changes) -> TrainOptions:
    """`RUN` with some options changed."""
    return dataclasses.replace(RUN, **changes)


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of a finished run directory to modify, as ``tmp_path/run``."""
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


def assert_all_differ(named: dict) -> None:
    """No two of ``named``'s tensors are equal (nor all-close), naming the first pair that is."""
    keys = list(named)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            assert not torch.allclose(named[a], named[b]), (a, b)


def assert_same_state(a, b) -> None:
    """Recursive torch.equal over nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_state(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_state(x, y)
    else:
        assert a == b
