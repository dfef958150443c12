"""torch's process-global RNG, shared safely by steps that run side by side in threads.

Network initialisation draws from torch's global generator, which every thread of a process
shares. Two steps running at once (aot_pipeline/lanes.py) would interleave their draws, so every
section that seeds, reads or restores the global state holds :data:`GLOBAL_RNG_LOCK`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

GLOBAL_RNG_LOCK = threading.RLock()


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draws inside the block come from the global generator seeded with ``seed``; the global
    state is restored afterwards, and no other thread touches it meanwhile."""
    with GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
