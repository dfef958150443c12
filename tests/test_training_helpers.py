"""Tests of the training loop's parts, one at a time: tick metrics, devices, RNG states, recorded
options, and the wiring of the loop up to its first optimizer step (resuming included).

The whole-loop tests (EMA, DDP, learning) are in test_training.py, checkpoint files and exact
resume in test_checkpoints.py; these reach
what a few-step run does not show: failure paths, CUDA branches (with stand-ins for torch.cuda),
and exact values of every metric and message.
"""

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from builders import RUN, STEP_KIMG, TINY, assert_all_differ, copy_run, run_options

from aot_model import training
from aot_model.augment import AugmentPipe
from aot_model.checkpoints import find_checkpoints, load_checkpoint
from aot_model.networks import EDMPrecond
from aot_model.pairing import Pairing, Pool, PoolStats
from aot_model.training import ADAM, Component, TrainOptions, training_loop

COMPONENT = "aot_model.training.Component"


class _Stop(Exception):
    """Raised by a stand-in to end training_loop at a chosen point."""


# ------------------------------------------------------------------------------------------------
# The loop's wiring, up to its first optimizer step.


def test_defaults_are_the_edm_aot_cifar10_recipe():
    """method-notes a.3, b.5: EDM's CIFAR-10 network, loss and Adam; EDM-AOT's batch and pools."""
    recorded = training._record(TrainOptions())
    assert recorded == {
        "class": "aot_model.training.TrainOptions",
        "network": {"class": COMPONENT, "cls": "aot_model.networks.EDMPrecond",
                    "kwargs": {"arch": "ncsnpp"}},
        "loss": {"class": COMPONENT, "cls": "aot_model.loss.EDMLoss", "kwargs": {}},
        "optimizer": {"class": COMPONENT, "cls": "torch.optim.adam.Adam",
                      "kwargs": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "fused": True}},
        "pairing": {"class": "aot_model.pairing.Pairing", "cost": "euclidean",
                    "solver": "scipy", "scope": "per_rank"},
        "cond": False, "augment_p": 0.12, "batch": 256, "batch_gpu": None,
        "lr_rampup_kimg": 10_000, "ema_halflife_kimg": 500, "ema_rampup_ratio": 0.05,
        "pool_size": 512, "prefetch": None, "duration_kimg": 200_000, "tick_kimg": 50,
        "snapshot_ticks": 50, "keep_snapshots": 3, "seed": 0, "precision": "auto",
        "channels_last": "auto", "compile": False, "tf32": False,
    }  # fmt: skip


def test_the_loop_resolves_the_micro_batch_and_prefetch(toy, tmp_path, monkeypatch):
    seen = []

    def capture(o, dataset, world_size):
        seen.append(o)
        raise _Stop

    monkeypatch.setattr(training, "_check_run", capture)
    for options in (TrainOptions(), TrainOptions(pairing=Pairing(scope="global"))):
        with pytest.raises(_Stop):
            training_loop(tmp_path, toy, options)
    assert [(o.batch_gpu, o.prefetch) for o in seen] == [(256, True), (256, False)]
    assert type(seen[0].batch_gpu) is int


def _run_until_pool(monkeypatch, *args, **kwargs) -> dict:
    """Run training_loop until it builds its NoisePool; return what the bar and pool were given
    and the global torch RNG state at that point (the stream that drives dropout)."""
    seen, real_bar = {}, training.progress_bar

    def bar(**kwargs):
        seen["bar"] = kwargs
        return real_bar(**{**kwargs, "disable": True})

    def pool(load_pool, pool_size, batch_gpu, **kwargs):
        seen["pool"] = {"pool_size": pool_size, "batch_gpu": batch_gpu, **kwargs}
        seen["rng"] = torch.get_rng_state()
        raise _Stop

    monkeypatch.setattr(training, "progress_bar", bar)
    monkeypatch.setattr(training, "NoisePool", pool)
    with pytest.raises(_Stop):
        training_loop(*args, **kwargs)
    return seen


