"""Branches side by side on the CPU (aot_pipeline/lanes.py) against one at a time.

The demo's network (params.yaml ``network`` and ``data``) trains at batch 64 (Adam steps) and runs
forward passes at batch 500 (a sampler step). One workload in this process with ``--threads`` torch
threads, or ``--lanes N`` workloads at once, each in its own thread in a lane (pinned to its share
of the usable cores, cores // N torch threads each), exactly as ``aot demo`` runs its branches.
Two processes pinned to a core each: ``taskset -c 0 python benchmarks/lanes.py --threads 1 &
taskset -c 1 python benchmarks/lanes.py --threads 1``.

Usage: python benchmarks/lanes.py [--threads N | --lanes N] [--steps 15]
"""

import argparse
import os
import time
from pathlib import Path

import torch

from aot_model.networks import EDMPrecond
from aot_pipeline import lanes
from aot_pipeline.config import load_params

ROOT = Path(__file__).resolve().parents[1]


def workload(steps: int) -> tuple[float, float]:
    """(training img/s at batch 64, forward img/s at batch 500) of the demo's network."""
    p = load_params(ROOT / "params.yaml")
    n, res, ch = p.network, p.data.image_resolution, p.data.channels
    torch.manual_seed(0)
    net = EDMPrecond(
        img_resolution=res, img_channels=ch, label_dim=0, arch=n.arch,
        model_channels=n.model_channels, channel_mult=n.channel_mult, num_blocks=n.num_blocks,
        attn_resolutions=n.attn_resolutions, dropout=n.dropout,
    )  # fmt: skip
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    x, sigma = torch.randn(64, ch, res, res), torch.rand(64) * 10 + 0.1

    def step() -> None:
        noisy = x + sigma.view(-1, 1, 1, 1) * torch.randn_like(x)
        loss = (net(noisy, sigma) - x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(3):  # warm-up
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    train = 64 * steps / (time.perf_counter() - start)
    xb, sb = torch.randn(500, ch, res, res), torch.full((500,), 1.0)
    with torch.no_grad():
        net(xb, sb)
        start = time.perf_counter()
        for _ in range(4):
            net(xb, sb)
        forward = 2000 / (time.perf_counter() - start)
    return train, forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--threads", type=int, help="one workload with this many torch threads")
    how.add_argument("--lanes", type=int, help="this many workloads at once, one per lane")
    parser.add_argument("--steps", type=int, default=15, help="timed training steps")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if args.lanes:
        core_sets = lanes.partition(cores, args.lanes)
        if not core_sets:
            raise SystemExit(f"--lanes {args.lanes} needs as many usable cores, have {cores}")
        plan = lanes.Lanes(core_sets)
        with lanes.torch_threads(plan):
            results = lanes.run([lambda: workload(args.steps)] * args.lanes, plan)
        label = f"{len(core_sets)} lanes {core_sets}, {plan.threads} torch thread(s) each"
    else:
        torch.set_num_threads(args.threads or torch.get_num_threads())
        results = [workload(args.steps)]
        label = f"one workload, {torch.get_num_threads()} torch thread(s), cores {cores}"
    train, forward = (sum(r[i] for r in results) for i in (0, 1))
    each = ", ".join(f"{t:.0f}/{f:.0f}" for t, f in results)
    print(f"{label}: train {train:.0f} img/s, forward b500 {forward:.0f} img/s (each {each})")


if __name__ == "__main__":
    main()
