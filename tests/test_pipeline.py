"""The pipeline's one declaration (aot_pipeline/pipeline.py) and what is generated from it."""

from pathlib import Path

import click
import pytest
import typer
import yaml

from aot_pipeline import pipeline
from aot_pipeline.cli import app
from aot_pipeline.config import load_params

ROOT = Path(__file__).resolve().parents[1]
PROFILES = [ROOT / "params.yaml", *sorted((ROOT / "configs").glob("*.yaml"))]


def _expanded(dvc: dict, params) -> dict[str, dict]:
    """dvc.yaml's stages with ``foreach: ${variants}`` expanded as DVC does."""
    stages = {}
    for name, body in dvc["stages"].items():
        if "foreach" not in body:
            stages[name] = body
            continue
        assert body["foreach"] == "${variants}"
        for key in params.variants:
            text = yaml.safe_dump(body["do"]).replace("${key}", key)
            stages[f"{name}@{key}"] = yaml.safe_load(text)
    return stages


def _outs(body: dict) -> list[str]:
    return [next(iter(o)) if isinstance(o, dict) else o for o in body.get("outs", [])]


def test_committed_dvc_yaml_is_the_generated_one():
    plan = pipeline.plan(load_params(ROOT / "params.yaml"))
    assert (ROOT / "dvc.yaml").read_text() == pipeline.dvc_yaml_text(plan)


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.stem)
def test_every_dep_is_produced_and_every_command_exists(profile):
    """What `dvc status` needs of a profile: each dep is some stage's out (the dataset's source is
    the prepare stage itself), and each command line parses as the `aot` command it names."""
    params = load_params(profile)
    stages = _expanded(pipeline.dvc_yaml(pipeline.plan(params)), params)
    produced = [out for body in stages.values() for out in _outs(body)]
    for name, body in stages.items():
        for dep in body.get("deps", []):
            assert dep in produced, (profile.stem, name, dep)
        args = body["cmd"].split()
        assert args[0] == "aot"
        command = typer.main.get_command(app).commands[args[1]]
        unknown = [a for a in args[2:] if a.startswith("--") and a not in _options(command)]
        assert not unknown, (name, unknown)
        command.make_context(args[1], args[2:])  # parses: types, required options


def _options(command: click.Command) -> set[str]:
    return {opt for param in command.params for opt in getattr(param, "opts", [])}


def test_guided_arm_and_study_report_follow_the_params():
    demo = pipeline.plan(load_params(ROOT / "params.yaml"))
    assert demo.guided == "aot" and not demo.study
    assert [s.name for s in pipeline.model_stages(demo, "aot")] == [
        "train", "sweep", "fakes", "discriminator", "guided_sweep",
    ]  # fmt: skip
    assert [s.name for s in pipeline.model_stages(demo, "edm")] == ["train", "sweep"]
    assert pipeline.plan(demo.params, guidance=False).guided is None

    smoke = pipeline.plan(load_params(ROOT / "configs" / "study-digits-smoke.yaml"))
    assert smoke.guided is None and smoke.study  # no guidance section: no guided arm
    assert [s.name for s in pipeline.shared_stages(smoke)] == ["prepare", "reference"]
    assert [s.name for s in pipeline.final_stages(smoke)] == ["report", "study_report"]
    assert set(pipeline.report_inputs(smoke, "w")) == set(smoke.params.variants)
    dvc = pipeline.dvc_yaml(smoke)
    assert not {"fakes", "extractor", "discriminator", "guided_sweep"} & set(dvc["stages"])

    study = pipeline.plan(load_params(ROOT / "configs" / "study-digits.yaml"))
    assert study.guided == "u-aot512-s0" and len(study.models) == 18
    deps = pipeline.dvc_yaml(study)["stages"]["study_report"]["deps"]
    assert "sweeps/u-aot512-s0-dg" in deps and "runs/c-edm-s2" in deps
    command = pipeline.command(pipeline.BY_NAME["study_report"], study, "/work")
    assert command[2:] == ["--root", "/work", "--out", "/work/study/results.md"]


def test_model_tags_group_a_study():
    study = pipeline.plan(load_params(ROOT / "configs" / "study-digits.yaml"))
    tags = pipeline.model_tags(study, "c-aot512-s1")
    assert tags == {
        "aot.arm": "aot512", "aot.seed": "1", "aot.cond": "true", "aot.budget_kimg": "60",
    }  # fmt: skip
