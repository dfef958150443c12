"""Faults on purpose: damaged files, kill -9 mid-run and full disks, through the `aot` CLI.

Every case asserts what the user sees (exit status 2 and one ``error:`` line, no traceback) and
that nothing that existed before was lost. docs/robustness.md tables the faults and messages.
Training kills run the real CLI in a child process that SIGKILLs itself at a point this module
chooses (inside a checkpoint write, inside pool matching, between backward and the optimizer
step) or is killed from here after a seeded random delay; the resumed run must end with the
uninterrupted run's checkpoint, bit for bit.
"""

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml
from builders import TINY_PARAMS, assert_same_state
from typer.testing import CliRunner

from aot_model import files
from aot_model.checkpoints import find_checkpoints, load_checkpoint
from aot_model.data import ImageDataset, save_dataset
from aot_pipeline.cli import app

# Under pytest-xdist the whole module runs on one worker, which builds `base` once.
pytestmark = pytest.mark.xdist_group("faults")

# 4 optimizer steps of 8 images (2 micro-batches of 4) from pools of 12, a checkpoint per step.
PARAMS = {
    **TINY_PARAMS,
    "network": {**TINY_PARAMS["network"], "dropout": 0.1},
    "train": {
        "seed": 1,
        "duration_kimg": 0.032,
        "batch": 8,
        "batch_gpu": 4,
        "lr_rampup_kimg": 0.016,
        "ema_halflife_kimg": 0.1,
        "tick_kimg": 0.008,
        "snapshot_ticks": 1,
        "keep_snapshots": 2,
        "aot": {"pool_size": 12},
    },
    "variants": {"aot": {"aot": True}},
    "sweep": {"steps": [2, 3], "rho": [7.0], "num_images": 16, "batch_size": 16},
    "score": {"metric": "fd", "feature_epochs": 1},
}
FINAL = "training-state-000000032.pt"
TRAIN = ("--variant", "aot")

# The CLI in a child process that SIGKILLs itself on the n-th call of one function.
WORKER = r"""
import os, signal, sys
import torch
torch.set_num_threads(int(os.environ["THREADS"]))
from aot_model import sweep, training
from aot_pipeline.cli import app

where, nth = os.environ["KILL_AT"].split(":")
calls = 0

def half_written(*args, **kwargs):
    for arg in args:
        if hasattr(arg, "write"):
            arg.write(os.urandom(4096))
            arg.flush()

def kill_on_nth(function, before=None):
    def wrapper(*args, **kwargs):
        global calls
        calls += 1
        if calls == int(nth):
            if before is not None:
                before(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
        return function(*args, **kwargs)
    return wrapper

if where == "checkpoint":
    torch.save = kill_on_nth(torch.save, half_written)
elif where == "matching":
    training.build_pool = kill_on_nth(training.build_pool)
elif where == "step":
    training._scrub_gradients = kill_on_nth(training._scrub_gradients)
elif where == "sweep":
    sweep.save_images = kill_on_nth(sweep.save_images)
sys.argv = ["aot", *sys.argv[1:]]
app()
"""


def invoke(*args, env=None):
    return CliRunner(env=env).invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    """Exit status 2, exactly one ``error:`` line holding every fragment, and no traceback."""
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def digests(folder) -> dict:
    """SHA-256 of every file under ``folder``, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def truncate(path, size=10_000):
    with open(path, "r+b") as f:
        f.truncate(size)


def flip_bytes(path, offset, count=64):
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(count)
        f.seek(offset)
        f.write(bytes(255 - b for b in data))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Params, a 48-image dataset, its reference folder, a finished run and a finished sweep.

    Copy before damaging anything (`copy_of`)."""
    root = tmp_path_factory.mktemp("faults")
    (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (48, 1, 8, 8), dtype=np.uint8)
    save_dataset(ImageDataset(images, rng.integers(0, 3, 48), 3, "toy"), root / "data.npz")
    done = [
        invoke("reference", "--data", root / "data.npz", "--out", root / "ref", *common(root)),
        invoke(*train_args(root, root / "run"), *common(root)),
        invoke("sweep", *TRAIN, "--run-dir", root / "run", "--out", root / "sweep",
               *common(root, reference=True)),
    ]  # fmt: skip
    for result in done:
        assert result.exit_code == 0, result.output
    return root


