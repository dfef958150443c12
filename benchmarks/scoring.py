"""Throughput of evaluation: feature extraction and sweep sampling, printed as a markdown table.

Measures, on the chosen device:

* the small feature net (:class:`aot_model.features.FeatureNet`, width 32) on 16x16x1 images;
* clean-fid's "clean" resize alone (PIL bicubic to 299x299, a CPU cost even on a GPU machine);
* Inception-v3 features in "clean" mode at 32x32x3, only when its weights are present locally;
* :func:`aot_model.sweep.run_sweep` sampling with the demo ``EDMPrecond`` (params.yaml) at the three
  settings (NFE 35, 27, 29).

Example::

    python benchmarks/scoring.py --threads 1 --num-images 512
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from aot_model import features, sweep
from aot_model.networks import EDMPrecond
from aot_pipeline.config import load_params

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, repeats: int = 1) -> float:
    """Best wall time of ``repeats`` calls after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def random_uint8(n: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, *shape), dtype=np.uint8)


def bench_feature_net(num_images: int, device: torch.device, workdir: Path) -> tuple[str, float]:
    path = workdir / "featnet.pt"
    features.save_feature_net(path, features.FeatureNet(1, 16, 10, width=32))
    extractor = features.feature_net_extractor(path, device=device, batch_size=256)
    images = random_uint8(num_images, (1, 16, 16))
    seconds = timed(lambda: extractor.features([images]), repeats=3)
    return "feature net (width 32), 16x16x1, native", num_images / seconds


def bench_clean_resize(num_images: int, threads: int) -> tuple[str, float]:
    def identity(x):
        return x.flatten(1)

    extractor = features.FeatureExtractor(
        "identity", identity, sha256="", mode="clean", in_channels=3, resize_threads=threads
    )
    images = random_uint8(num_images, (3, 32, 32))
    seconds = timed(lambda: extractor.features([images]), repeats=3)
    return f"clean-fid resize only (PIL bicubic 32->299, {threads} thread(s))", num_images / seconds


def bench_inception(
    num_images: int, device: torch.device, threads: int
) -> tuple[str, float] | None:
    try:
        extractor = features.inception_extractor(
            device=device, download=False, batch_size=64, resize_threads=threads
        )
    except FileNotFoundError:
        return None
    images = random_uint8(num_images, (3, 32, 32))
    seconds = timed(lambda: extractor.features([images]))
    return "Inception-v3 clean (resize + forward), 32x32x3", num_images / seconds


def bench_sweep(num_images: int, device: torch.device, workdir: Path) -> list[tuple[str, float]]:
    torch.manual_seed(0)
    demo = load_params(ROOT / "params.yaml")
    resolution, channels = demo.data.resolution, demo.data.channels
    net = EDMPrecond(
        resolution,
        channels,
        arch=demo.network.arch,
        augment_dim=0,
        **demo.network.model_dump(exclude={"arch", "cond"}),
    )
    net = net.to(device).eval()
    params = sum(p.numel() for p in net.parameters())
    rows = sweep.run_sweep(
        net,
        list(sweep.PAPER_POINTS),
        range(num_images),
        out_dir=workdir / "sweep",
        img_shape=(channels, resolution, resolution),
        batch_size=min(num_images, 256),
        device=device,
        progress=False,
    )
    return [
        (
            f"sweep sampling, demo EDMPrecond ({params / 1e3:.0f}k params), "
            f"{resolution}x{resolution}x{channels}, "
            f"{r.point.num_steps} steps rho {r.point.rho:g} (NFE {r.point.nfe})",
            r.img_per_s,
        )
        for r in rows
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch and resize CPU threads")
    parser.add_argument("--num-images", type=int, default=512)
    parser.add_argument("--inception-images", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        results = [
            bench_feature_net(args.num_images, device, workdir),
            bench_clean_resize(args.inception_images, 1),
        ]
        if args.threads > 1:
            results.append(bench_clean_resize(args.inception_images, args.threads))
        inception = bench_inception(args.inception_images, device, args.threads)
        results += [inception] if inception else []
        results += bench_sweep(args.num_images, device, workdir)
    print(f"`{' '.join(['python', *sys.argv])}` (device {device}, {args.threads} thread(s))\n")
    print("| what | img/s |\n|---|---:|")
    for name, rate in results:
        print(f"| {name} | {rate:,.0f} |")
    if inception is None:
        print(
            "\nInception skipped: inception-2015-12-05.pt not found locally "
            "(see aot_model/features.py)."
        )


if __name__ == "__main__":
    main()