def test_progress_is_shown_by_default_for_the_whole_run(toy, tmp_path, monkeypatch):
    options = TrainOptions(network=Component(EDMPrecond, TINY))
    seen = _run_until_pool(monkeypatch, tmp_path, toy, options)
    assert (seen["bar"]["disable"], seen["bar"]["total"]) == (False, 200_000_000)


@pytest.mark.parametrize(
    ("options", "prefetch"),
    [({}, True), ({"prefetch": False}, False), ({"pairing": Pairing(scope="global")}, False)],
)
def test_loop_hands_its_bar_and_pool_their_settings(toy, tmp_path, monkeypatch, options, prefetch):
    run = run_options(**options, duration_kimg=1)
    asked, real_init = [], training.distributed.init

    def init(device):
        asked.append(device)
        return real_init(device)

    monkeypatch.setattr(training.distributed, "init", init)
    seen = _run_until_pool(monkeypatch, tmp_path / "a" / "b", toy, run, device="cpu")
    assert asked == ["cpu"]
    assert seen["bar"] == {
        "total": 1000,
        "initial": 0,
        "unit": "img",
        "unit_scale": True,
        "disable": False,
    }
    assert seen["pool"] == {
        "pool_size": 12,
        "batch_gpu": 4,
        "start_pool": 0,
        "start_offset": 0,
        "prefetch": prefetch,
    }
    assert (tmp_path / "a" / "b").is_dir()  # the run directory, parents included
    # Dropout draws from the global RNG, reseeded after the network is built from its own stream.
    torch.manual_seed(training._derived_seed(RUN.seed, training._GLOBAL_RNG, 0))
    assert torch.equal(seen["rng"], torch.get_rng_state())


def test_resumed_loop_continues_its_bar_and_pool_and_drops_leftovers(
    finished_run, toy, tmp_path, monkeypatch
):
    run_dir = copy_run(finished_run, tmp_path)
    leftover = run_dir / ".training-state-000000024.pt.1a2b3c.tmp"  # a write that was killed
    leftover.write_bytes(b"partial")
    options = run_options(duration_kimg=1)
    seen = _run_until_pool(monkeypatch, run_dir, toy, options, resume="auto", progress=False)
    assert (seen["bar"]["initial"], seen["bar"]["total"], seen["bar"]["disable"]) == (
        24,
        1000,
        True,
    )
    saved = load_checkpoint(find_checkpoints(run_dir)[-1])["pool"]
    assert (seen["pool"]["start_pool"], seen["pool"]["start_offset"]) == (
        saved["pool_index"],
        saved["offset"],
    )
    assert saved != {"pool_index": 0, "offset": 0}
    assert not leftover.exists()


def test_loop_resumes_past_a_damaged_newest_checkpoint(finished_run, toy, tmp_path, monkeypatch):
    run_dir = copy_run(finished_run, tmp_path)
    newest = find_checkpoints(run_dir)[-1]
    newest.write_bytes(b"garbage")
    seen = _run_until_pool(monkeypatch, run_dir, toy, run_options(duration_kimg=1), resume="auto")
    assert seen["bar"]["initial"] == 16
    assert newest.with_name(newest.name + ".damaged").exists() and not newest.exists()


def test_resume_is_announced_with_its_checkpoint(finished_run, toy, tmp_path, capsys):
    run_dir = copy_run(finished_run, tmp_path)
    training_loop(run_dir, toy, run_options(duration_kimg=3 * STEP_KIMG), resume="auto")
    newest = find_checkpoints(run_dir)[-1]
    assert f"Resuming from {newest} at kimg 0.024\n" in capsys.readouterr().err


def test_sigma_draws_come_from_their_own_seeded_stream(toy, tmp_path, monkeypatch):
    states = []

    class FirstCall(training.EDMLoss):
        def __call__(self, *args, generator, **kwargs):
            states.append(generator.get_state())
            raise _Stop

    for seed in (1, 2):
        options = run_options(loss=Component(FirstCall), seed=seed, duration_kimg=1)
        with pytest.raises(_Stop):
            training_loop(tmp_path / str(seed), toy, options)
        expected = training._generator(seed, training._SIGMA, 0).get_state()
        assert torch.equal(states[-1], expected)
    assert not torch.equal(states[0], states[1])


