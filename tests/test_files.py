"""Tests for aot_model.files: digests and atomic writes."""

import hashlib
import os
import stat
import sys

import pytest
import torch

from aot_model import files
from aot_model.files import atomic_path, atomic_write, file_digest


class Interrupted(Exception):
    pass


def _fail_midway(f):
    f.write(b"partial bytes")
    raise Interrupted("write interrupted")


def test_file_digest_matches_hashlib(tmp_path):
    path = tmp_path / "blob"
    data = os.urandom(3 << 20)  # larger than one read chunk
    path.write_bytes(data)
    assert file_digest(path) == hashlib.sha256(data).hexdigest()
    assert file_digest(path, "md5") == hashlib.md5(data).hexdigest()


def test_atomic_write_creates_folders_replaces_and_returns_sha256(tmp_path):
    path = tmp_path / "a" / "b" / "out.bin"
    assert atomic_write(path, lambda f: f.write(b"old")) == hashlib.sha256(b"old").hexdigest()
    assert atomic_write(path, lambda f: f.write(b"new")) == hashlib.sha256(b"new").hexdigest()
    assert path.read_bytes() == b"new"
    assert os.listdir(path.parent) == ["out.bin"]


@pytest.mark.parametrize("error", [Interrupted, KeyboardInterrupt])
def test_interrupted_write_leaves_target_intact_and_no_temp_file(tmp_path, error):
    path = tmp_path / "out.bin"
    path.write_bytes(b"complete")

    def interrupted(f):
        f.write(b"partial bytes")
        raise error("write interrupted")

    with pytest.raises(error):
        atomic_write(path, interrupted)
    assert path.read_bytes() == b"complete"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_interrupted_first_write_leaves_nothing(tmp_path):
    with pytest.raises(Interrupted):
        atomic_write(tmp_path / "out.bin", _fail_midway)
    assert os.listdir(tmp_path) == []


def test_failed_torch_save_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "state.pt"
    with atomic_path(path) as tmp:
        torch.save({"step": 1}, tmp)
    with pytest.raises(Exception, match="pickle"), atomic_path(path) as tmp:
        torch.save({"step": 2, "bad": lambda: None}, tmp)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert os.listdir(tmp_path) == ["state.pt"]


@pytest.mark.parametrize(
    "content",
    [b"\x80\x02.", b"\x80\x02h\x01", b"\x80\x02K\x01K\x02\x86.", b"PK\x03\x04", b""],
    ids=["pop-from-empty-stack", "bad-memo-key", "no-magic-number", "cut-zip", "empty"],
)
def test_unreadable_torch_file_is_one_damaged_file_error(tmp_path, content):
    """Garbage makes torch's unpickler raise IndexError, KeyError, RuntimeError, ...: each is
    reported as the damaged file it is (random bytes hit IndexError about one time in 14)."""
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(files.DamagedFileError) as caught:
        files.load_torch_file(path, what="checkpoint", remedy="restore it")
    message = str(caught.value)
    assert message.startswith(f"{path} is not a readable checkpoint: truncated, corrupt or another")
    assert message.endswith("; restore it")


def test_nested_atomic_paths_replace_both_files_or_neither(tmp_path):
    first, second = tmp_path / "data.npz", tmp_path / "data.json"
    with pytest.raises(Interrupted), atomic_path(first) as a, atomic_path(second) as b:
        a.write_bytes(b"new data")
        raise Interrupted("before the second file was written")
    assert os.listdir(tmp_path) == []
    with atomic_path(first) as a, atomic_path(second) as b:
        a.write_bytes(b"data")
        b.write_bytes(b"manifest")
    assert (first.read_bytes(), second.read_bytes()) == (b"data", b"manifest")
    assert sorted(os.listdir(tmp_path)) == ["data.json", "data.npz"]


@pytest.mark.skipif(os.name != "posix", reason="file modes and umask are POSIX")
def test_written_file_gets_default_permissions(tmp_path):
    """Unlike a bare tempfile.mkstemp (0600), results are readable as the umask allows."""
    umask = os.umask(0o022)
    try:
        atomic_write(tmp_path / "out.bin", lambda f: f.write(b"x"))
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "out.bin").stat().st_mode) == 0o644


@pytest.mark.skipif(sys.platform != "linux", reason="directory fsync is checked on Linux")
def test_file_and_directory_are_fsynced(tmp_path, monkeypatch):
    synced = []

    def recording_fsync(fd):
        info = os.fstat(fd)
        synced.append((stat.S_ISDIR(info.st_mode), info.st_ino))

    monkeypatch.setattr(files.os, "fsync", recording_fsync)
    path = tmp_path / "out.bin"
    atomic_write(path, lambda f: f.write(b"x"))
    # The data before the rename (same inode as the result), then the folder's new entry.
    assert synced == [(False, path.stat().st_ino), (True, tmp_path.stat().st_ino)]
