"""Run by tests/test_steps.py under ``torchrun --nproc_per_node=2`` (gloo on CPU).

Each rank runs `aot sweep`'s and `aot fid --run-dir`'s steps on the same run, with the same
settings as the test's one-process run, into its own folder ``OUT/rank<r>`` (only rank 0 may
write there), and writes what the fid step returned to ``OUT/fid-rank<r>.json``.

Usage: python -m torch.distributed.run --standalone --nproc_per_node=2 sweep_worker.py RUN REF OUT
"""

import json
import os
import sys
from pathlib import Path

import torch

from aot_model.sweep import SweepPoint
from aot_pipeline import steps
from aot_pipeline.config import ScoreParams, SweepParams


def main(run_dir: Path, reference: Path, out: Path, params: dict) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    sweep, score = SweepParams(**params["sweep"]), ScoreParams(**params["score"])
    steps.sweep(sweep, score, run_dir, reference, out / f"rank{rank}", name="m")
    point = SweepPoint(**params["point"])
    result = steps.score_protocol(sweep, score, run_dir, reference, point, blocks=2)
    (out / f"fid-rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    run_dir, reference, out = map(Path, sys.argv[1:4])
    main(run_dir, reference, out, json.loads((out / "params.json").read_text()))
