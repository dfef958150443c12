"""The EDM / EDM-AOT training loop: one function, flat options, exactly resumable checkpoints.

`training_loop` follows EDM's training recipe (method-notes b.5): Adam with a linear learning-rate
warm-up measured in images, an EMA whose half-life ramps up with the images seen, NaN/Inf gradient
scrubbing, and progress measured in kimg with ticks and snapshots. The only change for EDM-AOT
(method-notes a.2) is where the noise comes from: a `NoisePool` serves micro-batches of
(augmented image, paired unit noise) from pools of P images matched by an exact assignment;
``aot=False`` gives the EDM baseline through the same path (identity pairing of the same images and
the same noise draws).

Randomness. Every stream is seeded from the run seed, so a run is a pure function of its options:

- pool i on rank r is a pure function of (seed, rank, i): its images are positions
  [i * P * W, (i + 1) * P * W) of the data order (`ordered_indices`, rank r's share), augmented
  with a generator seeded from (seed, rank, i), paired with noise drawn from a second generator
  seeded from (seed, rank, i). Resuming rebuilds the current pool exactly from its index;
- per-image sigma comes from a CPU training generator seeded from (seed, rank);
- dropout uses the torch global RNG, seeded from (seed, rank) after the network is initialised
  from ``seed`` alone (identical on every rank).

Checkpoints (`aot_model.checkpoints`) hold all of it, so an interrupted run continues with
bit-identical weights.

Precision: ``precision="auto"`` trains in bf16 autocast on CUDA for speed; EDM and EDM-AOT trained
in FP32 with TF32 off, so pass ``precision="fp32"`` (and keep ``tf32=False``) for paper parity. On
the CPU everything is FP32 unless asked otherwise. On CUDA the loop sets the process's TF32 switches
(`devices.set_float32_precision`) and cuDNN autotuning, and it reseeds the global torch, NumPy
and Python RNGs of the calling process.

Distributed: under torchrun each rank trains on its own share with DistributedDataParallel.
``match_scope="per_rank"`` is the authors' scheme (every rank matches its own pool of P).
``match_scope="global"`` gathers the W pools, solves one joint W*P problem on rank 0 and broadcasts
the paired noise, so every rank uses the same matching; the collectives must run in the main
thread in lockstep, so prefetching is off in that scope.
"""

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from aot_model import devices, distributed
from aot_model.augment import AUGMENT_DIM, AugmentPipe
from aot_model.checkpoints import (
    FORMAT_VERSION,
    STATS_FILE,
    check_compatible,
    checkpoint_path,
    drop_unsaved_progress,
    last_tick,
    resume_state,
    save_checkpoint,
)
from aot_model.checks import check_choice, check_int
from aot_model.data import ImageDataset, ordered_indices
from aot_model.loss import EDMLoss
from aot_model.networks import ARCHS, NETWORK_DEFAULTS, EDMPrecond
from aot_model.pairing import COSTS, SOLVERS, NoisePool, Pool, PoolStats, build_pool
from aot_model.progress import progress_bar

MATCH_SCOPES = ("per_rank", "global")
PRECISIONS = ("auto", "fp32", "bf16")
# Independent random streams derived from the run seed.
_AUGMENT, _NOISE, _GLOBAL_NOISE, _SIGMA, _GLOBAL_RNG = range(5)
# Keys of EDMPrecond's constructor that the loop sets itself.
_NETWORK_KEYS = ("img_resolution", "img_channels", "label_dim", "arch", "augment_dim")


