"""A study through the Prefect flow against the same models run by plain `aot` commands.

Starts its own services (temporary folder, free loopback ports, the models queue limited to the
usable cores), deploys both flows and runs ``--params`` (default: the smoke study) through
aot/train-eval into one folder. Then runs the same stages of the same params by plain `aot`
commands into another folder: the shared stages, then each model's stages as one chain of
processes, as many chains at once as there are cores, then the final stages; every command is
``pipeline.command`` of the declaration, so both runs execute the same steps. Both use one torch
thread per process. Prints each wall time, their ratio, whether every sweep score is the same bit
for bit, and the most child flow runs that ran at once (from their start and end times).

Usage: python benchmarks/fanout.py [--params configs/study-digits-smoke.yaml]
"""

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx
import typer

from aot_pipeline import pipeline, services
from aot_pipeline.cli import app
from aot_pipeline.config import load_params

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _flow(settings, env, params: Path, out: Path) -> tuple[float, list[dict]]:
    """Wall time of the flow run from submission to its end, and its child runs."""
    args = [BIN / "prefect", "deployment", "run", "aot/train-eval", "--param", f"params={params}"]
    args += ["--param", f"out={out}", "--param", "device=cpu", "--param", "guidance=false"]
    start = time.monotonic()
    text = subprocess.run(args, env=env, cwd=ROOT, check=True, capture_output=True, text=True)
    run_id = re.search(r"UUID:\s*([0-9a-f-]{36})", text.stdout).group(1)
    api = httpx.Client(base_url=settings.prefect_api_url, timeout=30)
    while (state := api.get(f"/flow_runs/{run_id}").json()["state"])["type"] not in (
        "COMPLETED", "FAILED", "CRASHED", "CANCELLED",
    ):  # fmt: skip
        time.sleep(1)
    wall = time.monotonic() - start
    if state["type"] != "COMPLETED":
        raise SystemExit(f"flow run {run_id} ended {state['type']}: {state['message']}")
    tasks = api.post("/task_runs/filter", json={"flow_runs": {"id": {"any_": [run_id]}}}).json()
    body = {"flow_runs": {"parent_task_run_id": {"any_": [t["id"] for t in tasks]}}}
    return wall, api.post("/flow_runs/filter", json=body).json()


def _plain(params: Path, out: Path, slots: int, env: dict) -> float:
    """Wall time of the same stages as plain `aot` commands, one model chain per core."""
    plan = pipeline.plan(load_params(params), guidance=False)

    commands = typer.main.get_command(app).commands

    def run(stage, model=None):
        argv = [str(BIN / "aot"), *pipeline.command(stage, plan, out, model)[1:]]
        options = {o for p in commands[stage.command].params for o in getattr(p, "opts", [])}
        for option, value in (("--params", str(params)), ("--device", "cpu")):
            if option in options:
                argv += [option, value]
        subprocess.run(argv, env=env, check=True, capture_output=True)

    def chain(model):
        for stage in pipeline.model_stages(plan, model):
            run(stage, model)

    start = time.monotonic()
    for stage in pipeline.shared_stages(plan):
        run(stage)
    with ThreadPoolExecutor(slots) as pool:
        list(pool.map(chain, plan.models))
    for stage in pipeline.final_stages(plan):
        run(stage)
    return time.monotonic() - start


def _most_at_once(runs: list[dict]) -> int:
    events = sorted(
        (datetime.fromisoformat(r[key]), step)
        for r in runs
        for key, step in (("start_time", 1), ("end_time", -1))
    )
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


def _scores(out: Path, plan) -> dict:
    return {
        m: [r["score"] for r in json.loads((out / "sweeps" / m / f"{m}_sweep.json").read_text())]
        for m in plan.models
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=ROOT / "configs/study-digits-smoke.yaml")
    args = parser.parse_args()
    params = args.params.resolve()
    slots = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        settings = services.Settings(
            state_dir=tmp / "state", s3_port=_port(), mlflow_port=_port(),
            prefect_port=_port(), worker_port=_port(), model_slots=slots,
        )  # fmt: skip
        env = {**os.environ, **settings.client_env({}), "AOT_TRACKING": "off"}
        env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        saved = dict(os.environ)
        os.environ.update(env)  # the worker and its flow runs inherit this
        try:
            services.up(settings, services.SERVICE_NAMES)
            subprocess.run([BIN / "prefect", "--no-prompt", "deploy", "--all"], env=env, cwd=ROOT,
                           check=True, capture_output=True)  # fmt: skip
            flow_wall, children = _flow(settings, env, params, tmp / "flow")
        finally:
            services.down(settings)
            os.environ.clear()
            os.environ.update(saved)
        print(f"flow (submission to end) {flow_wall:.1f} s; now the plain commands", flush=True)
        plain_wall = _plain(params, tmp / "plain", slots, env)
        plan = pipeline.plan(load_params(params), guidance=False)
        same = _scores(tmp / "flow", plan) == _scores(tmp / "plain", plan)
    print(f"params {params.relative_to(ROOT)}: {len(plan.models)} models, {slots} slots")
    print(f"flow (submission to end)          {flow_wall:7.1f} s")
    print(f"plain aot commands, {slots} chains    {plain_wall:7.1f} s")
    print(f"ratio flow / plain                 {flow_wall / plain_wall:7.3f}")
    print(f"sweep scores bit-identical         {same}")
    print(f"most child runs at once            {_most_at_once(children)} (limit {slots})")


if __name__ == "__main__":
    main()
