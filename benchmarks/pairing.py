"""Time AOT noise pairing: cost matrix plus exact assignment, scipy vs lap.

For each image shape and pool size P this builds P spatially correlated images in [-1, 1]
(bilinearly upsampled 4x4 Gaussian noise through tanh, a stand-in for natural images, which have
most of their energy at low frequencies) and P unit noises, then times the three parts of
`aot_model.pairing.Pairing.match`: the exact (fixed-point float64) cost matrix on the device, the
assignment with each solver (including the copy to the CPU), and the whole call. For comparison it
also times the plain float32 expanded form the project used before (BLAS-order dependent, so not
reproducible across CPUs) and prints the exact/float32 time ratio, both measured in the same run.
Every repeat uses a fresh pool; the table shows medians over repeats after one untimed warm-up.

``--builder`` times instead the training loop's whole pool builder (load, augment with EDM's
p = 0.12, draw noise, cost, solve: `training._pool_loader`, as the background thread runs it) in
img/s, next to its matching alone (cost + assignment; on a GPU only the assignment stays on the
CPU) and to the step's consumption measured by benchmarks/train_step.py, as ratios: a builder
below 1x would hold training back (the loop logs that wait as ``pool_wait_sec``).

    python benchmarks/pairing.py --quick
    python benchmarks/pairing.py --out pairing.json
    python benchmarks/pairing.py --builder
"""

import argparse
import json
import platform
import statistics
import time

import lap
import numpy as np
import scipy
import torch

from aot_model import training
from aot_model.data import ImageDataset, load_digits
from aot_model.pairing import SOLVERS, Pairing, cost_matrix, solve_assignment
from aot_model.training import TrainOptions

SHAPES = ((3, 32, 32), (1, 8, 8))
FULL_SIZES = (64, 128, 256, 512, 1024, 2048)
QUICK_SIZES = (64, 128, 256, 512)
DATA_NOTE = (
    "images: 4x4 Gaussian noise upsampled bilinearly to full size, through tanh (spatially "
    "correlated, in [-1, 1]); noise: N(0, I)"
)


def correlated_images(count, shape, generator):
    """[count, *shape] images in [-1, 1] with smooth spatial structure."""
    low = torch.randn(count, shape[0], 4, 4, generator=generator)
    return torch.tanh(torch.nn.functional.interpolate(low, size=shape[1:], mode="bilinear"))


def float32_costs(images, noise):
    """The former cost: float32 |y|^2 + |n|^2 - 2 y.n, whose last bits depend on the BLAS path."""
    y, n = images.flatten(1), noise.flatten(1)
    sq = torch.addmm(n.square().sum(1)[None], y, n.T, alpha=-2.0)
    return sq.add_(y.square().sum(1)[:, None]).clamp_min_(0.0).sqrt_()


