"""AOT pairing: exact optimum against brute force and float64 scipy, per-class blocks, pools."""

import concurrent.futures
import itertools
import sys
import threading
import time

import numpy as np
import pytest
import scipy.optimize
import scipy.spatial.distance
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aot_model import pairing
from aot_model.pairing import (
    NoisePool,
    Pairing,
    build_pool,
    cost_matrix,
    fixed_point,
    solve_assignment,
)

FAST = settings(max_examples=25, deadline=None)


def _data(seed, n, shape=(3, 4, 4)):
    """Spatially correlated images in [-1, 1] (upsampled 2x2 noise) and unit noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, shape[0], 2, 2, generator=g)
    images = torch.tanh(torch.nn.functional.interpolate(low, size=shape[1:], mode="bilinear"))
    return images, torch.randn(n, *shape, generator=g)


def _costs64(images, noise, metric="euclidean"):
    """Reference cost matrix in float64, computed directly (no expanded form)."""
    y = images.flatten(1).double().numpy()
    n = noise.flatten(1).double().numpy()
    return scipy.spatial.distance.cdist(
        y, n, "euclidean" if metric == "euclidean" else "sqeuclidean"
    )


def _total(costs, perm):
    return costs[np.arange(len(perm)), np.asarray(perm)].sum()


def match(images, noise, labels=None, **pairing):
    """``Pairing(**pairing).match``: the permutation pairing ``noise`` with ``images``."""
    return Pairing(**pairing).match(images, noise, labels)


def _is_permutation(perm, n):
    return perm.dtype == torch.int64 and torch.equal(torch.sort(perm).values, torch.arange(n))


@FAST
@given(
    seed=st.integers(0, 2**31), n=st.integers(1, 6), cost=st.sampled_from(["euclidean", "squared"])
)
def test_matches_brute_force_optimum(seed, n, cost):
    images, noise = _data(seed, n)
    perm = match(images, noise, cost=cost)
    c = _costs64(images, noise, cost)
    best = min(_total(c, p) for p in itertools.permutations(range(n)))
    assert _is_permutation(perm, n)
    assert _total(c, perm) == pytest.approx(best, rel=1e-6)
    assert _total(c, perm) <= _total(c, range(n)) * (1 + 1e-6)


@FAST
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(1, 30),
    solver=st.sampled_from(["scipy", "lap"]),
)
def test_recovers_a_hidden_permutation(seed, n, solver):
    # If the noise is a shuffled copy of the images, the only zero-cost pairing undoes the shuffle;
    # the expanded-form costs of those pairs round to about 0 (and must not become NaN).
    images, _ = _data(seed, n)
    shuffle = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    perm = match(images, images[shuffle], solver=solver)
    assert torch.equal(shuffle[perm], torch.arange(n))


@pytest.mark.parametrize("cost", ["euclidean", "squared"])
@pytest.mark.parametrize("solver", ["scipy", "lap"])
def test_matches_float64_scipy_reference(cost, solver):
    images, noise = _data(7, 48)
    c = _costs64(images, noise, cost)
    _, ref = scipy.optimize.linear_sum_assignment(c)
    perm = match(images, noise, cost=cost, solver=solver)
    # Continuous random data has no ties, so the optimum is unique and float32 costs find it.
    np.testing.assert_array_equal(perm.numpy(), ref)
    assert _total(c, perm) == pytest.approx(_total(c, ref), rel=1e-12)
    assert _total(c, perm) < _total(c, range(48))


@FAST
@given(seed=st.integers(0, 2**31), n=st.integers(1, 40))
def test_lap_same_optimum_as_scipy(seed, n):
    images, noise = _data(seed, n, shape=(1, 3, 3))
    c = _costs64(images, noise)
    by_scipy = match(images, noise, solver="scipy")
    by_lap = match(images, noise, solver="lap")
    assert _is_permutation(by_lap, n)
    assert _total(c, by_lap) == pytest.approx(_total(c, by_scipy), rel=1e-6)


def test_ties_still_give_a_permutation():
    images = torch.zeros(5, 1, 2, 2)
    noise = torch.ones(5, 1, 2, 2)  # every pairing costs the same
    for solver in ("scipy", "lap"):
        assert _is_permutation(match(images, noise, solver=solver), 5)


@FAST
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(1, 24),
    classes=st.integers(1, 4),
    solver=st.sampled_from(["scipy", "lap"]),
)
def test_per_class_matching_is_blockwise_optimal(seed, n, classes, solver):
    images, noise = _data(seed, n)
    labels = torch.randint(classes, (n,), generator=torch.Generator().manual_seed(seed))
    perm = match(images, noise, labels, solver=solver)
    assert _is_permutation(perm, n)
    assert torch.equal(labels[perm], labels)
    c = _costs64(images, noise)
    for k in labels.unique():
        idx = torch.nonzero(labels == k).squeeze(1).numpy()
        block = c[np.ix_(idx, idx)]
        _, ref = scipy.optimize.linear_sum_assignment(block)
        # perm restricted to the class, expressed in block coordinates
        local = np.searchsorted(idx, perm.numpy()[idx])
        assert _total(block, local) == pytest.approx(_total(block, ref), rel=1e-6)
    unconstrained = match(images, noise, solver=solver)
    assert _total(c, perm) >= _total(c, unconstrained) * (1 - 1e-6)


def test_labels_accept_numpy_and_constrain_matching():
    images, noise = _data(3, 12)
    labels = np.array([0, 1] * 6)
    perm = match(images, noise, labels)
    assert np.array_equal(labels[perm.numpy()], labels)
    assert not torch.equal(perm, match(images, noise))  # the constraint binds here


# ------------------------------------------------------------------------------------------------
# Reproducibility across math libraries (method-notes a.5): the costs must not depend on the
# summation order, or near-tied assignments flip between CPUs.


def _near_tied_pool(seed, n=64, shape=(3, 8, 8)):
    """A pool where every image appears twice, the copies 1e-6 apart: swapping the noises of two
    copies changes the total cost by less than float32 rounding, so only the last bits decide."""
    images, noise = _data(seed, n, shape)
    g = torch.Generator().manual_seed(seed)
    copies = images[: n // 2] + 1e-6 * torch.randn(images[: n // 2].shape, generator=g)
    return torch.cat([images[: n // 2], copies]), noise


@pytest.mark.parametrize("cost", ["euclidean", "squared"])
def test_costs_do_not_depend_on_the_pixel_order(cost):
    images, noise = _data(4, 96, (3, 16, 16))
    order = torch.randperm(3 * 16 * 16, generator=torch.Generator().manual_seed(0))
    shuffled = cost_matrix(images.flatten(1)[:, order], noise.flatten(1)[:, order], cost)
    assert torch.equal(cost_matrix(images, noise, cost), shuffled)


def test_costs_equal_the_direct_formula_bit_for_bit():
    """Another kernel (broadcast difference, then a reduction) gives the same bits."""
    images, noise = _data(5, 48, (3, 16, 16))
    y, n = fixed_point(images, noise)
    direct = (y[:, None, :] - n[None, :, :]).square().sum(-1)
    assert torch.equal(cost_matrix(images, noise, "squared"), direct)
    assert torch.equal(cost_matrix(images, noise), direct.sqrt())
    # The grid step is fine enough to be harmless: costs within 1e-4 of the float64 reference.
    reference = torch.from_numpy(_costs64(images, noise))
    torch.testing.assert_close(cost_matrix(images, noise), reference, rtol=0, atol=1e-4)


def _grid_bits(values):
    """The smallest a with every value a multiple of 2^-a (None: not on a power-of-two grid)."""
    return next(
        (a for a in range(60) if torch.equal(values * 2.0**a, (values * 2.0**a).round())), None
    )


def _tight(dims, magnitude):
    """Images in [-1, 1] and noise in [-magnitude, magnitude], each at its bound in one entry."""
    g = torch.Generator().manual_seed(0)
    images, noise = 2 * torch.rand(2, dims, generator=g) - 1, torch.randn(2, dims, generator=g)
    images[:, 0] = 1.0
    noise = magnitude * noise / noise.abs().max()
    return images, noise


@pytest.mark.parametrize(
    ("images", "noise", "finest"),
    [
        (*_data(6, 8, (3, 32, 32)), 17),  # CIFAR-10 size, |noise| < 6: rounding error <= 2^-18
        # dim (1 + 6 + 1)^2 = 2^16 exactly: 53 - 16 is odd, so the floor in the step matters, and
        # (1 + 6)^2 / 8^2 = 0.77 of the bound is used: one bit finer overflows 2^53.
        (*_tight(1024, 6.0), 18),
    ],
)
def test_fixed_point_grid_is_fine_and_keeps_every_sum_exact(images, noise, finest):
    y, n = fixed_point(images, noise)
    bits = _grid_bits(torch.cat([y, n]))
    assert bits is not None and bits >= finest
    # Every partial sum of |y|^2 + |n|^2 - 2 y.n is at most dim (max|y| + max|n|)^2.
    largest = y.abs().max().item() + n.abs().max().item()
    assert y.shape[1] * largest**2 * 2.0 ** (2 * bits) <= 2.0**53


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_near_tied_assignment_does_not_depend_on_the_summation_order(seed):
    images, noise = _near_tied_pool(seed)
    dims = images[0].numel()
    order = torch.randperm(dims, generator=torch.Generator().manual_seed(seed))
    reordered = match(images.flatten(1)[:, order], noise.flatten(1)[:, order])
    assert torch.equal(match(images, noise), reordered)


def test_squared_and_euclidean_costs_disagree_on_crafted_case():
    # Identity pairs distances (0, 4): Euclidean 4 < 5 for the swap (2.5, 2.5),
    # but squared 16 > 12.5, so the two costs pick different permutations.
    images = torch.tensor([[0.0, 0.0], [1.5, 2.0]])
    noise = torch.tensor([[0.0, 0.0], [1.5, -2.0]])
    assert match(images, noise, cost="euclidean").tolist() == [0, 1]
    assert match(images, noise, cost="squared").tolist() == [1, 0]
    # the same two pairs twice, in two classes: each per-class block uses the cost it is given
    labels = torch.tensor([0, 1, 0, 1])
    images, noise = images.repeat_interleave(2, 0), noise.repeat_interleave(2, 0)
    assert match(images, noise, labels, cost="euclidean").tolist() == [0, 1, 2, 3]
    assert match(images, noise, labels, cost="squared").tolist() == [2, 3, 0, 1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        # The registries' names: a new cost or solver must not break this test.
        ({"cost": "l1"}, f"cost must be one of {tuple(pairing.COSTS)}, got 'l1'"),
        ({"solver": "auction"}, f"solver must be one of {tuple(pairing.SOLVERS)}, got 'auction'"),
        ({"scope": "world"}, "scope must be one of ('per_rank', 'global'), got 'world'"),
    ],
)
def test_a_pairing_is_checked_when_made(kwargs, message):
    with pytest.raises(ValueError) as error:
        Pairing(**kwargs)
    assert str(error.value) == message


@pytest.mark.parametrize(
    ("images", "noise"),
    [
        (torch.zeros(4, 2), torch.zeros(4, 3)),
        (torch.zeros(4, 2), torch.zeros(5, 2)),
        (torch.tensor([[0.0, float("nan")]] * 4), torch.zeros(4, 2)),
    ],
)
def test_match_refuses_other_shapes_and_non_finite_images(images, noise):
    with pytest.raises(ValueError) as error:
        Pairing().match(images, noise)
    assert str(error.value) == (
        f"images must be finite and noise of their shape, got {tuple(images.shape)} and "
        f"{tuple(noise.shape)}"
    )


def test_a_new_cost_is_one_registry_entry(monkeypatch):
    """A cost registered in pairing.COSTS is a valid Pairing and is what matching minimises."""
    monkeypatch.setitem(pairing.COSTS, "negated", lambda squared: -squared)
    images, noise = _data(2, 6)
    worst = match(images, noise, cost="negated")
    c = _costs64(images, noise, "squared")
    assert _total(c, worst) == pytest.approx(
        max(_total(c, p) for p in itertools.permutations(range(6))), rel=1e-9
    )


def test_lap_missing_gives_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lap", None)  # makes `import lap` raise ImportError
    with pytest.raises(ImportError) as error:
        Pairing(solver="lap")
    assert str(error.value) == (
        "solver='lap' needs the 'lap' package: pip install 'aot-diffusion[fast]' "
        "or use solver='scipy'"
    )
    assert solve_assignment(1 - torch.eye(2)).tolist() == [0, 1]  # scipy does not need lap
    assert match(torch.zeros(2, 2), torch.ones(2, 2)).tolist() == [0, 1]


def test_solver_lap_runs_lapjv(monkeypatch):
    lap = pytest.importorskip("lap")
    calls = []

    def lapjv(costs, **kwargs):
        calls.append(costs.dtype)
        return real(costs, **kwargs)

    real = lap.lapjv
    monkeypatch.setattr(lap, "lapjv", lapjv)
    images, noise = _data(0, 8)
    assert torch.equal(match(images, noise, solver="lap"), match(images, noise))
    assert calls == [np.float64]
    labels = torch.tensor([0, 1] * 4)  # the per-class blocks use the solver too
    assert torch.equal(match(images, noise, labels, solver="lap"), match(images, noise, labels))
    assert calls == [np.float64] * 3
    # float32 costs reach lapjv as float64, the precision scipy solves in
    assert solve_assignment(1 - torch.eye(3, dtype=torch.float32), "lap").tolist() == [0, 1, 2]
    assert calls[-1] == np.float64


def _rows_of(rows, reference):
    """Index j with reference[j] == rows[i] for every i (rows must all be found)."""
    hits = (rows.flatten(1)[:, None] == reference.flatten(1)[None]).all(-1)
    assert torch.equal(hits.sum(1), torch.ones(len(rows), dtype=torch.int64))
    return hits.int().argmax(1)


@pytest.mark.parametrize("aot", [True, False])
def test_build_pool_only_permutes_the_drawn_noise(aot):
    images, _ = _data(0, 32)
    drawn = torch.randn(images.shape, generator=torch.Generator().manual_seed(5))
    pairing_ = Pairing() if aot else None
    pool = build_pool(images, generator=torch.Generator().manual_seed(5), pairing=pairing_)
    source = _rows_of(pool.noise, drawn)  # noise marginal untouched: same multiset of rows
    assert _is_permutation(source, 32)
    assert pool.images is images
    if aot:
        assert torch.equal(source, match(images, drawn))
        assert pool.stats.distance_ratio < 1.0
        assert pool.stats.solve_seconds > 0.0
    else:
        assert torch.equal(pool.noise, drawn)
        assert pool.stats.matched_distance == pool.stats.identity_distance
        assert pool.stats.solve_seconds == 0.0
    identity = torch.linalg.vector_norm((images - drawn).flatten(1), dim=1).mean().item()
    matched = torch.linalg.vector_norm((images - pool.noise).flatten(1), dim=1).mean().item()
    assert pool.stats.identity_distance == pytest.approx(identity)
    assert pool.stats.matched_distance == pytest.approx(matched)
    assert pool.stats.pool_size == 32


def test_build_pool_matches_within_classes_and_passes_labels_through():
    images, _ = _data(1, 30)
    class_ids = torch.arange(30) % 3
    onehot = torch.nn.functional.one_hot(class_ids, 3).float()
    augment = torch.randn(30, 9)
    drawn = torch.randn(images.shape, generator=torch.Generator().manual_seed(2))
    generator = torch.Generator().manual_seed(2)
    pool = build_pool(
        images, onehot, augment, generator=generator, pairing=Pairing(), class_ids=class_ids
    )
    source = _rows_of(pool.noise, drawn)
    assert torch.equal(class_ids[source], class_ids)
    assert pool.labels is onehot and pool.augment_labels is augment
    assert pool.stats.distance_ratio < 1.0
    baseline = build_pool(images, onehot, augment, generator=torch.Generator(), pairing=None)
    assert baseline.labels is onehot and baseline.augment_labels is augment


class Boom(Exception):
    pass


def _loader(pool_size, fail_at=None):
    """A pure load_pool: pool i depends only on i, like the training loop's."""

    def load_pool(index):
        if index == fail_at:
            raise Boom(f"pool {index}")
        size = pool_size
        g = torch.Generator().manual_seed(1000 + index)
        images = torch.rand(size, 1, 2, 2, generator=g) * 2 - 1
        class_ids = torch.randint(2, (size,), generator=g)
        onehot = torch.nn.functional.one_hot(class_ids, 2).float()
        augment = torch.randn(size, 9, generator=g)
        return build_pool(
            images,
            onehot,
            augment,
            class_ids=class_ids,
            generator=torch.Generator().manual_seed(index),
            pairing=Pairing(),
        )

    return load_pool


