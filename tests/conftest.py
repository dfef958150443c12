"""Shared test settings and fixtures.

`make test` runs the suite on two pytest-xdist workers, one per core of the 2-core CI machine.
Every worker and every process it starts (aot, dvc, servers, flow runs) uses one OpenMP thread,
set here before torch is imported: two 2-thread torch processes on 2 cores spin-wait for each
other's cores and run up to 15x slower (issue 8). AOT_TEST_THREADS overrides the count for this
process's own torch (e.g. one test on an idle machine)."""

import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
# The imports below come after these settings (ruff: E402 ignored for this file).

import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from builders import STEP_KIMG, TINY_PARAMS, make_cifar_tarball, run_options
from tqdm import tqdm

from aot_model import features
from aot_model.data import ImageDataset
from aot_model.training import training_loop

torch.set_num_threads(int(os.environ.get("AOT_TEST_THREADS", "1")))
# tqdm's default write lock holds a multiprocessing semaphore, shared with every process forked
# from this one, and its monitor thread takes that lock in the background. mutmut runs each mutant
# in a fork of the test process (scripts/mutants.py): one child killed while holding the lock left
# it held for good, and every later child hung at its first progress bar (docs/mutation.md). The
# tests need neither the monitor nor cross-process bars.
tqdm.monitor_interval = 0
tqdm.set_lock(threading.RLock())
# Tests that do not care about MLflow run the plain steps; tests/test_tracking.py and
# tests/test_tracked.py turn it on.
os.environ.setdefault("AOT_TRACKING", "off")


# `make test` hands tests to its two pytest-xdist workers (--dist loadgroup) in this order, longest
# first, so that the two longest start at once and short ones fill in at the end. Each worker keeps
# about three tests queued: the third entry waits behind the first, so it must be short.
LONGEST_FIRST = (
    "test_prefect.py",  # one xdist group: the services, a study through the flow and dvc repro
    "test_dvc.py::test_whole_pipeline_reproduces_and_caches",  # builds tiny_pipeline, then reruns
    "test_cli.py::test_demo_chain_results_and_training_rerun",
    "test_dvc.py",
    "test_faults.py",
    "test_tracked.py",  # with test_tracking.py one xdist group: the servers, a tracked demo
    "test_tracking.py",
)


def pytest_collection_modifyitems(items):
    """Longest first (LONGEST_FIRST, then the other slow tests); otherwise collection order."""

    def rank(item):
        names = (f"{item.path.name}::{getattr(item, 'originalname', item.name)}", item.path.name)
        first = min((LONGEST_FIRST.index(n) for n in names if n in LONGEST_FIRST), default=None)
        return (first is None, first or 0, item.get_closest_marker("slow") is None)

    items.sort(key=rank)


@pytest.fixture(scope="module")
def toy():
    """48 random 8x8 grey images in 3 classes: the training tests' dataset."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (48, 1, 8, 8), dtype=np.uint8)
    return ImageDataset(images, rng.integers(0, 3, 48).astype(np.int64), 3, "toy")


@pytest.fixture(scope="module")
def finished_run(toy, tmp_path_factory):
    """A 3-step run of builders.RUN with a checkpoint every tick (copy it before modifying)."""
    run_dir = tmp_path_factory.mktemp("finished")
    options = run_options(duration_kimg=3 * STEP_KIMG, snapshot_ticks=1)
    training_loop(run_dir, toy, options, progress=False)
    return run_dir


@pytest.fixture
def generator():
    """A seeded CPU generator: every random draw in a test is reproducible."""
    return torch.Generator().manual_seed(0)


@pytest.fixture
def rng():
    """A seeded NumPy generator, for tests that draw with NumPy."""
    return np.random.default_rng(0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's standalone server) on loopback, started and stopped here.

    Yields the environment a boto3 client or DVC needs to reach it; credentials are dummies."""
    port = _free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        yield {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point boto3 in this process at the local S3 server."""
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """A 33-image CIFAR-format tarball, its MD5, and the images and labels it must decode to."""
    return make_cifar_tarball(tmp_path_factory.mktemp("cifar"))


@pytest.fixture
def tiny_params(tmp_path):
    """A params.yaml for a pipeline run of a few seconds (8x8 digits, a 2-level NCSN++)."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(TINY_PARAMS))
    return path


ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# What running Python and tools may leave in the checkout; anything else a test writes there fails
# the session (tests write under their tmp_path). `git status --ignored` misses empty folders, such
# as the .aot/outbox/files a flow run in the checkout left behind, so the tree is walked instead.
# (.mutants: `make mutants` may run beside the tests.)
MAY_WRITE = {".git", ".venv", ".pytest_cache", "__pycache__", ".ruff_cache", ".hypothesis"}
MAY_WRITE |= {".mutants"}
_CHECKOUT_BEFORE = pytest.StashKey[set[str]]()
_CHECKOUT_LEFT = pytest.StashKey[list[str]]()


def _checkout_paths() -> set[str]:
    """Every file and folder under ROOT outside MAY_WRITE, relative to ROOT."""
    paths = set()
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in MAY_WRITE]
        paths.update(os.path.relpath(os.path.join(folder, n), ROOT) for n in dirs + files)
    return paths


