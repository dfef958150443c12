"""What ``aot train`` / ``aot sweep`` write to their ``--metrics`` file for ``dvc metrics``: only
the numbers people compare between models and commits, nested so ``dvc metrics show`` is one
narrow table (one row per file) and ``dvc metrics diff`` lines up. Hashes, paths and provenance
stay in the output manifests and the MLflow params.
"""

from __future__ import annotations

from pathlib import Path

from aot_model.sweep import read_table


def train(result: dict) -> dict:
    """Final training loss and throughput of the last tick (none for an imported checkpoint)."""
    return {key: result[key] for key in ("loss", "img_per_sec") if key in result}


def sweep(result: dict, out_dir: str | Path) -> dict:
    """``{<metric>: {<series>: {nfe<NNN>: score}}, curvature, straightness}`` (series:
    :attr:`aot_model.sweep.SweepPoint.series`); NFE is zero-padded to three digits so the columns
    sort by NFE. Guided sweeps have no curvature (it is measured on the unguided model)."""
    scores: dict[str, dict] = {}
    for row in read_table(Path(out_dir) / f"{result['model']}_sweep.json"):
        scores.setdefault(row.point.series, {})[f"nfe{row.point.nfe:03d}"] = row.score
    numbers = {result["metric"]: scores}
    if "curvature_mean" in result:
        numbers |= {
            "curvature": result["curvature_mean"],
            "straightness": result["straightness_mean"],
        }
    return numbers
