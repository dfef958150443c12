"""MLflow tracking for pipeline runners: one parent run per pipeline execution, one nested run per
step and model, metrics sent in the background, and nothing lost when a server is away.

The contract (docs/architecture.md, "Tracking"):

* :func:`pipeline_run` opens (or joins) the parent run of a pipeline execution and exports its id
  as ``AOT_MLFLOW_PARENT_RUN_ID`` so every step, in this process or a child process, nests under
  it. With ``handshake=True`` (the ``aot <step>`` commands, hence every ``dvc repro`` stage) the
  id is also recorded in ``.aot/mlflow-parent.json``; later stage processes of the same workspace,
  git commit and tracking store join that run instead of starting an orphan.
* :func:`step_run` opens the nested run of one step and yields a :class:`StepRun`: ``callback``
  for ``steps.train(callback=...)`` and ``log_*`` methods for results and files.
* ``AOT_TRACKING=off`` turns all of it into no-ops (unit tests, air-gapped debugging).

Backends: ``MLFLOW_TRACKING_URI`` when set (e.g. ``http://127.0.0.1:5001``), else the embedded
``sqlite:///<cwd>/mlflow.db`` with artifacts in ``<cwd>/mlruns``. A server that is down when a step
starts stops it before any compute (:class:`TrackingUnavailable`); one that goes away mid-run
only delays metrics: they are retried in the background and whatever is still unsent when the
step ends is written to the outbox (:mod:`aot_pipeline.outbox`) for ``aot sync``.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from aot_model.files import atomic_write
from aot_pipeline import outbox

# Offline by default: no telemetry, and a client that gives up on a dead server in seconds rather
# than retrying for minutes (the background sender and the outbox do the waiting instead).
for _key, _value in {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}.items():
    os.environ.setdefault(_key, _value)

PARENT_ENV = "AOT_MLFLOW_PARENT_RUN_ID"
HANDSHAKE_FILE = "mlflow-parent.json"
SEND_INTERVAL = 2.0  # seconds between background metric batches
FLUSH_TIMEOUT = 30.0  # seconds a finishing step waits for its metrics before spooling them


class TrackingUnavailable(RuntimeError):
    """The tracking server cannot be reached when a step starts (nothing has been computed)."""


def enabled() -> bool:
    """On unless ``AOT_TRACKING=off`` (or 0/false/no); only rank 0 tracks under torchrun."""
    switched_off = os.environ.get("AOT_TRACKING", "on").lower() in ("off", "0", "false", "no")
    return not switched_off and int(os.environ.get("RANK", "0")) == 0


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, or the embedded store ``sqlite:///<cwd>/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def client():
    """An ``MlflowClient`` on :func:`tracking_uri`; raises TrackingUnavailable for a dead server."""
    from mlflow.tracking import MlflowClient

    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5) as reply:
                reply.read()
        except OSError as error:
            reason = getattr(error, "reason", error)
            raise TrackingUnavailable(
                f"MLflow tracking server {uri} is not reachable ({reason}); start it "
                "(`aot services up`), fix MLFLOW_TRACKING_URI, or set AOT_TRACKING=off"
            ) from None
    return MlflowClient(uri)


def experiment_id(mlflow_client) -> str:
    """Id of ``MLFLOW_EXPERIMENT_NAME`` (default ``aot-diffusion``), created on first use."""
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "aot-diffusion"
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    embedded = tracking_uri().startswith("sqlite:")  # artifacts beside mlflow.db
    location = (Path.cwd() / "mlruns").as_uri() if embedded else None
    return mlflow_client.create_experiment(name, artifact_location=location)


# ------------------------------------------------------------------------------------------------
# provenance


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=10)
    except OSError:
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def provenance() -> dict[str, str]:
    """Git commit and dirty flag, package versions and device name (run params)."""
    import torch

    info = {"git_commit": _git("rev-parse", "HEAD") or "unknown"}
    status = _git("status", "--porcelain", "--untracked-files=no")
    info["git_dirty"] = "unknown" if status is None else str(bool(status)).lower()
    for package in ("aot-diffusion", "torch", "numpy", "scipy", "clean-fid", "mlflow"):
        try:
            info[f"version.{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[f"version.{package}"] = "not installed"
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return info


def flatten(params: dict, prefix: str = "") -> dict[str, str]:
    """``{"train": {"aot": {"pool_size": 512}}}`` -> ``{"train.aot.pool_size": "512"}``."""
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, list | tuple) else str(value)
    return flat


# ------------------------------------------------------------------------------------------------
# the parent run


def _joinable(mlflow_client, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def _create_run(mlflow_client, name: str, tags: dict[str, str]) -> str:
    """A new run in the experiment, nested under ``AOT_MLFLOW_PARENT_RUN_ID`` when that is set."""
    parent = os.environ.get(PARENT_ENV)
    if parent:
        tags = {**tags, "mlflow.parentRunId": parent}
    run = mlflow_client.create_run(experiment_id(mlflow_client), run_name=name, tags=tags)
    return run.info.run_id


@contextlib.contextmanager
def _ended(mlflow_client, run_id: str) -> Iterator[None]:
    """Ends the run FINISHED, or FAILED on an error; a server that is away meanwhile gets the
    status later from ``aot sync``."""
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    finally:
        try:
            mlflow_client.set_terminated(run_id, status)
        except Exception:
            outbox.put({"kind": "status", "run_id": run_id, "status": status})


@contextlib.contextmanager
def _parent(mlflow_client, run_id: str) -> Iterator[str]:
    """Runs started inside nest under ``run_id`` (exported as ``AOT_MLFLOW_PARENT_RUN_ID``)."""
    outer = os.environ.get(PARENT_ENV)
    os.environ[PARENT_ENV] = run_id
    try:
        with _ended(mlflow_client, run_id):
            yield run_id
    finally:
        if outer:
            os.environ[PARENT_ENV] = outer
        else:
            os.environ.pop(PARENT_ENV, None)


@contextlib.contextmanager
def pipeline_run(
    name: str, *, tags: dict[str, str] | None = None, handshake: bool = False
) -> Iterator[str | None]:
    """The parent run of one pipeline execution; yields its id (None when tracking is off).

    Inside an execution that already has a parent (``AOT_MLFLOW_PARENT_RUN_ID`` set by a runner
    above), this joins it and changes nothing. Otherwise it starts a run named ``name``, or, with
    ``handshake``, resumes the run recorded in ``.aot/mlflow-parent.json`` when it belongs to the
    same tracking store and git commit and still exists (how ``dvc repro``'s stage processes, and
    a stage re-run after a change, join one parent). The run ends FINISHED, or FAILED on error.
    """
    if not enabled() or os.environ.get(PARENT_ENV):
        yield os.environ.get(PARENT_ENV) if enabled() else None
        return
    mlflow_client = client()
    here = {"tracking_uri": tracking_uri(), "git_commit": _git("rev-parse", "HEAD") or "unknown"}
    record = outbox.state_dir() / HANDSHAKE_FILE
    run_id = None
    if handshake and record.is_file():
        saved = json.loads(record.read_text())
        if here.items() <= saved.items() and _joinable(mlflow_client, saved["run_id"]):
            run_id = saved["run_id"]
            mlflow_client.update_run(run_id, status="RUNNING")
    if run_id is None:
        all_tags = {"aot.role": "pipeline", "aot.runner": name, **(tags or {})}
        run_id = _create_run(mlflow_client, name, all_tags)
        outbox.deliver({"kind": "params", "run_id": run_id, "params": provenance()}, mlflow_client)
        if handshake:
            text = json.dumps({"run_id": run_id, **here}, indent=2) + "\n"
            atomic_write(record, lambda f: f.write(text.encode()))
    with _parent(mlflow_client, run_id):
        yield run_id


@contextlib.contextmanager
def model_run(model: str, tags: dict[str, str]) -> Iterator[str | None]:
    """One model's run inside the pipeline's parent run: its step runs nest under it (so the
    MLflow UI groups a study by the ``tags``: arm, seed, conditioning, budget)."""
    if not enabled():
        yield None
        return
    mlflow_client = client()
    run_id = _create_run(mlflow_client, model, {"aot.role": "model", "aot.model": model, **tags})
    with _parent(mlflow_client, run_id):
        yield run_id


# ------------------------------------------------------------------------------------------------
# step runs


class MetricSender:
    """Sends metrics from a background thread in batches; keeps them while the server is away.

    ``put`` never blocks and never raises, so a training tick costs a list append. ``close``
    waits up to FLUSH_TIMEOUT for the rest, then spools what is still unsent to the outbox.
    """

    def __init__(self, mlflow_client, run_id: str):
        self.client, self.run_id = mlflow_client, run_id
        # The queue: ``put`` extends it at the end, the sender deletes the head it has sent (both
        # single list operations, atomic under the GIL, so no lock is needed).
        self.pending: list = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="mlflow-metrics", daemon=True)
        self.thread.start()

    def put(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending.extend([Metric(k, float(v), now, int(step)) for k, v in metrics.items()])

    def _send(self) -> bool:
        while self.pending:
            batch = self.pending[:1000]  # MLflow's log_batch limit
            try:
                self.client.log_batch(self.run_id, metrics=batch, synchronous=True)
            except Exception:
                return False
            del self.pending[: len(batch)]
        return True

    def _loop(self) -> None:
        delay = SEND_INTERVAL
        while not self.stop.wait(delay):
            delay = SEND_INTERVAL if self._send() else min(delay * 2, 30.0)

    def close(self, timeout: float = FLUSH_TIMEOUT) -> int:
        """Stop the thread and send the rest; returns how many metric values were spooled."""
        self.stop.set()
        self.thread.join()
        deadline = time.monotonic() + timeout
        while not self._send() and time.monotonic() < deadline:
            time.sleep(1.0)
        if not self.pending:
            return 0
        values = [[m.key, m.value, m.timestamp, m.step] for m in self.pending]
        outbox.put({"kind": "metrics", "run_id": self.run_id, "metrics": values})
        return len(values)


@dataclass
class StepRun:
    """Handle of one step's nested run. With tracking off every method does nothing."""

    run_id: str | None = None
    client: object = None
    sender: MetricSender | None = None
    metric_step: str = "kimg"
    unsent: list[str] = field(default_factory=list)

    @property
    def callback(self):
        """Per-tick training metrics -> MLflow (background thread); None when tracking is off."""
        return None if self.sender is None else self.log_tick

    def log_tick(self, metrics: dict) -> None:
        """One training tick: every number except the counters, at step = kimg (or images seen
        when ticks are not whole kimg: MLflow steps are integers; tag ``aot.metric_step``)."""
        kimg = metrics["kimg"]
        step = round(kimg) if self.metric_step == "kimg" else round(kimg * 1000)
        numbers = {k: v for k, v in metrics.items() if k not in ("tick", "kimg", "step")}
        self.log_metrics(numbers, step=step)

    def use_image_steps(self) -> None:
        """Log training metrics at step = images seen (ticks that are not whole kimg)."""
        self.metric_step = "nimg"
        self.set_tags({"aot.metric_step": "nimg"})

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        if self.sender is not None:
            self.sender.put(metrics, step)

    def log_params(self, params: dict) -> None:
        self._send("params", params=flatten(params))

    def set_tags(self, tags: dict[str, str]) -> None:
        self._send("tags", tags={k: str(v) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file or folder; kept in the outbox for ``aot sync`` if that fails."""
        self._send("artifact", artifact_path=artifact_path, path=str(Path(path).resolve()))

    def _send(self, kind: str, **fields) -> None:
        """Deliver now, else keep the item (and a copy of its file) in the outbox."""
        if self.run_id is None:
            return
        item = {"kind": kind, "run_id": self.run_id, **fields}
        try:
            outbox.deliver(item, self.client)
        except Exception:
            what = kind
            if kind == "artifact":  # the copy outlives the original until `aot sync`
                item["path"] = str(outbox.keep_file(item["path"]))
                what = f"artifact {Path(item['path']).name}"
            outbox.put(item)
            self.unsent.append(what)


@contextlib.contextmanager
def step_run(step: str, model: str | None = None, params: dict | None = None) -> Iterator[StepRun]:
    """The nested run of one step (``train-aot``, ``sweep-edm``, ``report``, ...).

    Checks the tracking store before the step computes anything, logs the step's flattened
    ``params`` and the provenance, and on exit sends the remaining metrics and ends the run
    (FAILED if the step raised). What could not be sent is in the outbox; one line says so.
    """
    if not enabled():
        yield StepRun()
        return
    mlflow_client = client()
    name = step if model is None else f"{step}-{model}"
    tags = {"aot.role": "step", "aot.step": step}
    if model is not None:
        tags["aot.model"] = model
    run_id = _create_run(mlflow_client, name, tags)
    handle = StepRun(run_id, mlflow_client, MetricSender(mlflow_client, run_id))
    handle.log_params({**(params or {}), **provenance()})
    with _ended(mlflow_client, run_id):
        try:
            yield handle
        finally:
            spooled = handle.sender.close()
            if spooled:
                handle.unsent.append(f"{spooled} metric values")
            if handle.unsent:
                print(
                    f"tracking: {name} ({run_id}) kept unsent {', '.join(handle.unsent)} in "
                    f"{outbox.state_dir() / 'outbox'}; run `aot sync` when the server is back",
                    flush=True,
                )
