"""What ``aot train`` / ``aot sweep`` write to their ``--metrics`` file for ``dvc metrics``: only
the numbers people compare between models and commits, nested so ``dvc metrics show`` is one
narrow table (one row per file) and ``dvc metrics diff`` lines up. Hashes, paths and provenance
stay in the output manifests and the MLflow params.
"""

from __future__ import annotations

import json
from pathlib import Path


def train(result: dict) -> dict:
    """Final training loss and throughput of the last tick."""
    return {"loss": result["loss"], "img_per_sec": result["img_per_sec"]}


def sweep(result: dict, out_dir: str | Path) -> dict:
    """``{<metric>: {<solver>_rho<rho>: {nfe<NNN>: score}}, curvature, straightness}``; NFE is
    zero-padded to three digits so the columns sort by NFE."""
    rows = json.loads((Path(out_dir) / f"{result['model']}_sweep.json").read_text())
    scores: dict[str, dict] = {}
    for row in rows:
        series = scores.setdefault(f"{row['solver']}_rho{row['rho']:g}", {})
        series[f"nfe{row['nfe']:03d}"] = row["score"]
    return {
        result["metric"]: scores,
        "curvature": result["curvature_mean"],
        "straightness": result["straightness_mean"],
    }
