"""Tests of the training loop's parts, one at a time: tick metrics, devices, RNG states,
checkpoint files and resuming, and the wiring of the loop up to its first optimizer step.

The whole-loop tests (exact resume, EMA, DDP, learning) are in test_training.py; these reach
what a few-step run does not show: failure paths, CUDA branches (with stand-ins for torch.cuda),
and exact values of every metric and message.
"""

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_training import RUN, STEP_KIMG, TINY

from aot_model import training
from aot_model.augment import AugmentPipe
from aot_model.data import ImageDataset
from aot_model.files import DamagedFileError
from aot_model.pairing import PoolStats
from aot_model.training import find_checkpoints, load_checkpoint, training_loop


@pytest.fixture(scope="module")
def toy():
    """24 random 8x8 grey images in 3 classes."""
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (24, 1, 8, 8), dtype=np.uint8)
    return ImageDataset(images, rng.integers(0, 3, 24).astype(np.int64), 3, "toy")


@pytest.fixture(scope="module")
def two_snapshots(toy, tmp_path_factory):
    """A 2-step run with a checkpoint after each step (copy it before modifying)."""
    run_dir = tmp_path_factory.mktemp("two")
    training_loop(run_dir, toy, **RUN, duration_kimg=2 * STEP_KIMG, snapshot_ticks=1)
    return run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


class _Stop(Exception):
    """Raised by a stand-in to end training_loop at a chosen point."""


# ------------------------------------------------------------------------------------------------
# The loop's wiring, up to its first optimizer step.


def test_defaults_are_the_edm_aot_cifar10_recipe(toy, tmp_path, monkeypatch):
    seen = {}

    def capture(o, dataset, world_size):
        seen.update(o)
        raise _Stop

    monkeypatch.setattr(training, "_check_options", capture)
    with pytest.raises(_Stop):
        training_loop(tmp_path, toy)
    assert seen == {
        "arch": "ncsnpp",
        "model_kwargs": {},
        "cond": False,
        "augment_p": 0.12,
        "batch": 256,
        "batch_gpu": 256,
        "lr": 1e-3,
        "adam_betas": (0.9, 0.999),
        "adam_eps": 1e-8,
        "lr_rampup_kimg": 10_000,
        "ema_halflife_kimg": 500,
        "ema_rampup_ratio": 0.05,
        "aot": True,
        "pool_size": 512,
        "cost": "euclidean",
        "solver": "scipy",
        "match_scope": "per_rank",
        "prefetch": None,
        "duration_kimg": 200_000,
        "tick_kimg": 50,
        "snapshot_ticks": 50,
        "keep_snapshots": 3,
        "seed": 0,
        "device": None,
        "precision": "auto",
        "channels_last": "auto",
        "compile": False,
        "tf32": False,
    }
    assert type(seen["batch_gpu"]) is int


def _run_until_pool(monkeypatch, *args, **options) -> dict:
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
        training_loop(*args, **options)
    return seen


@pytest.mark.parametrize(
    ("options", "prefetch"),
    [({}, True), ({"prefetch": False}, False), ({"match_scope": "global"}, False)],
)
def test_loop_hands_its_bar_and_pool_their_settings(toy, tmp_path, monkeypatch, options, prefetch):
    run = {**RUN, "progress": True, "device": "cpu", **options}
    seen = _run_until_pool(monkeypatch, tmp_path / "a" / "b", toy, **run, duration_kimg=1)
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
    torch.manual_seed(training._derived_seed(RUN["seed"], training._GLOBAL_RNG, 0))
    assert torch.equal(seen["rng"], torch.get_rng_state())