@dataclasses.dataclass(frozen=True)
class TrainDefaults:
    """`training_loop`'s options and their defaults, in one place: the loop's signature and the
    params.yaml schema (aot_pipeline/config.py) read them, so a library call and a params file that
    leave an option out train the same run. EDM-AOT's CIFAR-10 recipe (method-notes a.3, b.5); the
    network's defaults, ``arch`` included, are `networks.NETWORK_DEFAULTS`."""

    # Data.
    cond: bool = False  # class-conditional: label_dim = dataset.num_classes, per-class matching
    augment_p: float = 0.12  # EDM augmentation probability; 0 disables it and the 9-dim input
    # Optimisation.
    batch: int = 256  # global images per optimizer step: EDM-AOT's README (EDM's default: 512)
    batch_gpu: int | None = None  # micro-batch per rank; None = batch // world_size
    lr: float = 1e-3  # Adam learning rate after warm-up
    adam_betas: tuple[float, float] = (0.9, 0.999)  # Adam beta1, beta2
    adam_eps: float = 1e-8  # Adam epsilon
    lr_rampup_kimg: float = 10_000  # linear learning-rate warm-up, in thousands of images
    ema_halflife_kimg: float = 500  # EMA half-life, in thousands of images
    ema_rampup_ratio: float | None = 0.05  # half-life <= ratio * images seen; None: no ramp-up
    # AOT pairing.
    aot: bool = True  # match noise to images (EDM-AOT); False: identity pairing (EDM)
    pool_size: int = 512  # images per pool and rank (P); a multiple of batch_gpu
    cost: str = "euclidean"  # matching cost, one of pairing.COSTS ("euclidean": the authors')
    solver: str = "scipy"  # exact assignment solver, one of pairing.SOLVERS
    match_scope: str = "per_rank"  # "per_rank" (authors) or "global" (one joint W*P matching)
    prefetch: bool | None = None  # build the next pool in a thread; None: on unless global
    # Schedule.
    duration_kimg: float = 200_000  # training length, in thousands of images
    tick_kimg: float = 50  # metrics every tick_kimg thousand images
    snapshot_ticks: int = 50  # checkpoint every snapshot_ticks ticks (and at the end)
    keep_snapshots: int = 3  # number of newest checkpoints kept in run_dir
    seed: int = 0  # run seed: network init, data order, augmentation, noise, sigma, dropout
    # Devices.
    precision: str = "auto"  # "fp32", "bf16" autocast, or "auto" (bf16 on CUDA, fp32 on CPU)
    channels_last: bool | str = "auto"  # NHWC memory format; "auto": on for CUDA
    compile: bool = False  # torch.compile the training network
    tf32: bool = False  # allow TF32 matmuls and convolutions on CUDA (EDM: off)


