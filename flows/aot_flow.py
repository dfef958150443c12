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

import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.context import TaskRunContext

import aot_model
import aot_pipeline
from aot_model.files import file_digest
from aot_pipeline import steps
from aot_pipeline.cli import _device  # the CLI's --device rule: auto, cpu or cuda
from aot_pipeline.config import ConfigError, Params, parse_params

ROOT = Path(__file__).resolve().parents[1]
IO_RETRIES = {"retries": 3, "retry_delay_seconds": [2, 10, 30]}  # backoff for downloads, S3


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


def inputs_key(*inputs: str):
    """A Prefect cache key function: the task's name and parameters, with the parameters named in
    ``inputs`` (paths, or a mapping of name -> path) replaced by content digests, plus the code."""

    def key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
        keyed = dict(parameters)
        for name in inputs:
            value = keyed[name]
            if isinstance(value, dict):
                keyed[name] = {k: path_digest(v) for k, v in value.items()}
            else:
                keyed[name] = path_digest(value)
        keyed.pop("device", None)  # where a step runs does not change what it computes
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


def _tick_logger(name: str):
    """One Prefect log line per training tick (the UI shows it; no carriage-return bars)."""
    logger = get_run_logger()

    def log(metrics: dict) -> None:
        logger.info(
            "%s tick %d: kimg %.2f loss %.4f lr %.2e %.0f img/s %.2f s/kimg",
            name,
            metrics["tick"],
            metrics["kimg"],
            metrics["loss"],
            metrics["lr"],
            metrics["img_per_sec"],
            metrics["sec_per_kimg"],
        )

    return log


@task(name="prepare", cache_key_fn=inputs_key(), persist_result=True, **IO_RETRIES)
def prepare_task(data: dict, out: str, downloads: str) -> dict:
    return steps.prepare(Params.model_validate({"data": data}).data, out, downloads=downloads)


@task(name="reference", cache_key_fn=inputs_key("dataset"), persist_result=True)
def reference_task(score: dict, dataset: str, out: str, device: str) -> dict:
    section = Params.model_validate({"score": score}).score
    return steps.reference(section, dataset, out, device=device)


@task(
    name="train",
    task_run_name="train-{variant}",
    cache_key_fn=inputs_key("dataset"),
    persist_result=True,
)
def train_task(sections: dict, variant: str, dataset: str, run_dir: str, device: str) -> dict:
    """No retries here: a retried flow run resumes from the run's latest checkpoint instead."""
    p = Params.model_validate(sections)
    callback = _tick_logger(variant)
    return steps.train(
        p.network,
        p.train,
        p.variants[variant],
        dataset,
        run_dir,
        resume="auto",
        device=device,
        callback=callback,
    )


@task(
    name="sweep",
    task_run_name="sweep-{variant}",
    cache_key_fn=inputs_key("run_dir", "reference"),
    persist_result=True,
)
def sweep_task(
    sections: dict, variant: str, run_dir: str, reference: str, out: str, device: str
) -> dict:
    p = Params.model_validate(sections)
    return steps.sweep(p.sweep, p.score, run_dir, reference, out, name=variant, device=device)


@task(name="report", cache_key_fn=inputs_key("sweep_dirs"), persist_result=True)
def report_task(sweep_dirs: dict[str, str], out: str) -> dict:
    return steps.report(sweep_dirs, out)


@task(name="publish", **IO_RETRIES)
def publish_task(report: dict) -> None:
    """The results table as a Prefect artifact (score per NFE for each model)."""
    create_markdown_artifact(report["table"], key="aot-results", description="score per NFE")


def _sections(p: Params, *names: str) -> dict:
    return p.model_dump(include=set(names), mode="json")


@flow(name="aot", log_prints=True)
def aot(
    params: str = "params.yaml",
    overrides: dict[str, Any] | None = None,
    out: str = "demo",
    device: str = "auto",
) -> dict:
    """prepare -> reference -> train each variant -> sweep each variant -> report.

    ``params``: a params file, or a profile name from configs/; ``overrides``: dotted keys, e.g.
    ``{"train.duration_kimg": 30}``; ``out``: the work folder (the layout of ``aot demo``);
    ``device``: auto, cpu or cuda. Everything is validated before the first task runs.
    """
    p = resolve_params(params, overrides)
    devices = _devices(device, len(p.variants))
    logger = get_run_logger()
    logger.info("params %s, overrides %s, devices %s", params, overrides or {}, devices)
    root = Path(out)
    dataset, reference = str(root / "data" / "dataset.npz"), str(root / "data" / "reference")
    prepare_task(_sections(p, "data")["data"], dataset, str(root / "data" / "downloads"))
    reference_task(_sections(p, "score")["score"], dataset, reference, devices[0])

    sweep_dirs = {name: str(root / "sweeps" / name) for name in p.variants}

    def branch(name: str, dev: str) -> dict:
        train_sections = _sections(p, "network", "train") | {
            "variants": {name: p.variants[name].model_dump()}
        }
        run_dir = str(root / "runs" / name)
        train_task(train_sections, name, dataset, run_dir, dev)
        sweep_sections = _sections(p, "sweep", "score")
        return sweep_task(sweep_sections, name, run_dir, reference, sweep_dirs[name], dev)

    if len(set(devices)) > 1:
        # One GPU per branch: AOT and baseline train and sweep side by side.
        futures = [
            task(name=f"branch-{name}")(branch).submit(name, dev)
            for name, dev in zip(p.variants, devices, strict=True)
        ]
        for future in futures:
            future.result()
    else:
        # On one device (CPU), branches run one after the other: two torch processes on the
        # same cores are slower than one at a time (OpenMP spin-waiting, see docs).
        for name, dev in zip(p.variants, devices, strict=True):
            branch(name, dev)
    result = report_task(sweep_dirs, str(root / "report"))
    publish_task(result)
    print(result["table"])
    return {k: v for k, v in result.items() if k != "table"}


def _devices(device: str, count: int) -> list[str]:
    """The device of each branch: one GPU each when enough are visible, else all on one."""
    import torch

    resolved = _device(device)
    if resolved == "cuda" and torch.cuda.device_count() >= count > 1:
        return [f"cuda:{i}" for i in range(count)]
    return [resolved] * count
