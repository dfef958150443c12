"""Tests of the training loop: EMA, pools, schedules, refusals, DDP, learning (exact resume and
checkpoints: test_checkpoints.py)."""

import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.optimize
import torch
from builders import RUN, STEP_KIMG, TINY, assert_all_differ, run_options

from aot_model import distributed, training
from aot_model.checkpoints import find_checkpoints, load_checkpoint
from aot_model.data import load_digits
from aot_model.networks import EDMPrecond
from aot_model.pairing import Pairing
from aot_model.training import ADAM, Component, NonFiniteLossError, TrainOptions, training_loop


def test_weights_change_and_ema_lags(finished_run):
    """Training moves the weights; the EMA differs from them once its half-life exceeds 0."""
    state = load_checkpoint(find_checkpoints(finished_run)[-1])
    fresh = training.EDMPrecond(**state["network_kwargs"]).state_dict()
    moved = [k for k in fresh if not torch.equal(fresh[k], state["net"][k])]
    assert moved
    assert any(not torch.equal(state["net"][k], state["ema"][k]) for k in moved)


def test_ema_after_two_steps_matches_the_formula(toy, tmp_path):
    """EMA_t = beta * EMA_{t-1} + (1 - beta) * net_t with beta = 0.5 ** (batch / half-life).

    Step 1 runs at learning rate 0 (warm-up from 0 images), so after step 2 the EMA is
    beta * init + (1 - beta) * net. A half-life of two batches gives beta = 0.5 ** 0.5, far from
    0.5, so swapping beta and 1 - beta shows."""
    options = run_options(
        duration_kimg=2 * STEP_KIMG, ema_halflife_kimg=2 * STEP_KIMG, ema_rampup_ratio=None
    )
    out = training_loop(tmp_path / "run", toy, options)
    torch.manual_seed(RUN.seed)  # initial weights depend on the seed alone
    init = training.EDMPrecond(
        **load_checkpoint(find_checkpoints(tmp_path / "run")[-1])["network_kwargs"]
    )
    beta = 0.5**0.5
    net, ema = dict(out["net"].named_parameters()), dict(out["ema"].named_parameters())
    moved = 0
    for name, p0 in init.named_parameters():
        moved += not torch.equal(p0, net[name])
        expected = beta * p0.detach() + (1 - beta) * net[name].detach()
        torch.testing.assert_close(ema[name], expected, rtol=1e-5, atol=1e-6, msg=name)
    assert moved > 0  # the second step changed the weights, so the formula is exercised


@pytest.mark.parametrize("aot", [True, False])
def test_each_pool_and_rank_draws_its_own_noise(toy, aot):
    o = run_options(pairing=Pairing() if aot else None)
    pools = {
        (rank, index): training._pool_loader(toy, o, rank, 2, "cpu")(index).noise
        for rank in (0, 1)
        for index in (0, 1)
    }
    # Compare the noise as a set of draws (sorted values), so a pairing permutation cannot hide
    # a repeated draw.
    assert_all_differ({key: noise.flatten().sort().values for key, noise in pools.items()})
    # ... and the same (rank, pool) is drawn again identically (resume rebuilds it).
    again = training._pool_loader(toy, o, 1, 2, "cpu")(1).noise
    assert torch.equal(again, pools[(1, 1)])