def test_resumed_loop_continues_its_bar_pool_and_stats(two_snapshots, toy, tmp_path, monkeypatch):
    run_dir = _copy(two_snapshots, tmp_path)
    leftover = run_dir / ".training-state-000000024.pt.1a2b3c.tmp"  # a write that was killed
    leftover.write_bytes(b"partial")
    seen = _run_until_pool(monkeypatch, run_dir, toy, **RUN, duration_kimg=1, resume="auto")
    assert (seen["bar"]["initial"], seen["bar"]["total"], seen["bar"]["disable"]) == (
        16,
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


def test_resume_is_announced_with_its_checkpoint(two_snapshots, toy, tmp_path, capsys):
    run_dir = _copy(two_snapshots, tmp_path)
    training_loop(run_dir, toy, **RUN, duration_kimg=2 * STEP_KIMG, resume="auto")
    newest = find_checkpoints(run_dir)[-1]
    assert f"Resuming from {newest} at kimg 0.016\n" in capsys.readouterr().err


def test_sigma_draws_come_from_their_own_seeded_stream(toy, tmp_path, monkeypatch):
    states = []

    class FirstCall(training.EDMLoss):
        def __call__(self, *args, generator, **kwargs):
            states.append(generator.get_state())
            raise _Stop

    monkeypatch.setattr(training, "EDMLoss", FirstCall)
    for seed in (1, 2):
        with pytest.raises(_Stop):
            training_loop(tmp_path / str(seed), toy, **{**RUN, "seed": seed}, duration_kimg=1)
        expected = training._generator(seed, training._SIGMA, 0).get_state()
        assert torch.equal(states[-1], expected)
    assert not torch.equal(states[0], states[1])


def test_compile_wraps_the_network_the_loop_trains(toy, tmp_path, monkeypatch):
    compiled = []

    def spy(module):
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", spy)
    out = training_loop(tmp_path, toy, **RUN, compile=True, duration_kimg=STEP_KIMG)
    assert compiled == [out["net"]] and out["step"] == 1


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("tpu", "device must be None, 'cpu' or 'cuda', got 'tpu'"),
        ("cuda", "device='cuda' was requested but CUDA is not available"),
    ],
)
def test_device_errors(toy, tmp_path, device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError) as caught:
        training_loop(tmp_path, toy, **RUN, device=device)
    assert str(caught.value) == message


def test_refused_resume_names_the_checkpoint_and_every_difference(two_snapshots, toy, tmp_path):
    run_dir = _copy(two_snapshots, tmp_path)
    with pytest.raises(ValueError) as caught:
        training_loop(run_dir, toy, **{**RUN, "lr": 2e-3, "seed": 3}, resume="auto")
    assert str(caught.value) == (
        f"cannot resume from {find_checkpoints(run_dir)[-1]}: it was trained with a different "
        "configuration:\n  seed: checkpoint 1, now 3\n  lr: checkpoint 0.001, now 0.002\n"
        "restore these options or start a new run_dir"
    )


# ------------------------------------------------------------------------------------------------
# Tick metrics.


def _stats(solve, matched, identity):
    return PoolStats(matched, identity, solve, pool_size=12)


class _Pool:
    last_stats = _stats(0.5, 3.0, 5.0)


def _tick(losses, pools, seconds_ago=2.0):
    return {
        "step": 3,
        "nimg": 24,
        "time": time.perf_counter() - seconds_ago,
        "losses": [torch.tensor(v, dtype=torch.float32) for v in losses],
        "pools": pools,
    }


def test_tick_metrics_are_per_image_per_pool_and_per_second():
    pools = [_stats(0.1, 2.0, 4.0), _stats(0.3, 3.0, 5.0)]
    tick = _tick([8.0, 24.0], pools)
    metrics = training._tick_metrics(tick, _Pool(), 5, 2, 40, 1e-4, 8, torch.device("cpu"), None)
    seconds = metrics.pop("img_per_sec"), metrics.pop("sec_per_kimg")
    assert metrics == {
        "tick": 2,
        "kimg": 0.04,
        "step": 5,
        "loss": 32.0 / 16,
        "lr": 1e-4,
        "pairing_sec": 0.1 + 0.3,  # summed in float64 (float32 would round it)
        "matched_distance": 2.5,
        "identity_distance": 4.5,
        "distance_ratio": 5.0 / 9.0,
    }
    img_per_sec, sec_per_kimg = seconds
    assert img_per_sec == pytest.approx(16 / 2.0, rel=0.05)
    assert sec_per_kimg == pytest.approx(2.0 / 0.016, rel=0.05)
    assert img_per_sec * sec_per_kimg == pytest.approx(1000)


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
    ("device", "precision", "channels_last", "tf32", "expected", "mode"),
    [
        ("cpu", "auto", "auto", True, (False, False), None),
        ("cpu", "bf16", True, False, (True, True), None),
        ("cpu", "fp32", False, False, (False, False), None),
        ("cuda", "auto", "auto", False, (True, True), "ieee"),
        ("cuda", "auto", "auto", True, (True, True), "tf32"),
        ("cuda", "fp32", False, False, (False, False), "ieee"),
        ("cuda", "bf16", True, True, (True, True), "tf32"),
    ],
)
def test_configure_device(device, precision, channels_last, tf32, expected, mode):
    """bf16 autocast and channels_last default on exactly on CUDA; TF32 is set only there."""
    switches = (torch.backends.cuda.matmul, torch.backends.cudnn.conv)
    before = [switch.fp32_precision for switch in switches]
    try:
        for switch in switches:
            switch.fp32_precision = "none"
        o = {"precision": precision, "channels_last": channels_last, "tf32": tf32}
        assert training._configure_device(o, torch.device(device)) == expected
        assert [switch.fp32_precision for switch in switches] == [mode or "none"] * 2
    finally:
        for switch, value in zip(switches, before, strict=True):
            switch.fp32_precision = value


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


