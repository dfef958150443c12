"""The outbox: everything the pipeline still owes a server (S3 checkpoint copies, MLflow metrics,
params, artifacts, run status), kept on disk until it is delivered.

Each item is one JSON file in ``<state>/outbox/`` (``<state>`` is ``AOT_STATE_DIR`` or ``.aot`` in
the working directory), named so that they sort in the order they were written. Files an item
refers to are hard-linked (or copied) into ``outbox/files/`` first, so a checkpoint that training
rotates away meanwhile is still there to send. ``aot sync`` delivers everything in order;
:class:`Uploader` delivers S3 copies from a background thread with retries and backoff while a
step runs. A delivered item and its kept file are deleted; nothing else ever deletes them.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
import time
import uuid
from pathlib import Path

from aot_model.files import atomic_write, file_digest
from aot_pipeline import storage

STATE_ENV = "AOT_STATE_DIR"
RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0)  # seconds between S3 attempts while a step runs


def state_dir() -> Path:
    """``AOT_STATE_DIR`` or ``./.aot``: the handshake file and the outbox live here."""
    return Path(os.environ.get(STATE_ENV) or ".aot").resolve()


def _box() -> Path:
    return state_dir() / "outbox"


def put(item: dict) -> Path:
    """Persist one undelivered item; returns its file."""
    path = _box() / f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.json"
    text = json.dumps(item) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))  # creates the folder
    return path


def keep_file(path: str | Path) -> Path:
    """A copy of ``path`` (file or folder) inside the outbox that outlives the original."""
    path = Path(path)
    kept = _box() / "files" / uuid.uuid4().hex / path.name
    kept.parent.mkdir(parents=True)
    if path.is_dir():
        shutil.copytree(path, kept, copy_function=_link_or_copy)
    else:
        _link_or_copy(path, kept)
    return kept


def _link_or_copy(source, target) -> None:
    try:
        os.link(source, target)  # same file system: no copy, survives the original's deletion
    except OSError:
        shutil.copy2(source, target)


def pending() -> list[Path]:
    """Undelivered item files, oldest first."""
    return sorted(_box().glob("*.json"))


def _discard(item_path: Path, item: dict) -> None:
    item_path.unlink()
    if "path" in item:
        kept = Path(item["path"])
        if _box() in kept.parents:
            shutil.rmtree(kept.parent, ignore_errors=True)


def deliver(item: dict, mlflow_client=None) -> None:
    """Send one item (raises on failure; the caller keeps it)."""
    kind = item["kind"]
    if kind == "s3":
        storage.upload_verified(item["path"], item["url"], sha256=file_digest(item["path"]))
        return
    from mlflow.entities import Metric, Param, RunTag

    run_id = item["run_id"]
    if kind in ("metrics", "params", "tags"):  # log_batch splits them into requests it allows
        mlflow_client.log_batch(
            run_id,
            metrics=[Metric(*values) for values in item.get("metrics", [])],
            params=[Param(k, v) for k, v in item.get("params", {}).items()],
            tags=[RunTag(k, v) for k, v in item.get("tags", {}).items()],
        )
    elif kind == "artifact":
        folder = Path(item["path"]).is_dir()
        log = mlflow_client.log_artifacts if folder else mlflow_client.log_artifact
        log(run_id, item["path"], item["artifact_path"])
    elif kind == "status":
        mlflow_client.set_terminated(run_id, item["status"])
    elif kind == "register":
        from aot_pipeline import registry

        registry.register(mlflow_client, run_id, item["name"], item["tags"])
    else:
        raise ValueError(f"unknown outbox item kind {kind!r}")


def sync(mlflow_client_factory) -> tuple[int, list[str]]:
    """Deliver every pending item in order: (delivered count, one line per item left).

    MLflow items for a run stop at the first failure so a run's history stays in order; S3 items
    are independent. ``mlflow_client_factory`` is called once, only if an MLflow item is pending.
    """
    items, left, mlflow_client, failed_runs = pending(), [], None, set()
    for item_path in items:
        item = json.loads(item_path.read_text())
        try:
            if item["kind"] != "s3":
                if item["run_id"] in failed_runs:
                    raise RuntimeError("an earlier item of this run is still unsent")
                mlflow_client = mlflow_client or mlflow_client_factory()
            deliver(item, mlflow_client)
        except Exception as error:
            failed_runs.add(item.get("run_id"))  # None for an S3 item: blocks no run
            target = item.get("url") or item.get("run_id", "")
            left.append(f"{item_path.name}: {item['kind']} {target}: {error}")
        else:
            _discard(item_path, item)
    return len(items) - len(left), left


class Uploader:
    """Copies files to S3 from a background thread: each file is first put in the outbox, then
    uploaded with retries and backoff (RETRY_DELAYS), checksum-verified, and only then removed
    from the outbox. An outage never blocks the caller; ``close`` reports what is still owed."""

    def __init__(self, delays=RETRY_DELAYS):
        self.delays = delays
        self.queue: queue.Queue = queue.Queue()
        self.items: list[tuple[Path, str]] = []  # (item file, url): this uploader's, not others'
        self.thread = threading.Thread(target=self._loop, name="s3-uploads", daemon=True)
        self.thread.start()

    def submit(self, path: str | Path, url: str) -> None:
        """Queue a copy of ``path``; costs the caller a hard link and a small JSON file."""
        item = {"kind": "s3", "path": str(keep_file(path)), "url": url}
        item_path = put(item)
        self.items.append((item_path, url))
        self.queue.put((item_path, item))

    def _loop(self) -> None:
        for item_path, item in iter(self.queue.get, None):  # until close() queues None
            for delay in (*self.delays, 0.0):  # no wait after the last attempt
                try:
                    deliver(item)
                except Exception:
                    time.sleep(delay)
                else:
                    _discard(item_path, item)
                    break

    def close(self, timeout: float | None = None) -> list[str]:
        """Finish the queue (waiting at most ``timeout`` s); returns the URLs it still owes
        (another step's uploader, running at the same time in another lane, counts its own)."""
        self.queue.put(None)
        self.thread.join(timeout)
        return [url for item_path, url in self.items if item_path.exists()]
