"""aot_pipeline.steps.report on hand-made sweep tables: every cell of report.md, summary.json."""

import json

import numpy as np
import pytest

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