def test_compile_wraps_the_network_the_loop_trains(toy, tmp_path, monkeypatch):
    compiled = []

    def spy(module):
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", spy)
    out = training_loop(tmp_path, toy, run_options(compile=True, duration_kimg=STEP_KIMG))
    assert compiled == [out["net"]] and out["step"] == 1


def test_options_reach_the_network_optimizer_and_autocast(toy, tmp_path, monkeypatch):
    autocasts, real_autocast = [], torch.autocast

    def autocast(device_type, dtype=None, enabled=True):
        autocasts.append((device_type, dtype, enabled))
        return real_autocast(device_type, dtype, enabled=enabled)

    monkeypatch.setattr(torch, "autocast", autocast)
    options = run_options(
        duration_kimg=STEP_KIMG,
        channels_last=True,
        precision="bf16",
        optimizer=Component(ADAM.cls, ADAM.kwargs | {"betas": (0.8, 0.99), "eps": 1e-6}),
    )
    out = training_loop(tmp_path, toy, options)
    assert out["kimg"] == STEP_KIMG and out["step"] == 1
    # (enc_in has one input channel, for which both layouts coincide.)
    weight = out["net"].model.enc_blocks[0][0].conv0.weight
    assert weight.shape[1] > 1 and weight.is_contiguous(memory_format=torch.channels_last)
    assert autocasts == [("cpu", torch.bfloat16, True)] * 2  # one per micro-batch
    group = load_checkpoint(out["checkpoint"])["optimizer"]["param_groups"][0]
    assert (group["betas"], group["eps"]) == ((0.8, 0.99), 1e-6)
    ema = out["ema"]
    assert not ema.training and not any(p.requires_grad for p in ema.parameters())


class _RecordingLoss(training.EDMLoss):
    """EDMLoss that records what each micro-batch passes in and, from a replay of the same
    sigma draws, the gradient of that micro-batch's summed per-image loss."""

    calls: list

    def __call__(self, net, images, noise, labels, augment_labels, *, generator):
        params = [p for p in net.parameters() if p.requires_grad]
        state = generator.get_state()
        replay = super().__call__(net, images, noise, labels, augment_labels, generator=generator)
        grads = torch.autograd.grad(replay.sum(), params)
        generator.set_state(state)
        loss = super().__call__(net, images, noise, labels, augment_labels, generator=generator)
        torch.testing.assert_close(loss, replay, rtol=0, atol=0)
        self.calls.append((labels, augment_labels, loss.detach().sum().item(), grads))
        return loss


