"""The worker/job image definition: the properties the deployments rely on (no Docker engine)."""

import re
import tomllib
from pathlib import Path

from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]


def _runs(text: str) -> list[str]:
    """The RUN instructions, continuation lines joined."""
    return [run.split("\n")[0] for run in text.replace("\\\n", " ").split("\nRUN ")[1:]]


def test_base_image_and_torch_match_the_project_pins():
    """The image is reproducible: an exact Python patch release inside requires-python, and the
    torch/torchvision it installs first are the versions pyproject.toml pins."""
    text = (ROOT / "Dockerfile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (base,) = re.findall(r"^FROM (\S+)", text, flags=re.MULTILINE)
    version = re.fullmatch(r"python:(\d+\.\d+\.\d+)-slim-\w+", base)
    assert version, f"base image not pinned to a Python patch release: {base}"
    assert version[1] in SpecifierSet(project["requires-python"])
    pins = {p.split("==")[0]: p for p in project["dependencies"] if "==" in p}
    (torch_install,) = [run for run in _runs(text) if "torch==" in run]
    assert {pins["torch"], pins["torchvision"]} <= set(torch_install.split())


def test_image_has_a_c_compiler_for_triton():
    """torch.compile's Triton builds its launcher with a C compiler (and libc headers) at first
    use; they are installed as root, before the image switches to its user."""
    text = (ROOT / "Dockerfile").read_text()
    installs = [run for run in _runs(text) if "apt-get install" in run]
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
