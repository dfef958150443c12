"""Tests of training checkpoints: writing, digests and damage, resuming (the chosen checkpoint,
damaged ones set aside, refusals) and exact resume through the training loop."""

import json
import os
import re
from pathlib import Path

import pytest
import torch
from builders import RUN, STEP_KIMG, assert_same_state, copy_run, run_options

from aot_model import checkpoints
from aot_model.checkpoints import (
    build_network_from_checkpoint,
    checkpoint_path,
    find_checkpoints,
    load_checkpoint,
    resume_state,
    save_checkpoint,
)
from aot_model.data import ImageDataset
from aot_model.files import DamagedFileError
from aot_model.pairing import Pairing
from aot_model.training import ADAM, Component, _record, training_loop

# _state_digest of test_state_digest_is_stable_and_sees_keys_items_and_nesting's state.
DIGEST = "1a545eb38cf0086004f3e2a0dccce565aeb938817761aea994ba92b21d0f1ea3"


# ------------------------------------------------------------------------------------------------
# Writing and verifying checkpoint files.


def test_state_digest_is_stable_and_sees_keys_items_and_nesting():
    """Checkpoints store this digest, so its value must not change between versions."""
    state = {"b": torch.arange(3), "a": [1, "x", (2.5, None)], 2: {"k": True}, 10: 0.5}
    assert checkpoints._state_digest(state) == DIGEST
    changed = [
        {**state, "a": [1, "y", (2.5, None)]},
        {**state, "a": [1, ["x"], (2.5, None)]},
        {**{k: v for k, v in state.items() if k != "b"}, "c": torch.arange(3)},
        {**state, "b": torch.arange(3).double()},
    ]
    assert len({checkpoints._state_digest(s) for s in changed} | {DIGEST}) == 5


def test_save_checkpoint_stores_its_checksum(tmp_path):
    path = tmp_path / "training-state-000000008.pt"
    save_checkpoint(path, {"n": 8}, keep=2)
    saved = torch.load(path, weights_only=True)
    assert saved == {"n": 8, "sha256": checkpoints._state_digest({"n": 8})}


def test_keeps_only_the_newest_snapshots(tmp_path):
    for nimg in (2000, 10_000, 1000, 10**9):
        save_checkpoint(checkpoint_path(tmp_path, nimg), {"n": nimg}, 2)
    kept = ["training-state-000010000.pt", "training-state-1000000000.pt"]
    assert [p.name for p in find_checkpoints(tmp_path)] == kept  # by number past 9 digits
    assert sorted(os.listdir(tmp_path)) == kept  # no temporary files left behind


@pytest.mark.parametrize("existing", [0, 3])
def test_full_disk_while_saving_names_the_newest_checkpoint_kept(tmp_path, monkeypatch, existing):
    for nimg in range(8, 8 * existing + 1, 8):
        save_checkpoint(checkpoint_path(tmp_path, nimg), {"n": nimg}, keep=5)

    def full(obj, file):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "_torch_save", full)
    path = checkpoint_path(tmp_path, 100)
    with pytest.raises(OSError) as caught:
        save_checkpoint(path, {"n": 100}, keep=5)
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
        checkpoints._torch_save({"x": torch.zeros(1000)}, FullAfterOneWrite())
    assert caught.value.errno == 28


