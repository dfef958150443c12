"""aot_pipeline.steps.report on hand-made sweep tables: every cell of report.md, summary.json."""

import json

import numpy as np
import pytest

from aot_model.files import DamagedFileError
from aot_pipeline import steps

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
