"""Tests of aot_pipeline/tracking.py, MLflow's runs: a server down when a step starts stops it
before any compute; separate `aot` processes join one parent run per commit (the `dvc repro`
handshake); tick metrics wait for a server that comes back, or are kept for `aot sync`. The steps
run with tracking (aot_pipeline/tracked.py) are tested in tests/test_tracked.py."""

import json
import time

import pytest
from conftest import _free_port
from typer.testing import CliRunner

from aot_pipeline import outbox, tracking
from aot_pipeline.cli import app

# Under pytest-xdist this module runs on one worker, in one group with tests/test_tracked.py (as
# when the two were one file), and creates its sqlite store once.
pytestmark = pytest.mark.xdist_group("tracking")


def test_server_down_at_start_stops_before_any_compute(tiny_params, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AOT_TRACKING", "on")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    out = tmp_path / "data" / "dataset.npz"
    result = CliRunner().invoke(app, ["prepare", "--params", tiny_params, "--out", out])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "is not reachable" in lines[0] and "AOT_TRACKING=off" in lines[0]
    assert not out.exists()


def test_step_processes_join_one_parent_per_commit(tiny_params, tmp_path, monkeypatch):
    """The `dvc repro` handshake: separate `aot` invocations share the recorded parent run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AOT_TRACKING", "on")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    for _ in range(2):
        result = CliRunner().invoke(app, ["prepare", "--params", tiny_params])
        assert result.exit_code == 0, result.output
    client = tracking.client()
    runs = client.search_runs([tracking.experiment_id(client)])
    parents = [r for r in runs if r.data.tags.get("aot.role") == "pipeline"]
    children = [r for r in runs if r.data.tags.get("aot.role") == "step"]
    assert len(parents) == 1 and len(children) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert parents[0].info.status == "FINISHED"

    record = tmp_path / ".aot" / tracking.HANDSHAKE_FILE
    saved = json.loads(record.read_text())
    record.write_text(json.dumps({**saved, "git_commit": "another"}))
    assert CliRunner().invoke(app, ["prepare", "--params", tiny_params]).exit_code == 0
    runs = client.search_runs([tracking.experiment_id(client)])
    assert len([r for r in runs if r.data.tags.get("aot.role") == "pipeline"]) == 2


class FlakyClient:
    """An MlflowClient whose log_batch fails while ``down`` is set (a server gone mid-run)."""

    def __init__(self, real):
        self.real, self.down, self.calls = real, True, 0

    def log_batch(self, *args, **kwargs):
        self.calls += 1
        if self.down:
            raise ConnectionError("server away")
        return self.real.log_batch(*args, **kwargs)


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory):
    """One embedded MLflow store for the tests below (creating one costs seconds)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}")
    return client, client.create_experiment("senders")


@pytest.fixture
def run_in_store(sqlite_store, tmp_path, monkeypatch):
    monkeypatch.setenv(outbox.STATE_ENV, str(tmp_path / ".aot"))
    client, experiment = sqlite_store
    return client, client.create_run(experiment).info.run_id


def test_metrics_wait_for_a_server_that_comes_back(run_in_store, monkeypatch):
    monkeypatch.setattr(tracking, "SEND_INTERVAL", 0.05)
    client, run_id = run_in_store
    flaky = FlakyClient(client)
    sender = tracking.MetricSender(flaky, run_id)
    for step in range(1, 4):
        sender.put({"loss": 10.0 / step}, step)
    while flaky.calls < 2:  # tried and failed at least twice
        time.sleep(0.05)
    flaky.down = False
    assert sender.close(timeout=10) == 0
    history = client.get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 10.0), (2, 5.0), (3, 10.0 / 3)]
    assert outbox.pending() == []


def test_metrics_of_a_server_that_stays_away_are_kept_for_sync(run_in_store):
    client, run_id = run_in_store
    sender = tracking.MetricSender(FlakyClient(client), run_id)
    sender.put({"loss": 1.5, "lr": 0.01}, 7)
    assert sender.close(timeout=0) == 2
    assert client.get_metric_history(run_id, "loss") == []
    assert len(outbox.pending()) == 1
    delivered, left = outbox.sync(lambda: client)
    assert (delivered, left) == (1, [])
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "lr")] == [(7, 0.01)]
