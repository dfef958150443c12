"""The Prefect flow's own logic, without a server: params resolution and the stage cache keys that
decide what a re-run skips (they follow the declaration's sections and inputs, as dvc.yaml does)."""

import sys
from pathlib import Path

import pytest
import typer
import yaml
from builders import TINY_PARAMS

from aot_pipeline import pipeline
from aot_pipeline.cli import app
from aot_pipeline.config import ConfigError, parse_params

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "flows"))
import aot_flow  # noqa: E402

SECTIONS = ("data", "network", "train", "sweep", "score", "guidance", "tracking")


def _key(raw: dict, stage: str, root: Path, model: str | None = None, nproc: int = 1) -> str:
    parameters = {"params": raw, "stage": stage, "model": model, "root": str(root)}
    parameters |= {"device": "cpu", "guidance": True, "nproc": nproc}
    return aot_flow.stage_key(None, parameters)


def _changed(raw: dict, section: str) -> dict:
    """``raw`` with one value of ``section`` changed (still valid)."""
    change = {
        "data": {"resolution": 12},
        "network": {"model_channels": 16},
        "train": {"lr": 0.5},
        "sweep": {"num_images": 70},
        "score": {"feature_seed": 7},
        "guidance": {"epochs": 5},
        "tracking": {"log_snapshots": True},
    }[section]
    return {**raw, section: {**raw.get(section, {}), **change}}


def test_stage_keys_follow_the_sections_each_stage_reads(tmp_path):
    """A stage's key changes with exactly the params sections its dvc.yaml stage lists."""
    raw = parse_params(TINY_PARAMS).model_dump(mode="json")
    for stage in pipeline.STAGES:
        model = "aot" if stage.scope is pipeline.Scope.MODEL else None
        base = _key(raw, stage.name, tmp_path, model)
        for section in SECTIONS:
            moved = _key(_changed(raw, section), stage.name, tmp_path, model) != base
            assert moved == (section in stage.sections), (stage.name, section)
    other = {**raw, "variants": {**raw["variants"], "edm": {"aot": True}}}
    assert _key(other, "train", tmp_path, "aot") == _key(raw, "train", tmp_path, "aot")
    assert _key(other, "train", tmp_path, "edm") != _key(raw, "train", tmp_path, "edm")
    assert _key(raw, "train", tmp_path, "aot", nproc=2) != _key(raw, "train", tmp_path, "aot")
    assert _key(raw, "sweep", tmp_path, "aot", nproc=2) == _key(raw, "sweep", tmp_path, "aot")


def test_stage_keys_follow_input_contents_work_folder_and_code(tmp_path, monkeypatch):
    raw = parse_params(TINY_PARAMS).model_dump(mode="json")
    run = pipeline.path(tmp_path, "run", "aot")
    run.mkdir(parents=True)
    (run / "a.pt").write_bytes(b"one")
    base = _key(raw, "sweep", tmp_path, "aot")
    assert _key(raw, "fakes", tmp_path, "aot") != base  # another stage
    (run / "a.pt").write_bytes(b"two")
    changed = _key(raw, "sweep", tmp_path, "aot")
    assert changed != base  # the input's content
    assert _key(raw, "reference", tmp_path) == _key(raw, "reference", tmp_path)
    assert _key(raw, "sweep", tmp_path / "elsewhere", "aot") != changed  # outputs land elsewhere
    report = _key(raw, "report", tmp_path)
    sweep = pipeline.path(tmp_path, "guided_sweep", "aot")
    sweep.mkdir(parents=True)
    (sweep / "aot-dg_sweep.json").write_text("[]")
    assert _key(raw, "report", tmp_path) != report  # the report reads the guided sweep too
    monkeypatch.setattr(aot_flow, "code_version", lambda: "edited")
    assert _key(raw, "sweep", tmp_path, "aot") != changed


def test_resolve_params_applies_overrides_and_names_bad_keys(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(TINY_PARAMS))
    p = aot_flow.resolve_params(str(path), {"train.duration_kimg": 2, "sweep.rho": [90]})
    assert p.train.duration_kimg == 2 and p.sweep.rho == [90.0]
    assert aot_flow.resolve_params("cifar10-uncond", None).data.dataset == "cifar10"
    with pytest.raises(ConfigError, match=r"train\.aot\.cost"):
        aot_flow.resolve_params(str(path), {"train.aot.cost": "l1"})
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        aot_flow.resolve_params(str(path), {"train.epochs": 3})
    with pytest.raises(ConfigError, match="cifar10-uncond"):
        aot_flow.resolve_params("no-such-profile", None)


def test_multi_gpu_training_is_the_declared_train_stage_under_torchrun():
    plan = pipeline.plan(parse_params(TINY_PARAMS))
    command = aot_flow.torchrun_command(plan, "work", "edm", 4)
    assert command[1:6] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=4",
        "-m",
    ]
    assert command[6:8] == ["aot_pipeline.cli", "train"]
    train = typer.main.get_command(app).commands["train"]
    options = train.make_context("train", command[8:]).params
    assert options["variant"] == "edm" and options["run_dir"] == Path("work/runs/edm")
    assert options["data"] == Path("work/data/dataset.npz") and options["resume"] == "auto"


def test_an_evaluate_only_models_key_follows_its_local_checkpoint(tmp_path):
    snapshot = tmp_path / "edm.pkl"
    snapshot.write_bytes(b"one")
    raw = parse_params(TINY_PARAMS).model_dump(mode="json")
    raw["variants"] = {"edm": {"aot": False, "checkpoint": str(snapshot)}}
    raw["guidance"]["variant"] = "edm"
    base = _key(raw, "train", tmp_path, "edm")
    snapshot.write_bytes(b"two")
    assert _key(raw, "train", tmp_path, "edm") != base
