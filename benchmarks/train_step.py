"""Training throughput (img/s, sec/kimg) and the step-time overhead of AOT pairing.

Every number comes from `training_loop` itself (its per-tick ``sec_per_kimg``; checkpoint writing
excluded), with the first tick of each run dropped as warm-up. Configurations:

- demo: the model, dataset, batch and pool of the project's params.yaml (the CPU demo: 16x16x1
  scikit-learn digits, a small NCSN++, batch 64, P = 512), prefetch on, EDM augmentation
  p = 0.12; always run, on the CPU unless CUDA exists.
- paper (CUDA only): EDM-AOT's NCSN++ CIFAR-10 network (method-notes b.4) on random 32x32x3 data,
  batch 64 per GPU, P = 512.

AOT and the EDM baseline (``aot=False``: same pools, identity pairing) run alternately in one
process (the order flips every repeat), so machine load affects both alike; the ratio of their
step times is reported per repeat as min and median.

Usage: python benchmarks/train_step.py [--repeats 5] [--ticks 3] [--threads N]
"""

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from aot_model.data import ImageDataset, load_digits
from aot_model.training import training_loop
from aot_pipeline.config import load_params

PARAMS = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
_NET = PARAMS.network.model_dump(exclude={"arch", "cond"})
DEMO = {
    "arch": PARAMS.network.arch,
    "model_kwargs": _NET,
    "batch": PARAMS.train.batch,
    "pool_size": PARAMS.train.aot.pool_size,
}
PAPER = {"arch": "ncsnpp", "model_kwargs": {}, "batch": 64, "pool_size": 512}


def timed_run(dataset: ImageDataset, config: dict, aot: bool, ticks: int) -> tuple[float, float]:
    """Mean sec/kimg and pairing seconds per pool over ``ticks`` one-pool ticks after a warm-up."""
    seen = []
    tick_kimg = config["pool_size"] / 1000
    with tempfile.TemporaryDirectory() as run_dir:
        training_loop(
            run_dir, dataset, **config, aot=aot, prefetch=True, tick_kimg=tick_kimg,
            duration_kimg=(ticks + 1) * tick_kimg, lr_rampup_kimg=1, snapshot_ticks=10**6,
            progress=False, callback=seen.append,
        )  # fmt: skip
    timed = seen[1:]
    return (
        statistics.fmean(m["sec_per_kimg"] for m in timed),
        statistics.fmean(m["pairing_sec"] for m in timed),
    )


def compare(dataset, config, repeats: int, ticks: int) -> dict:
    """Interleaved AOT / baseline runs; per-repeat ratios of AOT over baseline sec/kimg."""
    times, pairing = {True: [], False: []}, {True: [], False: []}
    for r in range(repeats):
        for aot in (r % 2 == 0, r % 2 == 1):
            seconds, solve = timed_run(dataset, config, aot, ticks)
            times[aot].append(seconds)
            pairing[aot].append(solve)
            print(f"  repeat {r} aot={aot}: {seconds:.3f} sec/kimg", file=sys.stderr)
    ratios = [a / b for a, b in zip(times[True], times[False], strict=True)]
    return {"times": times, "pairing": pairing, "ratios": ratios}


def table_rows(name: str, device: str, result: dict) -> list[str]:
    rows = []
    for aot in (False, True):
        med = statistics.median(result["times"][aot])
        label = "EDM-AOT" if aot else "EDM baseline"
        solve = statistics.median(result["pairing"][aot])
        rows.append(f"| {name} | {device} | {label} | {1000 / med:.1f} | {med:.3f} | {solve:.4f} |")
    r = result["ratios"]
    rows.append(
        f"| {name} | {device} | AOT / baseline step time | min {min(r):.3f} | "
        f"median {statistics.median(r):.3f} | max {max(r):.3f} |"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved AOT/baseline pairs")
    parser.add_argument("--ticks", type=int, default=3, help="timed pools per run (after 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    device += f" ({torch.get_num_threads()} threads)" if device == "cpu" else ""

    digits = load_digits(PARAMS.data.resolution, PARAMS.data.channels)
    result = compare(digits, DEMO, args.repeats, args.ticks)
    rows = table_rows(f"demo {digits.name}", device, result)
    if torch.cuda.is_available():
        rng = np.random.default_rng(0)
        cifar_like = ImageDataset(
            rng.integers(0, 256, (4096, 3, 32, 32), dtype=np.uint8),
            rng.integers(0, 10, 4096).astype(np.int64), 10, "random-32x32x3",
        )  # fmt: skip
        rows += table_rows("paper NCSN++ 32x32x3", device,
                           compare(cifar_like, PAPER, args.repeats, args.ticks))  # fmt: skip

    print(f"`python {' '.join(sys.argv)}`  (medians over {args.repeats} repeats)\n")
    print("| config | device | mode | img/s | sec/kimg | matching s/pool |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