def test_augmentation_differs_per_seed_rank_and_pool(toy):
    o = {**RUN, "pool_size": 12, "augment_p": 1.0}
    pipe = AugmentPipe(p=1.0)
    draws = {
        (seed, rank, index): training._pool_inputs(toy, pipe, {**o, "seed": seed}, rank, 2, index)[
            2
        ]
        for seed in (1, 2)
        for rank in (0, 1)
        for index in (0, 1)
    }
    keys = list(draws)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            assert not torch.equal(draws[a], draws[b]), (a, b)


def test_learning_rate_without_warm_up_is_full_from_the_first_image():
    assert training._learning_rate({"lr": 1e-3, "lr_rampup_kimg": 0}, 1) == 1e-3
    assert training._learning_rate({"lr": 1e-3, "lr_rampup_kimg": 0}, 0) == 0.0


def test_network_kwargs_follow_cond_and_augment_p(toy):
    base = {"arch": "ddpmpp", "model_kwargs": {"model_channels": 8}}
    plain = training._network_kwargs(toy, {**base, "cond": False, "augment_p": 0.0})
    assert plain == {
        "img_resolution": 8,
        "img_channels": 1,
        "label_dim": 0,
        "arch": "ddpmpp",
        "augment_dim": 0,
        "model_channels": 8,
    }
    full = training._network_kwargs(toy, {**base, "cond": True, "augment_p": 0.1})
    assert (full["label_dim"], full["augment_dim"]) == (3, 9)


def test_micro_batch_in_channels_last_keeps_labels(toy):
    o = {**RUN, "aot": True, "augment_p": 0.12, "cost": "euclidean", "solver": "scipy"}
    loader = training._pool_loader(toy, {**o, "match_scope": "per_rank"}, 0, 1, "cpu")
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


# ------------------------------------------------------------------------------------------------
# Checkpoint files.


def test_fingerprint_names_the_data(toy):
    fingerprint = training._dataset_fingerprint(toy)
    assert set(fingerprint) == {"name", "shape", "num_classes", "sha256"}
    assert fingerprint["name"] == "toy" and fingerprint["shape"] == [24, 1, 8, 8]
    assert fingerprint["num_classes"] == 3 and len(fingerprint["sha256"]) == 64


def test_options_must_be_json(toy, tmp_path):
    with pytest.raises(ValueError) as caught:
        training_loop(tmp_path, toy, **{**RUN, "model_kwargs": {**TINY, "dropout": {0.1}}})
    assert str(caught.value) == (
        "options must be JSON-serialisable (model_kwargs included): Object of type set is not "
        "JSON serializable"
    )


def test_rebuilt_network_goes_to_the_device_asked_for(two_snapshots):
    net = training.build_network_from_checkpoint(find_checkpoints(two_snapshots)[-1], device="meta")
    assert {p.device.type for p in net.parameters()} == {"meta"}


def _damage(path: Path, state) -> None:
    torch.save(state, path)


def test_load_checkpoint_names_each_kind_of_damage(two_snapshots, tmp_path):
    path = tmp_path / "training-state-000000016.pt"
    remedy = "use another checkpoint or restore this one from a backup"
    good = torch.load(find_checkpoints(two_snapshots)[-1], weights_only=True)
    cases = [
        (b"not a checkpoint", None),
        ([1, 2], f"{path} is not a training checkpoint of format 1"),
        ({"format": 2}, f"{path} is not a training checkpoint of format 1"),
        (
            {"format": 1, "net": {}, "step": 1},
            f"{path} lacks ['cur_nimg', 'cur_tick', 'ema', 'network_kwargs', 'optimizer', "
            f"'options', 'pool', 'rng'], so it is not a whole checkpoint; {remedy}",
        ),
        (
            {**good, "step": 99},
            f"{path} is damaged: its contents no longer match the checksum stored in it; {remedy}",
        ),
    ]
    for content, message in cases:
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            _damage(path, content)
        with pytest.raises(DamagedFileError) as caught:
            load_checkpoint(path)
        if message is None:
            assert str(caught.value).startswith(f"{path} is not a readable training checkpoint")
            assert str(caught.value).endswith(f"; {remedy}")
        else:
            assert str(caught.value) == message


