"""Tests of aot_pipeline/steps.py, the pipeline's steps without tracking: `reference` with a
user's Inception statistics (checked, copied and recorded); the sampling steps on one run
(`sweep.precision` reaches the sampler of every sampling step and is recorded with its results;
under torchrun the ranks share the seeds as EDM's generate.py does and rank 0 writes what one
process would); `report` on hand-made sweep tables (every cell of report.md, summary.json, one FID
mode per table, DG's w read right); the guided sweep's grid."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from builders import TINY_PARAMS
from edm_fixtures import tiny_network, write_snapshot
from typer.testing import CliRunner

from aot_model.checkpoints import build_network_from_checkpoint, find_checkpoints
from aot_model.data import ImageDataset, load_digits, save_dataset
from aot_model.edm_pickle import import_edm
from aot_model.files import DamagedFileError
from aot_model.sweep import SweepPoint, SweepRow, generate_images
from aot_pipeline import dvc_metrics, steps
from aot_pipeline.cli import app
from aot_pipeline.config import GuidanceParams, ScoreParams, SweepParams, parse_params

# ------------------------------------------------------------------------------------------------
# reference: statistics from the user's file


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "data.npz"
    save_dataset(load_digits(resolution=8, channels=3), path, source="digits")
    return path


def write_reference(path, mu, sigma):
    np.savez(path, mu=mu, sigma=sigma)
    return path


def fid_score(fake_inception, reference_file, mode="legacy_tensorflow"):
    reference = None if reference_file is None else str(reference_file)
    weights = str(fake_inception)
    return ScoreParams(
        metric="fid", inception_weights=weights, fid_mode=mode, reference_file=reference
    )


def test_reference_file_is_checked_copied_and_recorded(tmp_path, fake_inception, dataset):
    dim = steps.INCEPTION_FEATURES
    src = write_reference(tmp_path / "cifar10-32x32.npz", np.zeros(dim), np.eye(dim))
    out = tmp_path / "ref"
    info = steps.reference(fid_score(fake_inception, src), dataset, out)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert (out / steps.REFERENCE_STATS).read_bytes() == src.read_bytes()
    assert json.loads((out / "reference.json").read_text()) == info == {
        "dataset": "digits-8x8", "metric": "fid", "reference_file": str(src),
        "reference_file_sha256": digest, "reference_stats_sha256": digest,
        "extractor": "inception_v3", "mode": "legacy_tensorflow",
    }  # fmt: skip
    metric, extractor, ref = steps._scoring(fid_score(fake_inception, src), out, "cpu")
    assert (metric, extractor.mode, ref["source"], ref["sha256"]) == (
        "fid", "legacy_tensorflow", str(src), digest)  # fmt: skip
    with pytest.raises(ValueError) as error:  # clean-mode scoring against legacy statistics
        steps._scoring(fid_score(fake_inception, src, mode="clean"), out, "cpu")
    assert str(error.value) == (
        f"{out / 'reference.json'} holds legacy_tensorflow statistics, score.fid_mode is clean; "
        f"rebuild {out} with `aot reference`, or set score.fid_mode: legacy_tensorflow"
    )


@pytest.mark.parametrize(
    ("mu", "sigma", "reason"),
    [
        (np.zeros(64), np.eye(64), "mu has shape [64] and sigma [64, 64], Inception statistics "
         "are mu [2048] and sigma [2048, 2048]"),
        (np.full(2048, np.nan), np.eye(2048), "mu or sigma holds NaN or Inf"),
    ],
)  # fmt: skip
def test_bad_reference_files_are_refused(tmp_path, fake_inception, dataset, mu, sigma, reason):
    src = write_reference(tmp_path / "ref.npz", mu, sigma)
    params = tmp_path / "params.yaml"
    score = {"metric": "fid", "inception_weights": str(fake_inception), "reference_file": str(src)}
    params.write_text(yaml.safe_dump({**TINY_PARAMS, "score": score}))
    out = tmp_path / "ref"
    result = CliRunner().invoke(
        app,
        ["reference", "--data", str(dataset), "--out", str(out), "--params", str(params),
         "--device", "cpu"],
    )  # fmt: skip
    assert (result.exit_code, result.output) == (2, f"error: {src}: {reason}\n")
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# The sampling steps on one run: sweep, fakes, score_protocol


LABELS = 4
SCORE = ScoreParams(feature_epochs=1)
POINTS = [SweepPoint(2, 7.0), SweepPoint(3, 7.0)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run folder, reference folder): a conditional 3x8x8 network with every tensor random (an
    EDM-initialised one barely uses its weights, so bf16 would change no pixel), imported as a
    run, and fd reference statistics of 48 random 3x8x8 images."""
    root = tmp_path_factory.mktemp("sampling")
    net, config = tiny_network("ddpmpp", label_dim=LABELS)
    import_edm(write_snapshot(root / "snapshot.pkl", net, config), root / "run")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (48, 3, 8, 8), dtype=np.uint8)
    save_dataset(ImageDataset(images, rng.integers(0, LABELS, 48), LABELS, "toy"), root / "toy.npz")
    steps.reference(SCORE, root / "toy.npz", root / "reference")
    return root / "run", root / "reference"


