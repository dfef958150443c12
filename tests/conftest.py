"""Shared test settings: small thread pools so the suite behaves on a 2-core CI machine."""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from builders import TINY_PARAMS, make_cifar_tarball

torch.set_num_threads(int(os.environ.get("AOT_TEST_THREADS", "2")))
# Tests that do not care about MLflow run the plain steps; tests/test_tracking.py turns it on.
os.environ.setdefault("AOT_TRACKING", "off")


@pytest.fixture
def generator():
    """A seeded CPU generator: every random draw in a test is reproducible."""
    return torch.Generator().manual_seed(0)


@pytest.fixture
def rng():
    """A seeded NumPy generator, for tests that draw with NumPy."""
    return np.random.default_rng(0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's standalone server) on loopback, started and stopped here.

    Yields the environment a boto3 client or DVC needs to reach it; credentials are dummies."""
    port = _free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.2)
        yield {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point boto3 in this process at the local S3 server."""
    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    return s3_server


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """A 33-image CIFAR-format tarball, its MD5, and the images and labels it must decode to."""
    return make_cifar_tarball(tmp_path_factory.mktemp("cifar"))


@pytest.fixture
def tiny_params(tmp_path):
    """A params.yaml for a pipeline run of a few seconds (8x8 digits, a 2-level NCSN++)."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(TINY_PARAMS))
    return path
