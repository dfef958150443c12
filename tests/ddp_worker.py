"""Run by tests/test_training.py under ``torchrun --nproc_per_node=2`` (gloo on CPU).

Trains the tiny test configuration once per match scope, then resumes the global run from its
first checkpoint past a damaged second one, and writes, for each rank and run, a JSON file with a
SHA-256 of its final network and EMA state dicts, so the test can check that the ranks end with
identical weights and the resumed run with the uninterrupted one's.

Usage: python -m torch.distributed.run --standalone --nproc_per_node=2 ddp_worker.py OUT_DIR
"""

import atexit
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from aot_model.data import ImageDataset
from aot_model.networks import EDMPrecond
from aot_model.pairing import Pairing
from aot_model.training import Component, TrainOptions, training_loop


def state_hash(*modules: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for module in modules:
        for key, tensor in module.state_dict().items():
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(out_dir: Path) -> None:
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    dataset = ImageDataset(
        rng.integers(0, 256, (64, 1, 8, 8), dtype=np.uint8),
        rng.integers(0, 3, 64).astype(np.int64),
        num_classes=3,
        name="ddp-toy",
    )
    model = {"arch": "ncsnpp", "model_channels": 8, "channel_mult": [1, 2], "num_blocks": 1,
             "attn_resolutions": [], "dropout": 0.1}  # fmt: skip
    options = TrainOptions(
        network=Component(EDMPrecond, model), cond=True, batch=8, batch_gpu=2, pool_size=8,
        duration_kimg=0.032, tick_kimg=0.016, snapshot_ticks=1, lr_rampup_kimg=0.008, seed=3,
    )  # fmt: skip
    rank = int(os.environ["RANK"])
    # Registered before the group starts, so it runs after the group's own exit handler.
    atexit.register(lambda: (out_dir / f"exit-rank{rank}.json").write_text(
        json.dumps({"group_left": dist.is_initialized()})))  # fmt: skip
    for scope in ("per_rank", "global", "resumed"):
        resume = None
        if scope == "resumed":
            # The global run again, resumed from its first checkpoint past a damaged second one.
            ready, resume = out_dir / "resumed.ready", "auto"
            if rank == 0:
                first, last = sorted((out_dir / "global").glob("training-state-*.pt"))
                (out_dir / scope).mkdir()
                shutil.copy(first, out_dir / scope / first.name)
                (out_dir / scope / last.name).write_bytes(b"garbage")
                ready.touch()
            while not ready.exists():
                time.sleep(0.05)
        pairing = Pairing(scope="per_rank" if scope == "per_rank" else "global")
        result = training_loop(
            out_dir / scope, dataset, dataclasses.replace(options, pairing=pairing),
            resume=resume, progress=False,
        )  # fmt: skip
        record = {
            "hash": state_hash(result["net"], result["ema"]),
            "step": result["step"],
            "checkpoint": str(result["checkpoint"]),
            "metrics": result["metrics"],
        }
        (out_dir / f"{scope}-rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