@pytest.mark.parametrize("cond", [True, False])
def test_global_scope_pairs_the_ranks_pools_jointly(toy, monkeypatch, cond):
    """Two ranks of pairing scope "global", simulated in one process: what rank 0 gathers and
    broadcasts is recorded and replayed to rank 1. Each rank must end with its own images and its
    slice of one joint matching of both pools (seeded by the pool index alone), and the stats of
    that joint problem."""
    pairing = Pairing(scope="global")
    o = run_options(pairing=pairing, pool_size=6, cond=cond)
    p, index, pipe = o.pool_size, 1, training.AugmentPipe(p=o.augment_p)
    inputs = [training._pool_inputs(toy, pipe, o, rank, 2, index) for rank in (0, 1)]
    images = torch.cat([inputs[r][0] for r in (0, 1)])
    ids = torch.cat([inputs[r][3] for r in (0, 1)]) if cond else None
    gathered, broadcasts = [], []

    def all_gather_cat(tensor):
        gathered.append(tensor)
        return ids if tensor.dtype == torch.int64 else images

    def record(tensor, src=0):
        broadcasts.append(tensor.clone())
        return tensor

    def replay(tensor, src=0):
        return tensor.copy_(broadcasts.pop(0))

    monkeypatch.setattr(distributed, "all_gather_cat", all_gather_cat)
    monkeypatch.setattr(distributed, "broadcast_", record)
    pool0 = training._pool_loader(toy, o, 0, 2, "cpu")(index)
    monkeypatch.setattr(distributed, "broadcast_", replay)
    pool1 = training._pool_loader(toy, o, 1, 2, "cpu")(index)
    assert not broadcasts  # rank 1 took exactly what rank 0 sent
    per_rank = 2 if cond else 1  # images, then class ids when conditional
    for rank in (0, 1):
        assert torch.equal(gathered[per_rank * rank], inputs[rank][0])
        if cond:
            assert torch.equal(gathered[per_rank * rank + 1], inputs[rank][3])

    joint = training.build_pool(
        images,
        generator=training._generator(o.seed, training._GLOBAL_NOISE, index),
        pairing=pairing,
        class_ids=ids,
    )
    expected_stats = (joint.stats.matched_distance, joint.stats.identity_distance, 2 * p)
    for rank, pool in enumerate((pool0, pool1)):
        assert torch.equal(pool.images, inputs[rank][0])
        assert pool.labels is None if not cond else torch.equal(pool.labels, inputs[rank][1])
        assert torch.equal(pool.augment_labels, inputs[rank][2])
        assert torch.equal(pool.noise, joint.noise[rank * p : (rank + 1) * p])
        stats = pool.stats
        # Exactly: the stats travel as float64.
        assert (stats.matched_distance, stats.identity_distance, stats.pool_size) == expected_stats
        assert stats.solve_seconds == pool0.stats.solve_seconds > 0
    matched, identity = expected_stats[:2]
    assert matched < identity


def test_gradient_accumulation_matches_one_micro_batch(toy, tmp_path):
    """batch_gpu=4 with 2 rounds gives the gradient of batch_gpu=8 in one round (dropout off).

    Pools, augmentation and sigma draws are the same in both runs (CPU randn of 4 + 4 values
    equals one draw of 8), so only the loss reduction and the accumulation differ. Adam's first
    moments after one step are 0.1 * gradient, scale included (Adam's update itself would hide a
    wrong scale).
    """
    network = Component(EDMPrecond, {**TINY, "dropout": 0.0})
    moments = []
    for b in (4, 8):
        options = run_options(network=network, pool_size=16, batch_gpu=b, duration_kimg=STEP_KIMG)
        run = training_loop(tmp_path / f"b{b}", toy, options)
        state = load_checkpoint(run["checkpoint"])["optimizer"]["state"]
        moments.append(torch.cat([s["exp_avg"].flatten() for s in state.values()]))
    assert moments[0].abs().max() > 0
    torch.testing.assert_close(moments[0], moments[1], rtol=1e-4, atol=1e-9)


class StandInDDP(torch.nn.Module):
    """DistributedDataParallel as one simulated rank sees it: forwards to the network, and
    records for each forward whether gradients would be all-reduced (outside ``no_sync``)."""

    def __init__(self, module, **kwargs):
        super().__init__()
        self.module, self.kwargs, self.syncs, self.forwards = module, kwargs, True, []

    def forward(self, *args):
        self.forwards.append(self.syncs)
        return self.module(*args)

    @contextlib.contextmanager
    def no_sync(self):
        self.syncs = False
        try:
            yield
        finally:
            self.syncs = True


@pytest.mark.parametrize("scope", ["per_rank", "global"])
def test_two_ranks_train_through_ddp_and_all_reduce_on_the_last_micro_batch(
    toy, tmp_path, monkeypatch, scope
):
    """Rank 0 of two simulated in one process (stand-ins for the process group and for DDP; the
    real two-process run is test_ddp_two_ranks_end_identical): batch 8 on two ranks is 4 per
    rank in 2 micro-batches, so each step runs one forward under no_sync and one that all-reduces.
    On the CPU the wrapper takes no device ids; buffers are broadcast once, not every forward."""
    made = []

    def wrap(net, **kwargs):
        made.append(StandInDDP(net, **kwargs))
        return made[-1]

    monkeypatch.setattr(training, "DistributedDataParallel", wrap)
    monkeypatch.setattr(training.distributed, "init", lambda device: (0, 2, torch.device(device)))
    options = run_options(batch_gpu=2, pairing=Pairing(scope=scope), duration_kimg=2 * STEP_KIMG)
    result = training_loop(tmp_path / "run", toy, options)
    assert [ddp.module for ddp in made] == [result["net"]]
    assert made[0].kwargs == {"device_ids": None, "forward_sync_buffers": False}
    assert made[0].forwards == [False, True] * 2  # two steps of two micro-batches


