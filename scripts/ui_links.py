"""Where to look after a flow run of `aot/train-eval`: its Prefect UI page, the MLflow parent run,
the MLflow compare view of its AOT and baseline runs and their score-vs-NFE series drawn together,
and the report folder.

    python scripts/ui_links.py FLOW_RUN_ID        # prints the links (make demo does this)
    python scripts/ui_links.py FLOW_RUN_ID --json

Reads PREFECT_API_URL and MLFLOW_TRACKING_URI (`eval "$(aot services env)"` sets both).
"""

from __future__ import annotations

import json
import os
import re
import sys
from urllib.parse import quote

import httpx


def prefect_api(path: str, body: dict | None = None):
    url = os.environ["PREFECT_API_URL"].rstrip("/") + path
    response = httpx.request("POST" if body is not None else "GET", url, json=body, timeout=30)
    response.raise_for_status()
    return response.json()


def links(flow_run_id: str) -> dict[str, str]:
    """Prefect flow-run page, MLflow parent run page and compare view, report folder."""
    from mlflow.tracking import MlflowClient

    run = prefect_api(f"/flow_runs/{flow_run_id}")
    ui = os.environ["PREFECT_API_URL"].rstrip("/").removesuffix("/api")
    body = {
        "flow_runs": {"id": {"any_": [flow_run_id]}},
        "artifacts": {"key": {"any_": ["aot-mlflow-run"]}},
    }
    artifacts = prefect_api("/artifacts/filter", body)
    result = {
        "prefect_flow_run": f"{ui}/runs/flow-run/{flow_run_id}",
        "report": os.path.join(run["parameters"].get("out", "demo"), "report", "report.md"),
    }
    if not artifacts:
        return result
    parent_url = re.search(r"\((http[^)]+)\)", artifacts[0]["data"])[1]  # "[text](url)"
    parent_id = parent_url.rsplit("/", 1)[-1]
    tracking = os.environ["MLFLOW_TRACKING_URI"].rstrip("/")
    client = MlflowClient(tracking)
    experiment = client.get_run(parent_id).info.experiment_id

    def children(run_id: str):
        query = f"tags.mlflow.parentRunId = '{run_id}'"
        return client.search_runs([experiment], query, order_by=["attributes.run_name"])

    # The flow's run holds one run per model (aot.role model), which holds its step runs.
    models = [c for c in children(parent_id) if c.data.tags.get("aot.role") == "model"]
    steps = [step for model in models for step in children(model.info.run_id)]
    compared = [c for c in steps if c.info.run_name.startswith(("train-", "sweep-"))]
    ids = [c.info.run_id for c in compared]
    query = f"runs={quote(json.dumps(ids))}&experiments={quote(json.dumps([experiment]))}"
    result["mlflow_parent_run"] = parent_url
    result["mlflow_compare"] = f"{tracking}/#/compare-runs?{query}"
    # The score series (step = NFE) of the sweeps drawn together: AOT against the baseline.
    sweeps = [c for c in compared if c.info.run_name.startswith("sweep-")]
    series = sorted(
        {k for c in sweeps for k in c.data.metrics if "_rho" in k and "img_per_s" not in k}
    )
    if series:
        query = "&".join(
            f"{key}={quote(json.dumps(value))}"
            for key, value in {
                "runs": [c.info.run_id for c in sweeps],
                "metric": series[0],
                "experiments": [experiment],
                "plot_metric_keys": series,
                "plot_layout": {},
            }.items()
        )
        query += "&x_axis=step&y_axis_scale=linear&line_smoothness=1&show_point=true"
        result["mlflow_scores"] = f"{tracking}/#/metric?{query}&deselected_curves=[]"
    return result


if __name__ == "__main__":
    found = links(sys.argv[1])
    if "--json" in sys.argv:
        print(json.dumps(found))
    else:
        width = max(map(len, found))
        for name, url in found.items():
            print(f"  {name:<{width}}  {url}")
