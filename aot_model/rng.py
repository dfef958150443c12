"""Seeded sections of torch's process-global RNG that leave the global state as they found it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draws inside the block come from the global generator seeded with ``seed``; the global
    state is restored afterwards (a network's initialisation, without disturbing a caller's
    stream)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