def test_each_step_descends_the_mean_per_image_loss(toy, tmp_path, monkeypatch):
    """EDM: a step's gradient is that of the summed per-image loss over all its micro-batches
    divided by the images per step, with labels and augmentation labels fed to the loss; the
    tick's loss is the mean per-image loss over the tick."""
    _RecordingLoss.calls = []
    scrubbed, real_scrub = [], training._scrub_gradients

    def scrub(net):
        scrubbed.append([p.grad.clone() for p in net.parameters() if p.requires_grad])
        real_scrub(net)

    monkeypatch.setattr(training, "_scrub_gradients", scrub)
    run = run_options(
        network=Component(EDMPrecond, {**TINY, "dropout": 0.0}),
        loss=Component(_RecordingLoss),
        tick_kimg=2 * STEP_KIMG,
        duration_kimg=2 * STEP_KIMG,
    )
    training_loop(tmp_path, toy, run)
    calls = _RecordingLoss.calls
    assert len(calls) == 4 and len(scrubbed) == 2  # 2 steps of 2 micro-batches
    for labels, augment_labels, _, _ in calls:
        assert labels.shape == (4, 3) and torch.equal(labels.sum(1), torch.ones(4))
        assert augment_labels.shape == (4, 9)
    for step, grads in enumerate(scrubbed):
        expected = [
            (a + b) / 8 for a, b in zip(calls[2 * step][3], calls[2 * step + 1][3], strict=True)
        ]
        for got, want in zip(grads, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    (tick,) = [json.loads(x) for x in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert tick["step"] == 2 and tick["tick"] == 1
    assert tick["loss"] == pytest.approx(sum(c[2] for c in calls) / 16, rel=1e-6)


def test_first_tick_nan_names_step_one_and_no_checkpoint(toy, tmp_path, monkeypatch):
    class NaNLoss(training.EDMLoss):
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs) * math.nan

    with pytest.raises(training.NonFiniteLossError) as caught:
        training_loop(tmp_path, toy, run_options(loss=Component(NaNLoss), duration_kimg=1))
    assert str(caught.value).startswith("non-finite training loss at step 1 (kimg 0);")
    assert str(caught.value).endswith("the last good checkpoint is none (none was written)")
    assert find_checkpoints(tmp_path) == []


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("tpu", "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'tpu'"),
        ("cuda:1", "device 'cuda:1': CUDA is not available (nvidia-smi lists no GPU)"),
    ],
)
def test_device_errors(toy, tmp_path, monkeypatch, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("PATH", "")  # no nvidia-smi
    with pytest.raises(ValueError) as caught:
        training_loop(tmp_path, toy, run_options(duration_kimg=STEP_KIMG), device=device)
    assert str(caught.value) == message


# ------------------------------------------------------------------------------------------------
# Tick metrics.


def _stats(solve, matched, identity):
    return PoolStats(matched, identity, solve, pool_size=12)


class _Pool:
    last_stats = _stats(0.5, 3.0, 5.0)
    wait_seconds = 1.75  # 0.25 s since the tick began (`_tick`)


def _tick(losses, pools):
    """A tick that started at perf_counter() = 100 (see `_clock_at_102`)."""
    return {
        "step": 3,
        "nimg": 24,
        "time": 100.0,
        "pool_wait": 1.5,
        "losses": [torch.tensor(v, dtype=torch.float32) for v in losses],
        "pools": pools,
    }


@pytest.fixture
def _clock_at_102(monkeypatch):
    """perf_counter() = 102 inside _tick_metrics: every tick of these tests lasted 2 s."""
    monkeypatch.setattr(training.time, "perf_counter", lambda: 102.0)


@pytest.mark.usefixtures("_clock_at_102")
def test_tick_metrics_are_per_image_per_pool_and_per_second():
    pools = [_stats(0.1, 2.0, 4.0), _stats(0.3, 3.0, 5.0)]
    tick = _tick([8.0, 24.0], pools)
    metrics = training._tick_metrics(tick, _Pool(), 5, 2, 40, 1e-4, 8, torch.device("cpu"), None)
    assert metrics == {
        "tick": 2,
        "kimg": 0.04,
        "step": 5,
        "loss": 32.0 / 16,
        "lr": 1e-4,
        "pairing_sec": 0.1 + 0.3,  # summed in float64 (float32 would round it)
        "pool_wait_sec": 0.25,
        "matched_distance": 2.5,
        "identity_distance": 4.5,
        "distance_ratio": 5.0 / 9.0,
        "img_per_sec": 16 / 2.0,
        "sec_per_kimg": 2.0 / 0.016,
    }


@pytest.mark.usefixtures("_clock_at_102")
def test_tick_metrics_average_over_ranks(monkeypatch):
    """Two ranks that did the same: losses add up (images count both), times and distances are
    means over ranks and pools."""
    monkeypatch.setattr(training.distributed, "all_reduce_sum_", lambda t: t.mul_(2))
    tick = _tick([8.0, 24.0], [_stats(0.1, 2.0, 4.0)])
    metrics = training._tick_metrics(tick, _Pool(), 5, 2, 56, 1e-4, 16, torch.device("cpu"), None)
    assert metrics["loss"] == 64.0 / 32
    assert metrics["pairing_sec"] == 0.1 and metrics["pool_wait_sec"] == 0.25
    assert (metrics["matched_distance"], metrics["identity_distance"]) == (2.0, 4.0)


def test_peak_memory_is_reported_and_reset_on_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(
        torch.cuda, "max_memory_allocated", lambda device: calls.append(device) or 3 * 2**29
    )
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: calls.append(device))
    cuda = torch.device("cuda", 1)
    assert training._peak_memory(cuda) == {"cuda_max_mem_gib": 1.5}
    assert calls == [cuda, cuda]
    assert training._peak_memory(torch.device("cpu")) == {}
    assert len(calls) == 2


