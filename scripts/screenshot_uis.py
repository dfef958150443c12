"""Screenshots of the Prefect flow-run page and the MLflow compare view of one `aot/train-eval`
flow run, for the README, taken with headless Chromium (Debian: `apt-get install chromium`; the
project itself never needs it).

    eval "$(.venv/bin/aot services env)"
    .venv/bin/python scripts/screenshot_uis.py FLOW_RUN_ID     # -> docs/prefect-flow-run.png,
                                                               #    docs/mlflow-*.png
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from ui_links import links

DOCS = Path(__file__).resolve().parents[1] / "docs"
SHOTS = {
    "prefect_flow_run": ("prefect-flow-run.png", "1600,1000"),
    "mlflow_compare": ("mlflow-compare.png", "1600,1400"),
    "mlflow_scores": ("mlflow-scores.png", "1600,1000"),
}


def screenshot(url: str, path: Path, size: str = "1600,1000", wait_ms: int = 20000) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("headless Chromium is needed: apt-get install chromium")
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--window-size={size}",
            f"--virtual-time-budget={wait_ms}",  # the single-page apps fetch after load
            f"--screenshot={path}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )
    print(f"{path}: {url}")


def main(flow_run_id: str) -> None:
    found = links(flow_run_id)
    for key, (name, size) in SHOTS.items():
        screenshot(found[key], DOCS / name, size=size)


if __name__ == "__main__":
    main(sys.argv[1])
