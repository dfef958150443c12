"""The Prefect flow ``aot``: the pipeline of ``dvc.yaml`` and ``aot demo`` as Prefect tasks.

Each task calls one step of ``aot_pipeline.steps`` (no second implementation) and is cached by
its inputs: the params sections the step reads, the digests of its input files and the code
version. A re-run after a failure therefore skips the finished steps, and a changed param reruns
exactly the steps ``dvc repro`` would rerun (the same sections per step as ``dvc.yaml``).

Deployment ``train-eval`` (prefect.yaml)::

    prefect deployment run aot/train-eval --param params=params.yaml \\
        --param overrides='{"train.duration_kimg": 30}'
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
import tempfile
import threading
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.context import TaskRunContext
from prefect.runtime import flow_run

import aot_model
import aot_pipeline
from aot_model.files import file_digest
from aot_model.training import STATS_FILE
from aot_pipeline import tracked, tracking
from aot_pipeline.cli import _device  # the CLI's --device rule: auto, cpu or cuda
from aot_pipeline.config import ConfigError, Params, parse_params
from aot_pipeline.lanes import Lanes, torch_threads
from aot_pipeline.lanes import plan as plan_lanes

ROOT = Path(__file__).resolve().parents[1]
IO_RETRIES = {"retries": 3, "retry_delay_seconds": [2, 10, 30]}  # backoff for downloads, S3
# The params sections each step reads: the same lists as its dvc.yaml stage (a test checks it).
SECTIONS = {
    "prepare": ("data",),
    "reference": ("score",),
    "train": ("network", "train", "variants.{variant}"),
    "sweep": ("sweep", "score"),
    "fakes": ("guidance", "sweep"),
    "extractor": ("guidance",),
    "discriminator": ("guidance", "sweep", "score"),
    "guided_sweep": ("guidance", "sweep", "score"),
    "report": (),
}


@cache
def code_version() -> str:
    """Digest of the library and pipeline sources: a code change invalidates every cached step."""
    digest = hashlib.sha256()
    for package in (aot_model, aot_pipeline):
        for path in sorted(Path(package.__file__).parent.rglob("*.py")):
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def path_digest(path: str | Path) -> str:
    """sha256 of a file, or of a folder's relative paths and file digests; "missing" if absent."""
    path = Path(path)
    if path.is_file():
        return file_digest(path)
    if not path.is_dir():
        return "missing"
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{item.relative_to(path)}:{file_digest(item)}\n".encode())
    return digest.hexdigest()