def test_load_checkpoint_names_each_kind_of_damage(finished_run, tmp_path):
    path = tmp_path / "training-state-000000016.pt"
    remedy = "use another checkpoint or restore this one from a backup"
    good = torch.load(find_checkpoints(finished_run)[-1], weights_only=True)
    cases = [
        (b"not a checkpoint", None),
        ([1, 2], f"{path} is not a training checkpoint of format 1 or 2"),
        ({"format": 3}, f"{path} is not a training checkpoint of format 1 or 2"),
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
            torch.save(content, path)
        with pytest.raises(DamagedFileError) as caught:
            load_checkpoint(path)
        if message is None:
            assert str(caught.value).startswith(f"{path} is not a readable training checkpoint")
            assert str(caught.value).endswith(f"; {remedy}")
        else:
            assert str(caught.value) == message


def test_checkpoint_without_a_checksum_still_loads(finished_run, tmp_path):
    good = torch.load(find_checkpoints(finished_run)[-1], weights_only=True)
    assert "sha256" in good and "sha256" not in load_checkpoint(find_checkpoints(finished_run)[-1])
    path = tmp_path / "old.pt"
    torch.save({k: v for k, v in good.items() if k != "sha256"}, path)
    assert load_checkpoint(path)["step"] == good["step"]


def test_checkpoint_contents_and_network_rebuild(finished_run):
    """The checkpoint alone rebuilds the EMA denoiser (augment_dim and label_dim included)."""
    # Snapshots within one kimg keep distinct names: they are named by images seen.
    names = [p.name for p in find_checkpoints(finished_run)]
    assert names == [f"training-state-{n:09d}.pt" for n in (8, 16, 24)]
    path = find_checkpoints(finished_run)[-1]
    state = load_checkpoint(path)
    assert state["step"] == 3 and state["cur_nimg"] == 24 and state["cur_tick"] == 3
    assert state["options"]["optimizer"]["kwargs"]["lr"] == 1e-3
    assert state["options"]["network"]["cls"] == "aot_model.networks.EDMPrecond"
    assert state["options"]["dataset"]["name"] == "toy" and state["options"]["world_size"] == 1
    assert state["network_kwargs"]["label_dim"] == 3
    assert state["network_kwargs"]["augment_dim"] == 9
    net = build_network_from_checkpoint(path)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert_same_state(net.state_dict(), state["ema"])
    x, sigma = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 2.0])
    labels = torch.eye(3)[:2]
    raw = build_network_from_checkpoint(path, ema=False)
    assert not torch.equal(net(x, sigma, labels), raw(x, sigma, labels))


def test_rebuilt_network_goes_to_the_device_asked_for(finished_run):
    net = build_network_from_checkpoint(find_checkpoints(finished_run)[-1], device="meta")
    assert {p.device.type for p in net.parameters()} == {"meta"}


# ------------------------------------------------------------------------------------------------
# Choosing the checkpoint to resume from.


def test_fresh_run_refuses_a_directory_holding_any_part_of_a_run(finished_run, tmp_path):
    message = (
        "run_dir {} already holds a run (checkpoints or stats.jsonl); resume it, or choose "
        "another run_dir"
    )
    for keep in ("stats.jsonl", "training-state-000000008.pt"):
        run_dir = copy_run(finished_run, tmp_path / keep)
        for path in run_dir.iterdir():
            if path.name != keep:
                path.unlink()
        with pytest.raises(ValueError) as caught:
            resume_state(run_dir, None, 0)
        assert str(caught.value) == message.format(run_dir)
    assert resume_state(tmp_path / "new", None, 0) == (None, None)


def test_resume_from_a_named_checkpoint(finished_run):
    first = find_checkpoints(finished_run)[0]
    path, state = resume_state(finished_run, str(first), 0)
    assert path == first and state["step"] == 1


def test_damaged_newest_checkpoint_is_set_aside_by_rank_zero_only(finished_run, tmp_path, capsys):
    run_dir = copy_run(finished_run, tmp_path)
    *_, older, newest = find_checkpoints(run_dir)
    newest.write_bytes(b"garbage")
    path, state = resume_state(run_dir, "auto", 1)
    assert (path, state["step"]) == (older, 2) and newest.exists()  # rank 1 renames nothing
    assert capsys.readouterr().err == ""
    path, state = resume_state(run_dir, "auto", 0)
    assert (path, state["step"]) == (older, 2) and not newest.exists()
    assert newest.with_name(newest.name + ".damaged").read_bytes() == b"garbage"
    err = capsys.readouterr().err
    assert err.startswith(f"warning: {newest} is not a readable training checkpoint")
    assert err.endswith(f"; kept as {newest.name}.damaged\n")


