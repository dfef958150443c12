"""The `aot` command line end to end on a tiny offline configuration."""

import json

import boto3
import numpy as np
import pytest
import yaml
from builders import TINY_PARAMS
from typer.testing import CliRunner

from aot_model.data import load_dataset
from aot_pipeline.cli import app


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_bad_params_stop_before_any_work(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"aot": {"cost": "l1"}}}))
    out = tmp_path / "data" / "dataset.npz"
    result = invoke("prepare", "--params", params, "--out", out)
    assert result.exit_code == 2
    assert "train.aot.cost" in result.output and "'euclidean' or 'squared'" in result.output
    assert not out.exists()


def test_unknown_variant_lists_the_known_ones(tiny_params, tmp_path):
    result = invoke(
        "train", "--variant", "ot", "--run-dir", tmp_path / "run", "--params", tiny_params
    )
    assert result.exit_code == 2
    assert "--variant must be one of ['aot', 'edm']" in result.output


def test_a_step_prints_its_result_and_writes_it_as_metrics(tiny_params, tmp_path):
    """`aot prepare --metrics FILE`: the printed JSON and the file (what `dvc metrics` reads) are
    the step's result, here the dataset's count, classes and the digest in its manifest."""
    data, metrics = tmp_path / "dataset.npz", tmp_path / "metrics" / "prepare.json"
    result = invoke("prepare", "--out", data, "--params", tiny_params, "--metrics", metrics)
    assert result.exit_code == 0, result.output
    manifest = json.loads(data.with_suffix(".json").read_text())
    expected = {"count": 1797, "num_classes": 10, "sha256": manifest["sha256"]}
    assert json.loads(metrics.read_text()) == expected == json.loads(result.stdout)


def step_result(output: str, step: str) -> dict:
    """The JSON the demo prints after ``[step]``."""
    line = next(line for line in output.splitlines() if line.startswith(f"[{step}] "))  # stdout
    return json.loads(line.split("] ", 1)[1])


@pytest.mark.slow
def test_demo_chain_results_and_training_rerun(tiny_params, tmp_path):
    out = tmp_path / "demo"
    result = invoke("demo", "--out", out, "--params", tiny_params)
    assert result.exit_code == 0, result.output
    report = out / "report"
    assert {p.name for p in report.iterdir()} >= {
        "report.md",
        "summary.json",
        "curvature_vs_sigma.png",
    }
    assert "discriminator_curves.png" in {p.name for p in report.iterdir()}
    assert "guided points beat the unguided model" in (report / "report.md").read_text()
    tables = {
        name: json.loads((out / "sweeps" / name / f"{name}_sweep.json").read_text())
        for name in ("aot", "edm", "aot-dg")
    }
    assert [(r["nfe"], r["disc_calls"], r["base_model"]) for r in tables["aot-dg"]] == [
        (3, 1, "aot"),
        (7, 3, "aot"),
    ]
    rows = tables["aot"]
    assert [r["nfe"] for r in rows] == [3, 7]
    assert all(r["metric"] == "fd_digits" and r["score"] >= 0 for r in rows)

    # Each sweep's best point is its lowest score (FD: lower is better).
    summary = json.loads((report / "summary.json").read_text())
    assert set(summary) == {"aot", "edm", "aot-dg w=2"}  # the guided arm (params guidance)
    for name in ("aot", "edm"):
        table = tables[name]
        scores = [r["score"] for r in table]
        assert len(set(scores)) == len(scores)  # distinct, so min and max cannot agree
        best = table[scores.index(min(scores))]
        swept = step_result(result.stdout, f"sweep {name}")
        assert swept["best_score"] == best["score"]
        assert swept["best_nfe"] == best["nfe"]
        assert swept["best_point"] == f"heun steps={best['num_steps']} rho={best['rho']:g}"
        assert summary[name]["best_score"] == best["score"]
    # Every score sits in its model's column of report.md, in the row of its point.
    lines = (report / "report.md").read_text().split("\n\n")[0].splitlines()
    assert lines[0] == (
        "| solver | steps | rho | NFE | fd_digits aot | fd_digits edm | fd_digits aot-dg w=2 |"
    )
    cells = {tuple(c.strip() for c in line.strip("|").split("|")) for line in lines[2:]}
    expected = {
        (
            "heun",
            str(a["num_steps"]),
            f"{a['rho']:g}",
            str(a["nfe"]),
            f"{a['score']:.3f}",
            f"{e['score']:.3f}",
            f"{g['score']:.3f}",
        )
        for a, e, g in zip(tables["aot"], tables["edm"], tables["aot-dg"], strict=True)
    }
    assert cells == expected

    # Re-running training on a finished run resumes (nothing to do) and keeps the checkpoint.
    run_dir, dataset = out / "runs" / "aot", out / "data" / "dataset.npz"

    def train(params):
        args = ("train", "--variant", "aot", "--run-dir", run_dir, "--data", dataset)
        return invoke(*args, "--params", params)

    def checkpoints():
        return {p.name: p.stat().st_mtime_ns for p in run_dir.glob("training-state-*.pt")}

    before = checkpoints()
    again = train(tiny_params)
    assert again.exit_code == 0, again.output
    assert checkpoints() == before

    # A changed recipe is refused with the parameter named, and nothing is overwritten.
    changed = tmp_path / "changed.yaml"
    changed.write_text(
        yaml.safe_dump({**TINY_PARAMS, "train": {**TINY_PARAMS["train"], "lr": 5e-4}})
    )
    refused = train(changed)
    assert refused.exit_code == 2 and "lr" in refused.output
    assert checkpoints() == before

    # Scoring a sample file on its own gives the sweep's number; so does the first seed block of
    # EDM's protocol at the same point (seeds 0..63 at 4 steps, rho 7).
    reference = ("--reference", out / "data" / "reference", "--params", tiny_params)
    scored = invoke("fid", rows[1]["images"], *reference)
    assert scored.exit_code == 0, scored.output
    assert json.loads(scored.stdout)["value"] == pytest.approx(rows[1]["score"], rel=1e-6)
    protocol = invoke(
        "fid", "--run-dir", run_dir, "--steps", 4, "--rho", 7, "--blocks", 2, *reference
    )
    assert protocol.exit_code == 0, protocol.output
    result = json.loads(protocol.stdout)
    assert result["blocks"] == ["0-63", "64-127"] and result["nfe"] == 7
    assert result["values"][0] == pytest.approx(rows[1]["score"], rel=1e-6)
    assert result["min"] == min(result["values"])