TRAIN_DEFAULTS = TrainDefaults()


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf; the run stopped without writing a checkpoint."""


# ------------------------------------------------------------------------------------------------
# Options.


def _require(ok: bool, name: str, expected: str, value) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


def _check_options(o: dict, dataset, world_size: int) -> None:
    """Raise ValueError naming the first bad option, before anything is built."""
    _require(isinstance(dataset, ImageDataset), "dataset", "an ImageDataset", type(dataset))
    check_choice("arch", o["arch"], ARCHS)
    _require(isinstance(o["model_kwargs"], dict), "model_kwargs", "a dict", o["model_kwargs"])
    clash = sorted(set(o["model_kwargs"]) & set(_NETWORK_KEYS))
    _require(not clash, "model_kwargs", f"free of keys the loop sets {_NETWORK_KEYS}", clash)
    for name in ("cond", "aot", "compile", "tf32"):
        _require(isinstance(o[name], bool), name, "a bool", o[name])
    _require(0 <= o["augment_p"] <= 1, "augment_p", "in [0, 1]", o["augment_p"])
    for name in ("batch", "batch_gpu", "pool_size", "snapshot_ticks", "keep_snapshots"):
        check_int(name, o[name], 1)
    check_int("seed", o["seed"], 0)
    per_rank = o["batch"] // world_size
    if o["batch"] % world_size or per_rank % o["batch_gpu"]:
        raise ValueError(
            f"batch={o['batch']} must be a multiple of batch_gpu * world_size = "
            f"{o['batch_gpu']} * {world_size} (gradient accumulation runs whole micro-batches)"
        )
    if o["pool_size"] % o["batch_gpu"]:
        raise ValueError(
            f"pool_size={o['pool_size']} must be a multiple of batch_gpu={o['batch_gpu']} "
            "(a pool is served in whole micro-batches)"
        )
    for name in ("lr", "adam_eps", "duration_kimg", "tick_kimg", "ema_halflife_kimg"):
        _require(0 < o[name] < math.inf, name, "finite and > 0", o[name])
    _require(
        0 <= o["lr_rampup_kimg"] < math.inf,
        "lr_rampup_kimg",
        "finite and >= 0",
        o["lr_rampup_kimg"],
    )
    betas = o["adam_betas"]
    _require(
        len(betas) == 2 and all(0 <= b < 1 for b in betas),
        "adam_betas",
        "two values in [0, 1)",
        betas,
    )
    ratio = o["ema_rampup_ratio"]
    _require(ratio is None or ratio > 0, "ema_rampup_ratio", "None or > 0", ratio)
    check_choice("cost", o["cost"], COSTS)
    check_choice("solver", o["solver"], SOLVERS)
    check_choice("match_scope", o["match_scope"], MATCH_SCOPES)
    _require(o["prefetch"] in (None, True, False), "prefetch", "None, True or False", o["prefetch"])
    if o["match_scope"] == "global" and o["prefetch"]:
        raise ValueError(
            "prefetch must be False or None with match_scope='global': the joint matching uses "
            "collectives that must run in the main thread"
        )
    check_choice("precision", o["precision"], PRECISIONS)
    _require(
        o["channels_last"] in ("auto", True, False),
        "channels_last",
        "'auto', True or False",
        o["channels_last"],
    )


def _dataset_fingerprint(dataset: ImageDataset) -> dict:
    """Name, shape, classes and a SHA-256 of the pixels and labels: resuming on other data fails."""
    digest = hashlib.sha256()
    for array in (dataset.images, dataset.labels):
        digest.update(memoryview(np.ascontiguousarray(array)).cast("B"))
    return {
        "name": dataset.name,
        "shape": list(dataset.images.shape),
        "num_classes": dataset.num_classes,
        "sha256": digest.hexdigest(),
    }


def _plain(value):
    """Tuples to lists, recursively: options survive JSON and ``weights_only`` loading alike."""
    try:
        return json.loads(json.dumps(value))
    except TypeError as exc:
        raise ValueError(
            f"options must be JSON-serialisable (model_kwargs included): {exc}"
        ) from exc


def _network_kwargs(dataset: ImageDataset, o: dict) -> dict:
    """EDMPrecond constructor kwargs; ``augment_p = 0`` drops the augmentation input entirely."""
    channels, resolution, _ = dataset.image_shape
    return {
        "img_resolution": resolution,
        "img_channels": channels,
        "label_dim": dataset.num_classes if o["cond"] else 0,
        "arch": o["arch"],
        "augment_dim": AUGMENT_DIM if o["augment_p"] > 0 else 0,
        **o["model_kwargs"],
    }


# ------------------------------------------------------------------------------------------------
# Randomness.


def _derived_seed(seed: int, stream: int, *keys: int) -> int:
    """A 63-bit seed for one independent stream, e.g. (seed, _NOISE, rank, pool index)."""
    sequence = np.random.SeedSequence(seed, spawn_key=(stream, *keys))
    return int(sequence.generate_state(1, np.uint64)[0] >> np.uint64(1))


def _generator(seed: int, stream: int, *keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(_derived_seed(seed, stream, *keys))


def _seed_global_rngs(seed: int) -> None:
    torch.manual_seed(seed)  # also seeds every CUDA device
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _rng_state(sigma_generator: torch.Generator, device: torch.device) -> dict:
    """This rank's RNG states as tensors and plain containers (``weights_only``-loadable)."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    torch_state = torch.get_rng_state()
    state = {
        "torch": torch_state,
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
        "sigma_generator": sigma_generator.get_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, sigma_generator: torch.Generator, device: torch.device) -> None:
    n, p = state["numpy"], state["python"]
    keys = n["keys"].numpy().astype(np.uint32)
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    sigma_generator.set_state(state["sigma_generator"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


# ------------------------------------------------------------------------------------------------
# Pools.


def _pool_inputs(dataset, pipe, o, rank, world_size, index, device="cpu"):
    """Rank ``rank``'s P images of pool ``index``, augmented: (images, labels, aug, class_ids).

    The images are augmented on ``device`` (the training device), so that on a GPU the builder's
    CPU work is only the assignment; the augmentation's random draws stay on the CPU generator.
    """
    p = o["pool_size"]
    idx = ordered_indices(
        len(dataset),
        o["seed"],
        p * world_size * index,
        p * world_size,
        rank=rank,
        world_size=world_size,
    )
    images, augment_labels = dataset.to_float(idx).to(device), None
    if pipe is not None:
        images, augment_labels = pipe(images, _generator(o["seed"], _AUGMENT, rank, index))
    if not o["cond"]:
        return images, None, augment_labels, None
    return images, dataset.one_hot(idx), augment_labels, torch.from_numpy(dataset.labels[idx])


def _pool_loader(dataset, o, rank, world_size, device) -> Callable[[int], Pool]:
    """``load_pool(i)`` for `NoisePool`, in the requested match scope."""
    pipe = AugmentPipe(p=o["augment_p"]) if o["augment_p"] > 0 else None
    match = {"aot": o["aot"], "cost": o["cost"], "solver": o["solver"]}

    def per_rank(index: int) -> Pool:
        images, labels, augment_labels, ids = _pool_inputs(
            dataset, pipe, o, rank, world_size, index, device
        )
        noise_generator = _generator(o["seed"], _NOISE, rank, index)
        pool = build_pool(
            images, labels, augment_labels, generator=noise_generator, class_ids=ids, **match
        )
        return _pinned(pool, device)

    def joint(index: int) -> Pool:
        # Every rank gathers all W pools (NCCL needs device tensors); rank 0 solves the W*P
        # problem and broadcasts the paired noise, so all ranks use one matching even if their
        # solvers or BLAS differ.
        images, labels, augment_labels, ids = _pool_inputs(
            dataset, pipe, o, rank, world_size, index, device
        )
        all_images = distributed.all_gather_cat(images)
        all_ids = None if ids is None else distributed.all_gather_cat(ids.to(device)).cpu()
        if rank == 0:
            pool = build_pool(
                all_images,
                generator=_generator(o["seed"], _GLOBAL_NOISE, index),
                class_ids=all_ids,
                **match,
            )
            noise, s = pool.noise, pool.stats
            summary = [s.matched_distance, s.identity_distance, s.solve_seconds]
        else:
            noise, summary = torch.empty_like(all_images), [0.0, 0.0, 0.0]
        summary = distributed.broadcast_(torch.tensor(summary, dtype=torch.float64, device=device))
        noise = distributed.broadcast_(noise.contiguous())
        p = o["pool_size"]
        stats = PoolStats(*summary.tolist(), pool_size=p * world_size)
        pool = Pool(images, noise[rank * p : (rank + 1) * p], labels, augment_labels, stats)
        return _pinned(pool, device)

    return joint if o["match_scope"] == "global" else per_rank


def _pinned(pool: Pool, device: torch.device | str) -> Pool:
    """For a GPU, the pool's CPU tensors in pinned memory (in the builder's thread): serving a
    micro-batch is then an asynchronous copy, where a pageable one would wait for the GPU."""
    if torch.device(device).type != "cuda":
        return pool
    fields = ("images", "noise", "labels", "augment_labels")
    values = [getattr(pool, name) for name in fields]
    pinned = [x if x is None or x.device.type != "cpu" else x.pin_memory() for x in values]
    return dataclasses.replace(pool, **dict(zip(fields, pinned, strict=True)))


# ------------------------------------------------------------------------------------------------
# Optimisation.


def _learning_rate(o: dict, cur_nimg: int) -> float:
    """Linear warm-up from 0 over ``lr_rampup_kimg``, then constant (EDM, method-notes b.5)."""
    return o["lr"] * min(cur_nimg / max(o["lr_rampup_kimg"] * 1000, 1e-8), 1.0)


def _ema_beta(o: dict, cur_nimg: int) -> float:
    """Per-step EMA decay: half-life min(halflife, ratio * images seen), in images (EDM)."""
    halflife_nimg = o["ema_halflife_kimg"] * 1000
    if o["ema_rampup_ratio"] is not None:
        halflife_nimg = min(halflife_nimg, cur_nimg * o["ema_rampup_ratio"])
    return 0.5 ** (o["batch"] / max(halflife_nimg, 1e-8))


@torch.no_grad()
def _update_ema(ema: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    # One multi-tensor kernel per step instead of one per parameter (same values).
    torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1.0 - beta)


def _adam(net: torch.nn.Module, o: dict) -> torch.optim.Adam:
    """EDM's Adam, fused: one kernel for all parameters (CPU and CUDA both have one)."""
    return torch.optim.Adam(
        net.parameters(), lr=o["lr"], betas=tuple(o["adam_betas"]), eps=o["adam_eps"], fused=True
    )


def _load_optimizer(optimizer: torch.optim.Adam, state: dict) -> None:
    """Load a checkpoint's Adam state but keep this run's implementation: the saved param groups
    carry the flags of the run that wrote them (an older checkpoint says ``fused=None``)."""
    flags = {key: optimizer.param_groups[0][key] for key in ("foreach", "fused")}
    groups = [{**group, **flags} for group in state["param_groups"]]
    optimizer.load_state_dict({**state, "param_groups": groups})


@torch.no_grad()
def _scrub_gradients(net: torch.nn.Module) -> None:
    """NaN -> 0 and +-Inf -> +-1e5 in every gradient, as EDM does before each step."""
    for p in net.parameters():
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0.0, posinf=1e5, neginf=-1e5, out=p.grad)


# ------------------------------------------------------------------------------------------------
# Devices.


def _configure_device(o: dict, device: torch.device) -> tuple[bool, bool]:
    """Resolve (use bf16 autocast, use channels_last); on CUDA set TF32 and cuDNN autotuning."""
    cuda = device.type == "cuda"
    if cuda:
        devices.set_float32_precision(o["tf32"])
        # Shapes are fixed for the whole run: cuDNN's per-shape search pays off from step 2.
        torch.backends.cudnn.benchmark = True
    bf16 = o["precision"] == "bf16" or (o["precision"] == "auto" and cuda)
    channels_last = o["channels_last"] is True or (o["channels_last"] == "auto" and cuda)
    return bf16, channels_last


# ------------------------------------------------------------------------------------------------
# The loop.


def training_loop(
    run_dir: str | Path,
    dataset: ImageDataset,
    *,
    # Network.
    arch: str = NETWORK_DEFAULTS.arch,  # SongUNet preset: "ncsnpp" (EDM VE) or "ddpmpp" (VP)
    model_kwargs: dict | None = None,  # EDMPrecond / SongUNet overrides, e.g. model_channels
    cond: bool = TRAIN_DEFAULTS.cond,
    augment_p: float = TRAIN_DEFAULTS.augment_p,
    # Optimisation.
    batch: int = TRAIN_DEFAULTS.batch,
    batch_gpu: int | None = TRAIN_DEFAULTS.batch_gpu,
    lr: float = TRAIN_DEFAULTS.lr,
    adam_betas: tuple[float, float] = TRAIN_DEFAULTS.adam_betas,
    adam_eps: float = TRAIN_DEFAULTS.adam_eps,
    lr_rampup_kimg: float = TRAIN_DEFAULTS.lr_rampup_kimg,
    ema_halflife_kimg: float = TRAIN_DEFAULTS.ema_halflife_kimg,
    ema_rampup_ratio: float | None = TRAIN_DEFAULTS.ema_rampup_ratio,
    # AOT pairing.
    aot: bool = TRAIN_DEFAULTS.aot,
    pool_size: int = TRAIN_DEFAULTS.pool_size,
    cost: str = TRAIN_DEFAULTS.cost,
    solver: str = TRAIN_DEFAULTS.solver,
    match_scope: str = TRAIN_DEFAULTS.match_scope,
    prefetch: bool | None = TRAIN_DEFAULTS.prefetch,
    # Schedule.
    duration_kimg: float = TRAIN_DEFAULTS.duration_kimg,
    tick_kimg: float = TRAIN_DEFAULTS.tick_kimg,
    snapshot_ticks: int = TRAIN_DEFAULTS.snapshot_ticks,
    keep_snapshots: int = TRAIN_DEFAULTS.keep_snapshots,
    seed: int = TRAIN_DEFAULTS.seed,
    resume: str | Path | None = None,  # None: fresh; "auto": newest intact in run_dir; or a path
    # Devices.
    device: str | None = None,  # cpu, cuda (cuda:LOCAL_RANK), cuda:N; None/auto: CUDA if usable
    precision: str = TRAIN_DEFAULTS.precision,
    channels_last: bool | str = TRAIN_DEFAULTS.channels_last,
    compile: bool = TRAIN_DEFAULTS.compile,
    tf32: bool = TRAIN_DEFAULTS.tf32,
    # Reporting.
    callback: Callable[[dict], None] | None = None,  # receives each tick's metrics on rank 0
    progress: bool = True,  # tqdm progress bar on rank 0
) -> dict:
    """Train an EDM(-AOT) denoiser; see the module docstring for the recipe and randomness.

    Runs under plain ``python`` or ``torchrun`` (DistributedDataParallel, gloo on CPU, NCCL on
    CUDA). Each optimizer step accumulates ``batch / (batch_gpu * world_size)`` micro-batches per
    rank; the loss of a micro-batch is summed over images and divided by ``batch // world_size``
    (EDM), so gradients match one large batch.

    Every tick, rank 0 hands a metrics dict to ``callback``, appends it as a JSON line to
    ``run_dir/stats.jsonl`` and updates the progress bar. Metrics: tick, kimg, step, loss (mean
    per-image loss over the tick, all ranks), lr, img_per_sec, sec_per_kimg (checkpoint writing
    excluded), pairing_sec (solve time of the pools that came into use during the tick, mean over
    ranks), pool_wait_sec (time the step waited for the pool builder during the tick, mean over
    ranks: above zero, building pools is the bottleneck), matched_distance, identity_distance,
    distance_ratio (means over those pools, else the current pool's) and, on CUDA,
    cuda_max_mem_gib.

    Checkpoints ``run_dir/training-state-<nimg:09d>.pt`` (nimg: images seen) are written
    atomically by rank 0 every ``snapshot_ticks`` ticks and at the end; the newest
    ``keep_snapshots`` are kept. A NaN or Inf loss raises `NonFiniteLossError` (with its step and
    kimg) before any further checkpoint.

    Parameters
    ----------
    run_dir : str or Path
        Output directory (created if missing).
    dataset : ImageDataset
        uint8 images [N, C, R, R] and int64 labels.
    **options
        Keyword options: each with a default is documented in `TrainDefaults` (``arch`` in
        `networks.NetworkDefaults`), the others one per line in the signature.

    Returns
    -------
    dict
        checkpoint (Path of the last checkpoint or None), step, kimg, metrics (the last tick's
        metrics, from stats.jsonl for a finished run; empty if none), net and ema (the trained
        modules, unwrapped).
    """
    o = dict(locals())
    for key in ("run_dir", "dataset", "resume", "callback", "progress"):
        o.pop(key)
    device, _ = devices.resolve("auto" if device is None else device, "device")
    rank, world_size, device = distributed.init(device)
    o["model_kwargs"] = {} if model_kwargs is None else model_kwargs
    o["batch_gpu"] = batch // world_size if batch_gpu is None else batch_gpu
    _check_options(o, dataset, world_size)
    o["prefetch"] = match_scope == "per_rank" if prefetch is None else prefetch
    o = {**_plain({**o, "world_size": world_size}), "dataset": _dataset_fingerprint(dataset)}
    run_dir = Path(run_dir)
    start_path, saved = resume_state(run_dir, resume, rank)
    if saved is not None and "imported" in saved:  # written by aot_model.edm_pickle.import_edm
        raise ValueError(
            f"cannot resume from {start_path}: it was imported from {saved['imported']['source']} "
            "(network weights only, no optimizer, data or RNG state); train in another run_dir"
        )
    if saved is not None:
        check_compatible(saved["options"], o, start_path)

    # Network, EMA and optimizer; initial weights depend on the seed alone (same on every rank).
    bf16, channels_last = _configure_device(o, device)
    network_kwargs = _network_kwargs(dataset, o)
    _seed_global_rngs(seed)
    net = EDMPrecond(**network_kwargs).train().requires_grad_(True).to(device)
    _seed_global_rngs(_derived_seed(seed, _GLOBAL_RNG, rank))  # dropout differs across ranks
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    distributed.broadcast_module_(net)  # incl. the NCSN++ Fourier frequencies (method-notes a.5)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = _adam(net, o)
    sigma_generator = _generator(seed, _SIGMA, rank)
    step, cur_nimg, cur_tick, pool_index, pool_offset = 0, 0, 0, 0, 0
    if saved is not None:
        net.load_state_dict(saved["net"])
        ema.load_state_dict(saved["ema"])
        _load_optimizer(optimizer, saved["optimizer"])
        step, cur_nimg, cur_tick = saved["step"], saved["cur_nimg"], saved["cur_tick"]
        pool_index, pool_offset = saved["pool"]["pool_index"], saved["pool"]["offset"]
        _set_rng_state(saved["rng"][rank], sigma_generator, device)
        distributed.print0(
            f"Resuming from {start_path} at kimg {cur_nimg / 1000:g}", file=sys.stderr
        )
    del saved
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        drop_unsaved_progress(run_dir, step)

    ddp = None
    if world_size > 1:
        # Buffers never change and were synchronised above: no broadcast before every forward.
        device_ids = [device] if device.type == "cuda" else None
        ddp = DistributedDataParallel(net, device_ids=device_ids, forward_sync_buffers=False)
    train_net = ddp if ddp is not None else net
    if compile:
        train_net = torch.compile(train_net)
    loss_fn = EDMLoss()
    batch_per_rank = batch // world_size
    rounds = batch_per_rank // o["batch_gpu"]
    duration_nimg = _nimg(duration_kimg)
    tick_nimg = max(_nimg(tick_kimg), 1)
    # A finished run trains nothing: report its last tick, so a rerun states the same numbers.
    checkpoint, metrics = start_path, last_tick(run_dir)
    # Counts whole images, shown with SI prefixes ("60.0k/200k", "6.02kimg/s").
    bar = progress_bar(
        total=duration_nimg,
        initial=cur_nimg,
        unit="img",
        unit_scale=True,
        disable=rank != 0 or not progress,
    )
    pool = NoisePool(
        _pool_loader(dataset, o, rank, world_size, device),
        o["pool_size"],
        o["batch_gpu"],
        start_pool=pool_index,
        start_offset=pool_offset,
        prefetch=o["prefetch"],
    )
    tick = _new_tick(step, cur_nimg, pool)
    try:
        while cur_nimg < duration_nimg:
            # One optimizer step: `rounds` micro-batches, gradients all-reduced on the last only.
            optimizer.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), device=device)
            for round_index in range(rounds):
                images, noise, labels, augment_labels = _next_micro_batch(
                    pool, device, channels_last, tick["pools"]
                )
                last = ddp is None or round_index == rounds - 1
                with contextlib.nullcontext() if last else ddp.no_sync():
                    with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                        loss = loss_fn(
                            train_net,
                            images,
                            noise,
                            labels,
                            augment_labels,
                            generator=sigma_generator,
                        )
                    loss.sum().mul(1 / batch_per_rank).backward()
                step_loss += loss.detach().sum()
            tick["losses"].append(step_loss)
            lr_now = _learning_rate(o, cur_nimg)
            for group in optimizer.param_groups:
                group["lr"] = lr_now
            _scrub_gradients(net)
            optimizer.step()
            _update_ema(ema, net, _ema_beta(o, cur_nimg))
            cur_nimg += batch
            step += 1
            bar.update(batch)
            if cur_nimg < min(tick["nimg"] + tick_nimg, duration_nimg):
                continue

            # Tick: metrics (raises on a non-finite loss, before any checkpoint), snapshot.
            cur_tick += 1
            metrics = _tick_metrics(
                tick, pool, step, cur_tick, cur_nimg, lr_now, batch, device, checkpoint
            )
            if rank == 0:
                _report(metrics, run_dir, callback, bar)
            if cur_nimg >= duration_nimg or cur_tick % snapshot_ticks == 0:
                rng = distributed.all_gather_object(_rng_state(sigma_generator, device))
                state = {
                    "format": FORMAT_VERSION,
                    "net": net.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "step": step,
                    "cur_nimg": cur_nimg,
                    "cur_tick": cur_tick,
                    "pool": pool.state_dict(),
                    "rng": rng,
                    "options": o,
                    "network_kwargs": network_kwargs,
                }
                checkpoint = checkpoint_path(run_dir, cur_nimg)
                if rank == 0:
                    save_checkpoint(checkpoint, state, keep_snapshots)
                distributed.barrier()
            tick = _new_tick(step, cur_nimg, pool)
    finally:
        pool.close()
        bar.close()
    return {
        "checkpoint": checkpoint,
        "step": step,
        "kimg": cur_nimg / 1000,
        "metrics": metrics,
        "net": net,
        "ema": ema,
    }


