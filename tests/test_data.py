"""Tests for aot_model.data: dataset files, CIFAR-10 conversion, digits, and the data order."""

import functools
import hashlib
import http.server
import json
import shutil
import threading

import numpy as np
import pytest
import torch
from builders import PER_BATCH, TARBALL, cifar_md5, write_tarball
from hypothesis import given, settings
from hypothesis import strategies as st

from aot_model.data import (
    ImageDataset,
    convert_cifar10,
    epoch_permutation,
    fetch_cifar10,
    load_cifar10,
    load_dataset,
    load_digits,
    ordered_indices,
    save_dataset,
)


def _expected_split(expected, split):
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    return (
        np.concatenate([expected[n][0] for n in names]),
        np.concatenate([expected[n][1] for n in names]),
    )


# ---------------------------------------------------------------------------------------------
# CIFAR-10 conversion.


@pytest.mark.parametrize("split", ["train", "test"])
def test_convert_cifar10_decodes_every_batch_in_order(cifar, split):
    path, md5, _, expected = cifar
    ds = convert_cifar10(path, split, md5=md5)
    images, labels = _expected_split(expected, split)
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.images.dtype == np.uint8 and ds.labels.dtype == np.int64
    assert (ds.num_classes, ds.name) == (10, f"cifar10-{split}")


def test_convert_cifar10_rejects_wrong_md5(cifar):
    path, md5, _, _ = cifar
    with pytest.raises(ValueError, match=f"expected {'0' * 32}, got {md5}"):
        convert_cifar10(path, md5="0" * 32)


