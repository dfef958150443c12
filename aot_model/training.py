"""The EDM / EDM-AOT training loop: one function, typed options, exactly resumable checkpoints.

`training_loop` follows EDM's training recipe (method-notes b.5): Adam with a linear learning-rate
warm-up measured in images, an EMA whose half-life ramps up with the images seen, NaN/Inf gradient
scrubbing, and progress measured in kimg with ticks and snapshots. The only change for EDM-AOT
(method-notes a.2) is where the noise comes from: a `NoisePool` serves micro-batches of
(augmented image, paired unit noise) from pools of P images matched by `TrainOptions.pairing`;
``pairing=None`` gives the EDM baseline through the same path (identity pairing of the same images
and the same noise draws). The network, loss and optimizer are class + kwargs (`Component`), as in
EDM's train.py.

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
The pairing's scope ``"per_rank"`` is the authors' scheme (every rank matches its own pool of P);
``"global"`` gathers the W pools, solves one joint W*P problem on rank 0 and broadcasts
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
from aot_model.networks import NETWORK_DEFAULTS, EDMPrecond
from aot_model.pairing import NoisePool, Pairing, Pool, PoolStats, build_pool
from aot_model.progress import progress_bar

PRECISIONS = ("auto", "fp32", "bf16")
# Independent random streams derived from the run seed.
_AUGMENT, _NOISE, _GLOBAL_NOISE, _SIGMA, _GLOBAL_RNG = range(5)


@dataclasses.dataclass(frozen=True)
class Component:
    """A piece the loop builds, as a class and its keyword arguments: EDM's ``class_name`` +
    kwargs seam (``network_kwargs``, ``loss_kwargs``, ``optimizer_kwargs`` in EDM's train.py), so
    a user replaces the network, loss or optimizer without editing the loop."""

    cls: type
    kwargs: dict = dataclasses.field(default_factory=dict)

    def build(self, *args, **interface):
        """``cls(*args, **interface, **kwargs)``: ``interface`` is what the loop sets itself."""
        return self.cls(*args, **interface, **self.kwargs)


# EDM's Adam (method-notes b.5), fused: one kernel for all parameters (CPU and CUDA both have one).
ADAM = Component(torch.optim.Adam, {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "fused": True})
# What the loop passes EDMPrecond itself, from the dataset and the options.
NETWORK_INTERFACE = ("img_resolution", "img_channels", "label_dim", "augment_dim")


def _require(ok: bool, name: str, expected: str, value) -> None:
    if not ok:
        raise ValueError(f"{name} must be {expected}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    """`training_loop`'s options and their defaults, in one place, checked once when made; the
    params.yaml schema (aot_pipeline/config.py) reads the defaults, so a library call and a params
    file that leave an option out train the same run. EDM-AOT's CIFAR-10 recipe (method-notes a.3,
    b.5); the network's defaults, ``arch`` included, are `networks.NETWORK_DEFAULTS`.

    The pieces the loop builds are class + kwargs. ``network`` is built with `NETWORK_INTERFACE`
    plus its kwargs (EDMPrecond's: ``arch`` and SongUNet overrides); ``loss`` is built with its
    kwargs and called as EDMLoss is, ``loss(net, images, noise, labels, augment_labels,
    generator=)`` -> per-image losses; ``optimizer`` is built with the parameters plus its kwargs,
    which must hold the base ``lr`` that the warm-up scales. ``pairing`` has ``match`` and
    ``scope`` (`pairing.Pairing`); None is EDM's independent noise through the same path
    (identity pairing of the same draws).
    """

    network: Component = Component(EDMPrecond, {"arch": NETWORK_DEFAULTS.arch})
    loss: Component = Component(EDMLoss)
    optimizer: Component = ADAM
    pairing: Pairing | None = Pairing()  # noqa: RUF009 (frozen); None: EDM
    # Data.
    cond: bool = False  # class-conditional: label_dim = dataset.num_classes, per-class matching
    augment_p: float = 0.12  # EDM augmentation probability; 0 disables it and the 9-dim input
    # Optimisation.
    batch: int = 256  # global images per optimizer step: EDM-AOT's README (EDM's default: 512)
    batch_gpu: int | None = None  # micro-batch per rank; None = batch // world_size
    lr_rampup_kimg: float = 10_000  # linear learning-rate warm-up, in thousands of images
    ema_halflife_kimg: float = 500  # EMA half-life, in thousands of images
    ema_rampup_ratio: float | None = 0.05  # half-life <= ratio * images seen; None: no ramp-up
    # Pools.
    pool_size: int = 512  # images per pool and rank (P); a multiple of batch_gpu
    prefetch: bool | None = None  # build the next pool in a thread; None: on unless global scope
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

    def __post_init__(self):
        clash = sorted(set(self.network.kwargs) & set(NETWORK_INTERFACE))
        _require(
            not clash, "network.kwargs", f"free of keys the loop sets {NETWORK_INTERFACE}", clash
        )
        lr = self.optimizer.kwargs.get("lr")
        _require(
            lr is not None and 0 < lr < math.inf, "optimizer.kwargs['lr']", "finite and > 0", lr
        )
        for name in ("cond", "compile", "tf32"):
            _require(isinstance(getattr(self, name), bool), name, "a bool", getattr(self, name))
        _require(0 <= self.augment_p <= 1, "augment_p", "in [0, 1]", self.augment_p)
        for name in ("batch", "pool_size", "snapshot_ticks", "keep_snapshots"):
            check_int(name, getattr(self, name), 1)
        if self.batch_gpu is not None:
            check_int("batch_gpu", self.batch_gpu, 1)
        check_int("seed", self.seed, 0)
        for name in ("duration_kimg", "tick_kimg", "ema_halflife_kimg"):
            value = getattr(self, name)
            _require(0 < value < math.inf, name, "finite and > 0", value)
        ramp = self.lr_rampup_kimg
        _require(0 <= ramp < math.inf, "lr_rampup_kimg", "finite and >= 0", ramp)
        ratio = self.ema_rampup_ratio
        _require(ratio is None or ratio > 0, "ema_rampup_ratio", "None or > 0", ratio)
        _require(
            self.prefetch in (None, True, False), "prefetch", "None, True or False", self.prefetch
        )
        if self.prefetch and self.pairing is not None and self.pairing.scope == "global":
            raise ValueError(
                "prefetch must be False or None with pairing scope 'global': the joint matching "
                "uses collectives that must run in the main thread"
            )
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("channels_last", self.channels_last, ("auto", True, False))

    @property
    def scope(self) -> str:
        """Where pools are matched: the pairing's scope; EDM's identity pairing is per rank."""
        return "per_rank" if self.pairing is None else self.pairing.scope


TRAIN_DEFAULTS = TrainOptions()


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf; the run stopped without writing a checkpoint."""


# ------------------------------------------------------------------------------------------------
# Options.


def _check_run(o: TrainOptions, dataset, world_size: int) -> None:
    """Raise ValueError naming what does not fit this dataset and world size, before anything is
    built (the options alone were checked when made)."""
    _require(isinstance(dataset, ImageDataset), "dataset", "an ImageDataset", type(dataset))
    if o.batch % world_size or (o.batch // world_size) % o.batch_gpu:
        raise ValueError(
            f"batch={o.batch} must be a multiple of batch_gpu * world_size = "
            f"{o.batch_gpu} * {world_size} (gradient accumulation runs whole micro-batches)"
        )
    if o.pool_size % o.batch_gpu:
        raise ValueError(
            f"pool_size={o.pool_size} must be a multiple of batch_gpu={o.batch_gpu} "
            "(a pool is served in whole micro-batches)"
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


def _record(o: TrainOptions) -> dict:
    """The options as plain JSON, classes by qualified name: stored in every checkpoint (loadable
    with ``weights_only``) and compared on resume."""

    def plain(value):
        if isinstance(value, type):
            return f"{value.__module__}.{value.__qualname__}"
        if dataclasses.is_dataclass(value):
            return {"class": plain(type(value)), **vars(value)}
        raise TypeError(f"{type(value).__name__} {value!r}")

    try:
        return json.loads(json.dumps(o, default=plain))
    except TypeError as exc:
        raise ValueError(f"options must be JSON-serialisable (kwargs included): {exc}") from exc


def _network_interface(dataset: ImageDataset, o: TrainOptions) -> dict:
    """What the loop tells the network; ``augment_p = 0`` drops the augmentation input entirely."""
    channels, resolution, _ = dataset.image_shape
    return {
        "img_resolution": resolution,
        "img_channels": channels,
        "label_dim": dataset.num_classes if o.cond else 0,
        "augment_dim": AUGMENT_DIM if o.augment_p > 0 else 0,
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
    p = o.pool_size
    idx = ordered_indices(
        len(dataset),
        o.seed,
        p * world_size * index,
        p * world_size,
        rank=rank,
        world_size=world_size,
    )
    images, augment_labels = dataset.to_float(idx).to(device), None
    if pipe is not None:
        images, augment_labels = pipe(images, _generator(o.seed, _AUGMENT, rank, index))
    if not o.cond:
        return images, None, augment_labels, None
    return images, dataset.one_hot(idx), augment_labels, torch.from_numpy(dataset.labels[idx])


def _pool_loader(dataset, o, rank, world_size, device) -> Callable[[int], Pool]:
    """``load_pool(i)`` for `NoisePool`, in the requested match scope."""
    pipe = AugmentPipe(p=o.augment_p) if o.augment_p > 0 else None

    def per_rank(index: int) -> Pool:
        images, labels, augment_labels, ids = _pool_inputs(
            dataset, pipe, o, rank, world_size, index, device
        )
        noise_generator = _generator(o.seed, _NOISE, rank, index)
        pool = build_pool(
            images,
            labels,
            augment_labels,
            generator=noise_generator,
            pairing=o.pairing,
            class_ids=ids,
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
                generator=_generator(o.seed, _GLOBAL_NOISE, index),
                pairing=o.pairing,
                class_ids=all_ids,
            )
            noise, s = pool.noise, pool.stats
            summary = [s.matched_distance, s.identity_distance, s.solve_seconds]
        else:
            noise, summary = torch.empty_like(all_images), [0.0, 0.0, 0.0]
        summary = distributed.broadcast_(torch.tensor(summary, dtype=torch.float64, device=device))
        noise = distributed.broadcast_(noise.contiguous())
        p = o.pool_size
        stats = PoolStats(*summary.tolist(), pool_size=p * world_size)
        pool = Pool(images, noise[rank * p : (rank + 1) * p], labels, augment_labels, stats)
        return _pinned(pool, device)

    return joint if o.scope == "global" else per_rank


def _pinned(pool: Pool, device: torch.device | str) -> Pool:
    """For a GPU, the pool's CPU tensors in pinned memory (in the builder's thread): serving a
    micro-batch is then an asynchronous copy, where a pageable one would wait for the GPU."""
    if torch.device(device).type != "cuda":
        return pool
    pinned = {}
    for name in ("images", "noise", "labels", "augment_labels"):
        x = getattr(pool, name)
        pinned[name] = x if x is None or x.device.type != "cpu" else x.pin_memory()
    return dataclasses.replace(pool, **pinned)


# ------------------------------------------------------------------------------------------------
# Optimisation.


def _learning_rate(o: TrainOptions, cur_nimg: int) -> float:
    """Linear warm-up from 0 over ``lr_rampup_kimg``, then constant (EDM, method-notes b.5)."""
    return o.optimizer.kwargs["lr"] * min(cur_nimg / max(o.lr_rampup_kimg * 1000, 1e-8), 1.0)


def _ema_beta(o: TrainOptions, cur_nimg: int) -> float:
    """Per-step EMA decay: half-life min(halflife, ratio * images seen), in images (EDM)."""
    halflife_nimg = o.ema_halflife_kimg * 1000
    if o.ema_rampup_ratio is not None:
        halflife_nimg = min(halflife_nimg, cur_nimg * o.ema_rampup_ratio)
    return 0.5 ** (o.batch / max(halflife_nimg, 1e-8))


@torch.no_grad()
def _update_ema(ema: torch.nn.Module, net: torch.nn.Module, beta: float) -> None:
    # One multi-tensor kernel per step instead of one per parameter (same values).
    torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1.0 - beta)


def _load_optimizer(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a checkpoint's optimizer state but keep this run's implementation: the saved param
    groups carry the flags of the run that wrote them (an older checkpoint says ``fused=None``)."""
    group = optimizer.param_groups[0]
    flags = {key: group[key] for key in ("foreach", "fused") if key in group}
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


def _configure_device(o: TrainOptions, device: torch.device) -> tuple[bool, bool]:
    """Resolve (use bf16 autocast, use channels_last); on CUDA set TF32 and cuDNN autotuning."""
    cuda = device.type == "cuda"
    if cuda:
        devices.set_float32_precision(o.tf32)
        # Shapes are fixed for the whole run: cuDNN's per-shape search pays off from step 2.
        torch.backends.cudnn.benchmark = True
    bf16 = o.precision == "bf16" or (o.precision == "auto" and cuda)
    channels_last = o.channels_last is True or (o.channels_last == "auto" and cuda)
    return bf16, channels_last


# ------------------------------------------------------------------------------------------------
# The loop.


def training_loop(
    run_dir: str | Path,
    dataset: ImageDataset,
    options: TrainOptions = TRAIN_DEFAULTS,
    *,
    resume: str | Path | None = None,
    device: str | None = None,
    callback: Callable[[dict], None] | None = None,
    progress: bool = True,
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
    options : TrainOptions
        The run: network, loss, optimizer, pairing, schedule, devices.
    resume : None, "auto" or a path
        None: a fresh run (refused where it would overwrite one); "auto": the newest intact
        checkpoint in ``run_dir``; or a checkpoint's path.
    device : str, optional
        cpu, cuda (cuda:LOCAL_RANK under torchrun), cuda:N; None or "auto": CUDA if usable.
    callback : callable, optional
        Receives each tick's metrics on rank 0.
    progress : bool
        A progress bar on rank 0.

    Returns
    -------
    dict
        checkpoint (Path of the last checkpoint or None), step, kimg, metrics (the last tick's
        metrics, from stats.jsonl for a finished run; empty if none), net and ema (the trained
        modules, unwrapped).
    """
    device, _ = devices.resolve("auto" if device is None else device, "device")
    rank, world_size, device = distributed.init(device)
    o = dataclasses.replace(
        options,
        batch_gpu=options.batch_gpu or options.batch // world_size,
        prefetch=options.scope == "per_rank" if options.prefetch is None else options.prefetch,
    )
    _check_run(o, dataset, world_size)
    record = _record(o) | {"world_size": world_size, "dataset": _dataset_fingerprint(dataset)}
    run_dir = Path(run_dir)
    start_path, saved = resume_state(run_dir, resume, rank)
    if saved is not None and "imported" in saved:  # written by aot_model.edm_pickle.import_edm
        raise ValueError(
            f"cannot resume from {start_path}: it was imported from {saved['imported']['source']} "
            "(network weights only, no optimizer, data or RNG state); train in another run_dir"
        )
    if saved is not None:
        check_compatible(saved, record, start_path)

    # Network, EMA and optimizer; initial weights depend on the seed alone (same on every rank).
    bf16, channels_last = _configure_device(o, device)
    interface = _network_interface(dataset, o)
    _seed_global_rngs(o.seed)
    net = o.network.build(**interface).train().requires_grad_(True).to(device)
    _seed_global_rngs(_derived_seed(o.seed, _GLOBAL_RNG, rank))  # dropout differs across ranks
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    distributed.broadcast_module_(net)  # incl. the NCSN++ Fourier frequencies (method-notes a.5)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    optimizer = o.optimizer.build(net.parameters())
    sigma_generator = _generator(o.seed, _SIGMA, rank)
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
    if o.compile:
        train_net = torch.compile(train_net)
    loss_fn = o.loss.build()
    batch_per_rank = o.batch // world_size
    rounds = batch_per_rank // o.batch_gpu
    duration_nimg = _nimg(o.duration_kimg)
    tick_nimg = max(_nimg(o.tick_kimg), 1)
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
        o.pool_size,
        o.batch_gpu,
        start_pool=pool_index,
        start_offset=pool_offset,
        prefetch=o.prefetch,
    )
    tick = _new_tick(step, cur_nimg, pool)
    try:
        while cur_nimg < duration_nimg:
            # One optimizer step: `rounds` micro-batches, gradients all-reduced on the last only.
            optimizer.zero_grad()
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
            cur_nimg += o.batch
            step += 1
            bar.update(o.batch)
            if cur_nimg < min(tick["nimg"] + tick_nimg, duration_nimg):
                continue

            # Tick: metrics (raises on a non-finite loss, before any checkpoint), snapshot.
            cur_tick += 1
            metrics = _tick_metrics(
                tick, pool, step, cur_tick, cur_nimg, lr_now, o.batch, device, checkpoint
            )
            if rank == 0:
                _report(metrics, run_dir, callback, bar)
            if cur_nimg >= duration_nimg or cur_tick % o.snapshot_ticks == 0:
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
                    "options": record,
                    "network_kwargs": interface | o.network.kwargs,
                }
                checkpoint = checkpoint_path(run_dir, cur_nimg)
                if rank == 0:
                    save_checkpoint(checkpoint, state, o.keep_snapshots)
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