@pytest.fixture
def copy_of(base, tmp_path):
    """``copy_of("run")``: a private copy of one of `base`'s files or folders."""

    def copy(name):
        source, target = base / name, tmp_path / name
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
            if source.with_suffix(".json").exists() and source.suffix == ".npz":
                shutil.copy2(source.with_suffix(".json"), target.with_suffix(".json"))
        return target

    return copy


def common(base, *, reference=False) -> list:
    """--params (and --reference) of `base`, on the CPU."""
    ref = ["--reference", base / "ref"] if reference else []
    return [*ref, "--params", base / "params.yaml", "--device", "cpu"]


def train_args(base, run_dir, data=None) -> list:
    return ["train", *TRAIN, "--run-dir", run_dir, "--data", data or base / "data.npz"]


def train(base, run_dir, *more, data=None):
    return invoke(*train_args(base, run_dir, data), *common(base), *more)


def run_worker(args, kill_at, **popen):
    """The CLI in a child process that SIGKILLs itself at ``kill_at`` (see WORKER)."""
    env = {**os.environ, "THREADS": str(torch.get_num_threads()), "KILL_AT": kill_at}
    return subprocess.Popen([sys.executable, "-c", WORKER, *map(str, args)], env=env, **popen)


def assert_same_as_uninterrupted(base, run_dir):
    assert_same_state(load_checkpoint(run_dir / FINAL), load_checkpoint(base / "run" / FINAL))


# ------------------------------------------------------------------------------------------------
# Damaged checkpoints: resume falls back, never restarts silently, never deletes.


def test_damaged_newest_checkpoint_resumes_from_the_previous_one(base, copy_of):
    """The run kept steps 3 and 4; with step 4 truncated, resume redoes step 4 from step 3."""
    run_dir = copy_of("run")
    damaged = run_dir / FINAL
    truncate(damaged)
    damaged_bytes = damaged.read_bytes()
    result = train(base, run_dir)
    assert result.exit_code == 0, result.output
    assert f"warning: {damaged} is not a readable training checkpoint" in result.stderr
    assert f"kept as {FINAL}.damaged" in result.stderr
    assert f"Resuming from {run_dir / 'training-state-000000024.pt'}" in result.stderr
    assert (run_dir / f"{FINAL}.damaged").read_bytes() == damaged_bytes
    assert_same_as_uninterrupted(base, run_dir)