def _stream(noise_pool, count):
    return [noise_pool.next_batch() for _ in range(count)]


def _assert_same_stream(a, b):
    assert len(a) == len(b)
    for batch_a, batch_b in zip(a, b, strict=True):
        for x, y in zip(batch_a, batch_b, strict=True):
            assert torch.equal(x, y)


@pytest.mark.parametrize("prefetch", [True, False])
def test_noise_pool_serves_each_pool_once_in_order(prefetch):
    load = _loader(8)
    with NoisePool(load, 8, 2, prefetch=prefetch) as noise_pool:
        for index in range(3):
            pool = load(index)
            batches, flags = [], []
            for _ in range(4):
                batches.append(noise_pool.next_batch())
                flags.append(noise_pool.new_pool)
                stats = noise_pool.last_stats
                assert stats.matched_distance == pool.stats.matched_distance
                assert stats.identity_distance == pool.stats.identity_distance
            assert flags == [True, False, False, False]
            for field, served in zip(
                ("images", "noise", "labels", "augment_labels"),
                zip(*batches, strict=True),
                strict=True,
            ):
                assert torch.equal(torch.cat(served), getattr(pool, field))


def test_noise_pool_without_labels_serves_none():
    def load(index):
        images = torch.rand(4, 1, 2, 2, generator=torch.Generator().manual_seed(index))
        return build_pool(images, generator=torch.Generator().manual_seed(index), pairing=None)

    with NoisePool(load, 4, 4) as noise_pool:
        _, _, labels, augment_labels = noise_pool.next_batch()
    assert labels is None and augment_labels is None


