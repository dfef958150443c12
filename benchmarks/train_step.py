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

``--parts`` times instead the per-step pieces issue 21 changed, each against the form it replaced
(interleaved calls in one process, medians): Adam per parameter vs fused, the EMA per parameter vs
one multi-tensor lerp, and attention's q, k, v strided (SDPA's math path) vs contiguous (a fused
kernel), forward and backward at NCSN++'s 16x16 level, batch 8.

Usage: python benchmarks/train_step.py [--repeats 5] [--ticks 3] [--threads N] [--parts]
"""

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from aot_model.data import ImageDataset, load_digits
from aot_model.networks import EDMPrecond
from aot_model.training import TrainOptions, training_loop
from aot_pipeline.config import load_params, train_options

PARAMS = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
DEMO = train_options(PARAMS.network, PARAMS.train, aot=True)
PAPER = TrainOptions(batch=64, pool_size=512)


def timed_run(
    dataset: ImageDataset, config: TrainOptions, aot: bool, ticks: int
) -> tuple[float, float]:
    """Mean sec/kimg and pairing seconds per pool over ``ticks`` one-pool ticks after a warm-up."""
    seen = []
    tick_kimg = config.pool_size / 1000
    options = dataclasses.replace(
        config, pairing=config.pairing if aot else None, prefetch=True, tick_kimg=tick_kimg,
        duration_kimg=(ticks + 1) * tick_kimg, lr_rampup_kimg=1, snapshot_ticks=10**6,
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as run_dir:
        training_loop(run_dir, dataset, options, progress=False, callback=seen.append)
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


def interleaved(before, after, calls: int = 60, warm_up: int = 5) -> tuple[float, float]:
    """Median ms of each function over ``calls`` alternating calls (order flips every call)."""
    times = {before: [], after: []}
    for call in range(calls):
        for fn in (before, after) if call % 2 else (after, before):
            start = time.perf_counter()
            fn()
            times[fn].append(time.perf_counter() - start)
    return tuple(1e3 * statistics.median(times[fn][warm_up:]) for fn in (before, after))


def parts() -> list[str]:
    """Rows of before / after / ratio for the per-step pieces (see the module docstring)."""
    torch.manual_seed(0)
    net = EDMPrecond(PARAMS.data.resolution, PARAMS.data.channels, **DEMO.network.kwargs)
    params = list(net.parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    ema = [p.detach().clone() for p in params]
    loop_adam = torch.optim.Adam(params, lr=1e-4, foreach=False)
    fused_adam = torch.optim.Adam(params, lr=1e-4, fused=True)

    @torch.no_grad()
    def ema_loop():
        for a, b in zip(ema, params, strict=True):
            a.lerp_(b, 0.01)

    @torch.no_grad()
    def ema_foreach():
        torch._foreach_lerp_(ema, params, 0.01)

    qkv = torch.randn(8, 256, 3, 16 * 16, requires_grad=True)

    def attention(contiguous: bool):
        if contiguous:
            q, k, v = (t.unsqueeze(1) for t in qkv.permute(2, 0, 3, 1).contiguous().unbind(0))
        else:
            q, k, v = (t.transpose(1, 2).unsqueeze(1) for t in qkv.unbind(2))
        torch.nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()

    rows = []
    cases = (
        (f"Adam step, demo network ({len(params)} tensors)", loop_adam.step, fused_adam.step),
        ("EMA update, demo network", ema_loop, ema_foreach),
        ("attention fwd+bwd [8, C 256, 16x16]", lambda: attention(False), lambda: attention(True)),
    )
    for name, before, after in cases:
        b, a = interleaved(before, after)
        rows.append(f"| {name} | {b:.2f} ms | {a:.2f} ms | {a / b:.2f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved AOT/baseline pairs")
    parser.add_argument("--ticks", type=int, default=3, help="timed pools per run (after 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--parts", action="store_true", help="the per-step pieces, see above")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.parts:
        print(f"`python {' '.join(sys.argv)}`, {torch.get_num_threads()} thread(s)\n")
        print("| piece | before | after | after / before |\n|---|---|---|---|")
        print("\n".join(parts()))
        return
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
