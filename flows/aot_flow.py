"""The Prefect flows of the pipeline declared in ``aot_pipeline/pipeline.py``.

``aot`` (deployment ``train-eval``, work queue ``pipelines``) runs the shared stages (prepare,
reference, the guided arm's extractor) as its own tasks, starts one child flow run of the
per-model deployment ``aot-model/model`` (work queue ``models``) for every variant, waits for all
of them, then runs the final stages (report, study report). The ``models`` queue's concurrency
limit places the models: locally one process per core, on a GPU host one worker per GPU, on
Kubernetes one job per model (README "Scaling out"); the parent never holds a model slot.

Every task is one stage of the declaration (the same tracked step ``aot <command>`` and
``dvc repro`` run), cached by the params sections the stage reads, the content of its inputs, its
work folder and the code version: a re-run after a failure skips the finished stages and models,
and resumes an interrupted training from its checkpoint::

    prefect deployment run aot/train-eval --param params=study-digits
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.context import TaskRunContext
from prefect.deployments import run_deployment
from prefect.runtime import flow_run
from prefect.states import Cancelling

import aot_model
import aot_pipeline
from aot_model.checkpoints import STATS_FILE
from aot_model.files import file_digest
from aot_pipeline import pipeline, tracking
from aot_pipeline.cli import _device  # the CLI's --device rule
from aot_pipeline.config import ConfigError, Params, parse_params

ROOT = Path(__file__).resolve().parents[1]
IO_RETRIES = {"retries": 3, "retry_delay_seconds": [2, 10, 30]}  # backoff for downloads, S3
MODEL_DEPLOYMENT = "aot-model/model"
POLL_S = 2.0  # how often the parent looks at its children's states (one cheap API read each)


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


def stage_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """A stage task's cache key: the stage, its model and work folder, the params sections it
    reads (the same as its dvc.yaml stage), the content of its inputs, the processes of a
    training run and the code version. The device changes nothing a stage computes."""
    plan = _plan(parameters["params"], parameters["guidance"])
    stage, model, root = (
        pipeline.BY_NAME[parameters["stage"]],
        parameters["model"],
        parameters["root"],
    )
    keyed = {
        "stage": stage.name,
        "model": model,
        "root": str(Path(root).resolve()),
        "sections": pipeline.section_values(plan.params, stage, model),
        "inputs": {str(p): path_digest(p) for p in pipeline.cache_inputs(stage, plan, root, model)},
        "nproc": parameters["nproc"] if stage.name == "train" else 1,
        "code": code_version(),
    }
    text = json.dumps(keyed, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _plan(params: dict, guidance: bool) -> pipeline.Plan:
    return pipeline.plan(parse_params(params), guidance)


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


@task(cache_key_fn=stage_key, persist_result=True)
def stage_task(
    params: dict,
    stage: str,
    model: str | None,
    root: str,
    device: str,
    guidance: bool,
    nproc: int = 1,
) -> dict:
    """One stage of the declaration, the tracked step ``aot <command>`` runs. Training has no
    retries: a re-run resumes from the run's latest checkpoint instead."""
    plan, declared = _plan(params, guidance), pipeline.BY_NAME[stage]
    if declared.name != "train":
        return pipeline.run_stage(plan, declared, root, model, device)
    with _log_ticks(model, pipeline.path(root, "run", model) / STATS_FILE):
        if nproc > 1 and plan.params.variants[model].checkpoint is None:
            return _torchrun_train(plan, params, root, model, device, nproc)
        return pipeline.run_stage(plan, declared, root, model, device)