def test_changed_byte_inside_a_tensor_is_caught(base, copy_of):
    """torch.load accepts a flipped byte in tensor data; the stored digest does not."""
    run_dir = copy_of("run")
    newest = find_checkpoints(run_dir)[-1]
    flip_bytes(newest, newest.stat().st_size // 2)
    torch.load(newest, weights_only=True)  # the damage is invisible to torch itself
    with pytest.raises(files.DamagedFileError, match="no longer match the checksum"):
        load_checkpoint(newest)
    result = invoke("fid", "--run-dir", run_dir, *common(base, reference=True))
    assert_one_line_error(result, str(newest), "no longer match the checksum")


def test_no_intact_checkpoint_stops_and_touches_nothing(base, copy_of):
    run_dir = copy_of("run")
    for path in find_checkpoints(run_dir):
        truncate(path)
    before = digests(run_dir)
    result = train(base, run_dir)
    assert_one_line_error(result, f"no intact checkpoint to resume in {run_dir}", "restore one")
    assert digests(run_dir) == before


@pytest.mark.parametrize("resume", ["params.yaml", "data.npz"])
def test_resume_from_a_file_that_is_not_a_checkpoint(base, tmp_path, resume):
    result = train(base, tmp_path / "new", "--resume", base / resume)
    assert_one_line_error(result, str(base / resume), "not a readable training checkpoint")
    assert not (tmp_path / "new").exists()


def test_resume_option_names_the_option(base, tmp_path):
    result = train(base, tmp_path / "new", "--resume", "latest")
    assert_one_line_error(result, "--resume must be auto, none or a checkpoint file")


# ------------------------------------------------------------------------------------------------
# Kill -9 at points chosen here; the resumed run equals the uninterrupted one bit for bit.


def _kill_run(base, run_dir, kill_at, delay=None):
    """Run `aot train` in a child that dies by SIGKILL at ``kill_at`` (or after ``delay`` s once
    its first tick is logged); returns the checkpoints it left."""
    args = [*train_args(base, run_dir), *common(base)]
    child = run_worker(args, kill_at, stderr=subprocess.PIPE)
    if delay is not None:
        deadline = time.monotonic() + 120
        while not (run_dir / "stats.jsonl").exists() and child.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
    _, stderr = child.communicate(timeout=120)
    if child.returncode != -signal.SIGKILL:  # a random delay may outlast the whole run
        assert delay is not None and child.returncode == 0, stderr.decode()[-2000:]
    return find_checkpoints(run_dir)


@pytest.mark.integration
@pytest.mark.parametrize(
    "kill_at",
    ["checkpoint:2", "matching:3", "step:3", "random"],
)
def test_kill_anywhere_then_resume_is_bit_exact(base, tmp_path, kill_at):
    run_dir = tmp_path / "run"
    delay = random.Random(kill_at).uniform(0.0, 0.4) if kill_at == "random" else None
    left = _kill_run(base, run_dir, "none:0" if delay is not None else kill_at, delay)
    for path in left:  # whatever was renamed into place is whole
        load_checkpoint(path)
    result = train(base, run_dir)
    assert result.exit_code == 0, result.output
    assert_same_as_uninterrupted(base, run_dir)
    assert not list(run_dir.glob(".*.tmp"))  # the killed write's temporary file is gone
    steps = [json.loads(line)["step"] for line in (run_dir / "stats.jsonl").open()]
    assert steps == [1, 2, 3, 4]


@pytest.mark.integration
def test_killed_sweep_is_not_trusted_and_a_rerun_completes(base, copy_of, tmp_path):
    """A sweep killed while rewriting a finished sweep's folder leaves a table that no longer
    matches curvature.json: `aot report` refuses it; running the sweep again fixes it."""
    sweep_dir = copy_of("sweep")
    args = ["sweep", *TRAIN, "--run-dir", base / "run", "--out", sweep_dir]
    args += common(base, reference=True)
    assert run_worker(args, "sweep:2").wait(timeout=300) == -signal.SIGKILL
    report = ("report", "--sweep", f"aot={sweep_dir}", "--out", tmp_path / "report")
    assert_one_line_error(invoke(*report), "aot_sweep.json", "curvature.json", "aot sweep")
    assert not (tmp_path / "report").exists()
    assert invoke(*args).exit_code == 0
    assert invoke(*report).exit_code == 0
    samples = {k: v for k, v in digests(sweep_dir).items() if k.endswith(".npz")}
    assert samples == {k: v for k, v in digests(base / "sweep").items() if k.endswith(".npz")}


# ------------------------------------------------------------------------------------------------
# Full disk.


def _fail_write_when(predicate):
    """A torch.save that writes part of a checkpoint and fails like a full disk when asked."""
    save = torch.save

    def full_disk_save(obj, f, *args, **kwargs):
        if predicate(obj):
            f.write(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(obj, f, *args, **kwargs)

    return full_disk_save


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(base, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    monkeypatch.setattr(torch, "save", _fail_write_when(lambda state: state["step"] == 3))
    result = train(base, run_dir)
    previous = run_dir / "training-state-000000016.pt"
    assert_one_line_error(
        result, "could not write checkpoint", "No space left on device", f"is {previous}"
    )
    assert [p.name for p in find_checkpoints(run_dir)] == [
        "training-state-000000008.pt",
        previous.name,
    ]
    assert load_checkpoint(previous)["step"] == 2
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]
    monkeypatch.undo()  # space freed
    assert train(base, run_dir).exit_code == 0
    assert_same_as_uninterrupted(base, run_dir)


def test_full_disk_on_any_output_keeps_the_old_files(base, copy_of, monkeypatch):
    """Every output goes through files.atomic_path; a failing flush leaves old outputs whole."""
    data = copy_of("data.npz")
    before = digests(data.parent)

    def full(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(files, "_fsync", full)
    result = invoke("prepare", "--out", data, "--params", base / "params.yaml")
    assert_one_line_error(result, "No space left on device")
    assert digests(data.parent) == before


def _tmpfs(path, size):
    return subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="needs root to mount")
def test_real_full_disk_on_a_small_tmpfs(base, tmp_path):
    """A real ENOSPC: a 2.5 MB file system holds two ~1 MB checkpoints but not a third."""
    run_dir = tmp_path / "disk"
    run_dir.mkdir()
    if _tmpfs(run_dir, "2500k").returncode:
        pytest.skip("tmpfs cannot be mounted here")
    try:
        result = train(base, run_dir)
        kept = find_checkpoints(run_dir)
        assert_one_line_error(result, "No space left on device", f"is {kept[-1]}")
        for path in kept:
            load_checkpoint(path)
        subprocess.run(["mount", "-o", "remount,size=20m", str(run_dir)], check=True)
        assert train(base, run_dir).exit_code == 0
        assert_same_as_uninterrupted(base, run_dir)
    finally:
        subprocess.run(["umount", str(run_dir)], check=False)


# ------------------------------------------------------------------------------------------------
# Damaged or wrong inputs of the other steps: one line before any compute.


def test_damaged_dataset(base, copy_of, tmp_path):
    data = copy_of("data.npz")
    truncate(data, 2000)
    result = train(base, tmp_path / "new", data=data)
    assert_one_line_error(result, str(data), "does not match", "data.json", "prepare")
    data.with_suffix(".json").unlink()  # without a manifest the archive itself is checked
    result = train(base, tmp_path / "new", data=data)
    assert_one_line_error(result, str(data), "truncated or corrupt")
    data.write_text("images: []\n")
    assert_one_line_error(train(base, tmp_path / "new", data=data), "not an .npz archive")
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda ref: truncate(ref / "reference_stats.npz", 3000), "recorded in"),
        (lambda ref: flip_bytes(ref / "feature_net.pt", 2000), "recorded in"),
        (lambda ref: (ref / "reference.json").write_text("{"), "not valid JSON"),
        (lambda ref: (ref / "reference.json").unlink(), "reference folder manifest not found"),
    ],
)
def test_damaged_reference_folder(base, copy_of, damage, expected):
    ref = copy_of("ref")
    damage(ref)
    samples = base / "sweep" / "aot_heun_s2_r7.npz"
    result = invoke("fid", samples, "--reference", ref, "--params", base / "params.yaml")
    assert_one_line_error(result, expected, "aot reference")