def test_checkpoint_without_a_checksum_still_loads(two_snapshots, tmp_path):
    good = torch.load(find_checkpoints(two_snapshots)[-1], weights_only=True)
    assert "sha256" in good and "sha256" not in load_checkpoint(find_checkpoints(two_snapshots)[-1])
    path = tmp_path / "old.pt"
    torch.save({k: v for k, v in good.items() if k != "sha256"}, path)
    assert load_checkpoint(path)["step"] == good["step"]


def test_save_checkpoint_stores_its_checksum(tmp_path):
    path = tmp_path / "training-state-000000008.pt"
    training._save_checkpoint(path, {"n": 8}, keep=2)
    saved = torch.load(path, weights_only=True)
    assert saved == {"n": 8, "sha256": training._state_digest({"n": 8})}


@pytest.mark.parametrize("existing", [0, 3])
def test_full_disk_while_saving_names_the_newest_checkpoint_kept(tmp_path, monkeypatch, existing):
    for nimg in range(8, 8 * existing + 1, 8):
        training._save_checkpoint(training._checkpoint_path(tmp_path, nimg), {"n": nimg}, keep=5)

    def full(obj, file):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(training, "_torch_save", full)
    path = training._checkpoint_path(tmp_path, 100)
    with pytest.raises(OSError) as caught:
        training._save_checkpoint(path, {"n": 100}, keep=5)
    newest = tmp_path / "training-state-000000024.pt" if existing else "none"
    assert caught.value.errno == 28
    assert caught.value.strerror == (
        f"could not write checkpoint {path} (No space left on device); nothing was overwritten, "
        f"the newest checkpoint is {newest}; free space and resume the run"
    )
    assert len(find_checkpoints(tmp_path)) == existing


def test_torch_save_reports_the_write_error_itself():
    """A write that fails after the first makes torch's zip writer raise "unexpected pos"."""

    class FullAfterOneWrite:
        writes = 0

        def write(self, data):
            self.writes += 1
            if self.writes > 1:
                raise OSError(28, "No space left on device")
            return len(data)

        def flush(self):
            pass

    with pytest.raises(OSError) as caught:
        training._torch_save({"x": torch.zeros(1000)}, FullAfterOneWrite())
    assert caught.value.errno == 28


# ------------------------------------------------------------------------------------------------
# Resuming.


def test_fresh_run_refuses_a_directory_holding_any_part_of_a_run(two_snapshots, tmp_path):
    message = (
        "run_dir {} already holds a run (checkpoints or stats.jsonl); resume it, or choose "
        "another run_dir"
    )
    for keep in ("stats.jsonl", "training-state-000000008.pt"):
        run_dir = _copy(two_snapshots, tmp_path / keep)
        for path in run_dir.iterdir():
            if path.name != keep:
                path.unlink()
        with pytest.raises(ValueError) as caught:
            training._resume_state(run_dir, None, 0)
        assert str(caught.value) == message.format(run_dir)
    assert training._resume_state(tmp_path / "new", None, 0) == (None, None)


def test_resume_from_a_named_checkpoint(two_snapshots):
    first = find_checkpoints(two_snapshots)[0]
    path, state = training._resume_state(two_snapshots, str(first), 0)
    assert path == first and state["step"] == 1


def test_damaged_newest_checkpoint_is_set_aside_by_rank_zero_only(two_snapshots, tmp_path, capsys):
    run_dir = _copy(two_snapshots, tmp_path)
    older, newest = find_checkpoints(run_dir)
    newest.write_bytes(b"garbage")
    path, state = training._resume_state(run_dir, "auto", 1)
    assert (path, state["step"]) == (older, 1) and newest.exists()  # rank 1 renames nothing
    assert capsys.readouterr().err == ""
    path, state = training._resume_state(run_dir, "auto", 0)
    assert (path, state["step"]) == (older, 1) and not newest.exists()
    assert newest.with_name(newest.name + ".damaged").read_bytes() == b"garbage"
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {newest} is not a readable training checkpoint")
    assert err.endswith(f"; kept as {newest.name}.damaged\n")


def test_no_intact_checkpoint_lists_them_all_and_renames_none(two_snapshots, tmp_path):
    run_dir = _copy(two_snapshots, tmp_path)
    older, newest = find_checkpoints(run_dir)
    for path in (older, newest):
        path.write_bytes(b"garbage")
    with pytest.raises(DamagedFileError) as caught:
        training._resume_state(run_dir, "auto", 0)
    message = str(caught.value)
    prefix = (
        f"no intact checkpoint to resume in {run_dir}: {newest.name}, {older.name} all failed to "
        f"load (newest: {newest} is not a readable training checkpoint"
    )
    assert message.startswith(prefix)
    assert message.endswith(
        "); they were left as they are; restore one from a backup or start another run_dir"
    )
    assert find_checkpoints(run_dir) == [older, newest]