def sweep_params(precision: str) -> SweepParams:
    return SweepParams(steps=[2, 3], rho=[7.0], num_images=6, batch_size=4, precision=precision)


def test_sweep_precision_reaches_the_sampler_and_is_recorded(run, tmp_path):
    """fp32 rows are the library sampler's images of the EMA network, bit for bit (the path before
    the option existed); bf16 rows differ from them by bf16 rounding, and every row, .npz and the
    curvature record say which precision made them."""
    run_dir, reference = run
    rows = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        steps.sweep(sweep_params(precision), SCORE, run_dir, reference, out, name="m")
        rows[precision] = json.loads((out / "m_sweep.json").read_text())
        assert [row["precision"] for row in rows[precision]] == [precision] * len(POINTS)
        assert json.loads((out / "curvature.json").read_text())["precision"] == precision
    net = build_network_from_checkpoint(find_checkpoints(run_dir)[-1], ema=True)
    for point, fp32, bf16 in zip(POINTS, rows["fp32"], rows["bf16"], strict=True):
        before = generate_images(
            net, point, range(6), img_shape=(3, 8, 8), label_dim=LABELS, batch_size=4
        )
        expected = np.concatenate([batch.images for batch in before])
        with np.load(fp32["images"]) as f32, np.load(bf16["images"]) as f16:
            assert np.array_equal(f32["images"], expected)
            assert np.array_equal(f32["labels"], f16["labels"])  # same seeds, same labels
            assert (str(f32["precision"]), str(f16["precision"])) == ("fp32", "bf16")
            diff = np.abs(f32["images"].astype(int) - f16["images"].astype(int))
        # bf16 keeps 8 mantissa bits: a relative error of ~2**-9 per evaluation. The random
        # network amplifies it at a few pixels, but the images stay the same images.
        assert 0 < diff.mean() < 2, diff.mean()
        assert fp32["score"] != bf16["score"]


def test_fakes_and_the_fid_protocol_record_their_precision(run, tmp_path):
    run_dir, reference = run
    guidance = GuidanceParams(num_fakes=4, fake_steps=2)
    steps.fakes(guidance, sweep_params("bf16"), run_dir, tmp_path / "fakes.npz")
    with np.load(tmp_path / "fakes.npz") as f:
        assert str(f["precision"]) == "bf16"
    point = SweepPoint(2, 7.0)
    result = steps.score_protocol(sweep_params("bf16"), SCORE, run_dir, reference, point, blocks=1)
    assert result["precision"] == "bf16"


