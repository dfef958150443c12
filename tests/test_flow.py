"""The Prefect flow's own logic, without a server: params resolution and the task cache keys that
decide what a re-run skips (they must follow dvc.yaml, so both runners rerun the same steps)."""

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from builders import TINY_PARAMS

from aot_pipeline.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "flows"))
import aot_flow  # noqa: E402


def _key(task: str, inputs: tuple = (), **parameters) -> str:
    context = SimpleNamespace(task=SimpleNamespace(name=task))
    return aot_flow.inputs_key(aot_flow.SECTIONS[task], inputs)(context, parameters)


def test_sections_match_dvc_stages():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, sections in aot_flow.SECTIONS.items():
        stage = stages[name].get("do", stages[name])
        listed = [p.replace("${key}", "{variant}") for p in stage.get("params", [])]
        assert sorted(listed) == sorted(sections), name


def test_cache_keys_follow_params_sections_inputs_and_code(tmp_path, monkeypatch):
    p = aot_flow.parse_params(TINY_PARAMS).model_dump(mode="json")
    dataset = tmp_path / "dataset.npz"
    dataset.write_bytes(b"one")
    train = {"variant": "aot", "dataset": str(dataset), "run_dir": "runs/aot", "nproc": 1}
    train["device"] = "cpu"

    def train_key(params, **changes):
        return _key("train", ("dataset",), params=params, **(train | changes))

    base = train_key(p)
    assert train_key(p, device="cuda") == base  # where it runs changes nothing it computes
    other_sweep = {**p, "sweep": {**p["sweep"], "rho": [90.0]}}
    assert train_key(other_sweep) == base  # dvc repro would not retrain either
    assert _key("sweep", params=other_sweep) != _key("sweep", params=p)
    other_edm = {**p, "variants": {**p["variants"], "edm": {"aot": True}}}
    assert train_key(other_edm) == base  # another variant's setting
    assert train_key(other_edm, variant="edm") != train_key(p, variant="edm")
    assert train_key({**p, "train": {**p["train"], "lr": 1.0}}) != base
    dataset.write_bytes(b"two")
    assert train_key(p) != base  # the input file's content
    dataset.write_bytes(b"one")
    assert train_key(p) == base
    monkeypatch.setattr(aot_flow, "code_version", lambda: "edited")
    assert train_key(p) != base


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


def _task_key(task, **parameters) -> str:
    """The cache key the flow's ``task`` itself computes (its decorator's inputs and sections)."""
    return task.cache_key_fn(SimpleNamespace(task=SimpleNamespace(name=task.name)), parameters)


def test_guidance_cache_keys_follow_their_dvc_stages(tmp_path):
    p = aot_flow.parse_params(TINY_PARAMS).model_dump(mode="json")
    files = {}
    for name in ("dataset", "fakes", "extractor", "run_dir", "reference", "discriminator"):
        files[name] = tmp_path / name
        files[name].write_bytes(name.encode())
    paths = {name: str(path) for name, path in files.items()}
    calls = {
        aot_flow.fakes_task: {"run_dir": paths["run_dir"]},
        aot_flow.extractor_task: {"dataset": paths["dataset"]},
        aot_flow.discriminator_task: {
            k: paths[k] for k in ("dataset", "fakes", "extractor", "run_dir", "reference")
        },
        aot_flow.guided_sweep_task: {
            "name": "aot-dg",
            **{k: paths[k] for k in ("run_dir", "reference", "extractor", "discriminator")},
        },
    }

    def keys(params) -> dict[str, str]:
        return {
            task.name: _task_key(task, params=params, out="o", device="cpu", **args)
            for task, args in calls.items()
        }

    base = keys(p)
    assert len(set(base.values())) == 4
    changed = {
        "guidance": {**p["guidance"], "epochs": 5},
        "sweep": {**p["sweep"], "rho": [90.0]},
        "score": {**p["score"], "feature_seed": 7},
    }
    reads = {  # dvc.yaml's params per stage
        "fakes": {"guidance", "sweep"},
        "extractor": {"guidance"},
        "discriminator": {"guidance", "sweep", "score"},
        "guided_sweep": {"guidance", "sweep", "score"},
    }
    for section, value in changed.items():
        assert value != p[section]
        now = keys({**p, section: value})
        assert {t for t in base if now[t] != base[t]} == {t for t in reads if section in reads[t]}
    assert keys({**p, "train": {**p["train"], "lr": 1.0}}) == base  # inputs' content covers it
    files["fakes"].write_bytes(b"other fakes")
    now = keys(p)
    assert {t for t in base if now[t] != base[t]} == {"discriminator"}

    def report_key(**changes):
        args = {"sweep_dirs": {"aot": paths["run_dir"]}, "out": "r", "discriminator_dir": None}
        return _task_key(aot_flow.report_task, **(args | changes))

    assert report_key() != report_key(discriminator_dir=paths["discriminator"])
    before = report_key(discriminator_dir=paths["discriminator"])
    files["discriminator"].write_bytes(b"retrained")
    assert report_key(discriminator_dir=paths["discriminator"]) != before
