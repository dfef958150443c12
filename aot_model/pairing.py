"""Approximated Optimal Transport (AOT) pairing of training images with Gaussian noise.

EDM-AOT (Kim et al., arXiv 2403.05069) changes one thing in EDM training: instead of pairing each
augmented image y with an independent unit noise n, it takes a *pool* of P augmented images and P
i.i.d. N(0, I) noises and permutes the noises so that the summed Euclidean distance

    sum_i || flatten(y_i) - flatten(n_perm(i)) ||_2                      (not squared)

is minimal. Everything else (per-image sigma, y + sigma * n, preconditioning, loss) is plain EDM.
This module follows the authors' released code (large-scale-kim/EDM-AOT, 2024-03 training loop;
see method-notes section (a)):

- the cost is the Euclidean distance between the flattened augmented image (in [-1, 1]) and the
  unit noise, built on the images' device and solved exactly on the CPU with
  ``scipy.optimize.linear_sum_assignment``;
- matching uses the clean augmented images and unit-variance noise, so it never sees sigma;
- conditional models match within each class only (block-diagonal assignment);
- each rank matches its own pool of P images (no all-gather), and a pool is consumed over P / b
  consecutive micro-batches, so every image of a pool is trained on exactly once.

Permuting an i.i.d. sample leaves the noise marginally N(0, I) over the pool; only the noise given
the image changes. Three departures from the authors' code, none of which changes the result
beyond the tie-breaking of near-equal assignments: the cost is computed exactly in float64 on a
fixed-point grid (the authors' float32 ``torch.cdist`` depends on the BLAS kernel's summation
order, so the matching differed between CPUs);
``solver="lap"`` is a faster exact Jonker-Volgenant solver, and `NoisePool` builds the next pool in
a background thread while the current one is served. scipy's solver releases the GIL, so it
overlaps with the training loop's Python; lap 0.5 holds the GIL during a solve (measured on this
project's CPU), which can stall kernel launches for the length of the solve.
"""

import concurrent.futures
import dataclasses
import math
import time
from collections.abc import Callable

import numpy as np
import scipy.optimize
import torch

from aot_model.checks import check_choice, check_int, is_int

COSTS = ("euclidean", "squared")
SOLVERS = ("scipy", "lap")


@dataclasses.dataclass(frozen=True)
class PoolStats:
    """How much the matching shortened the image-noise distances of one pool.

    Attributes
    ----------
    matched_distance : float
        Mean Euclidean distance ||y_i - n_perm(i)|| over the pool's matched pairs.
    identity_distance : float
        Mean Euclidean distance under the identity pairing (EDM's independent noise).
    solve_seconds : float
        Wall time of the cost matrix plus the assignment; 0 when no matching was done.
    pool_size : int
        Number of image-noise pairs P.
    """

    matched_distance: float
    identity_distance: float
    solve_seconds: float
    pool_size: int

    @property
    def distance_ratio(self) -> float:
        """matched_distance / identity_distance: 1 for the EDM baseline, below 1 with AOT."""
        return self.matched_distance / self.identity_distance


@dataclasses.dataclass(frozen=True)
class Pool:
    """A pool of augmented images with their paired unit noise.

    Attributes
    ----------
    images : torch.Tensor
        [P, C, H, W] augmented images in [-1, 1].
    noise : torch.Tensor
        [P, C, H, W] unit noise, already permuted so that noise[i] pairs with images[i].
    labels : torch.Tensor or None
        [P, label_dim] one-hot float class labels.
    augment_labels : torch.Tensor or None
        [P, 9] augmentation labels from the augment pipe.
    stats : PoolStats
    """

    images: torch.Tensor
    noise: torch.Tensor
    labels: torch.Tensor | None
    augment_labels: torch.Tensor | None
    stats: PoolStats