def test_augment_p_zero_drops_the_augmentation_input(toy, tmp_path):
    result = training_loop(
        tmp_path, toy, run_options(augment_p=0.0, cond=False, duration_kimg=STEP_KIMG)
    )
    saved = load_checkpoint(result["checkpoint"])
    network_kwargs = saved["network_kwargs"]
    assert (network_kwargs["augment_dim"], network_kwargs["label_dim"]) == (0, 0)
    assert saved["options"]["world_size"] == 1 and saved["options"]["augment_p"] == 0.0
    assert result["net"].model.augment_dim == 0


def test_metrics_reach_callback_stats_file_and_progress_bar(toy, tmp_path, capsys):
    seen = []
    options = run_options(duration_kimg=2 * STEP_KIMG)
    training_loop(tmp_path, toy, options, callback=seen.append)
    # Off a terminal the bar redraws at start, per tick (new postfix) and at the end, counting
    # whole images ("16.0/16.0", not float kimg sums).
    bar = capsys.readouterr().err
    assert "16.0/16.0" in bar and bar.count("\r") <= 4
    lines = [json.loads(x) for x in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert seen == lines and [(m["tick"], m["step"]) for m in seen] == [(1, 1), (2, 2)]
    assert [m["kimg"] for m in seen] == [0.008, 0.016]
    expected = {
        "tick",
        "kimg",
        "step",
        "loss",
        "lr",
        "img_per_sec",
        "sec_per_kimg",
        "pairing_sec",
        "pool_wait_sec",
        "matched_distance",
        "identity_distance",
        "distance_ratio",
    }
    assert set(seen[0]) == expected
    first, second = seen
    assert first["lr"] == 0.0 and second["lr"] == pytest.approx(1e-3 * 8 / 16)  # EDM warm-up
    # Pool 0 comes into use in tick 1 (and is matched), pool 1 in tick 2.
    assert first["pairing_sec"] > 0 and second["pairing_sec"] > 0
    assert first["pool_wait_sec"] >= 0 and second["pool_wait_sec"] >= 0
    # Tick 1's pool, recomputed here: mean ||y - n|| for the drawn noise in order and for the
    # optimal assignment within each class (scipy on float64 distances).
    pool = training._pool_loader(toy, RUN, 0, 1, "cpu")(0)
    images = pool.images.double().flatten(1)
    drawn = torch.randn(
        pool.images.shape, generator=training._generator(RUN.seed, training._NOISE, 0, 0)
    )
    cost = torch.cdist(images, drawn.double().flatten(1)).numpy()
    classes = pool.labels.argmax(1).numpy()
    matched = 0.0
    for c in np.unique(classes):
        block = cost[np.ix_(classes == c, classes == c)]
        rows, cols = scipy.optimize.linear_sum_assignment(block)
        matched += block[rows, cols].sum() / len(classes)
    identity = cost.diagonal().mean()
    assert first["identity_distance"] == pytest.approx(identity, rel=1e-5)
    assert first["matched_distance"] == pytest.approx(matched, rel=1e-5)
    assert (
        first["distance_ratio"] == pytest.approx(matched / identity, rel=1e-5)
        and matched < identity
    )


def test_learning_rate_and_ema_schedules():
    """EDM (method-notes b.5): lr ramps linearly over lr_rampup_kimg; EMA half-life ramps up."""
    o = TrainOptions(lr_rampup_kimg=10, batch=100, ema_halflife_kimg=0.5, ema_rampup_ratio=0.05)
    assert training._learning_rate(o, 0) == 0.0
    assert training._learning_rate(o, 2500) == pytest.approx(2.5e-4)
    assert training._learning_rate(o, 50_000) == 1e-3
    assert training._ema_beta(o, 0) == 0.0  # the EMA starts as a copy of the network
    assert training._ema_beta(o, 4000) == pytest.approx(0.5 ** (100 / 200))  # 0.05 * 4000
    assert training._ema_beta(o, 10**6) == pytest.approx(0.5 ** (100 / 500))
    unramped = dataclasses.replace(o, ema_rampup_ratio=None)
    assert training._ema_beta(unramped, 0) == pytest.approx(0.5**0.2)


def test_gradient_scrubbing():
    layer = torch.nn.Linear(2, 2)
    layer.weight.grad = torch.tensor([[float("nan"), float("inf")], [-float("inf"), 2.0]])
    training._scrub_gradients(layer)
    assert layer.weight.grad.tolist() == [[0.0, 1e5], [-1e5, 2.0]]
    assert layer.bias.grad is None


def test_distributed_helpers_without_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.init("cpu") == (0, 1, torch.device("cpu"))
    x = torch.arange(3.0)
    assert distributed.all_gather_cat(x) is x and distributed.all_reduce_sum_(x) is x
    assert distributed.all_gather_object({"a": 1}) == [{"a": 1}]


class _NaNAfter(training.EDMLoss):
    """EDMLoss that returns NaN from the given call on (counting micro-batches)."""

    calls = 0
    first_bad_call = 7  # micro-batch 7 = step 4's first round (2 rounds per step)

    def __call__(self, *args, **kwargs):
        type(self).calls += 1
        loss = super().__call__(*args, **kwargs)
        return loss * float("nan") if type(self).calls >= self.first_bad_call else loss


def test_non_finite_loss_stops_and_keeps_last_checkpoint(toy, tmp_path, monkeypatch):
    monkeypatch.setattr(_NaNAfter, "calls", 0)
    options = run_options(loss=Component(_NaNAfter), duration_kimg=1, snapshot_ticks=1)
    with pytest.raises(NonFiniteLossError, match=r"step 4 \(kimg 0\.024\)") as caught:
        training_loop(tmp_path, toy, options)
    checkpoints = find_checkpoints(tmp_path)
    assert str(caught.value).endswith(f"the last good checkpoint is {checkpoints[-1]}")
    # One after each of steps 1-3, never after the NaN.
    assert [load_checkpoint(p)["step"] for p in checkpoints] == [1, 2, 3]
    assert len((tmp_path / "stats.jsonl").read_text().splitlines()) == 3
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([*(p.name for p in checkpoints), "stats.jsonl"])


INTERFACE = "('img_resolution', 'img_channels', 'label_dim', 'augment_dim')"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            {"network": Component(EDMPrecond, {"img_channels": 3, "label_dim": 2})},
            f"network.kwargs must be free of keys the loop sets {INTERFACE}, "
            "got ['img_channels', 'label_dim']",
        ),
        (
            {"optimizer": Component(torch.optim.SGD, {"momentum": 0.9})},
            "optimizer.kwargs['lr'] must be finite and > 0, got None",
        ),
        (
            {"optimizer": Component(ADAM.cls, {"lr": math.inf})},
            "optimizer.kwargs['lr'] must be finite and > 0, got inf",
        ),
        (
            {"optimizer": Component(ADAM.cls, {"lr": 0})},
            "optimizer.kwargs['lr'] must be finite and > 0, got 0",
        ),
        ({"cond": 1}, "cond must be a bool, got 1"),
        ({"augment_p": 1.5}, "augment_p must be in [0, 1], got 1.5"),
        ({"augment_p": -0.1}, "augment_p must be in [0, 1], got -0.1"),
        ({"batch": 0}, "batch must be an int >= 1, got 0"),
        ({"batch_gpu": True}, "batch_gpu must be an int >= 1, got True"),
        ({"seed": -1}, "seed must be an int >= 0, got -1"),
        ({"tick_kimg": 0}, "tick_kimg must be finite and > 0, got 0"),
        ({"duration_kimg": math.inf}, "duration_kimg must be finite and > 0, got inf"),
        ({"lr_rampup_kimg": -1}, "lr_rampup_kimg must be finite and >= 0, got -1"),
        ({"lr_rampup_kimg": math.inf}, "lr_rampup_kimg must be finite and >= 0, got inf"),
        ({"ema_rampup_ratio": 0}, "ema_rampup_ratio must be None or > 0, got 0"),
        ({"prefetch": "yes"}, "prefetch must be None, True or False, got 'yes'"),
        (
            {"pairing": Pairing(scope="global"), "prefetch": True},
            "prefetch must be False or None with pairing scope 'global': the joint matching uses "
            "collectives that must run in the main thread",
        ),
        ({"precision": "fp16"}, "precision must be one of ('auto', 'fp32', 'bf16'), got 'fp16'"),
        ({"channels_last": "no"}, "channels_last must be one of ('auto', True, False), got 'no'"),
    ],
)
def test_options_are_checked_when_made(override, message):
    with pytest.raises(ValueError) as caught:
        run_options(**override)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            {"pool_size": 10},
            "pool_size=10 must be a multiple of batch_gpu=4 (a pool is served in whole "
            "micro-batches)",
        ),
        (
            {"batch": 10},
            "batch=10 must be a multiple of batch_gpu * world_size = 4 * 1 (gradient accumulation "
            "runs whole micro-batches)",
        ),
        (
            {"network": Component(EDMPrecond, {**TINY, "dropout": {0.1}})},
            "options must be JSON-serialisable (kwargs included): set {0.1}",
        ),
    ],
)
def test_what_does_not_fit_the_run_is_refused_before_anything_is_written(
    toy, tmp_path, override, message
):
    with pytest.raises(ValueError) as caught:  # (one step at most, should the check be lost)
        training_loop(tmp_path, toy, run_options(**override, duration_kimg=STEP_KIMG))
    assert str(caught.value) == message
    assert list(tmp_path.iterdir()) == []