@pytest.mark.usefixtures("_clock_at_102")
def test_tick_without_a_new_pool_describes_the_current_one():
    tick = _tick([4.0], [])
    metrics = training._tick_metrics(tick, _Pool(), 4, 1, 32, 0.0, 8, torch.device("cpu"), None)
    assert metrics["pairing_sec"] == 0.0
    assert (metrics["matched_distance"], metrics["identity_distance"]) == (3.0, 5.0)


@pytest.mark.parametrize(
    ("checkpoint", "named"),
    [(None, "none (none was written)"), (Path("run/training-state-000000032.pt"), None)],
)
def test_non_finite_loss_names_its_step_kimg_and_last_checkpoint(checkpoint, named):
    tick = _tick([1.0, 2.0, math.nan, 3.0], [])
    with pytest.raises(training.NonFiniteLossError) as caught:
        training._tick_metrics(tick, _Pool(), 7, 1, 56, 0.0, 8, torch.device("cpu"), checkpoint)
    assert str(caught.value) == (
        "non-finite training loss at step 6 (kimg 0.04); training stopped without writing a "
        f"checkpoint; the last good checkpoint is {named or checkpoint}"
    )


def test_report_shows_loss_and_speed_on_the_bar(tmp_path):
    class Bar:
        def set_postfix(self, **kwargs):
            self.postfix = kwargs

    bar, seen = Bar(), []
    metrics = {"loss": 0.123456, "sec_per_kimg": 12.3456, "step": 1}
    training._report(metrics, tmp_path, seen.append, bar)
    assert bar.postfix == {"loss": "0.1235", "sec_per_kimg": "12.3"}
    assert seen == [metrics]
    assert json.loads((tmp_path / "stats.jsonl").read_text()) == metrics


# ------------------------------------------------------------------------------------------------
# Devices and randomness.


@pytest.mark.parametrize(
    ("device", "precision", "channels_last", "tf32", "expected", "matmul"),
    [
        ("cpu", "auto", "auto", True, (False, False), None),
        ("cpu", "bf16", True, False, (True, True), None),
        ("cpu", "fp32", False, False, (False, False), None),
        ("cuda", "auto", "auto", False, (True, True), "highest"),
        ("cuda", "auto", "auto", True, (True, True), "high"),
        ("cuda", "fp32", False, False, (False, False), "highest"),
        ("cuda", "bf16", True, True, (True, True), "high"),
    ],
)
def test_configure_device(device, precision, channels_last, tf32, expected, matmul):
    """bf16 autocast and channels_last default on exactly on CUDA; TF32 and cuDNN autotuning are
    set only there."""
    before = (
        torch.get_float32_matmul_precision(),
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
    )
    try:
        torch.set_float32_matmul_precision("medium")  # neither value the loop sets
        torch.backends.cudnn.benchmark = False
        o = TrainOptions(precision=precision, channels_last=channels_last, tf32=tf32)
        assert training._configure_device(o, torch.device(device)) == expected
        assert torch.get_float32_matmul_precision() == (matmul or "medium")
        assert torch.backends.cudnn.benchmark is (device == "cuda")
        if device == "cuda":
            assert torch.backends.cudnn.allow_tf32 is tf32
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]
        torch.backends.cudnn.benchmark = before[2]


def test_resumed_adam_stays_fused_whatever_the_checkpoint_says():
    """Checkpoints written before Adam was fused say ``fused=None`` in their param groups (and
    a foreach implementation, as here, may not be combined with the fused one)."""
    net = torch.nn.Linear(3, 2)
    older = torch.optim.Adam(net.parameters(), lr=0.1, foreach=True)
    net(torch.ones(1, 3)).sum().backward()
    older.step()
    optimizer = ADAM.build(net.parameters())
    training._load_optimizer(optimizer, older.state_dict())
    group = optimizer.param_groups[0]
    assert group["fused"] is True and group["foreach"] is None
    for p in net.parameters():  # Adam's first moment after one step: (1 - beta1) * gradient
        torch.testing.assert_close(optimizer.state[p]["exp_avg"], 0.1 * p.grad)


