"""Checksums and atomic file writes, shared by every module that writes results to disk.

A write goes to a fresh temporary file in the target's directory, is fsynced, and is renamed over
the target with ``os.replace`` (atomic on POSIX and Windows within one file system); the directory
is fsynced after the rename so the new name survives a power loss. Any exception, including
``KeyboardInterrupt``, removes the temporary file and leaves an existing target untouched, so a
reader never sees a truncated file under the real name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO


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
    neither target changes unless both bodies finish.

    Parameters
    ----------
    path : str or Path
        The target; its directory is created if missing.

    Yields
    ------
    Path
        An empty file beside ``path`` (a hidden ``.<name>.<random>.tmp``), created with the
        process's default permissions.
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
    """Write ``path`` through ``write(binary_file)`` atomically; returns the file's SHA-256.

    Parameters
    ----------
    path : str or Path
        The target; its directory is created if missing.
    write : callable
        Receives the temporary file opened for binary writing, e.g.
        ``lambda f: np.savez(f, **arrays)`` or ``lambda f: f.write(text.encode())``.

    Returns
    -------
    str
        Hex SHA-256 of the bytes written.
    """
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)
        digest = file_digest(tmp)
    return digest