def _timed(device, fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def measure(shape, pool_size, repeats, device):
    """Median timings (ms) and matching quality for one (shape, P) cell."""
    times = {"cost": [], "cost_f32": [], **{s: [] for s in SOLVERS}}
    ratios, disagreement = [], 0.0
    for rep in range(repeats + 1):  # repeat 0 is the untimed warm-up
        g = torch.Generator().manual_seed(rep)
        images = correlated_images(pool_size, shape, g).to(device)
        noise = torch.randn(pool_size, *shape, generator=g).to(device)
        costs, t_cost = _timed(device, cost_matrix, images, noise)
        _, t_f32 = _timed(device, float32_costs, images, noise)
        c, totals = costs.double().cpu().numpy(), {}
        for solver in SOLVERS:
            cols, t_solve = _timed(device, solve_assignment, costs, solver)
            totals[solver] = c[np.arange(pool_size), cols].sum()
            if rep:
                times[solver].append(t_solve)
        if rep:
            times["cost"].append(t_cost)
            times["cost_f32"].append(t_f32)
            identity = np.trace(c)
            ratios.append(totals["scipy"] / identity)
            disagreement = max(disagreement, abs(totals["lap"] / totals["scipy"] - 1))
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return {
        "shape": "x".join(map(str, shape)),
        "P": pool_size,
        "cost_ms": ms["cost"],
        "cost_f32_ms": ms["cost_f32"],
        "exact_cost_ratio": ms["cost"] / ms["cost_f32"],
        **{f"{s}_solve_ms": ms[s] for s in SOLVERS},
        **{f"{s}_total_ms": ms["cost"] + ms[s] for s in SOLVERS},
        "lap_speedup": ms["scipy"] / ms["lap"],
        "distance_ratio": statistics.median(ratios),
        "lap_vs_scipy_rel_diff": disagreement,
    }


def markdown(rows):
    lines = [
        "| shape | P | cost matrix | float32 cost (old) | exact/float32 | scipy solve | lap solve "
        "| total scipy | total lap | lap speedup | matched/identity |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['P']} | {r['cost_ms']:.2f} | {r['cost_f32_ms']:.2f} "
            f"| {r['exact_cost_ratio']:.1f}x | {r['scipy_solve_ms']:.2f} "
            f"| {r['lap_solve_ms']:.2f} | {r['scipy_total_ms']:.2f} | {r['lap_total_ms']:.2f} "
            f"| {r['lap_speedup']:.1f}x | {r['distance_ratio']:.4f} |"
        )
    return "\n".join(lines)


def builder_rates(dataset, pool_size: int, solver: str, repeats: int, device) -> dict:
    """img/s of the loop's pool builder and of its matching (cost + assignment), medians."""
    o = TrainOptions(pairing=Pairing(solver=solver), pool_size=pool_size)
    load = training._pool_loader(dataset, o, 0, 1, device)
    whole, solve = [], []
    for index in range(repeats + 1):  # pool 0 is the untimed warm-up
        pool, seconds = _timed(device, load, index)
        if index:
            whole.append(seconds)
            solve.append(pool.stats.solve_seconds)
    return {
        "builder_img_s": pool_size / statistics.median(whole),
        "solve_img_s": pool_size / statistics.median(solve),
    }


def builder_table(repeats: int, device) -> str:
    import train_step  # benchmarks/ (this script's folder) is on sys.path

    demo = load_digits(train_step.PARAMS.data.resolution, train_step.PARAMS.data.channels)
    rng = np.random.default_rng(0)
    cifar_like = ImageDataset(
        rng.integers(0, 256, (4096, 3, 32, 32), dtype=np.uint8),
        rng.integers(0, 10, 4096).astype(np.int64), 10, "random-32x32x3",
    )  # fmt: skip
    seconds, _ = train_step.timed_run(demo, train_step.DEMO, True, 2)
    consumed = {"demo": 1000 / seconds}
    lines = [
        "| config | solver | builder img/s | matching alone img/s | step img/s (train_step.py) "
        "| builder / step | matching / step |",
        "|---|---|---|---|---|---|---|",
    ]
    configs = (("demo", demo, train_step.DEMO["pool_size"]), ("paper", cifar_like, 512))
    for name, dataset, pool_size in configs:
        for solver in SOLVERS:
            r = builder_rates(dataset, pool_size, solver, repeats, device)
            step = consumed.get(name)
            ratios = (
                f"{r['builder_img_s'] / step:.1f}x | {r['solve_img_s'] / step:.1f}x"
                if step
                else "see text | see text"
            )
            lines.append(
                f"| {name} P={pool_size} | {solver} | {r['builder_img_s']:.0f} "
                f"| {r['solve_img_s']:.0f} | {f'{step:.0f}' if step else 'not on a CPU'} "
                f"| {ratios} |"
            )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"P in {QUICK_SIZES}, 3 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu", help="where the cost matrix is built")
    parser.add_argument("--out", default=None, help="write rows and settings as JSON here")
    parser.add_argument("--builder", action="store_true", help="the pool builder vs the step")
    args = parser.parse_args()
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    repeats = args.repeats or (3 if args.quick else 5)
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    if args.builder:
        print(f"Pool builder on {device}, torch threads {args.threads}, median of {repeats} pools")
        print(builder_table(repeats, device))
        return
    settings = {
        "repeats": repeats,
        "threads": args.threads,
        "device": str(device),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "scipy": scipy.__version__,
        "lap": lap.__version__,
        "data": DATA_NOTE,
    }
    rows = [measure(shape, p, repeats, device) for shape in SHAPES for p in sizes]
    print(f"AOT pairing, exact cost matrix on {device} + exact assignment on the CPU.")
    print(f"Median ms over {repeats} fresh pools; torch threads {args.threads}; {DATA_NOTE}.")
    print(f"torch {torch.__version__}, scipy {scipy.__version__}, lap {lap.__version__}.\n")
    print(markdown(rows))
    worst = max(r["lap_vs_scipy_rel_diff"] for r in rows)
    print(f"\nlap vs scipy optimum: max relative difference of the total cost {worst:.1e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"settings": settings, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
