"""`aot services` settings: ports from the environment; configured endpoints win; loopback only."""

from pathlib import Path

import pytest

from aot_pipeline import services


def test_settings_from_environment(tmp_path):
    env = {"AOT_SERVICES_DIR": str(tmp_path), "AOT_S3_PORT": "6000", "AOT_PREFECT_PORT": "6200"}
    s = services.Settings.from_env(env)
    assert (s.state_dir, s.s3_port, s.mlflow_port, s.prefect_port) == (tmp_path, 6000, 5001, 6200)
    client = s.client_env({})
    assert client["AWS_ENDPOINT_URL"] == "http://127.0.0.1:6000"
    assert client["PREFECT_API_URL"] == "http://127.0.0.1:6200/api"
    assert client["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5001"
    assert client["PREFECT_HOME"] == str(tmp_path / "prefect")
    assert client["DO_NOT_TRACK"] == "1" and client["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    with pytest.raises(ValueError, match="AOT_MLFLOW_PORT"):
        services.Settings.from_env({"AOT_MLFLOW_PORT": "http"})


def test_configured_endpoints_replace_local_services(tmp_path):
    s = services.Settings(state_dir=Path(tmp_path))
    real = {"MLFLOW_TRACKING_URI": "https://mlflow.example.com", "AWS_ENDPOINT_URL": ""}
    # Our own URL (e.g. after `eval "$(aot services env)"`) is not "external".
    real["PREFECT_API_URL"] = s.prefect_api_url
    assert s.external(real) == {"mlflow": "https://mlflow.example.com"}
    client = s.client_env(real)
    assert client["MLFLOW_TRACKING_URI"] == "https://mlflow.example.com"
    assert client["AWS_ACCESS_KEY_ID"] == "testing"  # dummies only for the local S3 server
    aws = {"AWS_ENDPOINT_URL": "https://s3.example.com"}
    assert "AWS_ACCESS_KEY_ID" not in s.client_env(aws)  # real S3 keeps the user's credentials


def test_every_server_binds_loopback(tmp_path):
    s = services.Settings(state_dir=Path(tmp_path), gpus=("0", "1"))
    for service in services.all_services(s):
        command = service.command(s)
        if "--host" in command:
            assert command[command.index("--host") + 1] == "127.0.0.1"
        if "-H" in command:
            assert command[command.index("-H") + 1] == "127.0.0.1"
        assert service.health_url(s).startswith("http://127.0.0.1:")
    for worker in services.workers(s):
        assert worker.env(s)["PREFECT_WORKER_WEBSERVER_HOST"] == "127.0.0.1"


def _option(command: list[str], name: str) -> list[str]:
    return [command[i + 1] for i, arg in enumerate(command) if arg == name]


def test_workers_one_for_all_queues_or_one_per_gpu(tmp_path):
    """On a CPU box one worker serves both queues (the models queue's limit places the models);
    with GPUs, each GPU's worker runs one model at a time with only that GPU visible."""
    (cpu,) = services.workers(services.Settings(state_dir=tmp_path))
    assert _option(cpu.command(services.Settings(state_dir=tmp_path)), "--work-queue") == []
    s = services.Settings(state_dir=tmp_path, worker_port=7000, gpus=("0", "3"))
    pipelines, *gpus = services.workers(s)
    assert _option(pipelines.command(s), "--work-queue") == ["pipelines"]
    assert "CUDA_VISIBLE_DEVICES" not in pipelines.env(s)
    for worker, gpu, port in zip(gpus, ("0", "3"), ("7001", "7002"), strict=True):
        command = worker.command(s)
        assert _option(command, "--work-queue") == ["models"] and _option(command, "--limit") == [
            "1"
        ]
        assert worker.env(s)["CUDA_VISIBLE_DEVICES"] == gpu
        assert worker.env(s)["PREFECT_WORKER_WEBSERVER_PORT"] == port
    env = {"AOT_SERVICES_DIR": str(tmp_path), "AOT_GPUS": "0,3", "AOT_MODEL_SLOTS": "5"}
    assert services.Settings.from_env(env).gpus == ("0", "3")
    assert services.Settings.from_env(env).model_slots == 5
    with pytest.raises(ValueError, match="AOT_MODEL_SLOTS must be a whole number >= 1, got '0'"):
        services.Settings.from_env({"AOT_MODEL_SLOTS": "0"})