@pytest.mark.parametrize(
    ("samples", "expected"),
    [
        ("data.npz", "lacks the arrays ['seeds']"),
        ("ref/reference_stats.npz", "lacks the arrays ['images', 'seeds']"),
        ("params.yaml", "is not an .npz archive"),
        ("ref/reference.json", "is not an .npz archive"),
    ],
)
def test_fid_on_a_file_that_holds_no_samples(base, samples, expected):
    result = invoke("fid", base / samples, *common(base, reference=True))
    assert_one_line_error(result, str(base / samples), expected, "aot sweep")


def test_fid_sampler_options_need_a_run_dir(base):
    samples = base / "sweep" / "aot_heun_s2_r7.npz"
    result = invoke("fid", samples, "--steps", 4, "--blocks", 2, "--params", base / "params.yaml")
    assert_one_line_error(result, "--steps, --blocks apply only with --run-dir")
    result = invoke("fid", "--run-dir", base / "run", "--blocks", 0, *common(base, reference=True))
    assert_one_line_error(result, "--blocks must be an int >= 1")


def test_sweep_refuses_a_reference_of_other_images(base, tmp_path):
    """A feature net for 16x16 images cannot score 8x8 samples: refused before sampling."""
    rng = np.random.default_rng(1)
    large = ImageDataset(rng.integers(0, 256, (16, 1, 16, 16), np.uint8), np.zeros(16, int), 1, "l")
    save_dataset(large, tmp_path / "large.npz")
    params = common(base)
    done = invoke("reference", "--data", tmp_path / "large.npz", "--out", tmp_path / "ref", *params)
    assert done.exit_code == 0, done.output
    sweep = ["sweep", "--run-dir", base / "run", "--out", tmp_path / "sweep", *params]
    result = invoke(*sweep, *TRAIN, "--reference", tmp_path / "ref")
    assert_one_line_error(result, "1x8x8 images", "feature_net takes 16x16 images, got 8x8")
    assert not (tmp_path / "sweep").exists()
    result = invoke(*sweep, "--variant", "ot")
    assert_one_line_error(result, "--variant must be one of ['aot']")


def test_report_inputs(base, tmp_path):
    params = base / "params.yaml"
    for sweeps, expected in [
        ((f"aot={params}",), "is not a folder"),
        ((f"aot={base / 'sweep'}", f"aot={base / 'sweep'}"), "--sweep names 'aot' twice"),
        (("aot",), "--sweep takes NAME=FOLDER"),
        ((f"edm={base / 'sweep'}",), "edm_sweep.json"),
    ]:
        args = [a for s in sweeps for a in ("--sweep", s)]
        assert_one_line_error(invoke("report", *args, "--out", tmp_path / "r"), expected)
    assert not (tmp_path / "r").exists()