def _torchrun_train(
    plan: pipeline.Plan, params: dict, root: str, model: str, device: str, nproc: int
) -> dict:
    """`aot train` (the same tracked step) under torchrun, one process per GPU; its rank 0 joins
    this model's MLflow run through AOT_MLFLOW_PARENT_RUN_ID, which the processes inherit."""
    with tempfile.TemporaryDirectory() as tmp:
        params_file, metrics = Path(tmp) / "params.yaml", Path(tmp) / "metrics.json"
        params_file.write_text(yaml.safe_dump(params))
        command = torchrun_command(plan, root, model, nproc)
        command += [f"--params={params_file}", f"--device={device.split(':')[0]}"]
        subprocess.run([*command, f"--metrics={metrics}"], check=True)
        return json.loads(metrics.read_text())


def torchrun_command(plan: pipeline.Plan, root: str, model: str, nproc: int) -> list[str]:
    """The train stage of the declaration as ``nproc`` torchrun processes on this host (options
    given after it win: --params, --device, --metrics)."""
    _, *argv = pipeline.command(pipeline.BY_NAME["train"], plan, root, model)
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", "-m", "aot_pipeline.cli", *argv,
    ]  # fmt: skip


def _run(stage: pipeline.Stage, params: dict, model: str | None, root: str, device: str,
         guidance: bool, nproc: int = 1) -> dict:  # fmt: skip
    """The stage as a task named after it (and its model), retried where it does I/O."""
    options: dict[str, Any] = {"name": stage.name}
    if model is not None:
        options["task_run_name"] = f"{stage.name}-{model}"
    if stage.io_retries:
        options |= IO_RETRIES
    task_ = stage_task.with_options(**options)
    return task_(params, stage.name, model, root, device, guidance, nproc)


