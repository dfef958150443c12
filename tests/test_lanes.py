"""Lanes (aot_pipeline/lanes.py): the core partition, the plan, real concurrency and pinning, and
that steps running side by side give the same bits as one after the other."""

import os
import threading
import time

import numpy as np
import pytest
import torch
from builders import TINY_PARAMS

from aot_model.data import ImageDataset
from aot_model.rng import seeded
from aot_model.training import load_checkpoint, training_loop
from aot_pipeline import lanes
from aot_pipeline.config import parse_params

CORES = sorted(os.sched_getaffinity(0))
two_cores = pytest.mark.skipif(len(CORES) < 2, reason="needs 2 usable cores")


@pytest.mark.parametrize(
    ("cores", "branches", "expected"),
    [
        ([0, 1], 2, [[0], [1]]),
        ([0], 2, []),  # one core: one branch at a time
        ([0, 1], 1, []),  # one branch: nothing to run beside it
        ([0, 1, 2], 2, [[0], [1]]),  # same width everywhere; core 2 stays free
        ([0, 1], 3, [[0], [1]]),  # more branches than cores: they queue for 2 lanes
        ([5, 1, 3, 7], 2, [[1, 3], [5, 7]]),  # any usable cores, 2 threads per lane
        ([0, 1, 2, 3, 4, 5, 6, 7], 3, [[0, 1], [2, 3], [4, 5]]),
    ],
)
def test_partition(cores, branches, expected):
    assert lanes.partition(cores, branches) == expected


def test_plan_runs_lanes_only_where_they_are_safe_and_wanted(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.delenv(lanes.SWITCH_ENV, raising=False)
    p = parse_params(TINY_PARAMS)
    assert p.network.dropout == 0
    plan, note = lanes.plan(p, "cpu", 2)
    assert plan.core_sets == [[0, 1], [2, 3]] and plan.threads == 2, note
    assert lanes.plan(p, "cpu", 2, wanted=False)[0] is None
    assert lanes.plan(p, "cuda", 2)[0] is None
    assert lanes.plan(p, "cpu", 1)[0] is None
    monkeypatch.setenv(lanes.SWITCH_ENV, "off")
    assert lanes.plan(p, "cpu", 2)[0] is None
    monkeypatch.delenv(lanes.SWITCH_ENV)
    dropout = parse_params({**TINY_PARAMS, "network": {**TINY_PARAMS["network"], "dropout": 0.1}})
    plan, note = lanes.plan(dropout, "cpu", 2)
    assert plan is None and "dropout" in note
    seeds = {**TINY_PARAMS, "variants": {"aot": {"aot": True, "seed": 1}, "edm": {"aot": False}}}
    plan, note = lanes.plan(parse_params(seeds), "cpu", 2)
    assert plan is None and "seeds" in note
    monkeypatch.delattr(os, "sched_setaffinity")
    plan, note = lanes.plan(p, "cpu", 2)
    assert plan is None and "pin" in note


@two_cores
def test_lanes_run_at_once_each_pinned_with_its_thread_count():
    """Two jobs meet at a barrier (so they run at the same time) and each sees its own core, one
    torch thread, and threads it starts inherit the pin; afterwards everything is as before."""
    plan = lanes.Lanes([[CORES[0]], [CORES[1]]])
    barrier = threading.Barrier(2, timeout=30)
    before = (os.sched_getaffinity(0), torch.get_num_threads())

    def job() -> dict:
        started = time.monotonic()
        barrier.wait()  # raises BrokenBarrierError unless the other lane is running too
        seen = {"cores": os.sched_getaffinity(0), "threads": torch.get_num_threads()}
        child = threading.Thread(target=lambda: seen.update(child=os.sched_getaffinity(0)))
        child.start()
        child.join()
        return seen | {"window": (started, time.monotonic())}

    with lanes.torch_threads(plan):
        first, second = lanes.run([job, job], plan)
    assert {frozenset(first["cores"]), frozenset(second["cores"])} == {
        frozenset({CORES[0]}),
        frozenset({CORES[1]}),
    }
    assert first["child"] == first["cores"] and second["child"] == second["cores"]
    assert first["threads"] == second["threads"] == 1
    (start_a, end_a), (start_b, end_b) = first["window"], second["window"]
    assert max(start_a, start_b) < min(end_a, end_b)  # the two windows overlap
    assert (os.sched_getaffinity(0), torch.get_num_threads()) == before


@two_cores
def test_more_jobs_than_lanes_queue_and_an_error_surfaces():
    plan = lanes.Lanes([[CORES[0]], [CORES[1]]])
    lock, running, peak = threading.Lock(), [0], [0]

    def job(i: int) -> int:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.2)
        with lock:
            running[0] -= 1
        return i

    assert lanes.run([lambda i=i: job(i) for i in range(4)], plan) == [0, 1, 2, 3]
    assert peak[0] == 2

    def fails() -> None:
        raise ValueError("lane failed")

    with pytest.raises(ValueError, match="lane failed"):
        lanes.run([fails, lambda: job(9)], plan)
    assert plan.free.qsize() == 2  # both lanes given back