def inputs_key(sections: tuple[str, ...], inputs: tuple[str, ...] = ()):
    """A Prefect cache key function: the task's name, the params ``sections`` the step reads
    (``variants.{variant}`` is filled from the task's arguments), the content digests of the
    arguments named in ``inputs`` (a path, a mapping of name -> path, or None), the task's
    other plain arguments, and the code version. ``params`` and ``device`` change nothing a step
    computes."""

    def key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        keyed = {k: v for k, v in parameters.items() if k not in ("params", "device")}
        for name in inputs:
            value = keyed[name]
            if isinstance(value, dict):
                keyed[name] = {k: path_digest(v) for k, v in value.items()}
            elif value is not None:
                keyed[name] = path_digest(value)
        for dotted in sections:
            node = parameters["params"]
            for part in dotted.format(**parameters).split("."):
                node = node[part]
            keyed[f"params.{dotted}"] = node
        keyed |= {"task": context.task.name, "code": code_version()}
        text = json.dumps(keyed, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()

    return key


def resolve_params(params: str, overrides: dict[str, Any] | None) -> Params:
    """A params file (path, or the name of a profile in configs/) with dotted-key overrides,
    validated by the one schema; a bad key or value raises ConfigError naming it."""
    path = Path(params)
    if not path.is_file():
        path = ROOT / "configs" / f"{params}.yaml"
    if not path.is_file():
        profiles = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
        raise ConfigError(
            f"params must be a params file or a profile in {profiles}, got {params!r}"
        )
    raw = yaml.safe_load(path.read_text()) or {}
    for dotted, value in (overrides or {}).items():
        *parents, leaf = dotted.split(".")
        node = raw
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node[leaf] = value
    return parse_params(raw)


@contextlib.contextmanager
def _log_ticks(name: str, stats: Path, interval: float = 2.0):
    """One Prefect log line per training tick (readable in the UI; no carriage-return bars):
    follows the lines the training loop appends to ``stats.jsonl`` while the block runs."""
    logger = get_run_logger()
    offset = stats.stat().st_size if stats.exists() else 0  # a resumed run: only the new ticks
    done = threading.Event()

    def follow() -> None:
        nonlocal offset
        while True:
            finished = done.wait(interval)
            if stats.exists():
                with open(stats, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
                complete = chunk[: chunk.rfind(b"\n") + 1]
                offset += len(complete)
                for line in complete.decode().splitlines():
                    m = json.loads(line)
                    logger.info(
                        f"{name} tick {m['tick']}: kimg {m['kimg']:.2f} loss {m['loss']:.4f} "
                        f"lr {m['lr']:.2e} {m['img_per_sec']:.0f} img/s "
                        f"{m['sec_per_kimg']:.2f} s/kimg"
                    )
            if finished:
                return

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


# Each task runs one tracked step (aot_pipeline.tracked: the step plus its MLflow nested run),
# the same function `aot <step>`, `aot demo` and dvc.yaml's stages call.
@task(
    name="prepare", cache_key_fn=inputs_key(SECTIONS["prepare"]), persist_result=True, **IO_RETRIES
)
def prepare_task(params: dict, out: str, downloads: str) -> dict:
    return tracked.prepare(Params.model_validate(params), out, downloads=downloads)


@task(
    name="reference",
    cache_key_fn=inputs_key(SECTIONS["reference"], ("dataset",)),
    persist_result=True,
)
def reference_task(params: dict, dataset: str, out: str, device: str) -> dict:
    return tracked.reference(Params.model_validate(params), dataset, out, device=device)


@task(
    name="train",
    task_run_name="train-{variant}",
    cache_key_fn=inputs_key(SECTIONS["train"], ("dataset",)),
    persist_result=True,
)
def train_task(
    params: dict, variant: str, dataset: str, run_dir: str, device: str, nproc: int = 1
) -> dict:
    """No retries here: a retried flow run resumes from the run's latest checkpoint instead.
    ``nproc`` > 1: data-parallel training with torchrun inside this task (one process per GPU)."""
    with _log_ticks(variant, Path(run_dir) / STATS_FILE):
        if nproc > 1:
            return _torchrun_train(params, variant, dataset, run_dir, device, nproc)
        return tracked.train(
            Params.model_validate(params), variant, dataset, run_dir, resume="auto", device=device
        )


def _torchrun_train(
    params: dict, variant: str, dataset: str, run_dir: str, device: str, nproc: int
) -> dict:
    """`aot train` (the same tracked step) under torchrun; its rank 0 joins this flow's MLflow
    parent run through AOT_MLFLOW_PARENT_RUN_ID, which the child processes inherit."""
    with tempfile.TemporaryDirectory() as tmp:
        params_file, metrics = Path(tmp) / "params.yaml", Path(tmp) / "metrics.json"
        params_file.write_text(yaml.safe_dump(params))
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", "aot_pipeline.cli", "train",
            f"--variant={variant}", f"--data={dataset}", f"--run-dir={run_dir}",
            f"--params={params_file}", f"--device={device.split(':')[0]}", f"--metrics={metrics}",
        ]  # fmt: skip
        subprocess.run(command, check=True)
        return json.loads(metrics.read_text())


@task(
    name="sweep",
    task_run_name="sweep-{variant}",
    cache_key_fn=inputs_key(SECTIONS["sweep"], ("run_dir", "reference")),
    persist_result=True,
)
def sweep_task(
    params: dict, variant: str, run_dir: str, reference: str, out: str, device: str
) -> dict:
    p = Params.model_validate(params)
    return tracked.sweep(p, variant, run_dir, reference, out, device=device)


# Discriminator Guidance on the guidance.variant model (dvc.yaml's fakes ... guided_sweep stages).
@task(name="fakes", cache_key_fn=inputs_key(SECTIONS["fakes"], ("run_dir",)), persist_result=True)
def fakes_task(params: dict, run_dir: str, out: str, device: str) -> dict:
    return tracked.fakes(Params.model_validate(params), run_dir, out, device=device)


@task(
    name="extractor",
    cache_key_fn=inputs_key(SECTIONS["extractor"], ("dataset",)),
    persist_result=True,
)
def extractor_task(params: dict, dataset: str, out: str, device: str) -> dict:
    return tracked.extractor(Params.model_validate(params), dataset, out, device=device)


@task(
    name="discriminator",
    cache_key_fn=inputs_key(
        SECTIONS["discriminator"], ("dataset", "fakes", "extractor", "run_dir", "reference")
    ),
    persist_result=True,
)
def discriminator_task(
    params: dict,
    dataset: str,
    fakes: str,
    extractor: str,
    run_dir: str,
    reference: str,
    out: str,
    device: str,
) -> dict:
    p = Params.model_validate(params)
    return tracked.discriminator(
        p, dataset, fakes, extractor, run_dir, reference, out, device=device
    )


@task(
    name="guided_sweep",
    task_run_name="guided_sweep-{name}",
    cache_key_fn=inputs_key(
        SECTIONS["guided_sweep"], ("run_dir", "reference", "extractor", "discriminator")
    ),
    persist_result=True,
)
def guided_sweep_task(
    params: dict,
    name: str,
    run_dir: str,
    reference: str,
    extractor: str,
    discriminator: str,
    out: str,
    device: str,
) -> dict:
    p = Params.model_validate(params)
    return tracked.guided_sweep(
        p, name, run_dir, reference, extractor, discriminator, out, device=device
    )


@task(
    name="report",
    cache_key_fn=inputs_key(SECTIONS["report"], ("sweep_dirs", "discriminator_dir")),
    persist_result=True,
)
def report_task(sweep_dirs: dict[str, str], out: str, discriminator_dir: str | None = None) -> dict:
    return tracked.report(sweep_dirs, out, discriminator_dir=discriminator_dir)


@task(name="publish", **IO_RETRIES)
def publish_task(report: dict, mlflow_run: str | None) -> None:
    """Prefect artifacts: the results table (score per NFE for each model) and the MLflow run."""
    create_markdown_artifact(report["table"], key="aot-results", description="score per NFE")
    if mlflow_run is not None:
        create_link_artifact(mlflow_run, "MLflow parent run", key="aot-mlflow-run")


@flow(name="aot", log_prints=True)
def aot(
    params: str = "params.yaml",
    overrides: dict[str, Any] | None = None,
    out: str = "demo",
    device: str = "auto",
    nproc: int = 1,
    guidance: bool = True,
    lanes: bool = True,
) -> dict:
    """prepare -> reference -> train each variant -> sweep each variant -> (fakes -> extractor
    -> discriminator -> guided sweep of params guidance.variant) -> report.

    ``params``: a params file, or a profile name from configs/; ``overrides``: dotted keys, e.g.
    ``{"train.duration_kimg": 30}``; ``out``: the work folder (the layout of ``aot demo``);
    ``device``: auto, cpu or cuda; ``nproc``: processes (GPUs) per training run, through
    torchrun; ``guidance``: add the discriminator-guided arm (``aot demo --no-guidance`` is
    ``guidance=false``); ``lanes``: on CPU, run the branches side by side, each pinned to its
    share of the cores (aot_pipeline/lanes.py; ``aot demo --no-lanes`` is ``lanes=false``).
    Everything is validated before the first task runs. The flow run is one
    MLflow parent run, tagged with the flow run's id and URL.
    """
    p = resolve_params(params, overrides)
    if nproc < 1:
        raise ConfigError(f"nproc must be >= 1, got {nproc}")
    if nproc == 1:
        devices = _devices(device, len(p.variants))
    else:  # with torchrun each training run spans the GPUs itself, so the branches take turns
        devices = _devices(device, 1) * len(p.variants)
    plan, note = plan_lanes(p, devices[0], len(p.variants), wanted=lanes and nproc == 1)
    logger = get_run_logger()
    logger.info("params %s, overrides %s, devices %s; %s", params, overrides or {}, devices, note)
    tags = {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_url": flow_run.ui_url or ""}
    with tracking.pipeline_run("prefect-aot", tags=tags) as run_id, torch_threads(plan):
        guided = p.guidance.variant if guidance else None
        result = _pipeline(
            p.model_dump(mode="json"), list(p.variants), Path(out), devices, nproc, guided, plan
        )
        publish_task(result, _mlflow_run_url(run_id))
    print(result["table"])
    return {k: v for k, v in result.items() if k != "table"}


def _pipeline(
    params: dict,
    variants: list[str],
    root: Path,
    devices: list[str],
    nproc: int,
    guided: str | None,
    lanes: Lanes | None = None,
) -> dict:
    """The tasks in order; ``guided``: the variant whose trained and swept model gets the
    discriminator-guided arm (None: no guidance); ``lanes``: CPU lanes for the branches."""
    dataset, reference = str(root / "data" / "dataset.npz"), str(root / "data" / "reference")
    prepare_task(params, dataset, str(root / "data" / "downloads"))
    reference_task(params, dataset, reference, devices[0])
    sweep_dirs = {name: str(root / "sweeps" / name) for name in variants}
    folder = root / "guidance"
    disc_dir = str(folder / "discriminator") if guided else None
    if guided:
        sweep_dirs[f"{guided}-dg"] = str(root / "sweeps" / f"{guided}-dg")

    def branch(name: str, dev: str) -> dict:
        run_dir = str(root / "runs" / name)
        train_task(params, name, dataset, run_dir, dev, nproc)
        result = sweep_task(params, name, run_dir, reference, sweep_dirs[name], dev)
        if name == guided:  # the same files as dvc.yaml's guidance stages, under the work folder
            fakes, extractor = str(folder / "fakes.npz"), str(folder / "extractor.pt")
            fakes_task(params, run_dir, fakes, dev)
            extractor_task(params, dataset, extractor, dev)
            discriminator_task(params, dataset, fakes, extractor, run_dir, reference, disc_dir, dev)
            guided_sweep_task(
                params, f"{name}-dg", run_dir, reference, extractor, disc_dir,
                sweep_dirs[f"{name}-dg"], dev,
            )  # fmt: skip
        return result

    def in_lane(name: str, dev: str) -> dict:
        with lanes.lane():  # this task's thread, pinned to the lane's cores
            return branch(name, dev)

    if len(set(devices)) > 1 or lanes is not None:
        # Side by side: one GPU per branch, or one lane of CPU cores per branch (the same lanes as
        # `aot demo`, so both give the same scores).
        futures = [
            task(name=f"branch-{name}")(branch if lanes is None else in_lane).submit(name, dev)
            for name, dev in zip(variants, devices, strict=True)
        ]
        for future in futures:
            future.result()
    else:
        for name, dev in zip(variants, devices, strict=True):
            branch(name, dev)
    return report_task(sweep_dirs, str(root / "report"), disc_dir)


def _mlflow_run_url(run_id: str | None) -> str | None:
    """The MLflow UI page of a run when the tracking store is a server; None otherwise."""
    uri = tracking.tracking_uri()
    if run_id is None or not uri.startswith("http"):
        return None
    run = tracking.client().get_run(run_id)
    return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"


def _devices(device: str, count: int) -> list[str]:
    """The device of each branch: one GPU each when enough are visible, else all on one."""
    import torch

    resolved = _device(device)
    if resolved == "cuda" and torch.cuda.device_count() >= count > 1:
        return [f"cuda:{i}" for i in range(count)]
    return [resolved] * count
