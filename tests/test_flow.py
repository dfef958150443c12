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
