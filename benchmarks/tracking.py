"""What MLflow tracking costs the demo's training, measured inside one tracked `aot train` run.

The demo's model, data and batch (``params.yaml``) train for ``--kimg`` with ticks every
``--tick-kimg`` (default 1 kimg, five times the demo's tick rate, so per-tick costs weigh more than
in the demo) through ``tracked.train`` into an embedded sqlite store. CPU time is counted per thread
(``time.thread_time``), which stays meaningful on a loaded machine where wall time does not:

- in the loop: the tick callback on the training thread, plus all CPU the background metric sender
  thread used; the ratio to the training loop's CPU time is the overhead that grows with the budget;
- around the loop: CPU of the tracked step outside ``steps.train`` (runs, params, artifacts, the
  pyfunc model with the checkpoint, the registry), expressed against the demo's whole training
  budget (``train.duration_kimg`` at the measured CPU sec/kimg).

Usage: python benchmarks/tracking.py [--kimg 3] [--tick-kimg 1] [--threads N]
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from aot_pipeline import steps, tracked, tracking
from aot_pipeline.config import load_params

ROOT = Path(__file__).resolve().parents[1]


def _timed(function, totals: dict, key: str):
    """``function`` that adds the calling thread's CPU seconds to ``totals[key]``."""

    def wrapper(*args, **kwargs):
        start = time.thread_time()
        try:
            return function(*args, **kwargs)
        finally:
            totals[key] = totals.get(key, 0.0) + time.thread_time() - start

    return wrapper


def measure(params, dataset: Path, tmp: Path) -> dict:
    """CPU seconds of one tracked training step, split as described in the module docstring."""
    totals: dict[str, float] = {}
    patches = [
        (steps, "train", "loop"),
        (tracking.StepRun, "log_tick", "callback"),
        (tracking.MetricSender, "_send", "sender"),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, key in patches:
        setattr(owner, name, _timed(getattr(owner, name), totals, key))
    try:
        start = time.process_time()
        with tracking.pipeline_run("benchmark"):
            tracked.train(params, "aot", dataset, tmp / "run", device="cpu")
        totals["step"] = time.process_time() - start
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kimg", type=float, default=3.0, help="training budget of the run")
    parser.add_argument("--tick-kimg", type=float, default=1.0, help="metrics every ... kimg")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    demo = load_params(ROOT / "params.yaml")
    train = demo.train.model_copy(update={"duration_kimg": args.kimg, "tick_kimg": args.tick_kimg})
    params = demo.model_copy(update={"train": train})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.update(
            AOT_TRACKING="on",
            AOT_STATE_DIR=str(tmp / ".aot"),
            MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}",
        )
        steps.prepare(params.data, tmp / "dataset.npz")
        tracking.experiment_id(tracking.client())  # the store exists before, as a project's does
        t = measure(params, tmp / "dataset.npz", tmp)
    in_loop = t.get("callback", 0.0) + t.get("sender", 0.0)
    around = t["step"] - t["loop"] - t.get("sender", 0.0)
    budget = demo.train.duration_kimg * t["loop"] / args.kimg
    print(
        f"{args.kimg:g} kimg, ticks of {args.tick_kimg:g} kimg, {args.threads} thread(s): "
        f"training loop {t['loop']:.2f} CPU s; tick callbacks {t.get('callback', 0):.4f} s + "
        f"sender thread {t.get('sender', 0):.4f} s = {100 * in_loop / t['loop']:.3f}% of the loop; "
        f"around the loop {around:.2f} CPU s = {100 * around / budget:.2f}% of the demo's "
        f"{demo.train.duration_kimg:g} kimg training (~{budget:.0f} CPU s at this speed)"
    )


if __name__ == "__main__":
    main()
