"""`dvc plots show` works offline: the project's .dvc/config points at a template with vega,
vega-lite and vega-embed inlined (scripts/build_dvc_plots_template.py), not at a CDN."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TEMPLATE = ROOT / ".dvc" / "plots" / "offline.html"


def test_template_is_self_contained_and_keeps_licences():
    text = TEMPLATE.read_text()
    assert "{plot_divs}" in text and "{scripts}" not in text  # {scripts} would re-add the CDN
    assert not re.search(r"<script[^>]+src=", text)
    for package in ("vega@5.20.2", "vega-lite@5.2.0", "vega-embed@6.18.2"):
        assert package in text
    assert text.count("Redistribution and use in source and binary forms") == 3


@pytest.mark.integration
def test_dvc_plots_show_draws_offline(tmp_path):
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for args in (["git", "init", "-q"], [str(BIN / "dvc"), "init", "-q"]):
        subprocess.run(args, cwd=tmp_path, env=env, check=True, timeout=60)
    shutil.copy(ROOT / ".dvc" / "config", tmp_path / ".dvc" / "config")
    shutil.copytree(TEMPLATE.parent, tmp_path / ".dvc" / "plots")
    plots = {"plots": yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(plots))
    for name, scores in (("aot", [9.1, 5.1, 1.7]), ("edm", [12.0, 7.3, 3.1])):
        rows = "".join(f"{nfe},{s}\n" for nfe, s in zip((5, 7, 11), scores, strict=True))
        (tmp_path / "sweeps" / name).mkdir(parents=True)
        (tmp_path / "sweeps" / name / f"{name}_sweep.csv").write_text("nfe,score\n" + rows)
    subprocess.run(
        [str(BIN / "dvc"), "plots", "show"], cwd=tmp_path, env=env, check=True, timeout=120
    )
    page = (tmp_path / "dvc_plots" / "index.html").read_text()
    assert "cdn.jsdelivr" not in page and "aot_sweep.csv" in page

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("headless Chromium not installed (apt-get install chromium) to draw the page")
    dom = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=5000",
            "--dump-dom",
            (tmp_path / "dvc_plots" / "index.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    canvas = re.search(r'<canvas width="(\d+)" height="(\d+)" class="marks"', dom)
    assert canvas and int(canvas[1]) > 100 and int(canvas[2]) > 100, "vega drew no chart"
