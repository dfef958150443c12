"""Tests of aot_pipeline/tracked.py, the pipeline's steps run with tracking, against real
servers: an `mlflow server` whose artifacts go to an S3 bucket on moto's server, both started here
on free loopback ports. A tiny `aot demo` must leave the run tree, params, metric histories,
pictures, checkpoints and registered models a user would look at; an S3 outage mid-training must
lose nothing once `aot sync` has run; no credential may leak. The guided sweep's run (in an
embedded store) has a score series per guidance weight."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
import numpy as np
import pandas as pd
import pytest
import yaml
from builders import TINY_PARAMS
from conftest import _free_port
from edm_fixtures import tiny_network, write_snapshot
from typer.testing import CliRunner

from aot_pipeline import dvc_metrics, outbox, storage, tracked, tracking
from aot_pipeline.cli import app
from aot_pipeline.config import parse_params

BIN = Path(sys.executable).parent
# Under pytest-xdist the whole module runs on one worker, which starts its servers once.
pytestmark = pytest.mark.xdist_group("tracking")
SECRET = "Zq7-not-a-real-secret-4d1f"  # must never appear in MLflow, logs or artifacts
CHECKPOINTS = "s3://checkpoints/aot"


def _wait(url: str, proc: subprocess.Popen, what: str, seconds: float = 300) -> None:
    """Until ``url`` answers (generous: a loaded 2-core machine starts `mlflow server` slowly)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=1)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                state = "exited" if proc.poll() is not None else "still starting"
                raise RuntimeError(f"{what} did not answer {url} ({state})") from None
            time.sleep(0.3)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class Moto:
    """moto's S3 server on a fixed loopback port, so it can be killed and started again."""

    def __init__(self, env: dict):
        self.port, self.env, self.proc = _free_port(), env, None
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)]
        self.proc = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        _wait(f"{self.endpoint}/moto-api/", self.proc, "moto_server")
        s3 = boto3.client("s3", endpoint_url=self.endpoint)
        for bucket in ("mlflow", "checkpoints"):  # moto keeps nothing across restarts
            s3.create_bucket(Bucket=bucket)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """moto (S3) and `mlflow server --artifacts-destination s3://mlflow/artifacts` on loopback."""
    root = tmp_path_factory.mktemp("servers")
    saved = dict(os.environ)
    aws = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    os.environ.update(aws)
    moto = Moto(aws)
    moto.start()
    port = _free_port()
    env = {
        **os.environ,
        "MLFLOW_S3_ENDPOINT_URL": moto.endpoint,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    log = open(root / "mlflow-server.log", "w")  # noqa: SIM115 (closed below)
    server = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}",
            "--artifacts-destination",
            "s3://mlflow/artifacts",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait(f"http://127.0.0.1:{port}/health", server, "mlflow server")
        yield {
            "uri": f"http://127.0.0.1:{port}",
            "moto": moto,
            "db": root / "mlflow.db",
            "log": root / "mlflow-server.log",
        }
    finally:
        _stop(server)
        log.close()
        _stop(moto.proc)
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def tracked_env(servers, tmp_path, monkeypatch):
    """Tracking on, against the server; outbox and working files in tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AOT_TRACKING", "on")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", servers["uri"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", servers["moto"].endpoint)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"test-{tmp_path.name}")
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    params = {**TINY_PARAMS, "tracking": {"checkpoint_url": CHECKPOINTS}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return servers


def _runs(client):
    experiment = client.get_experiment_by_name(os.environ["MLFLOW_EXPERIMENT_NAME"])
    runs = client.search_runs([experiment.experiment_id])
    return {run.info.run_name: run for run in runs}


@pytest.mark.slow
@pytest.mark.integration
def test_demo_run_tree_metrics_artifacts_registry_and_bucket(tracked_env, tmp_path):
    import mlflow

    result = CliRunner().invoke(app, ["demo", "--out", "demo", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    client = tracking.client()
    runs = _runs(client)
    steps = {"prepare", "reference", "train-aot", "train-edm", "sweep-aot", "sweep-edm", "report"}
    steps |= {"fakes-aot", "extractor", "discriminator-aot", "guided_sweep-aot-dg"}  # DG arm
    assert set(runs) == steps | {"demo", "aot", "edm"}  # the pipeline, its models, their steps
    parent = runs["demo"].info.run_id
    model_of = {"aot": "aot", "edm": "edm", "fakes-aot": "aot", "discriminator-aot": "aot"}
    model_of |= {"guided_sweep-aot-dg": "aot"}
    for name in steps:
        model = model_of.get(name, name.partition("-")[2] if "-" in name else None)
        expected = runs[model].info.run_id if model else parent
        assert runs[name].data.tags["mlflow.parentRunId"] == expected, name
    for model in ("aot", "edm"):
        tags = runs[model].data.tags
        assert tags["mlflow.parentRunId"] == parent and tags["aot.role"] == "model"
        assert (tags["aot.arm"], tags["aot.seed"], tags["aot.cond"]) == (model, "0", "false")
    assert all(run.info.status == "FINISHED" for run in runs.values())

    train = runs["train-aot"]
    params = train.data.params
    assert params["train.aot.pool_size"] == "128" and params["variant.aot"] == "True"
    assert params["network.channel_mult"] == "[1, 2]"
    manifest = json.loads((tmp_path / "demo/data/dataset.json").read_text())
    assert params["dataset_sha256"] == manifest["sha256"]
    assert {"git_commit", "git_dirty", "device", "version.torch"} <= set(params)
    # 0.512 kimg in ticks of 0.256 kimg: steps are images seen (tagged), one point per tick.
    assert train.data.tags["aot.metric_step"] == "nimg"
    for key in ("loss", "lr", "img_per_sec", "sec_per_kimg", "matched_distance", "pairing_sec"):
        history = client.get_metric_history(train.info.run_id, key)
        assert [m.step for m in history] == [256, 512], key
    stats = [json.loads(line) for line in (tmp_path / "demo/runs/aot/stats.jsonl").open()]
    losses = [m.value for m in client.get_metric_history(train.info.run_id, "loss")]
    assert losses == pytest.approx([s["loss"] for s in stats])

    sweep = runs["sweep-edm"]
    series = client.get_metric_history(sweep.info.run_id, "fd_digits_heun_rho7")
    rows = json.loads((tmp_path / "demo/sweeps/edm/edm_sweep.json").read_text())
    assert sorted((m.step, m.value) for m in series) == sorted((r["nfe"], r["score"]) for r in rows)
    assert {"curvature_mean", "straightness_mean", "best_score", "best_nfe"} <= set(
        sweep.data.metrics
    )
    ref = json.loads((tmp_path / "demo/data/reference/reference.json").read_text())
    assert sweep.data.params["reference_stats_sha256"] == ref["reference_stats_sha256"]

    def names(run, path=None):
        return {Path(a.path).name for a in client.list_artifacts(run.info.run_id, path)}

    grids = {Path(r["grid"]).name for r in rows}
    assert len(grids) == 2 and grids == names(sweep, "samples")
    assert names(sweep, "plots") == {"fd_digits_vs_nfe_edm.png"}
    assert {"report.md", "summary.json", "curvature_vs_sigma.png"} <= names(
        runs["report"], "report"
    )
    assert "params.yaml" in names(train) and "stats.jsonl" in names(train)

    # The guided arm: discriminator curves per epoch, guided score series at step = NFE.
    disc = runs["discriminator-aot"]
    for key in ("loss", "accuracy", "heldout_loss", "heldout_accuracy", "select_fd_digits"):
        assert [m.step for m in client.get_metric_history(disc.info.run_id, key)] == [1, 2], key
    chosen = disc.data.metrics["chosen_epoch"]
    assert chosen in (1, 2)
    held = {
        m.step: m.value for m in client.get_metric_history(disc.info.run_id, "heldout_accuracy")
    }
    assert disc.data.metrics["chosen_heldout_accuracy"] == held[chosen]
    assert names(disc, "plots") == {"discriminator_curves.png"}
    guided = runs["guided_sweep-aot-dg"]
    rows = json.loads((tmp_path / "demo/sweeps/aot-dg/aot-dg_sweep.json").read_text())
    series = client.get_metric_history(guided.info.run_id, "fd_digits_heun_rho7_w2")
    assert sorted((m.step, m.value) for m in series) == sorted((r["nfe"], r["score"]) for r in rows)
    assert {Path(r["grid"]).name for r in rows} == names(guided, "samples")
    assert runs["report"].data.metrics["aot-dg_w2.best_score"] == min(r["score"] for r in rows)
    assert any(n.startswith("training-state-") for n in names(train, "model/artifacts"))

    # The registry: one version per variant, tagged with its score; champion alias set.
    name = f"aot-{manifest['name']}-aot"
    version = client.get_model_version_by_alias(name, "champion")
    assert version.tags["metric"] == "fd_digits" and version.tags["variant"] == "aot"
    best = runs["sweep-aot"].data.metrics["best_score"]
    assert float(version.tags["best_score"]) == pytest.approx(best, rel=1e-5)
    mlflow.set_tracking_uri(tracking.tracking_uri())
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version.version}")
    images = model.predict(pd.DataFrame({"seed": [5, 6, 7]}), params={"num_steps": 4})
    assert images.shape == (3, 1, 8, 8) and images.dtype == np.uint8
    again = model.predict(pd.DataFrame({"seed": [7]}), params={"num_steps": 4})
    np.testing.assert_array_equal(again[0], images[2])
    assert not np.array_equal(images[0], images[1])

    # Checkpoint copies: every kept checkpoint is in the bucket with matching checksums.
    s3 = storage.s3_client()
    for variant in ("aot", "edm"):
        run_id = runs[f"train-{variant}"].info.run_id
        for path in sorted((tmp_path / f"demo/runs/{variant}").glob("training-state-*.pt")):
            bucket, key = storage.split_s3_url(f"{CHECKPOINTS}/{run_id}/{path.name}")
            head = s3.head_object(Bucket=bucket, Key=key)
            assert head["ETag"].strip('"') == storage.multipart_etag(path)
            assert head["Metadata"]["sha256"] == tracked.file_digest(path)
    assert outbox.pending() == []

    # No credential anywhere: the database, the server log, the command output.
    database = tracked_env["db"].read_bytes()
    assert b"train.aot.pool_size" in database  # the search below looks in the right place
    for blob in (database, tracked_env["log"].read_bytes(), result.output.encode()):
        assert SECRET.encode() not in blob


@pytest.mark.slow
@pytest.mark.integration
def test_s3_outage_during_training_loses_nothing_after_sync(tracked_env, tmp_path, monkeypatch):
    moto = tracked_env["moto"]
    monkeypatch.setattr(outbox, "RETRY_DELAYS", (0.1, 0.2))
    monkeypatch.setattr(outbox.Uploader.__init__, "__defaults__", ((0.1, 0.2),))
    p = parse_params({**TINY_PARAMS, "tracking": {"checkpoint_url": CHECKPOINTS}})
    tracked.prepare(p, "data/dataset.npz", downloads="data/downloads")
    plain_train = tracked.steps.train

    def train_with_outage(*args, callback, **kwargs):
        def kill_then_forward(metrics):
            if moto.proc.poll() is None:
                moto.kill()  # S3 goes away after the first tick, before any checkpoint
            callback(metrics)

        return plain_train(*args, callback=kill_then_forward, **kwargs)

    monkeypatch.setattr(tracked.steps, "train", train_with_outage)
    with tracking.pipeline_run("outage"):
        result = tracked.train(p, "aot", "data/dataset.npz", "run", device="cpu")
    assert result["kimg"] == pytest.approx(0.512)  # training finished
    kept = sorted(Path("run").glob("training-state-*.pt"))
    owed = [json.loads(path.read_text()) for path in outbox.pending()]
    assert {item["kind"] for item in owed} >= {"s3", "artifact"}

    moto.start()  # S3 is back (empty: moto keeps nothing)
    done = CliRunner().invoke(app, ["sync"])
    assert done.exit_code == 0, done.output
    assert outbox.pending() == []
    run_id = _runs(tracking.client())["train-aot"].info.run_id
    s3 = storage.s3_client()
    for path in kept:
        bucket, key = storage.split_s3_url(f"{CHECKPOINTS}/{run_id}/{path.name}")
        head = s3.head_object(Bucket=bucket, Key=key)
        assert head["ETag"].strip('"') == storage.multipart_etag(path)
    listed = {a.path for a in tracking.client().list_artifacts(run_id)}
    assert {"model", "params.yaml", "stats.jsonl"} <= listed


def test_guided_sweep_run_has_a_series_per_weight(tmp_path, monkeypatch):
    """The guided sweep's run: one score series per (solver, rho, weight) at step = NFE, the
    discriminator calls beside it; its dvc metrics have the same series and no curvature."""
    from aot_model.plots import save_image_grid

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AOT_TRACKING", "on")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    monkeypatch.setenv(outbox.STATE_ENV, str(tmp_path / ".aot"))
    rows = [
        {"solver": "heun", "rho": 7.0, "num_steps": steps, "nfe": 2 * steps - 1,
         "guidance_weight": weight, "disc_calls": steps - 1, "img_per_s": 10.0 * weight,
         "score": steps + weight}
        for steps in (2, 4) for weight in (1.0, 2.5)
    ]  # fmt: skip
    checkpoint, disc = tmp_path / "training-state-000000.pt", tmp_path / "disc"
    checkpoint.write_bytes(b"weights")
    disc.mkdir()
    (disc / "discriminator.pt").write_bytes(b"head")
    (tmp_path / "reference.json").write_text('{"reference_stats_sha256": "abc"}')

    def guided_sweep(*args, name, device):  # stands in for sampling: the table it writes
        out = Path(args[7])
        out.mkdir()
        (out / f"{name}_sweep.json").write_text(json.dumps(rows))
        (out / f"{name}_sweep.csv").write_text("nfe,score\n")
        save_image_grid(np.zeros((4, 1, 8, 8), np.uint8), out / f"{name}_heun_s2_rho7_w1.png")
        best = {"best_score": 3.0, "best_nfe": 3, "best_point": "heun steps=2 rho=7 w=1"}
        return {"model": name, "checkpoint": str(checkpoint), "metric": "fd_x", **best}

    monkeypatch.setattr(tracked.steps, "guided_sweep", guided_sweep)
    p = parse_params(TINY_PARAMS)
    out = tmp_path / "sweep"
    result = tracked.guided_sweep(p, "aot-dg", "runs", tmp_path, "e.pt", disc, out, device="cpu")
    client = tracking.client()
    (run,) = client.search_runs([tracking.experiment_id(client)])
    assert run.info.run_name == "guided_sweep-aot-dg" and run.info.status == "FINISHED"
    run_id = run.info.run_id
    for weight, tail in ((1.0, "w1"), (2.5, "w2.5")):
        mine = [r for r in rows if r["guidance_weight"] == weight]
        for key, field in (
            (f"fd_x_heun_rho7_{tail}", "score"),
            (f"disc_calls_heun_{tail}", "disc_calls"),
        ):
            history = client.get_metric_history(run_id, key)
            assert sorted((m.step, m.value) for m in history) == [
                (r["nfe"], r[field]) for r in mine
            ]
    assert run.data.params["guidance.weights"] == "[2.0]"
    assert run.data.params["discriminator_sha256"] == tracked.file_digest(disc / "discriminator.pt")
    artifacts = {a.path for d in ("samples", "plots") for a in client.list_artifacts(run_id, d)}
    assert artifacts == {"samples/aot-dg_heun_s2_rho7_w1.png", "plots/fd_x_vs_nfe_aot-dg.png"}
    assert dvc_metrics.sweep(result, out) == {
        "fd_x": {
            "heun_rho7_w1": {"nfe003": 3.0, "nfe007": 5.0},
            "heun_rho7_w2.5": {"nfe003": 4.5, "nfe007": 6.5},
        }
    }


def test_tracked_import_is_one_run_and_a_registered_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AOT_TRACKING", "on")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    monkeypatch.setenv(outbox.STATE_ENV, str(tmp_path / ".aot"))
    net, config = tiny_network("ddpmpp", 4)
    src = write_snapshot(tmp_path / "s.pkl", net, config)
    raw = {**TINY_PARAMS, "variants": {"edm": {"aot": False, "checkpoint": str(src)}}}
    raw["guidance"] = {**raw["guidance"], "variant": "edm"}
    result = tracked.import_checkpoint(parse_params(raw), "edm", tmp_path / "run")
    client = tracking.client()
    (run,) = client.search_runs([tracking.experiment_id(client)])
    assert run.info.run_name == "import-edm" and run.info.status == "FINISHED"
    assert run.data.params["source_sha256"] == result["source_sha256"]
    assert run.data.params["architecture"] == "DDPM++"
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"import.json", "model"}
    (version,) = client.search_model_versions("name = 'aot-cifar10-32x32-edm'")
    assert version.tags["checkpoint_sha256"] == result["checkpoint_sha256"]