def _next_micro_batch(pool: NoisePool, device, channels_last: bool, new_pools: list):
    """(images, noise, labels, augment_labels) on ``device``; records a new pool's stats."""
    batch = [None if x is None else x.to(device, non_blocking=True) for x in pool.next_batch()]
    if pool.new_pool:
        new_pools.append(pool.last_stats)
    if channels_last:
        batch[:2] = [x.contiguous(memory_format=torch.channels_last) for x in batch[:2]]
    return batch


def _nimg(kimg: float) -> int:
    """Thousands of images to a whole number of images."""
    return round(kimg * 1000)


def _new_tick(step: int, cur_nimg: int, pool: NoisePool) -> dict:
    return {
        "step": step,
        "nimg": cur_nimg,
        "time": time.perf_counter(),
        "pool_wait": pool.wait_seconds,
        "losses": [],
        "pools": [],
    }


def _tick_metrics(tick, pool, step, cur_tick, cur_nimg, lr_now, batch, device, checkpoint) -> dict:
    """Reduce the tick's losses and pool stats over ranks; raise on a non-finite loss.

    Pool distances average over the pools that came into use during the tick, or describe the
    current pool when none did.
    """
    pools = tick["pools"] or [pool.last_stats]
    extra = [
        sum(s.solve_seconds for s in tick["pools"]),
        sum(s.matched_distance for s in pools),
        sum(s.identity_distance for s in pools),
        len(pools),
        pool.wait_seconds - tick["pool_wait"],
        1.0,  # rank count
    ]
    values = torch.cat(
        [
            torch.stack(tick["losses"]).double(),
            torch.tensor(extra, device=device, dtype=torch.float64),
        ]
    )
    values = distributed.all_reduce_sum_(values).tolist()
    losses, (solve, matched, identity, n_pools, wait, ranks) = (
        values[: -len(extra)],
        values[-len(extra) :],
    )
    bad = [i for i, value in enumerate(losses) if not math.isfinite(value)]
    if bad:
        raise NonFiniteLossError(
            f"non-finite training loss at step {tick['step'] + bad[0] + 1} (kimg "
            f"{(tick['nimg'] + bad[0] * batch) / 1000:g}); training stopped without writing a "
            f"checkpoint; the last good checkpoint is {checkpoint or 'none (none was written)'}"
        )
    seconds = time.perf_counter() - tick["time"]
    images = cur_nimg - tick["nimg"]
    metrics = {
        "tick": cur_tick,
        "kimg": cur_nimg / 1000,
        "step": step,
        "loss": sum(losses) / images,
        "lr": lr_now,
        "img_per_sec": images / seconds,
        "sec_per_kimg": seconds / (images / 1000),
        "pairing_sec": solve / ranks,
        "pool_wait_sec": wait / ranks,
        "matched_distance": matched / n_pools,
        "identity_distance": identity / n_pools,
        "distance_ratio": matched / identity,
    }
    return metrics | _peak_memory(device)


def _peak_memory(device: torch.device) -> dict:
    """``{"cuda_max_mem_gib": peak}`` since the previous call (the peak is reset), {} off CUDA."""
    if device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return {"cuda_max_mem_gib": peak}


def _report(metrics: dict, run_dir: Path, callback, bar) -> None:
    """Hand the tick's metrics to the callback, stats.jsonl and the progress bar (rank 0)."""
    with open(run_dir / STATS_FILE, "a") as f:
        f.write(json.dumps(metrics) + "\n")
    bar.set_postfix(loss=f"{metrics['loss']:.4g}", sec_per_kimg=f"{metrics['sec_per_kimg']:.3g}")
    if callback is not None:
        callback(metrics)