def test_wait_seconds_count_the_time_spent_waiting_for_pools(monkeypatch):
    """Without prefetch the whole build is waited for; a fake clock makes each build last 3 s."""
    clock = [0.0]
    monkeypatch.setattr(pairing.time, "perf_counter", lambda: clock[0])
    load = _loader(4)

    def slow_load(index):
        clock[0] += 3.0
        return load(index)

    with NoisePool(slow_load, 4, 2, prefetch=False) as noise_pool:
        waits = []
        for _ in range(4):
            noise_pool.next_batch()
            waits.append(noise_pool.wait_seconds)
    assert waits == [3.0, 3.0, 6.0, 6.0]  # a new pool every second batch


def test_prefetch_and_sync_give_identical_streams():
    with (
        NoisePool(_loader(8), 8, 4, prefetch=True) as a,
        NoisePool(_loader(8), 8, 4, prefetch=False) as b,
    ):
        _assert_same_stream(_stream(a, 9), _stream(b, 9))


@pytest.mark.parametrize("prefetch", [True, False])
def test_resume_from_state_dict_continues_the_stream(prefetch):
    load = _loader(6)
    with NoisePool(load, 6, 2, prefetch=prefetch) as noise_pool:
        full = _stream(noise_pool, 10)
    for k in range(10):
        with NoisePool(load, 6, 2, prefetch=prefetch) as noise_pool:
            _stream(noise_pool, k)
            state = noise_pool.state_dict()
        assert state == {"pool_index": k // 3, "offset": 2 * (k % 3)}
        with NoisePool(
            load,
            6,
            2,
            start_pool=state["pool_index"],
            start_offset=state["offset"],
            prefetch=prefetch,
        ) as resumed:
            _assert_same_stream(_stream(resumed, 10 - k), full[k:])
            assert resumed.new_pool  # the first batch after a resume reports its pool


@pytest.mark.parametrize("prefetch", [True, False])
def test_loader_exception_surfaces_in_caller(prefetch):
    with NoisePool(_loader(2, fail_at=1), 2, 2, prefetch=prefetch) as noise_pool:
        noise_pool.next_batch()
        with pytest.raises(Boom, match="pool 1") as info:
            noise_pool.next_batch()
        assert "building pool 1" in "".join(info.value.__notes__)
        with pytest.raises(Boom):  # not swallowed on a retry either
            noise_pool.next_batch()


def test_background_exception_surfaces_on_the_next_call():
    """A failed background build is raised by the first call after it, long before its pool.

    The test waits on the build's future rather than sleeping, so it cannot race the thread.
    """
    with NoisePool(_loader(64, fail_at=1), 64, 1) as noise_pool:
        noise_pool.next_batch()  # pool 0 is served; pool 1 is being built and fails
        concurrent.futures.wait([noise_pool._future])
        with pytest.raises(Boom):
            noise_pool.next_batch()


def test_close_stops_the_background_thread():
    def pool_threads():
        return {t for t in threading.enumerate() if t.name.startswith("aot-pool")}

    before = pool_threads()
    with NoisePool(_loader(4), 4, 2) as noise_pool:
        noise_pool.next_batch()
        assert pool_threads() - before
    assert not pool_threads() - before
    with pytest.raises(RuntimeError, match=r"^NoisePool is closed$"):
        noise_pool.next_batch()
    noise_pool.close()  # idempotent


def test_build_pool_noise_follows_the_images_dtype():
    images, _ = _data(0, 8)
    pool = build_pool(
        images.double(), generator=torch.Generator().manual_seed(3), pairing=Pairing()
    )
    assert pool.noise.dtype == torch.float64
    drawn = torch.randn(images.shape, generator=torch.Generator().manual_seed(3)).double()
    assert _is_permutation(_rows_of(pool.noise, drawn), 8)


def test_build_pool_noise_is_drawn_in_float32_whatever_torchs_default_dtype():
    """The stream is the generator's float32 draws, so a seed gives the same pool also where the
    caller has set ``torch.set_default_dtype(torch.float64)`` (build_pool's docstring)."""
    images, _ = _data(0, 8)

    def noise():
        return build_pool(images, generator=torch.Generator().manual_seed(3), pairing=None).noise

    expected = noise()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert torch.equal(noise(), expected)
    finally:
        torch.set_default_dtype(default)


def test_build_pool_uses_the_cost_it_is_given():
    images, _ = _data(0, 24)
    drawn = torch.randn(images.shape, generator=torch.Generator().manual_seed(9))
    squared = match(images, drawn, cost="squared")
    assert not torch.equal(squared, match(images, drawn))  # the two costs disagree here
    generator = torch.Generator().manual_seed(9)
    pool = build_pool(images, generator=generator, pairing=Pairing(cost="squared"))
    assert torch.equal(_rows_of(pool.noise, drawn), squared)


def test_solve_seconds_is_the_time_spent_matching():
    images, _ = _data(0, 16)
    start = time.perf_counter()
    pool = build_pool(images, generator=torch.Generator(), pairing=Pairing())
    assert 0.0 < pool.stats.solve_seconds <= time.perf_counter() - start


def test_noise_pool_of_single_pairs_and_its_state_before_the_first_batch():
    with NoisePool(_loader(1), 1, 1, prefetch=False) as noise_pool:
        assert noise_pool.last_stats is None and noise_pool.new_pool is False
        first, second = _stream(noise_pool, 2)
        assert torch.equal(first[0], _loader(1)(0).images)
        assert torch.equal(second[0], _loader(1)(1).images)
        assert noise_pool.state_dict() == {"pool_index": 2, "offset": 0}