def test_without_lanes_jobs_run_in_order_in_this_thread():
    seen = []
    lanes.run([lambda: seen.append(threading.get_ident()) for _ in range(2)], None)
    assert seen == [threading.get_ident()] * 2


def test_seeded_sections_do_not_see_each_other():
    """Two threads drawing from the global RNG under different seeds at once get exactly what
    each seed gives alone (without the lock, the other thread's reseeding leaks in)."""
    expected = {}
    for seed in (0, 1):
        with seeded(seed):
            expected[seed] = torch.randn(64)
    bad = []

    def draw(seed: int) -> None:
        for _ in range(300):
            with seeded(seed):
                first = torch.randn(32)
                time.sleep(0)  # let the other thread run in between
                values = torch.cat([first, torch.randn(32)])
            if not torch.equal(values, expected[seed]):
                bad.append(seed)

    threads = [threading.Thread(target=draw, args=(seed,)) for seed in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not bad


@two_cores
@pytest.mark.slow
def test_two_trainings_side_by_side_match_one_after_the_other(tmp_path):
    """The same bits (weights, EMA, Adam, RNG states) at the same torch thread count."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (48, 1, 8, 8), dtype=np.uint8)
    toy = ImageDataset(images, np.zeros(48, dtype=np.int64), 1, "toy")
    options = {
        "arch": "ncsnpp",
        "model_kwargs": {"model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1},
        "batch": 8,
        "pool_size": 8,
        "tick_kimg": 0.008,
        "duration_kimg": 0.024,
        "seed": 3,
        "progress": False,
    }
    options["model_kwargs"] |= {"attn_resolutions": [], "dropout": 0.0}

    def train(folder: str, aot: bool):
        return lambda: training_loop(tmp_path / folder / str(aot), toy, aot=aot, **options)

    plan = lanes.Lanes([[CORES[0]], [CORES[1]]])
    with lanes.torch_threads(plan):
        side = lanes.run([train("side", True), train("side", False)], plan)
        alone = lanes.run([train("alone", True), train("alone", False)], None)
    for a, b in zip(side, alone, strict=True):
        saved = [load_checkpoint(run["checkpoint"]) for run in (a, b)]
        for key in ("net", "ema", "optimizer", "rng"):
            assert _flat(saved[0][key]) == _flat(saved[1][key]), key


def _flat(state) -> list:
    """Every tensor's bytes and every plain value of a nested checkpoint entry, in order."""
    if isinstance(state, dict):
        return [(k, _flat(v)) for k, v in sorted(state.items(), key=lambda kv: str(kv[0]))]
    if isinstance(state, list | tuple):
        return [_flat(v) for v in state]
    if isinstance(state, torch.Tensor):
        return [str(state.dtype), state.cpu().numpy().tobytes()]
    return [state]