def test_pools_for_a_gpu_are_pinned_for_asynchronous_copies(monkeypatch):
    pinned, copies = [], []

    def pin_memory(self):
        pinned.append(self)
        copies.append(self + 0)
        return copies[-1]

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    images, noise = torch.zeros(4, 1, 2, 2), torch.ones(4, 1, 2, 2, device="meta")
    pool = Pool(images, noise, None, torch.zeros(4, 9), PoolStats(1.0, 1.0, 0.0, 4))
    assert training._pinned(pool, torch.device("cpu")) is pool
    staged = training._pinned(pool, torch.device("cuda"))
    assert [id(x) for x in pinned] == [id(images), id(pool.augment_labels)]  # CPU tensors only
    assert staged.noise is noise and staged.labels is None and staged.stats == pool.stats
    assert staged.images is copies[0] and staged.augment_labels is copies[1]


class _FakeCuda:
    """Stands in for torch.cuda's RNG functions on a machine without CUDA."""

    def __init__(self):
        self.set_calls = []

    def get_rng_state(self, device):
        return torch.tensor([7, int(device.index or 0)], dtype=torch.uint8)

    def set_rng_state(self, state, device):
        self.set_calls.append((state, device))


def test_rng_state_round_trip_with_the_cuda_generator(monkeypatch):
    fake = _FakeCuda()
    monkeypatch.setattr(torch.cuda, "get_rng_state", fake.get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state", fake.set_rng_state)
    cuda, cpu = torch.device("cuda", 1), torch.device("cpu")
    generator = torch.Generator().manual_seed(5)
    state = training._rng_state(generator, cuda)
    assert torch.equal(state["cuda"], torch.tensor([7, 1], dtype=torch.uint8))
    assert state["numpy"]["keys"].dtype == torch.int64
    assert "cuda" not in training._rng_state(generator, cpu)

    expected = np.random.random(3)  # what follows the saved state
    generator.manual_seed(6)
    np.random.seed(0)
    training._set_rng_state(state, generator, cuda)
    np.testing.assert_array_equal(np.random.random(3), expected)
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(5).get_state())
    assert fake.set_calls == [(state["cuda"], cuda)]
    training._set_rng_state(state, generator, cpu)  # a CPU run ignores a saved CUDA state
    training._set_rng_state({k: v for k, v in state.items() if k != "cuda"}, generator, cuda)
    assert len(fake.set_calls) == 1


def test_derived_seeds_use_63_bits_and_every_key():
    seeds = [training._derived_seed(s, 0) for s in range(200)]
    assert all(0 <= s < 2**63 for s in seeds) and max(seeds) >= 2**62
    assert len({training._derived_seed(1, 2, 3), training._derived_seed(1, 3, 2)}) == 2
    draws = [torch.rand(2, generator=training._generator(s, 1, 0)) for s in (1, 2)]
    assert not torch.equal(*draws)


def test_global_rngs_take_the_low_32_bits_for_numpy():
    training._seed_global_rngs(2**32 + 5)
    ours = np.random.random(2)
    np.random.seed(5)
    np.testing.assert_array_equal(ours, np.random.random(2))
    training._seed_global_rngs(7)
    ours = np.random.random(2)
    np.random.seed(7)
    np.testing.assert_array_equal(ours, np.random.random(2))


def test_augmentation_and_noise_have_their_own_streams(toy):
    """Rank r's pool i is augmented from the stream (seed, AUGMENT, r, i) and, without AOT, paired
    with the unpermuted draw of the stream (seed, NOISE, r, i) (module docstring)."""
    o = run_options(augment_p=1.0, pairing=None)
    rank, index = 1, 1
    images = training._pool_inputs(toy, None, o, rank, 2, index)[0]
    stream = training._generator(o.seed, training._AUGMENT, rank, index)
    expected_images, expected_labels = AugmentPipe(p=1.0)(images, stream)
    pool = training._pool_loader(toy, o, rank, 2, "cpu")(index)
    assert torch.equal(pool.images, expected_images)
    assert torch.equal(pool.augment_labels, expected_labels)
    noise = torch.randn(
        images.shape, generator=training._generator(o.seed, training._NOISE, rank, index)
    )
    assert torch.equal(pool.noise, noise)