def test_a_dataset_must_be_an_image_dataset(tmp_path):
    with pytest.raises(ValueError) as caught:
        training_loop(tmp_path, np.zeros((4, 1, 8, 8), np.uint8), RUN)
    assert str(caught.value) == "dataset must be an ImageDataset, got <class 'numpy.ndarray'>"


@pytest.mark.parametrize(
    "override",
    [
        {"augment_p": 1.0},
        {"augment_p": 0.0},
        {"seed": 0},
        {"lr_rampup_kimg": 0},
        {"ema_rampup_ratio": None},
        {"prefetch": False},
        {"prefetch": True},
        {"channels_last": True},
        {"channels_last": False},
        {"pairing": None, "prefetch": True},
    ],
)
def test_option_boundaries_are_accepted(override):
    run_options(**override)


@pytest.mark.slow
@pytest.mark.integration
def test_ddp_two_ranks_end_identical(tmp_path):
    """torchrun, 2 CPU processes (gloo), per_rank and global matching scope, and the global run
    resumed past a damaged checkpoint; the process group is destroyed at exit."""
    worker = Path(__file__).with_name("ddp_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(worker.parents[1])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(worker), str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    hashes = {}
    for scope in ("per_rank", "global", "resumed"):
        ranks = [json.loads((tmp_path / f"{scope}-rank{r}.json").read_text()) for r in (0, 1)]
        assert ranks[0] == {**ranks[1], "metrics": ranks[0]["metrics"]}
        assert ranks[0]["step"] == 4 and Path(ranks[0]["checkpoint"]).is_file()
        assert ranks[0]["metrics"]["distance_ratio"] < 1
        hashes[scope] = ranks[0]["hash"]
    assert hashes["per_rank"] != hashes["global"]  # the joint matching pairs differently
    assert hashes["resumed"] == hashes["global"]
    assert len(list((tmp_path / "resumed").glob("*.pt.damaged"))) == 1
    for r in (0, 1):  # the process group was destroyed before the process exited
        assert json.loads((tmp_path / f"exit-rank{r}.json").read_text()) == {"group_left": False}


@pytest.mark.slow
@pytest.mark.parametrize("aot", [True, False])
def test_tiny_model_learns_digits(tmp_path, aot):
    """A few hundred steps on 8x8 digits lower the loss (first vs last tick means)."""
    digits = load_digits(resolution=8)
    seen = []
    options = TrainOptions(
        network=Component(EDMPrecond, {"arch": "ddpmpp", **TINY, "model_channels": 16,
        "dropout": 0.0}), optimizer=Component(ADAM.cls, ADAM.kwargs | {"lr": 2e-3}),
        pairing=Pairing() if aot else None, augment_p=0.0, batch=32, pool_size=128,
        lr_rampup_kimg=0.5, duration_kimg=6.4, tick_kimg=1.6,
    )  # fmt: skip
    training_loop(tmp_path, digits, options, progress=False, callback=seen.append)
    assert len(seen) == 4
    assert seen[-1]["loss"] < 0.7 * seen[0]["loss"], [m["loss"] for m in seen]
    if aot:
        assert seen[-1]["distance_ratio"] < 0.99
    else:
        assert seen[-1]["distance_ratio"] == 1