@pytest.mark.slow
@pytest.mark.integration
def test_two_ranks_sample_the_images_of_one_process(run, tmp_path):
    """`aot sweep` and `aot fid --run-dir` under torchrun with 2 CPU processes (gloo): rank 0
    writes the one-process sweep's .npz and grids byte for byte and its scores, rank 1 writes
    nothing, and the fid protocol gives the one-process values (rank 1 returns nothing). Rank 0
    samples seeds [0, 1] and [4], rank 1 [2, 3] and [5]; one process [0, 1], [2, 3], [4, 5]."""
    run_dir, reference = run
    params = {
        "sweep": {"steps": [2, 3], "rho": [7.0], "num_images": 6, "batch_size": 2},
        "score": {"feature_epochs": 1},
        "point": {"num_steps": 3, "rho": 7.0},
    }
    (tmp_path / "params.json").write_text(json.dumps(params))
    worker = Path(__file__).with_name("sweep_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(worker.parents[1])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               *map(str, (worker, run_dir, reference, tmp_path))]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    sweep, score = SweepParams(**params["sweep"]), ScoreParams(**params["score"])
    one = tmp_path / "one"
    steps.sweep(sweep, score, run_dir, reference, one, name="m")
    point = SweepPoint(**params["point"])
    fid = steps.score_protocol(sweep, score, run_dir, reference, point, blocks=2)

    two = tmp_path / "rank0"
    assert not (tmp_path / "rank1").exists()
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    written = sorted(p.name for p in one.iterdir() if p.suffix in (".npz", ".png"))
    assert written == [f"m_heun_s{n}_r7.{ext}" for n in (2, 3) for ext in ("npz", "png")]
    for name in written:
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    rows = [json.loads((d / "m_sweep.json").read_text()) for d in (one, two)]
    assert [r["score"] for r in rows[0]] == [r["score"] for r in rows[1]]
    curvature = [json.loads((d / "curvature.json").read_text()) for d in (one, two)]
    assert curvature[0]["curvature"] == curvature[1]["curvature"]
    ranks = [json.loads((tmp_path / f"fid-rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[1] == {}
    assert ranks[0]["blocks"] == ["0-5", "6-11"]
    # The protocol scores each sampled batch as it comes: batches of 2, 2, 1, 1 images here, of
    # 2, 2, 2 in one process, and the feature net's sums over a batch round by batch size.
    assert ranks[0]["values"] == pytest.approx(fid["values"], rel=1e-6, abs=0)


# ------------------------------------------------------------------------------------------------
# report


# (solver, steps, rho, nfe) -> score, per model; distinct values so a swapped cell shows.
SCORES = {
    "aot": {("heun", 2, 7.0, 3): 41.0, ("heun", 4, 7.0, 7): 12.5, ("heun", 4, 90.0, 7): 9.25},
    "edm": {("heun", 2, 7.0, 3): 55.0, ("heun", 4, 7.0, 7): 20.125, ("heun", 4, 90.0, 7): 30.0},
}
STRAIGHTNESS = {"aot": [0.9, 0.8], "edm": [0.5, 0.7]}
CURVATURE = {"aot": [0.01, 0.03], "edm": [0.2, 0.1]}


def write_sweep(folder, name):
    folder.mkdir(parents=True)
    rows = [
        {"solver": s, "num_steps": n, "rho": r, "nfe": nfe, "metric": "fd_digits", "score": v}
        for (s, n, r, nfe), v in SCORES[name].items()
    ]
    (folder / f"{name}_sweep.json").write_text(json.dumps(rows))
    curvature = {
        "sigmas": [80.0, 1.0, 0.002, 0.0],
        "curvature": CURVATURE[name],
        "angle": [0.1, 0.2],
        "drift": [1.0, 0.5, 0.1],
        "straightness": STRAIGHTNESS[name],
    }
    (folder / "curvature.json").write_text(json.dumps(curvature))
    return folder


@pytest.fixture
def report(tmp_path):
    dirs = {name: write_sweep(tmp_path / name, name) for name in ("aot", "edm")}
    result = steps.report(dirs, tmp_path / "report")
    return tmp_path / "report", result


def table_rows(text):
    """report.md's first table as {(solver, steps, rho, nfe): [cells...]} plus its header."""
    lines = [line for line in text.split("\n\n")[0].splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[(cells[0], int(cells[1]), float(cells[2]), int(cells[3]))] = cells[4:]
    return header, rows


def test_report_table_puts_each_score_under_its_model(report):
    folder, result = report
    text = (folder / "report.md").read_text()
    assert result["table"] == text
    header, rows = table_rows(text)
    assert header == ["solver", "steps", "rho", "NFE", "fd_digits aot", "fd_digits edm"]
    assert set(rows) == set(SCORES["aot"])
    for key, cells in rows.items():
        assert cells == [f"{SCORES['aot'][key]:.3f}", f"{SCORES['edm'][key]:.3f}"], key
    # Ordered by rho, then NFE.
    assert list(rows) == sorted(rows, key=lambda k: (k[2], k[3]))


def test_report_curvature_table_and_summary(report):
    folder, result = report
    text = (folder / "report.md").read_text()
    curvature_lines = [line for line in text.split("\n\n")[1].splitlines()[2:]]
    assert curvature_lines == ["| aot | 0.8500 | 0.0200 |", "| edm | 0.6000 | 0.1500 |"]
    summary = json.loads((folder / "summary.json").read_text())
    expected = {
        "aot": {"best_score": 9.25, "straightness_mean": 0.85, "curvature_mean": 0.02},
        "edm": {"best_score": 20.125, "straightness_mean": 0.6, "curvature_mean": 0.15},
    }
    for name, values in expected.items():
        assert summary[name] == pytest.approx(values)
        assert result[name] == summary[name]
    pictures = {p.name for p in folder.glob("*.png")}
    assert pictures == {
        "fd_digits_vs_nfe_rho7.png",
        "fd_digits_vs_nfe_rho90.png",
        "curvature_vs_sigma.png",
    }


def test_report_marks_points_a_model_lacks(tmp_path):
    dirs = {name: write_sweep(tmp_path / name, name) for name in ("aot", "edm")}
    rows = json.loads((dirs["edm"] / "edm_sweep.json").read_text())
    (dirs["edm"] / "edm_sweep.json").write_text(json.dumps([r for r in rows if r["rho"] == 7.0]))
    text = steps.report(dirs, tmp_path / "report")["table"]
    _, table = table_rows(text)
    assert table[("heun", 4, 90.0, 7)] == ["9.250", "-"]
    assert np.isclose(
        json.loads((tmp_path / "report" / "summary.json").read_text())["edm"]["best_score"], 20.125
    )


# The guided arm on the AOT model at rho 7 only (params.yaml's guidance.rho): (steps, nfe) ->
# (score, disc_calls), one better and one worse than unguided.
GUIDED = {(2, 3): (40.0, 1), (4, 7): (13.5, 3)}


def write_guided_sweep(folder):
    folder.mkdir(parents=True)
    rows = [
        {"solver": "heun", "num_steps": n, "rho": 7.0, "nfe": nfe, "metric": "fd_digits",
         "score": score, "guidance_weight": 2.0, "disc_calls": calls, "base_model": "aot"}
        for (n, nfe), (score, calls) in GUIDED.items()
    ]  # fmt: skip
    (folder / "aot-dg_sweep.json").write_text(json.dumps(rows))
    return folder


def test_report_guided_arm_with_fewer_rho_than_the_unguided_models(tmp_path):
    dirs = {name: write_sweep(tmp_path / name, name) for name in ("aot", "edm")}
    dirs["aot-dg"] = write_guided_sweep(tmp_path / "aot-dg")
    text = steps.report(dirs, tmp_path / "report")["table"]
    header, table = table_rows(text)
    assert header[4:] == ["fd_digits aot", "fd_digits edm", "fd_digits aot-dg w=2"]
    assert table[("heun", 2, 7.0, 3)] == ["41.000", "55.000", "40.000"]
    assert table[("heun", 4, 7.0, 7)] == ["12.500", "20.125", "13.500"]
    assert table[("heun", 4, 90.0, 7)] == ["9.250", "30.000", "-"]  # not guided at rho 90
    guided = [line for line in text.split("\n\n")[-1].splitlines()[2:]]
    assert guided == [
        "| aot | aot-dg | 2 | heun | 2 | 7 | 3 | 1 | 41.000 | 40.000 | -1.000 | yes |",
        "| aot | aot-dg | 2 | heun | 4 | 7 | 7 | 3 | 12.500 | 13.500 | +1.000 | no |",
    ]
    assert "1 of 2 guided points beat the unguided model" in text
    pictures = {p.name for p in (tmp_path / "report").glob("*.png")}
    assert {"fd_digits_vs_nfe_rho7.png", "fd_digits_vs_nfe_rho90.png"} <= pictures
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert summary["aot-dg w=2"] == {"best_score": 13.5}


def test_report_refuses_a_damaged_discriminator_history(tmp_path):
    dirs = {"aot": write_sweep(tmp_path / "aot", "aot")}
    history = tmp_path / "disc" / "history.json"
    history.parent.mkdir()
    history.write_text('{"chosen_epoch": ')
    expected = r"history\.json is not valid JSON.*`aot discriminator`"
    with pytest.raises(DamagedFileError, match=expected):
        steps.report(dirs, tmp_path / "report", discriminator_dir=history.parent)


def set_mode(folder, name, mode):
    path = folder / f"{name}_sweep.json"
    rows = json.loads(path.read_text())
    for row in rows:
        row["metric"], row["score_info"] = "fid", {"mode": mode}
    path.write_text(json.dumps(rows))


def test_report_never_compares_modes(tmp_path):
    dirs = {name: write_sweep(tmp_path / name, name) for name in ("aot", "edm")}
    set_mode(dirs["aot"], "aot", "legacy_tensorflow")
    set_mode(dirs["edm"], "edm", "clean")
    with pytest.raises(ValueError) as error:
        steps.report(dirs, tmp_path / "report")
    assert str(error.value) == (
        "the sweeps were scored in different modes (aot: legacy_tensorflow, edm: clean); scores "
        "of different modes are never compared in one table: score them all with one "
        "score.fid_mode"
    )
    assert not (tmp_path / "report").exists()
    set_mode(dirs["edm"], "edm", "legacy_tensorflow")
    text = steps.report(dirs, tmp_path / "report")["table"]
    assert text.startswith("FID in clean-fid's legacy_tensorflow mode.\n| solver |")


@pytest.mark.parametrize(
    ("second_order", "note"),
    [
        (False, "w guides the Euler step only (second_order false, DG's released default): "
         "Heun's average then follows the probability-flow ODE guided with w/2, not w, so even "
         "a perfect discriminator at w = 1 does not reach the data distribution; compare these "
         "w with DG's papers accordingly."),
        (True, "With second_order true both Heun slopes are guided: the ODE's weight is w."),
    ],
)  # fmt: skip
def test_guided_table_says_how_to_read_w(tmp_path, second_order, note):
    dirs = {"aot": write_sweep(tmp_path / "aot", "aot")}
    dirs["aot-dg"] = write_guided_sweep(tmp_path / "aot-dg")
    path = dirs["aot-dg"] / "aot-dg_sweep.json"
    rows = [{**row, "second_order": second_order} for row in json.loads(path.read_text())]
    path.write_text(json.dumps(rows))
    text = steps.report(dirs, tmp_path / "report")["table"]
    guided = next(p for p in text.split("\n\n") if p.startswith("Discriminator guidance:"))
    assert guided.endswith("not counted in NFE). " + note)


# ------------------------------------------------------------------------------------------------
# guided_sweep


@pytest.mark.parametrize(
    ("guided_rho", "expected"),
    [(None, [(2, 7.0), (2, 90.0), (4, 7.0), (4, 90.0)]), ([7.0], [(2, 7.0), (4, 7.0)])],
)
def test_guided_sweep_grid_takes_guidance_rho(tmp_path, monkeypatch, guided_rho, expected):
    """guidance.rho replaces the sweep's rho in the guided grid (steps and solvers stay); unset,
    the guided grid is the sweep's. Sampling is replaced by a table of the points asked for."""
    p = parse_params(
        {
            "sweep": {"steps": [2, 4], "rho": [7.0, 90.0]},
            "guidance": {"weights": [2.0], "rho": guided_rho},
        }
    )
    asked = []

    def sweep_points(params, score, run_dir, reference_dir, out_dir, points, **kwargs):
        asked.extend(points)
        rows = [
            SweepRow(pt, disc_calls=1, metric="fd_x", score=float(i)) for i, pt in enumerate(points)
        ]
        return steps.Model("ckpt.pt", None, (1, 8, 8), 0, "cpu", "fp32"), "fd_x", rows

    monkeypatch.setattr(steps, "_sweep_points", sweep_points)
    monkeypatch.setattr(steps, "load_discriminator", lambda *args, **kwargs: None)
    (tmp_path / "extractor.pt").write_bytes(b"digested only")
    out = tmp_path / "aot-dg"
    result = steps.guided_sweep(
        p.guidance, p.sweep, p.score, "run", "ref", tmp_path / "extractor.pt", tmp_path, out,
        name="aot-dg",
    )  # fmt: skip
    assert [(pt.num_steps, pt.rho, pt.solver, pt.guidance_weight) for pt in asked] == [
        (n, r, "heun", 2.0) for n, r in expected
    ]
    rows = json.loads((out / "aot-dg_sweep.json").read_text())
    assert [(r["num_steps"], r["rho"], r["base_model"]) for r in rows] == [
        (n, r, "aot") for n, r in expected
    ]
    series = dvc_metrics.sweep(result, out)["fd_x"]  # what `dvc metrics show` lists
    assert set(series) == {f"heun_rho{r:g}_w2" for _, r in expected}


# ------------------------------------------------------------------------------------------------
# import_checkpoint: an evaluate-only variant's train stage (download once, SHA-256, import)


def test_checkpoint_from_s3_is_downloaded_once_and_checked(tmp_path, s3_env):
    import boto3

    net, config = tiny_network("ncsnpp")
    src = write_snapshot(tmp_path / "network-snapshot-200000.pkl", net, config)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    s3 = boto3.client("s3", endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    s3.create_bucket(Bucket="released")
    s3.upload_file(str(src), "released", "edm/network-snapshot-200000.pkl")
    url, downloads = "s3://released/edm/network-snapshot-200000.pkl", tmp_path / "downloads"
    wrong = "0" * 64
    with pytest.raises(ValueError) as error:
        steps.import_checkpoint(url, tmp_path / "bad", name="x", sha256=wrong, downloads=downloads)
    assert str(error.value).endswith(f"sha256 {digest} is not the expected {wrong}; the download "
                                     "is damaged or another file")  # fmt: skip
    assert list(downloads.iterdir()) == [] and not (tmp_path / "bad").exists()
    first = steps.import_checkpoint(url, tmp_path / "a", name="edm", sha256=digest,
                                    downloads=downloads)  # fmt: skip
    s3.delete_object(Bucket="released", Key="edm/network-snapshot-200000.pkl")
    second = steps.import_checkpoint(url, tmp_path / "b", name="edm", sha256=digest,
                                     downloads=downloads)  # fmt: skip
    assert first["source"] == second["source"] == str(downloads / "network-snapshot-200000.pkl")
    assert first["source_sha256"] == second["source_sha256"] == digest