@task(name="publish", **IO_RETRIES)
def publish_task(table: str, mlflow_run: str | None) -> None:
    """Prefect artifacts: the results table (score per NFE for each model) and the MLflow run."""
    create_markdown_artifact(table, key="aot-results", description="score per NFE")
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
    model_deployment: str = MODEL_DEPLOYMENT,
    gpu_job_variable: str | None = None,
) -> dict:
    """prepare -> reference (-> extractor) -> one child flow run per model (train -> sweep
    [-> fakes -> discriminator -> guided sweep]) -> report (-> study report).

    ``params``: a params file, or a profile name from configs/; ``overrides``: dotted keys, e.g.
    ``{"train.duration_kimg": 30}``; ``out``: the work folder (the layout of
    aot_pipeline/pipeline.py); ``device``: auto, cpu or cuda (resolved where each run runs);
    ``nproc``: processes (GPUs) per training run, through torchrun; ``guidance``: add the
    discriminator-guided arm when the params have a ``guidance`` section;
    ``model_deployment``: the per-model deployment (``aot-model/model-k8s``, ...);
    ``gpu_job_variable``: the job variable of that deployment set to ``nproc`` for each model
    (deploy/kubernetes.prefect.yaml: ``gpus``, its GPU request).
    Everything is validated before the first task runs. The flow run is one MLflow parent run,
    tagged with the flow run's id and URL; each model's run nests under it.
    """
    p = resolve_params(params, overrides)
    if nproc < 1:
        raise ConfigError(f"nproc must be >= 1, got {nproc}")
    plan = pipeline.plan(p, guidance)
    raw = p.model_dump(mode="json", exclude_unset=True)  # keeps which sections the file set
    local = _device(device)
    logger = get_run_logger()
    logger.info("params %s, overrides %s, %d models", params, overrides or {}, len(plan.models))
    tags = {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_url": flow_run.ui_url or ""}
    with tracking.pipeline_run("prefect-aot", tags=tags) as run_id:
        for stage in pipeline.shared_stages(plan):
            _run(stage, raw, None, out, local, guidance)
        children = {
            "params": raw, "out": out, "device": device, "nproc": nproc, "guidance": guidance,
            "mlflow_parent": run_id,
        }  # fmt: skip
        gpus = {gpu_job_variable: nproc} if gpu_job_variable else None
        run_models(plan, model_deployment, children, Path(params).stem, gpus)
        results = {
            s.name: _run(s, raw, None, out, local, guidance) for s in pipeline.final_stages(plan)
        }
        publish_task(results["report"]["table"], _mlflow_run_url(run_id))
    print(results["report"]["table"])
    return {name: {k: v for k, v in r.items() if k != "table"} for name, r in results.items()}


def run_models(
    plan: pipeline.Plan,
    deployment: str,
    parameters: dict,
    profile: str,
    job_variables: dict | None = None,
) -> None:
    """One child flow run of ``deployment`` per model, all submitted at once (the work queue's
    limit decides how many run); waits without a time limit. A crashed child (its process
    killed) is submitted once more and resumes from its checkpoint; any other end but Completed
    fails this flow run with one line per model naming its state and message."""
    logger = get_run_logger()

    def submit(model: str):
        tags = [f"profile:{profile}"] + [f"{k.removeprefix('aot.')}:{v}" for k, v in
                                         pipeline.model_tags(plan, model).items()]  # fmt: skip
        child = run_deployment(
            deployment, parameters={**parameters, "model": model}, flow_run_name=model,
            tags=tags, timeout=0, job_variables=job_variables,
        )  # fmt: skip
        logger.info("model %s: flow run %s", model, child.id)
        return child.id

    pending = {model: submit(model) for model in plan.models}
    retried, failed = set(), []
    with get_client(sync_client=True) as client, _cancel_on_exit(client, pending):
        while pending:
            time.sleep(POLL_S)
            for model, child in list(pending.items()):
                state = client.read_flow_run(child).state
                if state is None or not state.is_final():
                    continue
                del pending[model]
                if state.is_crashed() and model not in retried:
                    logger.warning("model %s crashed (%s); submitting it once more", model,
                                   state.message)  # fmt: skip
                    retried.add(model)
                    pending[model] = submit(model)
                elif not state.is_completed():
                    failed.append(f"model {model}: {state.name}: {state.message}")
    if failed:
        raise RuntimeError("; ".join(failed))


@contextlib.contextmanager
def _cancel_on_exit(client, pending: dict):
    """Cancels the children still in ``pending`` when the parent stops waiting for them
    (cancelled: the worker's SIGTERM lands here; or any error). Prefect's server cancels the
    children of a cancelled parent too, but on a cleanup loop that a child can outrun. The
    worker that holds each child kills its process."""
    try:
        yield
    except BaseException:
        for child in pending.values():
            with contextlib.suppress(Exception):  # one unreachable child must not hide the rest
                message = "The parent flow run stopped waiting for it."
                client.set_flow_run_state(child, Cancelling(message=message), force=True)
        raise


@flow(name="aot-model", log_prints=True)
def model_flow(
    params: dict,
    model: str,
    out: str = "demo",
    device: str = "auto",
    nproc: int = 1,
    guidance: bool = True,
    mlflow_parent: str | None = None,
) -> dict:
    """One model's branch of the pipeline (train -> sweep [-> fakes -> discriminator -> guided
    sweep]), started by the flow ``aot`` as a child run; ``params`` are the parent's resolved
    params, ``mlflow_parent`` its MLflow run (the model's run nests under it)."""
    plan = _plan(params, guidance)
    if model not in plan.models:
        raise ConfigError(f"model must be one of {plan.models}, got {model!r}")
    device = _device(device)
    if mlflow_parent:
        os.environ[tracking.PARENT_ENV] = mlflow_parent
    with tracking.model_run(model, pipeline.model_tags(plan, model)):
        return {
            stage.name: _run(stage, params, model, out, device, guidance, nproc)
            for stage in pipeline.model_stages(plan, model)
        }


def _mlflow_run_url(run_id: str | None) -> str | None:
    """The MLflow UI page of a run when the tracking store is a server; None otherwise."""
    uri = tracking.tracking_uri()
    if run_id is None or not uri.startswith("http"):
        return None
    run = tracking.client().get_run(run_id)
    return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