@pytest.mark.integration
def test_prepare_cifar10_from_s3(cifar, s3_env, tmp_path):
    """`data.source: s3://...` goes through boto3 to a real local S3 server; MD5 checked."""
    tarball, md5, _, expected = cifar
    s3 = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    s3.create_bucket(Bucket="datasets")
    s3.upload_file(str(tarball), "datasets", "cifar10/cifar-10-python.tar.gz")
    data = {"dataset": "cifar10", "source": "s3://datasets/cifar10/cifar-10-python.tar.gz"}
    params = tmp_path / "params.yaml"
    out = tmp_path / "data" / "dataset.npz"

    params.write_text(yaml.safe_dump({"data": {**data, "md5": "0" * 32}}))
    result = invoke("prepare", "--params", params, "--out", out, "--downloads", tmp_path / "dl")
    assert result.exit_code == 2 and "MD5" in result.output
    assert not out.exists() and not any((tmp_path / "dl").iterdir())

    params.write_text(yaml.safe_dump({"data": {**data, "md5": md5, "split": "test"}}))
    result = invoke("prepare", "--params", params, "--out", out, "--downloads", tmp_path / "dl")
    assert result.exit_code == 0, result.output
    dataset = load_dataset(out)
    images, labels = expected["test_batch"]
    assert np.array_equal(dataset.images, images) and np.array_equal(dataset.labels, labels)
    assert json.loads(out.with_suffix(".json").read_text())["source"] == data["source"]


def test_guidance_bad_inputs_stop_before_any_work(tiny_params, tmp_path):
    data = tmp_path / "dataset.npz"
    assert invoke("prepare", "--out", data, "--params", tiny_params).exit_code == 0
    fakes = tmp_path / "fakes.npz"
    np.savez(fakes, images=np.zeros((4, 3, 8, 8), np.uint8))
    out = tmp_path / "disc"
    result = invoke(
        "discriminator", "--run-dir", tmp_path / "none", "--data", data, "--fakes", fakes,
        "--out", out, "--params", tiny_params,
    )  # fmt: skip
    assert result.exit_code == 2 and not out.exists()
    assert "fake samples must be uint8 [N, 1, 8, 8] like the data" in result.output

    params = yaml.safe_load(tiny_params.read_text())
    params["guidance"]["extractor"].update(kind="adm", checkpoint=str(tmp_path / "c.pt"))
    adm = tmp_path / "adm.yaml"
    adm.write_text(yaml.safe_dump(params))
    result = invoke("extractor", "--data", data, "--out", tmp_path / "e.pt", "--params", adm)
    assert result.exit_code == 2 and "takes 3x32x32 images" in result.output

    params["guidance"]["weights"] = [float("nan")]
    adm.write_text(yaml.safe_dump(params))
    result = invoke("extractor", "--data", data, "--out", tmp_path / "e.pt", "--params", adm)
    assert result.exit_code == 2
    assert "guidance.weights.0: Input should be a finite number" in result.output