def _check_images(name: str, x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point torch.Tensor, got {type(x).__name__}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(
            f"{name} must have shape [N, ...] with N >= 1 and a feature dim, got {tuple(x.shape)}"
        )
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains non-finite values (nan or inf)")


def _check_class_ids(name: str, class_ids, n: int) -> torch.Tensor:
    """Returns the class ids as a CPU int64 tensor of shape [n]."""
    ids = torch.as_tensor(class_ids)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(
            f"{name} must hold integer class ids (argmax of one-hot labels), got dtype {ids.dtype}"
        )
    if ids.shape != (n,):
        raise ValueError(f"{name} must have shape [{n}] (one id per image), got {tuple(ids.shape)}")
    return ids.to("cpu", torch.int64)


def _import_lap():
    try:
        import lap
    except ImportError as exc:
        raise ImportError(
            "solver='lap' needs the 'lap' package: pip install 'aot-diffusion[fast]' "
            "or use solver='scipy'"
        ) from exc
    return lap


def fixed_point(images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened float64 copies of both, rounded to a grid fine enough to lose nothing that
    matters (step 2^-a, a >= 17 for CIFAR-10-sized images) and coarse enough that every sum of
    products in the cost is exact in float64 (method-notes a.5).

    With both on a 2^-a grid, products are multiples of 2^-2a, and as long as every partial sum
    stays below 2^53 * 2^-2a it is represented exactly, whatever the summation order: so the costs
    are the same bits on every CPU math library, thread count and GPU.
    """
    y = images.flatten(1).double()
    n = noise.to(images.device).flatten(1).double()
    # |y|^2, |n|^2, y.n and every partial sum of them are at most dim * (max|y| + max|n| + 1)^2.
    largest = y.abs().max() + n.abs().max() + 1
    bits = math.ceil(math.log2(y.shape[1] * largest.item() ** 2))
    step = 2.0 ** -((53 - bits) // 2)
    return torch.round(y / step) * step, torch.round(n / step) * step


def cost_matrix(images: torch.Tensor, noise: torch.Tensor, cost: str = "euclidean") -> torch.Tensor:
    """Pairwise image-noise costs, exact up to the final square root, on the images' device.

    Uses the expanded form |y|^2 + |n|^2 - 2 y.n (one matmul, as cdist's mm path does) on the
    :func:`fixed_point` copies, where every sum is exact: the result does not depend on the
    summation order of the BLAS kernel, so near-tied assignments cannot flip between machines
    (the float32 version did: method-notes a.5). IEEE square roots are correctly rounded.

    Parameters
    ----------
    images : torch.Tensor
        [N, ...] images.
    noise : torch.Tensor
        [M, ...] noise with the same per-item shape.
    cost : {"euclidean", "squared"}
        ||y - n||_2 (the authors' cost) or ||y - n||_2^2.

    Returns
    -------
    torch.Tensor
        [N, M] float64 costs, entry [i, j] for image i and noise j.
    """
    check_choice("cost", cost, COSTS)
    y, n = fixed_point(images, noise)
    sq = torch.addmm(n.square().sum(1)[None], y, n.T, alpha=-2.0)
    sq = sq.add_(y.square().sum(1)[:, None])
    return sq.sqrt_() if cost == "euclidean" else sq


def solve_assignment(costs: torch.Tensor, solver: str = "scipy") -> np.ndarray:
    """Exact minimum-cost perfect matching of a square cost matrix.

    Parameters
    ----------
    costs : torch.Tensor
        [N, N] costs on any device; copied to the CPU as float64.
    solver : {"scipy", "lap"}
        scipy.optimize.linear_sum_assignment, or lap.lapjv (Jonker-Volgenant, several times faster
        on N >= 512 with the same optimum; docs/benchmarks.md).

    Returns
    -------
    np.ndarray
        [N] int64 columns: row i is assigned column cols[i].
    """
    check_choice("solver", solver, SOLVERS)
    if costs.ndim != 2 or costs.shape[0] != costs.shape[1]:
        raise ValueError(f"costs must be a square [N, N] matrix, got {tuple(costs.shape)}")
    c = costs.to("cpu", torch.float64).numpy()
    if solver == "lap":
        _, cols, _ = _import_lap().lapjv(c, extend_cost=False)
    else:
        _, cols = scipy.optimize.linear_sum_assignment(c)
    return np.asarray(cols, dtype=np.int64)


def match_noise(
    images: torch.Tensor,
    noise: torch.Tensor,
    labels=None,
    cost: str = "euclidean",
    solver: str = "scipy",
) -> torch.LongTensor:
    """Permutation of `noise` that minimises the summed image-noise cost (AOT, arXiv 2403.05069).

    ``noise[perm]`` is the noise paired with ``images``; images and labels never move. With labels,
    noises are only exchanged among images of the same class, as the authors do for conditional
    models, so ``labels[perm] == labels``.

    Parameters
    ----------
    images : torch.Tensor
        [N, ...] augmented images (floating point, finite).
    noise : torch.Tensor
        [N, ...] unit noise, same shape as images.
    labels : torch.Tensor or array-like, optional
        [N] integer class ids. None matches the whole pool at once.
    cost : {"euclidean", "squared"}
        Euclidean distance (the authors' cost) or its square.
    solver : {"scipy", "lap"}
        Exact assignment solver; see `solve_assignment`.

    Returns
    -------
    torch.LongTensor
        [N] permutation on the CPU (indexing a CUDA tensor with it works).
    """
    check_choice("cost", cost, COSTS)
    check_choice("solver", solver, SOLVERS)
    if solver == "lap":
        _import_lap()
    _check_images("images", images)
    _check_images("noise", noise)
    if images.shape != noise.shape:
        raise ValueError(
            f"images and noise must have the same shape, got {tuple(images.shape)} "
            f"and {tuple(noise.shape)}"
        )
    n = images.shape[0]
    noise = noise.to(images.device)
    if labels is None:
        return torch.from_numpy(solve_assignment(cost_matrix(images, noise, cost), solver))
    ids = _check_class_ids("labels", labels, n)
    perm = torch.empty(n, dtype=torch.int64)
    for c in torch.unique(ids):
        idx = torch.nonzero(ids == c).squeeze(1)
        idx_dev = idx.to(images.device)
        block = cost_matrix(images[idx_dev], noise[idx_dev], cost)
        perm[idx] = idx[torch.from_numpy(solve_assignment(block, solver))]
    return perm


def _mean_distance(images: torch.Tensor, noise: torch.Tensor) -> float:
    return torch.linalg.vector_norm((images - noise).flatten(1).float(), dim=1).mean().item()


def build_pool(
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    augment_labels: torch.Tensor | None = None,
    *,
    generator: torch.Generator,
    aot: bool = True,
    cost: str = "euclidean",
    solver: str = "scipy",
    class_ids=None,
) -> Pool:
    """Draws P unit noises and pairs them with a pool of P augmented images.

    The noise is drawn with `generator` on the CPU in float32 and then moved to the images'
    device, so a pool depends only on the generator state, not on the device. ``aot=False`` gives
    the EDM baseline through the same code path: identity pairing, matched == identity distance.

    Parameters
    ----------
    images : torch.Tensor
        [P, C, H, W] augmented images in [-1, 1].
    labels : torch.Tensor, optional
        [P, label_dim] one-hot float labels, passed through untouched.
    augment_labels : torch.Tensor, optional
        [P, 9] augmentation labels, passed through untouched.
    generator : torch.Generator
        CPU generator for the noise.
    aot : bool
        Match the noise (EDM-AOT) or keep the drawn order (EDM).
    cost, solver : str
        See `match_noise`.
    class_ids : torch.Tensor or array-like, optional
        [P] integer class ids; when given, matching happens within each class (conditional models,
        where the authors use the argmax of the one-hot label).

    Returns
    -------
    Pool
    """
    check_choice("cost", cost, COSTS)
    check_choice("solver", solver, SOLVERS)
    _check_images("images", images)
    p = images.shape[0]
    for name, extra in (("labels", labels), ("augment_labels", augment_labels)):
        if extra is not None and (extra.ndim != 2 or extra.shape[0] != p):
            raise ValueError(f"{name} must have shape [{p}, k], got {tuple(extra.shape)}")
    if class_ids is not None:
        class_ids = _check_class_ids("class_ids", class_ids, p)
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise ValueError(
            "generator must be a CPU torch.Generator (noise is drawn on the CPU so "
            "results do not depend on the device)"
        )

    drawn = torch.randn(images.shape, generator=generator, dtype=torch.float32)
    drawn = drawn.to(images.device, images.dtype)
    identity = _mean_distance(images, drawn)
    if not aot:
        stats = PoolStats(identity, identity, 0.0, p)
        return Pool(images, drawn, labels, augment_labels, stats)
    start = time.perf_counter()
    perm = match_noise(images, drawn, class_ids, cost=cost, solver=solver)
    seconds = time.perf_counter() - start
    noise = drawn[perm.to(images.device)]
    stats = PoolStats(_mean_distance(images, noise), identity, seconds, p)
    return Pool(images, noise, labels, augment_labels, stats)


class NoisePool:
    """Serves micro-batches of b pairs from consecutive AOT pools of P pairs.

    Pool i is ``load_pool(i)``, a pure function of i supplied by the training loop (load P images,
    augment, draw noise with a generator seeded from (seed, rank, i), call `build_pool`). It is
    consumed over P / b consecutive `next_batch` calls, as in the authors' loop. With
    ``prefetch=True`` pool i + 1 is built in one background thread while pool i is served, so the
    assignment overlaps with training; the stream is identical to ``prefetch=False``.

    Parameters
    ----------
    load_pool : Callable[[int], Pool]
        Builds pool i; must return a Pool of `pool_size` pairs.
    pool_size : int
        P, a positive multiple of `micro_batch`.
    micro_batch : int
        b, pairs per `next_batch` call.
    start_pool, start_offset : int
        Position to start from, as returned by `state_dict` (resuming a run).
    prefetch : bool
        Build the next pool in a background thread.

    Attributes
    ----------
    last_stats : PoolStats or None
        Stats of the pool that the latest batch came from.
    new_pool : bool
        True when the latest batch was the first one served from a freshly loaded pool (log
        `last_stats` then).
    wait_seconds : float
        Total time `next_batch` has waited for pools: for a background build still running, or
        for the whole build without prefetch. Above zero, the builder holds training back.
    """

    def __init__(
        self,
        load_pool: Callable[[int], Pool],
        pool_size: int,
        micro_batch: int,
        *,
        start_pool: int = 0,
        start_offset: int = 0,
        prefetch: bool = True,
    ):
        if not callable(load_pool):
            raise ValueError("load_pool must be a callable taking the pool index")
        if not (
            is_int(pool_size)
            and is_int(micro_batch)
            and micro_batch > 0
            and pool_size > 0
            and pool_size % micro_batch == 0
        ):
            raise ValueError(
                f"pool_size must be a positive multiple of micro_batch, got "
                f"pool_size={pool_size!r}, micro_batch={micro_batch!r}"
            )
        check_int("start_pool", start_pool, 0)
        if not (
            is_int(start_offset)
            and 0 <= start_offset < pool_size
            and start_offset % micro_batch == 0
        ):
            raise ValueError(
                f"start_offset must be a multiple of micro_batch={micro_batch} in "
                f"[0, pool_size={pool_size}), got {start_offset!r}"
            )
        self._load_pool = load_pool
        self.pool_size = pool_size
        self.micro_batch = micro_batch
        self._pool_index = start_pool
        self._offset = start_offset
        self._pool: Pool | None = None
        self._closed = False
        self.last_stats: PoolStats | None = None
        self.new_pool = False
        self.wait_seconds = 0.0
        self._executor = None
        self._future = None
        if prefetch:
            self._executor = concurrent.futures.ThreadPoolExecutor(1, "aot-pool")
            self._future = self._executor.submit(self._load, start_pool)

    def _load(self, index: int) -> Pool:
        try:
            pool = self._load_pool(index)
            if not isinstance(pool, Pool) or pool.images.shape[0] != self.pool_size:
                got = pool.images.shape[0] if isinstance(pool, Pool) else type(pool).__name__
                raise ValueError(
                    f"load_pool({index}) must return a Pool of pool_size="
                    f"{self.pool_size} pairs, got {got}"
                )
        except Exception as exc:
            exc.add_note(f"raised by load_pool while building pool {index}")
            raise
        return pool

    def _next_pool(self) -> Pool:
        if self._future is None:
            return self._load(self._pool_index)
        pool = self._future.result()
        self._future = self._executor.submit(self._load, self._pool_index + 1)
        return pool

    def next_batch(
        self,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The next b pairs: (images, noise, labels, augment_labels), labels None where absent.

        An exception raised while building a pool in the background is re-raised here, on the
        first call after it happened.
        """
        if self._closed:
            raise RuntimeError("NoisePool is closed")
        if self._future is not None and self._future.done():
            self._future.result()  # re-raises a failure of the background build now
        self.new_pool = self._pool is None
        if self._pool is None:
            start = time.perf_counter()
            self._pool = self._next_pool()
            self.wait_seconds += time.perf_counter() - start
            self.last_stats = self._pool.stats
        part = slice(self._offset, self._offset + self.micro_batch)
        pool = self._pool
        batch = (
            pool.images[part],
            pool.noise[part],
            None if pool.labels is None else pool.labels[part],
            None if pool.augment_labels is None else pool.augment_labels[part],
        )
        self._offset += self.micro_batch
        if self._offset == self.pool_size:
            self._pool, self._pool_index, self._offset = None, self._pool_index + 1, 0
        return batch

    def state_dict(self) -> dict[str, int]:
        """Position of the next batch, for ``NoisePool(..., start_pool=, start_offset=)``."""
        return {"pool_index": self._pool_index, "offset": self._offset}

    def close(self) -> None:
        """Stops the background thread (waits for a build in progress). Idempotent."""
        self._closed = True
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor, self._future = None, None

    def __enter__(self) -> "NoisePool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
