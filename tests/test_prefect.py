"""The Prefect path for real: `aot services up --worker` starts moto S3, MLflow and Prefect servers
and a process worker on free loopback ports with the model queue limited to 2, `prefect deploy
--all` registers aot/train-eval and aot-model/model, and `prefect deployment run` runs a tiny
study (2 arms x 2 seeds) whose models fan out as child flow runs; `aot services down` stops all."""

import json
import os
import re
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path

import boto3
import httpx
import pytest
import torch
import yaml
from builders import TINY_PARAMS
from conftest import BIN, ROOT, _free_port, dvc_env, run_ok

from aot_model.checkpoints import find_checkpoints
from aot_pipeline import outbox, pipeline, services

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("prefect")]
SLOTS = 2
# A study of 2 arms x 2 training seeds on TINY_PARAMS, without the guided arm.
STUDY = {k: v for k, v in TINY_PARAMS.items() if k != "guidance"} | {
    "variants": {
        f"u-{arm}-s{seed}": {"aot": arm == "aot", "arm": arm, "seed": seed}
        for arm in ("edm", "aot")
        for seed in (0, 1)
    }
}
# One model that trains long enough (10 checkpoints) to be killed after its first checkpoint.
KILLED = {k: v for k, v in TINY_PARAMS.items() if k != "guidance"} | {
    "train": {**TINY_PARAMS["train"], "duration_kimg": 2.56},
    "variants": {"edm": {"aot": False}},
}
# One that trains long enough to be cancelled in the middle.
LONG = KILLED | {"train": {**KILLED["train"], "duration_kimg": 6.4}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """All services on free ports, state in a temp folder, both deployments registered."""
    tmp = tmp_path_factory.mktemp("services")
    settings = services.Settings(
        state_dir=tmp / "state",
        s3_port=_free_port(),
        mlflow_port=_free_port(),
        prefect_port=_free_port(),
        worker_port=_free_port(),
        model_slots=SLOTS,
    )
    # One thread (tests/conftest.py), as in `dvc repro`: byte-identical scores across runners.
    env = {**os.environ, **settings.client_env({})}
    env["AOT_TRACKING"] = "on"  # conftest turns it off for unit tests
    # Flow runs work in the checkout (prefect.yaml's pull step): keep their outbox out of it.
    env[outbox.STATE_ENV] = str(tmp / "aot-state")
    # The server cancels the children of a cancelled flow run every 2 s (default 20).
    env["PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_LOOP_SECONDS"] = "2"
    saved = dict(os.environ)
    os.environ.update(env)  # the worker (and the flow runs it starts) inherit this
    try:
        services.up(settings, services.SERVICE_NAMES)
        run_ok([BIN / "prefect", "--no-prompt", "deploy", "--all"], ROOT, env)
        yield settings, env, tmp
    finally:
        services.down(settings)
        os.environ.clear()
        os.environ.update(saved)
    assert not any(services.status(settings)[name]["healthy"] for name in services.SERVICE_NAMES)


def _start(env, params: dict, folder: Path, **overrides) -> str:
    """`prefect deployment run aot/train-eval` (no --watch) of ``params``; the flow run id."""
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    args = [BIN / "prefect", "deployment", "run", "aot/train-eval", "--param", f"params={path}"]
    args += ["--param", f"out={folder / 'out'}", "--param", "device=cpu"]
    args += ["--param", f"overrides={json.dumps(overrides)}"]
    return re.search(r"UUID:\s*([0-9a-f-]{36})", run_ok(args, ROOT, env)).group(1)


def _api(settings, method, path, body=None):
    response = httpx.request(method, f"{settings.prefect_api_url}{path}", json=body, timeout=30)
    response.raise_for_status()
    return response.json()


def _wait(
    settings, flow_run_id, timeout=600, until=("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = _api(settings, "GET", f"/flow_runs/{flow_run_id}")
        if run["state"]["type"] in until:
            return run
        time.sleep(1)
    raise AssertionError(f"flow run {flow_run_id} still {run['state']['type']}")


def _children(settings, parent_id) -> list[dict]:
    """The flow runs started by ``parent_id`` (linked through a task run of the parent)."""
    tasks = _api(
        settings, "POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [parent_id]}}}
    )
    ids = [t["id"] for t in tasks]
    body = {"flow_runs": {"parent_task_run_id": {"any_": ids}}}
    return _api(settings, "POST", "/flow_runs/filter", body)


def _task_states(settings, flow_run_id) -> dict[str, str]:
    """{task run name: state name}, without the suffix Prefect gives unnamed runs (-a3f)."""
    body = {"flow_runs": {"id": {"any_": [flow_run_id]}}}
    runs = _api(settings, "POST", "/task_runs/filter", body)
    return {re.sub(r"-[0-9a-f]{3}$", "", run["name"]): run["state"]["name"] for run in runs}


def _most_at_once(runs: list[dict]) -> int:
    """The most runs whose [start, end] intervals overlap at one moment."""
    events = []
    for run in runs:
        events += [(datetime.fromisoformat(run["start_time"]), 1)]
        events += [(datetime.fromisoformat(run["end_time"]), -1)]
    running = most = 0
    for _, step in sorted(events):  # an end sorts before a start at the same instant
        running += step
        most = max(most, running)
    return most


def test_study_fans_out_fails_resumes_and_matches_dvc(stack, tmp_path):
    settings, env, _ = stack
    folder, out = tmp_path / "flow", tmp_path / "flow" / "out"
    folder.mkdir()

    # One model cannot write its run folder: its child fails, the others complete, and the
    # parent fails naming that model.
    blocked = pipeline.path(out, "run", "u-edm-s1")
    blocked.parent.mkdir(parents=True)
    blocked.write_text("not a folder")
    failed = _wait(settings, _start(env, STUDY, folder))
    assert failed["state"]["type"] == "FAILED"
    assert "model u-edm-s1: Failed" in failed["state"]["message"], failed["state"]
    first = {c["name"]: c for c in _children(settings, failed["id"])}
    assert {n: c["state"]["type"] for n, c in first.items()} == {
        "u-edm-s0": "COMPLETED", "u-edm-s1": "FAILED", "u-aot-s0": "COMPLETED",
        "u-aot-s1": "COMPLETED",
    }  # fmt: skip
    assert set(first["u-aot-s1"]["tags"]) == {
        "profile:params", "arm:aot", "seed:1", "cond:false", "budget_kimg:0.512",
    }  # fmt: skip

    # Fixed: the finished models are cached, the failed one runs, then the report and the page.
    blocked.unlink()
    checkpoints = f"s3://{settings.bucket}/checkpoints"
    run = _wait(settings, _start(env, STUDY, folder, **{"tracking.checkpoint_url": checkpoints}))
    assert run["state"]["type"] == "COMPLETED", run["state"]
    second = {c["name"]: c for c in _children(settings, run["id"])}
    assert {c["state"]["type"] for c in second.values()} == {"COMPLETED"}
    assert _task_states(settings, second["u-edm-s0"]["id"]) == {
        "train-u-edm-s0": "Cached", "sweep-u-edm-s0": "Cached",
    }  # fmt: skip
    assert _task_states(settings, second["u-edm-s1"]["id"]) == {
        "train-u-edm-s1": "Completed", "sweep-u-edm-s1": "Completed",
    }  # fmt: skip
    states = _task_states(settings, run["id"])
    assert states["prepare"] == states["reference"] == "Cached", states
    assert states["report"] == states["study_report"] == "Completed", states
    assert _most_at_once([*first.values(), *second.values()]) == SLOTS  # the queue's limit

    # MLflow: the flow's parent run, one run per model tagged for grouping, steps under it.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(settings.mlflow_url)
    body = {"flow_runs": {"id": {"any_": [run["id"]]}}}
    artifacts = {a["key"]: a for a in _api(settings, "POST", "/artifacts/filter", body)}
    assert "| NFE |" in artifacts["aot-results"]["data"]
    parent_id = artifacts["aot-mlflow-run"]["data"].rstrip(")").rsplit("/", 1)[-1]
    parent = client.get_run(parent_id)
    assert parent.data.tags["prefect.flow_run_id"] == run["id"]
    experiment = parent.info.experiment_id
    models = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_id}'")
    model = next(m for m in models if m.info.run_name == "u-edm-s1")
    assert {k: model.data.tags[k] for k in ("aot.arm", "aot.seed", "aot.cond")} == {
        "aot.arm": "edm", "aot.seed": "1", "aot.cond": "false",
    }  # fmt: skip
    steps = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{model.info.run_id}'")
    assert {s.info.run_name for s in steps} == {"train-u-edm-s1", "sweep-u-edm-s1"}
    s3 = boto3.client("s3", endpoint_url=settings.s3_url)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=settings.bucket)["Contents"]]
    assert any(k.startswith("checkpoints/") and k.endswith(".pt") for k in keys), keys

    # The same profile through `dvc repro`: the same report and study page, byte for byte.
    project = tmp_path / "dvc"
    project.mkdir()
    denv = dvc_env(tracking="off")
    run_ok(["git", "init", "-q"], project, denv)
    run_ok([BIN / "dvc", "init", "-q"], project, denv)
    (project / "params.yaml").write_text(yaml.safe_dump(STUDY))
    run_ok([BIN / "aot", "pipeline", "dvc-yaml"], project, denv)
    run_ok([BIN / "dvc", "repro"], project, denv, timeout=900)
    for key in ("report", "study_page"):
        page = "report.md" if key == "report" else ""
        flow_file = pipeline.path(out, key) / page
        dvc_file = pipeline.path(project, key) / page
        assert flow_file.read_bytes() == dvc_file.read_bytes(), key


