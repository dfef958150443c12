"""What a full paper reproduction costs: measured img/s of the paper's NCSN++, then GPU-hours.

Measures, on one device, with EDM-AOT's CIFAR-10 NCSN++ (method-notes b.4: 56M parameters, 32x32x3,
FP32 as in the paper):

- training img/s: one optimizer step of ``EDMLoss`` + Adam at batch 64 per GPU (the authors'
  batch_gpu), the matching excluded (benchmarks/train_step.py measures its overhead);
- sampling img/s with Heun at the AOT README's points: 14 steps rho 90 (NFE 27) and 18 steps
  rho 7 (NFE 35, EDM's default), batch 250 (the sweep's).

From these it prints the GPU-hours of one model (training 200 Mimg, then a 50k-image sample at
each of the README's three sampler points, NFE 35 / 27 / 29) and of the paper's four
(EDM and EDM-AOT, unconditional and conditional). Feature extraction (Inception) is excluded.

    python benchmarks/paper_cost.py                  # on CUDA: the real numbers
    python benchmarks/paper_cost.py --tiny           # CPU smoke check: a tiny NCSN++ at 16x16
"""

import argparse
import platform
import time

import torch

from aot_model import devices
from aot_model.loss import EDMLoss
from aot_model.networks import EDMPrecond
from aot_model.sampling import heun_sampler

TRAIN_IMAGES = 200e6  # the paper's duration (method-notes b.5)
FID_IMAGES = 50_000
SWEEP = ((18, 7.0), (14, 90.0), (15, 72.0))  # the README's points: NFE 35, 27, 29 (d.1)
TIMED = ((14, 90.0), (18, 7.0))  # NFE 27 and 35
PAPER = dict(resolution=32, channels=3, kwargs={}, train_batch=64, sample_batch=250)
TINY = dict(
    resolution=16,
    channels=1,
    kwargs=dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[]),
    train_batch=16,
    sample_batch=16,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn, images: int, repeats: int, device: torch.device) -> float:
    """img/s of ``fn`` (which handles ``images`` images), best of ``repeats`` after a warm-up."""
    fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return images / best


def measure(config: dict, device: torch.device, repeats: int) -> dict:
    shape = (config["channels"], config["resolution"], config["resolution"])
    net = EDMPrecond(
        config["resolution"], config["channels"], arch="ncsnpp", **config["kwargs"]
    ).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)  # as training_loop's
    loss_fn = EDMLoss()
    g = torch.Generator(device).manual_seed(0)
    b = config["train_batch"]
    images = torch.rand(b, *shape, generator=g, device=device) * 2 - 1
    noise = torch.randn(b, *shape, generator=g, device=device)

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(net, images, noise, generator=g).mean().backward()
        optimizer.step()

    result = {
        "parameters": sum(p.numel() for p in net.parameters()),
        "train_img_s": rate(train_step, b, repeats, device),
    }
    net.eval()
    n = config["sample_batch"]
    latents = torch.randn(n, *shape, generator=g, device=device)
    for steps, rho in TIMED:

        def sample(steps=steps, rho=rho):
            with torch.no_grad():
                heun_sampler(net, latents, num_steps=steps, rho=rho)

        result[f"sample_img_s_nfe{2 * steps - 1}"] = rate(sample, n, repeats, device)
    return result


def gpu_hours(result: dict) -> dict:
    """Hours on one device of the measured kind: training, a 50k sample per sweep point."""
    # Sampling cost scales with NFE: network evaluations per second, averaged over both points.
    per_nfe = sum(result[f"sample_img_s_nfe{2 * s - 1}"] * (2 * s - 1) for s, _ in TIMED) / 2
    sample_s = sum(FID_IMAGES * (2 * steps - 1) / per_nfe for steps, _ in SWEEP)
    train_h = TRAIN_IMAGES / result["train_img_s"] / 3600
    model = train_h + sample_s / 3600
    return {"train_h": train_h, "sweep_h": sample_s / 3600, "model_h": model, "paper_h": 4 * model}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny NCSN++ (CPU smoke check)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    device = torch.device(args.device)
    devices.set_float32_precision(False)  # the paper trains in FP32 (method-notes b.5)
    config = TINY if args.tiny else PAPER
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    r = measure(config, device, args.repeats)
    h = gpu_hours(r)
    size = "tiny NCSN++ (smoke check, NOT the paper's network)" if args.tiny else "paper NCSN++"
    print(f"{size}, {r['parameters']:,} parameters, {device} ({name or platform.machine()}), FP32")
    print(f"training: {r['train_img_s']:.1f} img/s at batch {config['train_batch']}")
    for steps, rho in TIMED:
        nfe = 2 * steps - 1
        rate = r[f"sample_img_s_nfe{nfe}"]
        print(f"sampling NFE {nfe} (Heun, {steps} steps, rho {rho:g}): {rate:.1f} img/s")
    print(
        f"one model: {h['train_h']:.1f} h training (200 Mimg) + {h['sweep_h']:.2f} h sampling "
        f"(50k images at NFE 35, 27, 29) = {h['model_h']:.1f} device-hours"
    )
    print(
        f"the paper's four models (EDM and EDM-AOT, unconditional and conditional): "
        f"{h['paper_h']:.0f} device-hours on this device (Inception scoring excluded)"
    )


if __name__ == "__main__":
    main()
