"""Checksums, atomic file writes and checked reads, shared by every module that touches disk.

A write goes to a fresh temporary file in the target's directory, is fsynced, and is renamed over
the target with ``os.replace`` (atomic on POSIX and Windows within one file system); the directory
is fsynced after the rename so the new name survives a power loss. Any exception, including
``KeyboardInterrupt``, removes the temporary file and leaves an existing target untouched, so a
reader never sees a truncated file under the real name.

Reads of files the user hands over (a dataset, reference statistics, samples, a manifest, a
checkpoint) go through `read_npz`, `read_json`, `load_torch_file` and `check_digest`, which turn a
truncated, corrupt or foreign file into one `DamagedFileError` line naming the file, the problem
and what to do.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in chunks (``algorithm`` is any :mod:`hashlib` name)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def _fsync(path: Path) -> None:
    """Flush ``path``'s data (a file, or on POSIX a directory's entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write instead of ``path``; renamed onto ``path`` on a clean exit.

    For writers that need a file name rather than a file object (``torch.save`` of a large
    state, a downloader), and for files that must be replaced together: nest two of these and
    neither target changes unless both bodies finish. The yielded path is an empty file beside
    ``path`` (a hidden ``.<name>.<random>.tmp``) with the process's default permissions;
    ``path``'s directory is created if missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    # "x" refuses an existing name; unlike tempfile.mkstemp (mode 0600) the file gets the
    # umask's permissions, which the renamed result keeps.
    tmp.open("xb").close()
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if os.name == "posix":  # Windows cannot open a directory for fsync
        _fsync(path.parent)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> str:
    """Write ``path`` through ``write(binary_file)`` atomically; returns the hex SHA-256 written.

    ``write`` receives the temporary file opened for binary writing, e.g.
    ``lambda f: np.savez(f, **arrays)``; ``path``'s directory is created if missing.
    """
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)
        return file_digest(tmp)


class DamagedFileError(ValueError):
    """An input file is truncated, corrupt, of the wrong format or fails its recorded checksum.

    The message names the file, what is wrong with it and what to do; it is one line.
    """


def check_digest(path: str | Path, expected: str, *, recorded_in: str | Path, remedy: str) -> None:
    """Raise `DamagedFileError` unless ``path``'s SHA-256 is ``expected`` (from ``recorded_in``)."""
    got = file_digest(path)
    if got != expected:
        raise DamagedFileError(
            f"{path} is damaged or was replaced: its sha256 {got[:12]}... does not match "
            f"{expected[:12]}... recorded in {recorded_in}; {remedy}"
        )


def _existing(path: str | Path, what: str, remedy: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}; {remedy}")
    return path


def read_json(path: str | Path, *, what: str, remedy: str, kind: type = dict):
    """The JSON value (of type ``kind``) in ``path``; FileNotFoundError or `DamagedFileError`."""
    path = _existing(path, what, remedy)
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DamagedFileError(f"{path} is not valid JSON ({error}); {remedy}") from None
    if not isinstance(value, kind):
        raise DamagedFileError(
            f"{path} holds a JSON {type(value).__name__}, not the {what} expected; {remedy}"
        )
    return value


def read_npz(
    path: str | Path, keys: Iterable[str], *, what: str, remedy: str, optional: Iterable[str] = ()
) -> dict[str, np.ndarray]:
    """Arrays ``keys`` (and those of ``optional`` present) of an ``.npz``, without pickle.

    A missing file raises FileNotFoundError; a file that is not a zip archive, is truncated, or
    lacks one of ``keys`` raises `DamagedFileError` naming it, ``what`` it should be and
    ``remedy``.
    """
    path = _existing(path, what, remedy)
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":  # np.load would try .npy and pickle on anything else
            raise DamagedFileError(f"{path} is not an .npz archive (expected {what}); {remedy}")
    keys = tuple(keys)
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = set(npz.files)
            arrays = {k: npz[k] for k in (*keys, *optional) if k in names}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as error:
        raise DamagedFileError(
            f"{path} is truncated or corrupt ({error}; expected {what}); {remedy}"
        ) from None
    missing = sorted(set(keys) - names)
    if missing:
        raise DamagedFileError(f"{path} lacks the arrays {missing}, so it is not {what}; {remedy}")
    return arrays


def load_torch_file(
    path: str | Path, *, what: str, remedy: str, map_location: str | torch.device = "cpu"
):
    """``torch.load(path, weights_only=True)``; a file torch cannot read is a `DamagedFileError`.

    Torch reports a truncated or foreign file with a variety of exceptions (a zip reader
    RuntimeError, ``OSError: [Errno 22]``, an unpickling, decoding, index or key error); all of
    them become one line naming the file, ``what`` it should be and ``remedy``.
    """
    path = _existing(path, what, remedy)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    # Nothing but the load is in the try, and a damaged file can make torch's unpickler raise
    # almost anything (IndexError "pop from empty list", KeyError from a bad memo reference, ...).
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if len(first_line) > 160:
            first_line = first_line[:157] + "..."
        raise DamagedFileError(
            f"{path} is not a readable {what}: truncated, corrupt or another format "
            f"({first_line}); {remedy}"
        ) from None
