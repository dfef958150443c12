"""What MLflow tracking costs the demo's training: the same `aot train` step with tracking off
(``steps.train``) and on (``tracked.train`` into an embedded sqlite store), alternately in one
process (the order flips every repeat) so machine load affects both alike.

Reported per repeat: the training-loop time ratio tracked/plain (per-tick metrics handed to the
background sender; what grows with the training budget), and the fixed seconds the tracked step
adds around the loop (runs, params, stats.jsonl, the pyfunc model with the checkpoint, registry).
The fixed part is then expressed against the full demo budget (``params.yaml`` train.duration_kimg)
using the measured sec/kimg.

Usage: python benchmarks/tracking.py [--kimg 10] [--repeats 2] [--threads N]
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from aot_pipeline import steps, tracked, tracking
from aot_pipeline.config import load_params

ROOT = Path(__file__).resolve().parents[1]


def one_run(params, dataset: Path, track: bool) -> tuple[float, float]:
    """(training-loop seconds, whole-step seconds) of one `aot train --variant aot`."""
    loop = []
    plain_train = steps.train

    def timed_train(*args, **kwargs):
        start = time.perf_counter()
        result = plain_train(*args, **kwargs)
        loop.append(time.perf_counter() - start)
        return result

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["AOT_TRACKING"] = "on" if track else "off"
        os.environ["AOT_STATE_DIR"] = str(Path(tmp) / ".aot")
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        steps.train = timed_train
        try:
            start = time.perf_counter()
            with tracking.pipeline_run("benchmark"):
                tracked.train(params, "aot", dataset, Path(tmp) / "run", device="cpu")
            total = time.perf_counter() - start
        finally:
            steps.train = plain_train
    return loop[0], total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kimg", type=float, default=10.0, help="training budget per run")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    demo = load_params(ROOT / "params.yaml")
    params = demo.model_copy(
        update={"train": demo.train.model_copy(update={"duration_kimg": args.kimg})}
    )
    with tempfile.TemporaryDirectory() as tmp:
        dataset = Path(tmp) / "dataset.npz"
        steps.prepare(params.data, dataset)
        ratios, fixed, sec_per_kimg = [], [], []
        for repeat in range(args.repeats):
            order = (False, True) if repeat % 2 == 0 else (True, False)
            times = {track: one_run(params, dataset, track) for track in order}
            (plain_loop, plain_total), (track_loop, track_total) = times[False], times[True]
            ratios.append(track_loop / plain_loop)
            fixed.append(track_total - track_loop - (plain_total - plain_loop))
            sec_per_kimg.append(plain_loop / args.kimg)
            print(
                f"repeat {repeat}: loop plain {plain_loop:.1f} s, tracked {track_loop:.1f} s "
                f"(ratio {ratios[-1]:.4f}); fixed tracking cost {fixed[-1]:.2f} s"
            )
    budget = demo.train.duration_kimg * statistics.median(sec_per_kimg)
    extra = statistics.median(ratios) - 1 + statistics.median(fixed) / budget
    print(
        f"loop ratio tracked/plain: median {statistics.median(ratios):.4f}, "
        f"min {min(ratios):.4f}; fixed cost median {statistics.median(fixed):.2f} s; "
        f"demo training ({demo.train.duration_kimg:g} kimg, ~{budget:.0f} s here): "
        f"tracking adds {100 * extra:.2f}%"
    )


if __name__ == "__main__":
    main()