def _pid(flow_run: dict) -> int:
    """The process of a flow run the process worker started ("host:pid")."""
    return int(flow_run["infrastructure_pid"].rsplit(":", 1)[-1])


def _running_child(settings, parent_id, ready=lambda child: True, timeout=300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in _children(settings, parent_id):
            if child["state"]["type"] == "RUNNING" and child["infrastructure_pid"] and ready(child):
                return child
        time.sleep(0.5)
    raise AssertionError("no child flow run started")


def test_killed_child_is_resubmitted_and_resumes_to_the_same_weights(stack, tmp_path):
    settings, env, _ = stack
    folder = tmp_path / "flow"
    folder.mkdir()
    run_dir = pipeline.path(folder / "out", "run", "edm")
    parent = _start(env, KILLED, folder)
    child = _running_child(settings, parent, ready=lambda c: find_checkpoints(run_dir))
    os.kill(_pid(child), signal.SIGKILL)
    run = _wait(settings, parent)
    assert run["state"]["type"] == "COMPLETED", run["state"]
    children = sorted(_children(settings, parent), key=lambda c: c["start_time"])
    assert [c["state"]["type"] for c in children] == ["CRASHED", "COMPLETED"]

    # The same model trained without interruption by the plain command, one torch thread.
    params = folder / "params.yaml"
    plain = tmp_path / "plain"
    dataset = pipeline.path(folder / "out", "dataset")
    run_ok(
        [BIN / "aot", "train", "--params", params, "--variant", "edm", "--data", dataset,
         "--run-dir", plain, "--device", "cpu"],
        tmp_path, dvc_env(tracking="off"),
    )  # fmt: skip
    resumed = torch.load(find_checkpoints(run_dir)[-1], weights_only=True)
    whole = torch.load(find_checkpoints(plain)[-1], weights_only=True)
    for key in ("net", "ema"):
        assert resumed[key].keys() == whole[key].keys()
        assert all(torch.equal(resumed[key][k], whole[key][k]) for k in whole[key]), key


def test_cancelled_parent_leaves_no_child_running(stack, tmp_path):
    settings, env, _ = stack
    folder = tmp_path / "flow"
    folder.mkdir()
    parent = _start(env, LONG, folder)
    child = _running_child(settings, parent)
    state = {"state": {"type": "CANCELLING"}, "force": True}
    _api(settings, "POST", f"/flow_runs/{parent}/set_state", state)
    assert _wait(settings, parent)["state"]["type"] == "CANCELLED"
    assert _wait(settings, child["id"], timeout=120)["state"]["type"] == "CANCELLED"
    deadline = time.monotonic() + 30
    while _alive(_pid(child)):
        assert time.monotonic() < deadline, "the child's process still runs"
        time.sleep(0.5)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return status.exists() and "zombie" not in status.read_text()


def test_services_reuse_and_stop_only_their_own(tmp_path, monkeypatch):
    """A second `up` reuses what runs; `down` leaves alone a server `up` did not start."""
    for var in services.ENDPOINT_ENV.values():  # the stack above exports its endpoints
        monkeypatch.delenv(var, raising=False)
    settings = services.Settings(state_dir=tmp_path, s3_port=_free_port())
    lines = []
    services.up(settings, ("s3",), say=lines.append)
    services.up(settings, ("s3",), say=lines.append)
    assert "started" in lines[0] and "already running" in lines[1]
    pid = services.status(settings)["s3"]["pid"]
    services.down(settings)
    assert not services.status(settings)["s3"]["healthy"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)

    foreign = subprocess.Popen(
        [BIN / "moto_server", "-H", "127.0.0.1", "-p", str(settings.s3_port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while not services.healthy(services.SERVICES[0].health_url(settings)):
            assert foreign.poll() is None
            time.sleep(0.2)
        services.up(settings, ("s3",), say=lines.append)
        assert "left alone" in lines[-1]
        services.down(settings)
        assert foreign.poll() is None and services.status(settings)["s3"]["healthy"]
    finally:
        foreign.terminate()
        foreign.wait(timeout=10)


def _job_variables(file: str, deployment: str) -> dict:
    spec = yaml.safe_load((ROOT / "deploy" / file).read_text())
    chosen = next(d for d in spec["deployments"] if d["name"] == deployment)
    return chosen["work_pool"]["job_variables"]


def test_gpu_job_templates_render_with_nproc_gpus(stack):
    """The model deployments' job variables through the Docker and Kubernetes workers' own job
    configurations, with what the parent passes (k8s: gpus = nproc)."""
    import asyncio

    from prefect_docker.worker import DockerWorker, DockerWorkerJobConfiguration
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads((ROOT / "deploy" / "kubernetes-job-template.json").read_text())
    parent = yaml.safe_load((ROOT / "deploy" / "kubernetes.prefect.yaml").read_text())
    gpu_variable = parent["deployments"][0]["parameters"]["gpu_job_variable"]
    values = _job_variables("kubernetes.prefect.yaml", "model-k8s") | {gpu_variable: 4}
    values["image"] = "registry.example.com/aot-diffusion:0.1.0"  # "{{ $AOT_IMAGE }}" at deploy
    k8s = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(template, values))
    container = k8s.job_manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 4
    assert container["image"] == values["image"]

    values = _job_variables("docker.prefect.yaml", "model-docker")
    values["image"] = "registry.example.com/aot-diffusion:0.1.0"
    default = DockerWorker.get_default_base_job_template()
    docker = asyncio.run(DockerWorkerJobConfiguration.from_template_and_values(default, values))
    (request,) = docker.container_create_kwargs["device_requests"]
    assert request["Count"] == -1 and request["Capabilities"] == [["gpu"]]


def test_evaluate_only_profile_through_the_flow(stack, tmp_path):
    """configs/cifar10-uncond-pretrained.yaml with fixture snapshots standing in for the released
    files: each model's train stage imports its checkpoint; the report equals `aot demo`'s."""
    from test_edm_import import _stand_in_profile

    settings, env, _ = stack
    folder = tmp_path / "flow"
    folder.mkdir()
    raw = _stand_in_profile("cifar10-uncond-pretrained", tmp_path)
    run = _wait(settings, _start(env, raw, folder))
    assert run["state"]["type"] == "COMPLETED", run["state"]
    children = {c["name"]: c for c in _children(settings, run["id"])}
    assert {n: c["state"]["type"] for n, c in children.items()} == {
        "edm": "COMPLETED", "edm-aot": "COMPLETED",
    }  # fmt: skip
    demo = tmp_path / "demo"
    run_ok([BIN / "aot", "demo", "--params", folder / "params.yaml", "--out", demo,
            "--device", "cpu"], tmp_path, dvc_env(tracking="off"))  # fmt: skip
    flow_report = pipeline.path(folder / "out", "report") / "report.md"
    assert flow_report.read_bytes() == (pipeline.path(demo, "report") / "report.md").read_bytes()
