"""Lanes: the independent branches of a pipeline (train -> sweep per variant, and the guided arm)
side by side on the CPU, each in its own thread pinned to its own share of the cores.

Measured on a 2-core machine (docs/benchmarks.md, "Lanes"): two branches in two threads with one
torch thread each, each thread pinned to its core, train 1.53x and sample 1.46x as many images
per second as one branch at a time with two torch threads. ``aot demo`` and the Prefect flow both
plan with :func:`plan`, so they run every step with the same torch thread count and give the same
scores (CPU results are bit-identical for a fixed thread count only).

Lanes are used when the device is the CPU, at least 2 cores are usable, there are at least 2
branches, and two training loops cannot disturb each other's random streams (no dropout, one
training seed; torch's global RNG is one per process). Otherwise, or with ``AOT_LANES=off``
(``aot demo --no-lanes``, flow parameter ``lanes=False``), branches run one at a time as before.
"""

from __future__ import annotations

import contextlib
import os
import queue
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from aot_pipeline.config import Params, apply_variant

T = TypeVar("T")

SWITCH_ENV = "AOT_LANES"


def partition(cores: Sequence[int], branches: int) -> list[list[int]]:
    """The core sets of the lanes: min(branches, cores) lanes of len(cores) // lanes cores each
    (leftover cores stay unused, so every lane runs at the same thread count); [] for < 2 lanes.
    More branches than lanes queue for a free lane."""
    cores = sorted(cores)
    lanes = min(branches, len(cores))
    if lanes < 2:
        return []
    width = len(cores) // lanes
    return [cores[i * width : (i + 1) * width] for i in range(lanes)]


@dataclass
class Lanes:
    """Free core sets; :meth:`lane` lends one to the calling thread for one branch."""

    core_sets: list[list[int]]
    free: queue.Queue = field(init=False, repr=False)

    def __post_init__(self):
        self.free = queue.Queue()
        for cores in self.core_sets:
            self.free.put(cores)

    @property
    def threads(self) -> int:
        """torch threads per lane: one per core of a lane."""
        return len(self.core_sets[0])

    @contextlib.contextmanager
    def lane(self) -> Iterator[list[int]]:
        """Wait for a free lane, pin the calling thread (and the threads it starts) to its cores
        with this lane's torch thread count; unpin and free the lane afterwards."""
        import torch

        cores = self.free.get()
        before = os.sched_getaffinity(0)  # pid 0: the calling thread on Linux
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(self.threads)  # this thread's OpenMP setting, set before any op
        try:
            yield cores
        finally:
            os.sched_setaffinity(0, before)
            self.free.put(cores)


def enabled() -> bool:
    """On unless ``AOT_LANES=off`` (or 0/false/no)."""
    return os.environ.get(SWITCH_ENV, "on").lower() not in ("off", "0", "false", "no")


def plan(p: Params, device: str, branches: int, wanted: bool = True) -> tuple[Lanes | None, str]:
    """Lanes for ``branches`` branches of ``p`` on ``device``, or None with the reason."""
    if not (wanted and enabled()):
        return None, "lanes off: branches run one at a time"
    if device != "cpu":
        return None, f"no lanes on {device}: branches run one at a time"
    seeds = {apply_variant(p.network, p.train, v)[1].seed for v in p.variants.values()}
    if p.network.dropout > 0 or len(seeds) > 1:
        # Dropout draws from torch's one global RNG, and each training loop reseeds it and saves
        # its state in checkpoints: two loops at once would make each other's bits depend on timing.
        return None, (
            "no lanes: network.dropout > 0 or variants with different seeds share torch's global "
            "RNG; branches run one at a time"
        )
    if not hasattr(os, "sched_setaffinity"):  # macOS, Windows: threads cannot be pinned
        return None, "no lanes: this OS cannot pin threads to cores; branches run one at a time"
    core_sets = partition(sorted(os.sched_getaffinity(0)), branches)
    if not core_sets:
        return None, "no lanes: fewer than 2 usable cores or branches"
    lanes = Lanes(core_sets)
    return lanes, f"{len(core_sets)} lanes {core_sets}, {lanes.threads} torch thread(s) each"


@contextlib.contextmanager
def torch_threads(lanes: Lanes | None) -> Iterator[None]:
    """The whole pipeline (steps outside the lanes too) at the lanes' torch thread count, so a
    run gives the same bits as ``OMP_NUM_THREADS=<threads> dvc repro``; restored afterwards."""
    import torch

    if lanes is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(lanes.threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(jobs: list[Callable[[], T]], lanes: Lanes | None) -> list[T]:
    """Each job's result: one job after the other without lanes, else each in its own thread
    inside a lane; an error is raised once every started job has ended."""
    if lanes is None:
        return [job() for job in jobs]

    def in_lane(job: Callable[[], T]) -> T:
        with lanes.lane():
            return job()

    with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="lane") as pool:
        futures = [pool.submit(in_lane, job) for job in jobs]
    return [future.result() for future in futures]
