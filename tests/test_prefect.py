"""The Prefect path for real: `aot services up` starts moto S3, MLflow and Prefect servers and a
process worker on free loopback ports, `prefect deploy --all` registers aot/train-eval, and
`prefect deployment run` runs the pipeline on tiny params; `aot services down` stops them all."""

import json
import os
import re
import subprocess
import time
from pathlib import Path

import boto3
import httpx
import pytest
import yaml
from builders import TINY_PARAMS
from conftest import BIN, ROOT, _free_port, run_ok

from aot_pipeline import services

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """All services on free ports, state in a temp folder, the deployment registered."""
    tmp = tmp_path_factory.mktemp("services")
    settings = services.Settings(
        state_dir=tmp / "state",
        s3_port=_free_port(),
        mlflow_port=_free_port(),
        prefect_port=_free_port(),
        worker_port=_free_port(),
    )
    # One thread (tests/conftest.py), as in `dvc repro`: byte-identical scores across runners.
    env = {**os.environ, **settings.client_env({})}
    env["AOT_TRACKING"] = "on"  # conftest turns it off for unit tests
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


def _deployment_run(env, params: Path, out: Path, overrides: dict) -> str:
    """`prefect deployment run aot/train-eval` (no --watch); the flow run id."""
    stdout = run_ok(
        [
            BIN / "prefect",
            "deployment",
            "run",
            "aot/train-eval",
            "--param",
            f"params={params}",
            "--param",
            f"out={out}",
            "--param",
            "device=cpu",
            "--param",
            f"overrides={json.dumps(overrides)}",
        ],
        ROOT,
        env,
    )
    return re.search(r"UUID:\s*([0-9a-f-]{36})", stdout).group(1)


def _api(settings, method, path, body=None):
    response = httpx.request(method, f"{settings.prefect_api_url}{path}", json=body, timeout=30)
    response.raise_for_status()
    return response.json()


def _wait(settings, flow_run_id, timeout=600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = _api(settings, "GET", f"/flow_runs/{flow_run_id}")
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(2)
    raise AssertionError(f"flow run {flow_run_id} still {run['state']['type']}")


def _task_states(settings, flow_run_id) -> dict[str, str]:
    body = {"flow_runs": {"id": {"any_": [flow_run_id]}}}
    runs = _api(settings, "POST", "/task_runs/filter", body)
    return {run["name"].rsplit("-", 1)[0]: run["state"]["name"] for run in runs}


def test_deployment_run_fails_then_resumes_cached_and_tracks(stack, tmp_path, request):
    settings, env, _ = stack
    params = tmp_path / "tiny.yaml"
    params.write_text(yaml.safe_dump(TINY_PARAMS))
    out = tmp_path / "out"
    checkpoints = f"s3://{settings.bucket}/checkpoints"

    # A step that fails: the flow run is Failed and says why, through the API.
    missing = tmp_path / "no-such-inception.pt"
    broken = {"score.metric": "fid", "score.inception_weights": str(missing)}
    failed = _wait(settings, _deployment_run(env, params, out, broken))
    assert failed["state"]["type"] == "FAILED"
    states = _task_states(settings, failed["id"])
    assert states["prepare"] == "Completed" and states["reference"] == "Failed", states
    assert str(missing) in failed["state"]["message"], failed["state"]

    # Fixed: the finished step is skipped (cached), the rest runs, and every UI links the other.
    fixed = {"tracking.checkpoint_url": checkpoints}
    run = _wait(settings, _deployment_run(env, params, out, fixed))
    assert run["state"]["type"] == "COMPLETED", run["state"]
    states = _task_states(settings, run["id"])
    assert states["prepare"] == "Cached", states
    ran = ("reference", "train", "sweep", "fakes", "extractor", "discriminator", "report")
    assert {states[k] for k in (*ran, "guided_sweep-aot", "publish")} == {"Completed"}, states

    body = {"flow_runs": {"id": {"any_": [run["id"]]}}}
    artifacts = {a["key"]: a for a in _api(settings, "POST", "/artifacts/filter", body)}
    assert "| NFE |" in artifacts["aot-results"]["data"]
    mlflow_link = artifacts["aot-mlflow-run"]["data"]
    parent_id = mlflow_link.rstrip(")").rsplit("/", 1)[-1]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(settings.mlflow_url)
    parent = client.get_run(parent_id)
    assert parent.data.tags["prefect.flow_run_id"] == run["id"]
    assert run["id"] in parent.data.tags["prefect.flow_run_url"]
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    assert {"train-aot", "train-edm", "sweep-aot", "sweep-edm", "report"} <= {
        c.info.run_name for c in children
    }
    assert {"fakes-aot", "extractor", "discriminator-aot", "guided_sweep-aot-dg"} <= {
        c.info.run_name for c in children
    }  # the guided arm, on by default as in `aot demo`

    s3 = boto3.client("s3", endpoint_url=settings.s3_url)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=settings.bucket)["Contents"]]
    assert any(k.startswith("checkpoints/") and k.endswith(".pt") for k in keys), keys
    assert any(k.startswith("mlflow/") for k in keys), keys

    # The same params through `dvc repro` (once per session, tests/conftest.py): byte-identical
    # scores. Asked for only now, so that another worker has built it in the meantime.
    _, _, dvc_sweeps = request.getfixturevalue("tiny_pipeline")
    for variant in ("aot", "edm", "aot-dg"):
        flow_rows = json.loads((out / "sweeps" / variant / f"{variant}_sweep.json").read_text())
        dvc_rows = json.loads((dvc_sweeps / variant / f"{variant}_sweep.json").read_text())
        assert [r["score"] for r in flow_rows] == [r["score"] for r in dvc_rows]


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
