"""The DVC pipeline for real: `dvc repro` runs the project's stages, and `dvc push` / `dvc pull`
version the dataset on an S3 remote (moto's server standing in for AWS S3 or MinIO)."""

import json
import re
import shutil

import boto3
import pytest
import yaml
from builders import TINY_PARAMS
from conftest import BIN, dvc_checkout, dvc_env, run_ok

from aot_model.data import load_dataset
from aot_model.files import file_digest

pytestmark = pytest.mark.integration


@pytest.fixture
def dvc_project(tmp_path, s3_env):
    """A git + DVC checkout holding the project's dvc.yaml, params.yaml and .dvc/config."""
    env = dvc_env(tracking="off") | s3_env
    dvc_checkout(tmp_path, env)
    bucket = "aot-diffusion"  # the project's .dvc/config names s3://aot-diffusion/dvc
    boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=bucket)
    return tmp_path, env


def test_prepare_stage_pushes_and_pulls_through_s3(dvc_project):
    root, env = dvc_project
    dvc = str(BIN / "dvc")
    run_ok([dvc, "repro", "prepare"], root, env)
    dataset = root / "data" / "dataset.npz"
    digest = file_digest(dataset)
    assert "didn't change" in run_ok([dvc, "repro", "prepare"], root, env)

    run_ok([dvc, "push", "prepare"], root, env)
    dataset.unlink()
    shutil.rmtree(root / ".dvc" / "cache")
    run_ok([dvc, "pull", "prepare"], root, env)
    assert file_digest(dataset) == digest
    assert len(load_dataset(dataset)) == 1797  # the manifest's sha256 is checked on load

    # The stage depends on its own params section only.
    params = yaml.safe_load((root / "params.yaml").read_text())
    other = {**params, "train": {**params["train"], "duration_kimg": 61}}
    (root / "params.yaml").write_text(yaml.safe_dump(other))
    assert params["train"]["duration_kimg"] != 61  # the edit really changed the train section
    assert "up to date" in run_ok([dvc, "status", "prepare"], root, env)
    own = {**params, "data": {**params["data"], "resolution": 8}}
    assert params["data"]["resolution"] != 8
    (root / "params.yaml").write_text(yaml.safe_dump(own))
    assert re.search(r"modified:\s+data\b", run_ok([dvc, "status", "prepare"], root, env))


@pytest.mark.slow
def test_whole_pipeline_reproduces_and_caches(tiny_pipeline):
    root, env = tiny_pipeline  # `dvc repro` has run there (tests/conftest.py), tracking on
    dvc = str(BIN / "dvc")
    names = {p.name for p in (root / "metrics").iterdir()}
    assert names == {f"{s}-{m}.json" for s in ("train", "sweep") for m in ("aot", "edm")} | {
        "sweep-aot-dg.json"  # the guided arm (guidance.variant aot, weight 2)
    }
    # Only the numbers people compare: score per rho (and guidance weight) and NFE, curvature,
    # loss, img/s.
    shown = run_ok([dvc, "metrics", "show"], root, env)
    header = shown.splitlines()[0].split()
    assert header == [
        "Path",
        "curvature",
        "fd_digits.heun_rho7.nfe003",
        "fd_digits.heun_rho7.nfe007",
        "fd_digits.heun_rho7_w2.nfe003",
        "fd_digits.heun_rho7_w2.nfe007",
        "img_per_sec",
        "loss",
        "straightness",
    ]
    assert (root / "report" / "report.md").is_file()

    # Every stage process joined one MLflow parent run (the .aot/mlflow-parent.json handshake).
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("aot-diffusion").experiment_id])
    parents = {r.info.run_id for r in runs if r.data.tags["aot.role"] == "pipeline"}
    steps = [r for r in runs if r.data.tags["aot.role"] == "step"]
    assert len(parents) == 1 and len(steps) == 11  # 7 + fakes ... guided_sweep
    assert {r.data.tags["mlflow.parentRunId"] for r in steps} == parents
    assert "score_vs_nfe" in run_ok([dvc, "plots", "show", "--json"], root, env)
    assert "didn't change" in run_ok([dvc, "repro", "report"], root, env)

    # A longer training budget reruns training (resuming the persisted run) and what follows it.
    longer = {**TINY_PARAMS, "train": {**TINY_PARAMS["train"], "duration_kimg": 0.768}}
    (root / "params.yaml").write_text(yaml.safe_dump(longer))
    status = run_ok([dvc, "status"], root, env)
    assert "train@aot" in status and "prepare" not in status and "reference" not in status
    ran = run_ok([dvc, "repro"], root, env)
    for stage in ("train@aot", "train@edm", "sweep@aot", "sweep@edm", "report"):
        assert f"Running stage '{stage}'" in ran, stage
    for stage in ("prepare", "reference"):
        assert f"Running stage '{stage}'" not in ran, stage
    last = (root / "runs" / "aot" / "stats.jsonl").read_text().splitlines()[-1]
    assert json.loads(last)["kimg"] == pytest.approx(0.768)  # resumed up to the new budget
    assert "didn't change" in run_ok([dvc, "repro"], root, env)
