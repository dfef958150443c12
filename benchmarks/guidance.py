"""Cost of Discriminator Guidance relative to the denoiser, printed as a markdown table.

Per image, at the sizes of params.yaml (the demo): one denoiser evaluation (``EDMPrecond``, what NFE
counts) vs one discriminator forward + backward pass (extractor + head, what ``disc_calls``
counts), both at batch ``--batch``. Wall and process CPU seconds are both given: on a shared
machine the CPU time is the steadier figure, and the ratio is what sizes a guided sweep
(guided cost ~ NFE + ratio * disc_calls denoiser evaluations).

Example::

    python benchmarks/guidance.py --threads 2 --batch 500
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from aot_model.adm import EncoderUNet
from aot_model.guidance import Discriminator, log_ratio_grad
from aot_model.networks import EDMPrecond
from aot_pipeline.config import load_params

ROOT = Path(__file__).resolve().parents[1]


def cost(fn, repeats: int) -> tuple[float, float]:
    """Mean (wall, CPU) seconds of ``repeats`` calls after one warm-up call."""
    fn()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - wall) / repeats, (time.process_time() - cpu) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    p = load_params(ROOT / "params.yaml")
    res, ch, g = p.data.resolution, p.data.channels, p.guidance
    net = EDMPrecond(
        res,
        ch,
        arch=p.network.arch,
        augment_dim=0,
        **p.network.model_dump(exclude={"arch", "cond"}),
    ).eval()
    extractor = EncoderUNet(
        image_size=res,
        in_channels=ch,
        model_channels=g.extractor.model_channels,
        out_channels=10,
        num_res_blocks=g.extractor.num_blocks,
        attention_ds=tuple(res // r for r in g.extractor.attn_resolutions),
        channel_mult=tuple(g.extractor.channel_mult),
        num_head_channels=g.extractor.num_head_channels,
    )
    head = EncoderUNet(
        image_size=extractor.feature_size,
        in_channels=extractor.feature_channels,
        model_channels=g.head_channels,
        out_channels=1,
        num_res_blocks=g.head_blocks,
        attention_ds=(1,),
        channel_mult=(1,),
        num_head_channels=g.extractor.num_head_channels,
    )
    disc = Discriminator(extractor, head)
    x, sigma = torch.randn(args.batch, ch, res, res), torch.full((args.batch,), 1.0)
    with torch.no_grad():
        denoiser = cost(lambda: net(x, sigma), args.repeats)
    guidance = cost(lambda: log_ratio_grad(disc, x, sigma), args.repeats)
    print(f"batch {args.batch}, {args.threads} thread(s), {res}x{res}x{ch}\n")
    print("| what | wall s/batch | CPU s/batch |\n|---|---:|---:|")
    print(f"| denoiser evaluation (1 NFE) | {denoiser[0]:.3f} | {denoiser[1]:.3f} |")
    print(f"| discriminator forward + backward | {guidance[0]:.3f} | {guidance[1]:.3f} |")
    print(f"| ratio | {guidance[0] / denoiser[0]:.2f} | {guidance[1] / denoiser[1]:.2f} |")


if __name__ == "__main__":
    main()