@pytest.fixture
def guidance_inputs(base, tmp_path):
    """Intact fakes (48 random 1x8x8 images, like `aot fakes` writes) and a file for the extractor
    (each case damages one)."""
    images = np.random.default_rng(2).integers(0, 256, (48, 1, 8, 8), dtype=np.uint8)
    fakes = tmp_path / "fakes.npz"
    np.savez_compressed(fakes, images=images, seeds=np.arange(48), checkpoint="run/x.pt")
    extractor = tmp_path / "extractor.pt"
    extractor.write_bytes(os.urandom(4096))
    return fakes, extractor


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda fakes, _: truncate(fakes, fakes.stat().st_size // 2), "fakes.npz is truncated"),
        (lambda fakes, _: fakes.write_text("images: []"), "fakes.npz is not an .npz archive"),
        (
            lambda fakes, _: np.savez(fakes, mu=np.zeros(3)),
            "fakes.npz lacks the arrays ['images']",
        ),
        (lambda _, extractor: None, "extractor.pt is not a readable encoder checkpoint"),
    ],
    ids=["truncated-fakes", "text-fakes", "foreign-npz-fakes", "random-extractor"],
)
def test_damaged_discriminator_inputs(base, tmp_path, guidance_inputs, damage, expected):
    """The fake images and the extractor are checked before any training: one line, naming the
    file and the step that rebuilds it."""
    fakes, extractor = guidance_inputs
    damage(fakes, extractor)
    step = "aot extractor" if "extractor" in expected else "aot fakes"
    result = invoke(
        "discriminator", "--run-dir", base / "run", "--data", base / "data.npz", "--fakes", fakes,
        "--extractor", extractor, "--out", tmp_path / "disc", *common(base, reference=True),
    )  # fmt: skip
    assert_one_line_error(result, str(tmp_path), expected, step)
    assert not (tmp_path / "disc").exists()


def test_damaged_discriminator_head_stops_the_guided_sweep(base, tmp_path, guidance_inputs):
    _, extractor = guidance_inputs
    (tmp_path / "disc").mkdir()
    (tmp_path / "disc" / "discriminator.pt").write_bytes(b"PK\x03\x04" + os.urandom(2000))
    result = invoke(
        "guided-sweep", "--run-dir", base / "run", "--name", "aot-dg", "--extractor", extractor,
        "--discriminator", tmp_path / "disc", "--out", tmp_path / "dg",
        *common(base, reference=True),
    )  # fmt: skip
    expected = "discriminator.pt is not a readable encoder checkpoint"
    assert_one_line_error(result, str(tmp_path / "disc"), expected, "retrain the discriminator")
    assert not (tmp_path / "dg").exists()


def test_output_under_a_file_is_refused_before_work(base, tmp_path):
    out = tmp_path / "data.npz"
    result = invoke(
        "prepare",
        "--out",
        out,
        "--metrics",
        base / "params.yaml" / "m.json",
        "--params",
        base / "params.yaml",
    )
    assert_one_line_error(result, "--metrics", "is a file, not a folder")
    assert not out.exists()


@pytest.mark.parametrize(
    ("source", "env", "expected"),
    [
        ("http://127.0.0.1:9/cifar-10-python.tar.gz", {}, "could not download"),
        (
            "s3://bucket/cifar-10-python.tar.gz",
            {
                "AWS_ACCESS_KEY_ID": None,
                "AWS_SECRET_ACCESS_KEY": None,
                "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                "AWS_CONFIG_FILE": "/nonexistent",
                "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
            },
            "Unable to locate credentials",
        ),
    ],
)
def test_prepare_offline_or_without_credentials(tmp_path, source, env, expected):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"dataset": "cifar10", "source": source}}))
    result = invoke(
        "prepare",
        "--out",
        tmp_path / "d.npz",
        "--downloads",
        tmp_path / "dl",
        "--params",
        params,
        env=env,
    )
    assert_one_line_error(result, expected, source)
    assert not (tmp_path / "d.npz").exists() and not any((tmp_path / "dl").iterdir())


def test_debug_shows_the_traceback(base):
    result = invoke("fid", base / "data.npz", *common(base, reference=True), env={"AOT_DEBUG": "1"})
    assert isinstance(result.exception, files.DamagedFileError)