def test_convert_cifar10_rejects_truncated_tarball(cifar, tmp_path):
    path = tmp_path / TARBALL
    path.write_bytes(cifar[0].read_bytes()[: cifar[0].stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        convert_cifar10(path, md5=cifar_md5(path))


def test_convert_cifar10_names_a_missing_member(cifar, tmp_path):
    batches = {k: v for k, v in cifar[2].items() if k != "data_batch_3"}
    path = tmp_path / TARBALL
    write_tarball(path, batches)
    with pytest.raises(ValueError, match="cifar-10-batches-py/data_batch_3"):
        convert_cifar10(path, md5=cifar_md5(path))
    assert len(convert_cifar10(path, "test", md5=cifar_md5(path))) == PER_BATCH["test_batch"]


def test_convert_cifar10_rejects_wrong_array_sizes(cifar, tmp_path):
    batches = dict(cifar[2])
    batches["data_batch_2"] = {b"labels": [1, 2], b"data": np.zeros((2, 3000), np.uint8)}
    path = tmp_path / TARBALL
    write_tarball(path, batches)
    with pytest.raises(ValueError, match=r"data_batch_2: expected data \[n, 3072\]"):
        convert_cifar10(path, md5=cifar_md5(path))


def test_convert_cifar10_refuses_foreign_pickle_globals(cifar, tmp_path):
    batches = dict(cifar[2])
    batches["test_batch"] = {b"labels": [], b"data": print}  # pickles the global builtins.print
    path = tmp_path / TARBALL
    write_tarball(path, batches)
    with pytest.raises(ValueError, match=r"refusing to load global builtins\.print"):
        convert_cifar10(path, "test", md5=cifar_md5(path))


def test_cifar10_bad_arguments(cifar, tmp_path):
    with pytest.raises(ValueError, match="split must be one of"):
        convert_cifar10(cifar[0], "valid", md5=cifar[1])
    with pytest.raises(ValueError, match="md5 must be 32 lowercase hex"):
        fetch_cifar10(cifar[0].as_uri(), tmp_path / "raw", md5="abc")
    assert not (tmp_path / "raw").exists()  # refused before any download
    with pytest.raises(ValueError, match="MD5 mismatch"):  # no malformed md5 matches a file
        convert_cifar10(cifar[0], md5="abc")


# ---------------------------------------------------------------------------------------------
# Fetching.


def test_fetch_file_url_downloads_and_verifies(cifar, tmp_path):
    path, md5, _, _ = cifar
    dest = tmp_path / "raw"
    got = fetch_cifar10(path.as_uri(), dest, md5=md5)
    assert got == dest / TARBALL and got.read_bytes() == path.read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == [TARBALL]


def test_fetch_http_url_from_a_local_server(cifar, tmp_path):
    path, md5, _, _ = cifar

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(QuietHandler, directory=str(path.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{TARBALL}"
        ds = load_cifar10(url, tmp_path / "raw", "test", md5=md5)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert (tmp_path / "raw" / TARBALL).read_bytes() == path.read_bytes()
    assert len(ds) == PER_BATCH["test_batch"]


def test_fetch_with_wrong_md5_leaves_nothing_behind(cifar, tmp_path):
    dest = tmp_path / "raw"
    with pytest.raises(ValueError, match="MD5 mismatch"):
        fetch_cifar10(cifar[0].as_uri(), dest, md5="f" * 32)
    assert list(dest.iterdir()) == []


def test_fetch_s3_goes_through_the_given_fetcher_and_caches(cifar, tmp_path):
    path, md5, _, _ = cifar
    calls = []

    def copy_fetcher(url, dest):
        calls.append(url)
        shutil.copyfile(path, dest)

    url = f"s3://bucket/datasets/{TARBALL}"
    got = fetch_cifar10(url, tmp_path, md5=md5, fetchers={"s3": copy_fetcher})
    assert got == tmp_path / TARBALL and calls == [url]
    # A verified file already in dest_dir is reused.
    assert fetch_cifar10(url, tmp_path, md5=md5, fetchers={"s3": copy_fetcher}) == got
    assert calls == [url]


def test_fetch_without_a_fetcher_for_the_scheme_raises(tmp_path):
    with pytest.raises(ValueError, match="scheme 's3'"):
        fetch_cifar10("s3://bucket/key.tar.gz", tmp_path)


def test_fetch_local_path_is_verified_in_place(cifar, tmp_path):
    path, md5, _, _ = cifar
    assert fetch_cifar10(path, tmp_path, md5=md5) == path
    with pytest.raises(ValueError, match="MD5 mismatch"):
        fetch_cifar10(path, tmp_path)  # the official checksum
    with pytest.raises(FileNotFoundError):
        fetch_cifar10(tmp_path / "missing.tar.gz", tmp_path, md5=md5)


# ---------------------------------------------------------------------------------------------
# ImageDataset and its files.


def _small_dataset() -> ImageDataset:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(12, 3, 4, 4), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 0, 1, 2, 2, 2], dtype=np.int64)
    return ImageDataset(images, labels, num_classes=4, name="tiny")


def test_to_float_and_one_hot():
    ds = _small_dataset()
    x = ds.to_float(np.array([0, 5]))
    assert x.dtype == torch.float32 and x.shape == (2, 3, 4, 4)
    torch.testing.assert_close(x, torch.from_numpy(ds.images[[0, 5]]).float() / 127.5 - 1)
    edges = ImageDataset(
        np.array([0, 255], np.uint8).reshape(2, 1, 1, 1), np.zeros(2, np.int64), 1, "e"
    )
    assert edges.to_float(slice(None)).flatten().tolist() == [-1.0, 1.0]
    onehot = ds.one_hot(np.array([1, 2, 3]))
    assert torch.equal(onehot, torch.tensor([[0.0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0]]))
    assert len(ds) == 12 and ds.image_shape == (3, 4, 4)


@pytest.mark.parametrize(
    ("images", "labels", "num_classes", "match"),
    [
        (np.zeros((2, 1, 4, 4), np.float32), np.zeros(2, np.int64), 2, "uint8"),
        (np.zeros((2, 4, 4), np.uint8), np.zeros(2, np.int64), 2, r"\[N, C, H, W\]"),
        (np.zeros((2, 1, 4, 4), np.uint8), np.zeros(2, np.int32), 2, "int64"),
        (np.zeros((2, 1, 4, 4), np.uint8), np.zeros(3, np.int64), 2, "shape"),
        (np.zeros((2, 1, 4, 4), np.uint8), np.array([0, 2]), 2, r"\[0, 2\)"),
    ],
)
def test_image_dataset_validates(images, labels, num_classes, match):
    with pytest.raises(ValueError, match=match):
        ImageDataset(images, labels, num_classes, "bad")


def test_save_load_roundtrip_and_manifest(tmp_path):
    ds = _small_dataset()
    path = tmp_path / "out" / "tiny.npz"
    manifest = save_dataset(ds, path, source="unit test", source_checksum="md5:" + "0" * 32)
    assert json.loads((tmp_path / "out" / "tiny.json").read_text()) == manifest
    assert manifest["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert manifest["count"] == 12 and manifest["shape"] == [12, 3, 4, 4]
    assert manifest["class_histogram"] == [4, 3, 5, 0]
    assert (manifest["source"], manifest["name"]) == ("unit test", "tiny")
    back = load_dataset(path)
    np.testing.assert_array_equal(back.images, ds.images)
    np.testing.assert_array_equal(back.labels, ds.labels)
    assert (back.num_classes, back.name) == (4, "tiny")
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny.json", "tiny.npz"]


def test_load_detects_a_modified_file(tmp_path):
    path = tmp_path / "tiny.npz"
    save_dataset(_small_dataset(), path)
    with open(path, "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match=r"does not match .* recorded in .*tiny\.json"):
        load_dataset(path)
    (tmp_path / "tiny.json").unlink()
    assert len(load_dataset(path)) == 12  # without a manifest there is nothing to check against


def test_failed_save_keeps_the_old_files_and_leaves_no_temporaries(tmp_path, monkeypatch):
    path = tmp_path / "tiny.npz"
    save_dataset(_small_dataset(), path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def fail_midway(f, **arrays):
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez_compressed", fail_midway)
    with pytest.raises(OSError, match="disk full"):
        save_dataset(_small_dataset(), path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_save_rejects_other_suffixes(tmp_path):
    with pytest.raises(ValueError, match=r"\.npz"):
        save_dataset(_small_dataset(), tmp_path / "tiny.zip")


# ---------------------------------------------------------------------------------------------
# Digits.


def _bilinear_2x_matrix(n: int) -> np.ndarray:
    """``[2n, n]`` bilinear upsampling with half-pixel centres, clamped at the edges."""
    m = np.zeros((2 * n, n))
    for i in range(2 * n):
        src = min(max((i + 0.5) / 2 - 0.5, 0.0), n - 1.0)
        lo = int(np.floor(src))
        hi = min(lo + 1, n - 1)
        m[i, lo] += 1 - (src - lo)
        m[i, hi] += src - lo
    return m


def test_load_digits_scales_and_resizes_by_the_documented_rule():
    from sklearn.datasets import load_digits as sklearn_digits

    raw = sklearn_digits().images * (255 / 16)
    native = load_digits(resolution=8)
    np.testing.assert_array_equal(native.images[:, 0], np.round(raw).astype(np.uint8))
    ds = load_digits(resolution=16)
    assert ds.images.shape == (1797, 1, 16, 16) and ds.images.dtype == np.uint8
    assert ds.num_classes == 10 and np.bincount(ds.labels).min() > 170
    m = _bilinear_2x_matrix(8)
    expected = np.round(m @ raw @ m.T)
    assert np.abs(ds.images[:, 0].astype(float) - expected).max() <= 1  # float rounding ties


def test_load_digits_channels_and_downsampling():
    rgb = load_digits(resolution=4, channels=3)
    assert rgb.images.shape == (1797, 3, 4, 4) and rgb.name == "digits-4x4"
    assert (rgb.images[:, 0] == rgb.images[:, 2]).all()
    with pytest.raises(ValueError, match="channels"):
        load_digits(channels=2)
    with pytest.raises(ValueError, match="resolution"):
        load_digits(resolution=0)


# ---------------------------------------------------------------------------------------------
# Data order.


def test_epoch_permutation_is_a_seeded_permutation():
    p = epoch_permutation(50, seed=3, epoch=2)
    assert sorted(p.tolist()) == list(range(50))
    np.testing.assert_array_equal(p, epoch_permutation(50, seed=3, epoch=2))
    assert not np.array_equal(p, epoch_permutation(50, seed=3, epoch=1))
    assert not np.array_equal(p, epoch_permutation(50, seed=4, epoch=2))


def test_ordered_indices_crosses_epoch_boundaries():
    n, seed = 7, 11
    stream = np.concatenate([epoch_permutation(n, seed, e) for e in range(4)])
    np.testing.assert_array_equal(ordered_indices(n, seed, start=5, count=12), stream[5:17])
    assert ordered_indices(n, seed, start=3, count=0).shape == (0,)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 20),
    start=st.integers(0, 60),
    split=st.integers(0, 30),
    rest=st.integers(0, 30),
    world_size=st.integers(1, 4),
)
def test_resume_and_ranks_reproduce_the_single_stream(n, start, split, rest, world_size):
    whole = ordered_indices(n, 5, start, split + rest)
    resumed = np.concatenate(
        [ordered_indices(n, 5, start, split), ordered_indices(n, 5, start + split, rest)]
    )
    np.testing.assert_array_equal(whole, resumed)
    count = world_size * (split // world_size + 1)
    window = ordered_indices(n, 5, start, count)
    for rank in range(world_size):
        share = ordered_indices(n, 5, start, count, rank=rank, world_size=world_size)
        np.testing.assert_array_equal(share, window[rank::world_size])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(count=5, world_size=2), "multiple of world_size"),
        (dict(count=4, rank=2, world_size=2), "rank must be in"),
        (dict(count=4, world_size=0), "world_size"),
        (dict(count=-1), "count"),
    ],
)
def test_ordered_indices_validates(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ordered_indices(10, 0, 0, **kwargs)