@pytest.mark.parametrize("rank", [0, 1])
def test_damaged_checkpoints_move_only_between_barriers(finished_run, tmp_path, monkeypatch, rank):
    """Every rank has read every checkpoint before rank 0 renames one, and no rank goes on before
    the renames are done (the order each rank sees under torchrun; here one rank, stand-ins)."""
    run_dir = copy_run(finished_run, tmp_path)
    *_, older, newest = find_checkpoints(run_dir)
    newest.write_bytes(b"garbage")
    events = []
    load = load_checkpoint
    rename = Path.rename
    monkeypatch.setattr(
        checkpoints,
        "load_checkpoint",
        lambda path: events.append(f"read {path.name}") or load(path),
    )
    monkeypatch.setattr(checkpoints.distributed, "barrier", lambda: events.append("barrier"))
    monkeypatch.setattr(
        Path, "rename", lambda self, to: events.append(f"rename {self.name}") or rename(self, to)
    )
    resume_state(run_dir, "auto", rank)
    renames = [f"rename {newest.name}"] if rank == 0 else []
    reads = [f"read {newest.name}", f"read {older.name}"]
    assert events == [*reads, "barrier", *renames, "barrier"]


def test_no_intact_checkpoint_lists_them_all_and_renames_none(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    paths = find_checkpoints(run_dir)
    for path in paths:
        path.write_bytes(b"garbage")
    names = ", ".join(path.name for path in reversed(paths))
    with pytest.raises(DamagedFileError) as caught:
        resume_state(run_dir, "auto", 0)
    message = str(caught.value)
    prefix = (
        f"no intact checkpoint to resume in {run_dir}: {names} all failed to load (newest: "
        f"{paths[-1]} is not a readable training checkpoint"
    )
    assert message.startswith(prefix)
    assert message.endswith(
        "); they were left as they are; restore one from a backup or start another run_dir"
    )
    assert find_checkpoints(run_dir) == paths


# ------------------------------------------------------------------------------------------------
# Resuming through the training loop.


def test_resume_is_bit_exact(toy, tmp_path):
    """8 steps in one go == 4 steps, checkpoint, then a fresh call resuming for 4 more.

    The split falls in the middle of a pool (12 images = 1.5 steps), with AOT, per-class
    matching, augmentation, dropout and a prefetching pool all on.
    """
    whole = training_loop(tmp_path / "whole", toy, run_options(duration_kimg=8 * STEP_KIMG))
    half = tmp_path / "half"
    first = training_loop(half, toy, run_options(duration_kimg=4 * STEP_KIMG))
    assert load_checkpoint(first["checkpoint"])["pool"] == {"pool_index": 2, "offset": 8}
    second = training_loop(half, toy, run_options(duration_kimg=8 * STEP_KIMG), resume="auto")

    assert second["step"] == whole["step"] == 8
    assert_same_state(whole["net"].state_dict(), second["net"].state_dict())
    assert_same_state(whole["ema"].state_dict(), second["ema"].state_dict())
    saved_whole, saved_half = (
        load_checkpoint(whole["checkpoint"]),
        load_checkpoint(second["checkpoint"]),
    )
    assert_same_state(saved_whole["optimizer"], saved_half["optimizer"])
    assert_same_state(saved_whole["rng"], saved_half["rng"])
    # The resumed run's stats continue the first half's: one line per step-tick, no gaps.
    steps = [json.loads(line)["step"] for line in (half / "stats.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_refuses_to_overwrite_an_existing_run(finished_run, toy, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    with pytest.raises(ValueError, match="already holds a run"):
        training_loop(run_dir, toy, run_options(duration_kimg=STEP_KIMG))
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before


def test_refuses_resume_with_other_configuration(finished_run, toy, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    # The duration and the solver may change; the optimizer's lr and the pool size may not.
    changed = run_options(
        optimizer=Component(ADAM.cls, ADAM.kwargs | {"lr": 2e-3}),
        pairing=Pairing(solver="lap"),
        pool_size=16,
        duration_kimg=1,
    )
    with pytest.raises(ValueError) as info:
        training_loop(run_dir, toy, changed, resume="auto")
    lr_was, lr_now = _record(RUN)["optimizer"], _record(changed)["optimizer"]
    assert str(info.value) == (
        f"cannot resume from {find_checkpoints(run_dir)[-1]}: it was trained with a different "
        f"configuration:\n  optimizer: checkpoint {lr_was!r}, now {lr_now!r}\n"
        "  pool_size: checkpoint 12, now 16\nrestore these options or start a new run_dir"
    )
    for pairing in (Pairing(cost="squared"), None):  # another matching, or EDM's noise
        with pytest.raises(ValueError, match=re.escape("\n  pairing: checkpoint {'class'")):
            options = run_options(pairing=pairing, duration_kimg=4 * STEP_KIMG)
            training_loop(run_dir, toy, options, resume="auto")
    other_data = ImageDataset(toy.images[::-1].copy(), toy.labels, 3, "toy")
    with pytest.raises(ValueError, match="dataset:"):
        training_loop(run_dir, other_data, run_options(duration_kimg=1), resume="auto")


def test_a_format_1_checkpoint_loads_but_does_not_resume(finished_run, toy, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    last = find_checkpoints(run_dir)[-1]
    _rewrite(last, format=1, options={"lr": 1e-3})
    assert build_network_from_checkpoint(last).label_dim == 3
    with pytest.raises(ValueError) as info:
        training_loop(run_dir, toy, ONE_MORE_STEP, resume="auto")
    assert str(info.value) == (
        f"cannot resume from {last}: an earlier version wrote it (checkpoint format 1); its "
        "weights sample and import, but train in a new run_dir"
    )


# Refusal tests train at most one step when the refusal is missing (a mutant), not the default run.
ONE_MORE_STEP = run_options(duration_kimg=4 * STEP_KIMG)


def _rewrite(path: Path, **changes) -> None:
    """The checkpoint at ``path`` with ``changes``, saved without its digest (as older ones)."""
    state = torch.load(path, weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "sha256"} | changes, path)


def test_an_option_the_checkpoint_lacks_is_a_difference(finished_run, toy, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    last = find_checkpoints(run_dir)[-1]
    options = load_checkpoint(last)["options"]
    _rewrite(last, options={k: v for k, v in options.items() if k != "augment_p"})
    with pytest.raises(ValueError, match=re.escape("\n  augment_p: checkpoint None, now 0.12\n")):
        training_loop(run_dir, toy, ONE_MORE_STEP, resume="auto")


def test_an_imported_run_is_not_resumed(finished_run, toy, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    last = find_checkpoints(run_dir)[-1]
    _rewrite(last, imported={"source": "edm-snapshot.pkl"})
    with pytest.raises(ValueError) as info:
        training_loop(run_dir, toy, ONE_MORE_STEP, resume="auto")
    assert str(info.value) == (
        f"cannot resume from {last}: it was imported from edm-snapshot.pkl (network weights only, "
        "no optimizer, data or RNG state); train in another run_dir"
    )


def test_resume_names_what_it_takes(toy, tmp_path):
    with pytest.raises(ValueError) as info:
        training_loop(tmp_path, toy, ONE_MORE_STEP, resume="nope.pt")
    assert str(info.value) == (
        "resume must be None, 'auto' or an existing checkpoint file, got 'nope.pt'"
    )


def test_finished_run_resumes_as_a_no_op(finished_run, toy, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    result = training_loop(run_dir, toy, run_options(duration_kimg=3 * STEP_KIMG), resume="auto")
    # Nothing is trained; the metrics are the last tick's, as stats.jsonl recorded them.
    last = json.loads((run_dir / "stats.jsonl").read_text().splitlines()[-1])
    assert result["step"] == 3 and result["metrics"] == last
    assert result["checkpoint"] == find_checkpoints(run_dir)[-1]


def test_resume_drops_stats_written_after_the_checkpoint(finished_run, toy, tmp_path):
    """Stats of a run that died after its last checkpoint (incl. a cut line) are replaced."""
    run_dir = copy_run(finished_run, tmp_path)
    with open(run_dir / "stats.jsonl", "a") as f:
        f.write('{"step": 4, "loss": -1}\n{"step": 5, "lo')
    training_loop(run_dir, toy, run_options(duration_kimg=4 * STEP_KIMG), resume="auto")
    lines = [json.loads(x) for x in (run_dir / "stats.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4] and lines[-1]["loss"] > 0