def test_pools_are_augmented_on_the_training_device(toy):
    """On a GPU the builder's CPU work is the assignment alone (meta tensors stand in for one)."""
    o = run_options(augment_p=1.0, cond=True)
    images, labels, augment_labels, ids = training._pool_inputs(
        toy, AugmentPipe(p=1.0), o, 0, 1, 0, torch.device("meta")
    )
    assert images.device.type == "meta" and augment_labels.device.type == "meta"
    assert labels.device.type == "cpu" and ids.device.type == "cpu"  # pinned for a GPU


def test_augmentation_differs_per_seed_rank_and_pool(toy):
    pipe = AugmentPipe(p=1.0)
    augment_labels = {}
    for seed, rank, index in itertools.product((1, 2), (0, 1), (0, 1)):
        o = run_options(pool_size=12, augment_p=1.0, seed=seed)
        inputs = training._pool_inputs(toy, pipe, o, rank, 2, index)
        augment_labels[(seed, rank, index)] = inputs[2]
    assert_all_differ(augment_labels)


def test_learning_rate_without_warm_up_is_full_from_the_first_image():
    o = TrainOptions(lr_rampup_kimg=0)
    assert training._learning_rate(o, 1) == 1e-3 and training._learning_rate(o, 0) == 0.0


def test_network_interface_follows_cond_and_augment_p(toy):
    plain = training._network_interface(toy, TrainOptions(cond=False, augment_p=0.0))
    assert plain == {"img_resolution": 8, "img_channels": 1, "label_dim": 0, "augment_dim": 0}
    full = training._network_interface(toy, TrainOptions(cond=True, augment_p=0.1))
    assert (full["label_dim"], full["augment_dim"]) == (3, 9)


def test_micro_batch_in_channels_last_keeps_labels(toy):
    loader = training._pool_loader(toy, RUN, 0, 1, "cpu")
    pool = training.NoisePool(loader, 12, 4, prefetch=False)
    new_pools = []
    try:
        images, noise, labels, augment = training._next_micro_batch(pool, "cpu", True, new_pools)
    finally:
        pool.close()
    assert len(new_pools) == 1 and new_pools[0] is pool.last_stats
    for x in (images, noise):
        assert x.shape == (4, 1, 8, 8) and x.is_contiguous(memory_format=torch.channels_last)
    assert labels.shape == (4, 3) and augment.shape == (4, 9)
    pool = training.NoisePool(loader, 12, 4, prefetch=False)
    try:
        moved = training._next_micro_batch(pool, "meta", False, [])
    finally:
        pool.close()
    assert {x.device.type for x in moved} == {"meta"}


# ------------------------------------------------------------------------------------------------
# What a run records: the data's fingerprint, JSON options; each rank's pool window.


def test_fingerprint_names_the_data(toy):
    fingerprint = training._dataset_fingerprint(toy)
    assert set(fingerprint) == {"name", "shape", "num_classes", "sha256"}
    assert fingerprint["name"] == "toy" and fingerprint["shape"] == [48, 1, 8, 8]
    assert fingerprint["num_classes"] == 3 and len(fingerprint["sha256"]) == 64


def test_each_rank_takes_its_share_of_the_pool_window(toy):
    """Rank r of W takes every W-th image of the window the whole world consumes, so the two
    ranks' pools together are the one-rank pool of twice the size."""
    o = run_options(pool_size=6)
    shares = [training._pool_inputs(toy, None, o, rank, 2, 1) for rank in (0, 1)]
    whole = training._pool_inputs(toy, None, run_options(pool_size=12), 0, 1, 1)
    for k in (0, 1, 3):  # images, labels, class ids
        together = torch.stack([shares[0][k], shares[1][k]], dim=1).flatten(0, 1)
        assert torch.equal(together, whole[k])
    assert not torch.equal(shares[0][0], shares[1][0])
