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

from aot_model.checks import check_choice


def _import_lap():
    try:
        import lap
    except ImportError as exc:
        raise ImportError(
            "solver='lap' needs the 'lap' package: pip install 'aot-diffusion[fast]' "
            "or use solver='scipy'"
        ) from exc
    return lap


def _scipy_solve(costs: np.ndarray) -> np.ndarray:
    return scipy.optimize.linear_sum_assignment(costs)[1]


def _lap_solve(costs: np.ndarray) -> np.ndarray:
    return _import_lap().lapjv(costs)[1]


# The registries: a new cost or solver is one entry here (params.yaml's choices derive from them).
# A cost maps the exact squared distances [N, M] to the costs; a solver a float64 [N, N] matrix to
# each row's column.
COSTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "euclidean": torch.Tensor.sqrt_,  # the authors' ||y - n||_2
    "squared": lambda squared: squared,  # ||y - n||_2^2
}
SOLVERS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "scipy": _scipy_solve,  # scipy.optimize.linear_sum_assignment
    "lap": _lap_solve,  # lap.lapjv (Jonker-Volgenant), faster on N >= 512 (docs/benchmarks.md)
}
SCOPES = ("per_rank", "global")


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
    """Pairwise image-noise costs [N, M] in float64 (entry [i, j]: image i, noise j), exact up to
    the cost's last operation, on the images' device.

    Uses the expanded form |y|^2 + |n|^2 - 2 y.n (one matmul, as cdist's mm path does) on the
    :func:`fixed_point` copies, where every sum is exact: the result does not depend on the
    summation order of the BLAS kernel, so near-tied assignments cannot flip between machines
    (the float32 version did: method-notes a.5). IEEE square roots are correctly rounded.
    ``cost`` is a key of `COSTS`.
    """
    y, n = fixed_point(images, noise)
    squared = torch.addmm(n.square().sum(1)[None], y, n.T, alpha=-2.0)
    return COSTS[cost](squared.add_(y.square().sum(1)[:, None]))


def solve_assignment(costs: torch.Tensor, solver: str = "scipy") -> np.ndarray:
    """Exact minimum-cost perfect matching of a square [N, N] cost matrix (copied to the CPU as
    float64): [N] int64 columns, row i assigned column cols[i]. ``solver`` is a key of `SOLVERS`."""
    return np.asarray(SOLVERS[solver](costs.to("cpu", torch.float64).numpy()), dtype=np.int64)


@dataclasses.dataclass(frozen=True)
class Pairing:
    """EDM-AOT's pairing of a pool's images with its noise (method-notes a.2), checked once here.

    The training loop calls ``match`` on every pool and reads ``scope``; any object with both can
    stand in for this one (e.g. another transport plan) without editing the loop. Pass None to
    the loop instead for EDM's independent pairing.

    Attributes
    ----------
    cost : str
        A key of `COSTS`: "euclidean" (the authors') or "squared".
    solver : str
        A key of `SOLVERS`: exact solvers, so they find the same optimum (ties aside).
    scope : str
        "per_rank" (the authors': each rank matches its own pool) or "global" (one joint matching
        of all ranks' pools on rank 0).
    """

    cost: str = "euclidean"
    solver: str = "scipy"
    scope: str = "per_rank"

    def __post_init__(self):
        check_choice("cost", self.cost, COSTS)
        check_choice("solver", self.solver, SOLVERS)
        check_choice("scope", self.scope, SCOPES)
        if self.solver == "lap":
            _import_lap()

    def match(
        self, images: torch.Tensor, noise: torch.Tensor, class_ids: torch.Tensor | None = None
    ) -> torch.LongTensor:
        """Permutation of ``noise`` minimising the summed image-noise cost (arXiv 2403.05069).

        ``noise[perm]`` is the noise paired with ``images`` ([N, ...] each, same shape); images
        never move. With ``class_ids`` ([N] integer class ids), noises are only exchanged among
        images of the same class, as the authors do for conditional models. The permutation is
        on the CPU (indexing a CUDA tensor with it works).
        """
        if images.shape != noise.shape or not torch.isfinite(images).all():
            raise ValueError(
                f"images must be finite and noise of their shape, got {tuple(images.shape)} "
                f"and {tuple(noise.shape)}"
            )
        noise = noise.to(images.device)
        if class_ids is None:
            return torch.from_numpy(self._solve(images, noise))
        ids = torch.as_tensor(class_ids).cpu()
        perm = torch.empty(len(ids), dtype=torch.int64)
        for c in torch.unique(ids):
            idx = torch.nonzero(ids == c).squeeze(1)
            on_device = idx.to(images.device)
            perm[idx] = idx[self._solve(images[on_device], noise[on_device])]
        return perm

    def _solve(self, images: torch.Tensor, noise: torch.Tensor) -> np.ndarray:
        return solve_assignment(cost_matrix(images, noise, self.cost), self.solver)


def _mean_distance(images: torch.Tensor, noise: torch.Tensor) -> float:
    return torch.linalg.vector_norm((images - noise).flatten(1).float(), dim=1).mean().item()


def build_pool(
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    augment_labels: torch.Tensor | None = None,
    *,
    generator: torch.Generator,
    pairing: Pairing | None,
    class_ids: torch.Tensor | None = None,
) -> Pool:
    """Draws P unit noises and pairs them with a pool of P augmented images.

    The noise is drawn with the CPU ``generator`` in float32 and then moved to the images'
    device, so a pool depends only on the generator state, not on the device. ``pairing=None``
    gives the EDM baseline through the same code path: identity pairing, matched == identity
    distance.

    Parameters
    ----------
    images : torch.Tensor
        [P, C, H, W] augmented images in [-1, 1].
    labels, augment_labels : torch.Tensor, optional
        [P, label_dim] one-hot labels and [P, 9] augmentation labels, passed through untouched.
    generator : torch.Generator
        CPU generator for the noise.
    pairing : Pairing or None
        How to match (EDM-AOT), or None to keep the drawn order (EDM).
    class_ids : torch.Tensor, optional
        [P] integer class ids: match within each class (conditional models, where the authors use
        the argmax of the one-hot label).
    """
    drawn = torch.randn(images.shape, generator=generator, dtype=torch.float32)
    drawn = drawn.to(images.device, images.dtype)
    identity = _mean_distance(images, drawn)
    p = images.shape[0]
    if pairing is None:
        return Pool(images, drawn, labels, augment_labels, PoolStats(identity, identity, 0.0, p))
    start = time.perf_counter()
    perm = pairing.match(images, drawn, class_ids)
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
            return self._load_pool(index)
        except Exception as exc:
            exc.add_note(f"raised by load_pool while building pool {index}")
            raise

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
            self._executor.shutdown()  # at most one job, started when submitted
            self._executor, self._future = None, None

    def __enter__(self) -> "NoisePool":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