def pytest_sessionstart(session):
    # xdist: the controller checks for all workers. Not in the scratch copies of `make mutants`
    # (no .git), where mutmut writes its results while other mutants' tests run.
    if not hasattr(session.config, "workerinput") and (ROOT / ".git").exists():
        session.config.stash[_CHECKOUT_BEFORE] = _checkout_paths()


def pytest_sessionfinish(session):
    before = session.config.stash.get(_CHECKOUT_BEFORE, None)
    if before is None:
        return
    left = sorted(_checkout_paths() - before)
    if left:
        session.config.stash[_CHECKOUT_LEFT] = left
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, config):
    left = config.stash.get(_CHECKOUT_LEFT, [])
    if left:
        terminalreporter.section("files left in the checkout", red=True)
        terminalreporter.write_line(
            "tests must write under tmp_path (or a folder they chdir to), not in "
            f"{ROOT}; new since the session started (or made by someone else meanwhile):"
        )
        for path in left:
            terminalreporter.write_line(f"  {path}", red=True)


def run_ok(args, cwd, env, timeout=600) -> str:
    """Run a command to completion; its stdout, or a failure showing both output streams."""
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def dvc_env(tracking: str = "on") -> dict:
    """The environment of a user's `dvc repro`, whatever servers the calling test started:
    MLflow tracking (when on) into the embedded store ./mlflow.db, one OpenMP thread as above."""
    skip = ("MLFLOW_", "AWS_", "PREFECT_", "AOT_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(skip) and k != "CI"}
    # (DVC changes nothing under CI, but keep the run identical to a user's.)
    return env | {"AOT_TRACKING": tracking, "DVC_NO_ANALYTICS": "1", "PATH": f"{BIN}:{env['PATH']}"}


def dvc_checkout(root: Path, env: dict) -> None:
    """A git + DVC checkout in ``root``: the project's dvc.yaml, params.yaml and .dvc/config."""
    run_ok(["git", "init", "-q"], root, env)
    run_ok([BIN / "dvc", "init", "-q"], root, env)
    for name in ("dvc.yaml", "params.yaml", ".dvc/config"):
        shutil.copy(ROOT / name, root / name)


@pytest.fixture
def tiny_pipeline(tmp_path):
    """`dvc repro` of the dvc.yaml generated for TINY_PARAMS with tracking on, in a git + DVC
    checkout; (project, env) for tests/test_dvc.py's whole-pipeline test, which continues there."""
    project = tmp_path / "project"
    project.mkdir()
    dvc_checkout(project, dvc_env())
    (project / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    run_ok([BIN / "aot", "pipeline", "dvc-yaml"], project, dvc_env())
    run_ok([BIN / "dvc", "repro"], project, dvc_env(), timeout=1800)
    return project, dvc_env()


# A stand-in for the Inception file (test_fid_protocol.py, test_steps.py).
class FakeLayers(torch.nn.Module):
    def forward(self, x):
        stats = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], 1)  # [B, 6]
        return torch.cat([stats.repeat(1, 341), stats[:, :2]], 1)  # [B, 2048]


class FakeInception(torch.nn.Module):
    """Stands in for inception-2015-12-05.pt (a TorchScript file with ``layers``)."""

    def __init__(self):
        super().__init__()
        self.layers = FakeLayers()

    def forward(self, x, return_features: bool = False):
        return self.layers(x) + 1000.0  # marks the graph's own (resizing) entry point


@pytest.fixture
def fake_inception(tmp_path):
    path = tmp_path / "weights" / features.INCEPTION_FILENAME
    path.parent.mkdir()
    torch.jit.save(torch.jit.script(FakeInception()), str(path))
    return path
