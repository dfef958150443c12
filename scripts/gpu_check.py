"""Acceptance check of every GPU path (issue 21): a PASS / FAIL / SKIP line per check, figures.

Run through ``scripts/gpu_check.sh``. On CUDA it trains the paper's NCSN++ (32x32x3, random data,
batch 64, P = 512) for a few ticks in each mode; ``--smoke`` (the default without CUDA) runs the
same checks with a tiny network on the CPU in well under a minute, so the test suite keeps every
path alive. Exit status 1 if any check failed.
"""

import argparse
import atexit
import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import paper_cost  # noqa: E402  (benchmarks/ is not a package)

from aot_model import devices  # noqa: E402
from aot_model.adm import ADM32_CLASSIFIER, DG_HEAD, EncoderUNet  # noqa: E402
from aot_model.checkpoints import build_network_from_checkpoint, find_checkpoints  # noqa: E402
from aot_model.data import ImageDataset  # noqa: E402
from aot_model.guidance import Discriminator, Guidance  # noqa: E402
from aot_model.metrics import feature_stats, frechet_distance  # noqa: E402
from aot_model.networks import EDMPrecond  # noqa: E402
from aot_model.pairing import Pairing  # noqa: E402
from aot_model.sampling import fast_net, heun_sampler, latents_from_seeds  # noqa: E402
from aot_model.sweep import to_uint8  # noqa: E402
from aot_model.training import Component, TrainOptions, training_loop  # noqa: E402

PAPER = TrainOptions(batch=64, pool_size=512)
SMOKE = TrainOptions(
    network=Component(EDMPrecond, {"arch": "ncsnpp", "model_channels": 8, "channel_mult": [1, 2],
                                   "num_blocks": 1, "attn_resolutions": [4]}),
    batch=8,
    pool_size=16,
)  # fmt: skip
TICKS = 3
SAMPLER_POINTS = ((14, 90.0), (18, 7.0))  # NFE 27 and 35 (benchmarks/paper_cost.py)
failures = []


def report(status: str, name: str, detail: str) -> None:
    print(f"{status} {name}: {detail}", flush=True)
    if status == "FAIL":
        failures.append(name)


def check(name: str):
    """Run the decorated check now; its returned string is the PASS line's figures."""

    def run(fn):
        try:
            report("PASS", name, fn())
        except Exception as error:  # one line per failed check, the script goes on
            report("FAIL", name, f"{type(error).__name__}: {str(error).splitlines()[0]}")

    return run


def dataset(smoke: bool) -> ImageDataset:
    shape = (64, 1, 8, 8) if smoke else (4096, 3, 32, 32)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    return ImageDataset(images, rng.integers(0, 10, shape[0]).astype(np.int64), 10, "random")


def train(
    run_dir: Path, data, config: TrainOptions, device: str, ticks: int = TICKS, resume=None,
    aot: bool = True, scope: str = "per_rank", **options,
):  # fmt: skip
    """Train ``ticks`` one-pool ticks: (the per-tick metrics, the trained network)."""
    seen = []
    tick_kimg = config.pool_size / 1000
    options = dataclasses.replace(
        config, pairing=Pairing(scope=scope) if aot else None, tick_kimg=tick_kimg,
        duration_kimg=ticks * tick_kimg, lr_rampup_kimg=1, **options,
    )  # fmt: skip
    result = training_loop(
        run_dir, data, options, device=device, resume=resume, progress=False,
        callback=seen.append,
    )  # fmt: skip
    return seen, result["net"]


def figures(ticks: list) -> str:
    last = ticks[-1]
    text = (
        f"{last['img_per_sec']:.1f} img/s, {last['sec_per_kimg']:.3f} s/kimg, "
        f"builder wait {last['pool_wait_sec']:.3f} s/tick, loss {last['loss']:.4g}"
    )
    if "cuda_max_mem_gib" in last:
        text += f", peak {last['cuda_max_mem_gib']:.2f} GiB"
    return text


def state_hash(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for tensor in module.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def ddp_worker(out: Path, smoke: bool) -> None:
    """One rank of the DDP check (started by torchrun): global matching scope, hash written.

    NCCL with the paper's network on two GPUs; otherwise the gloo stand-in trains the smoke
    network on the CPU (the paper's would take hours there)."""
    torch.set_num_threads(1)
    cuda = not smoke and torch.cuda.device_count() >= 2
    with tempfile.TemporaryDirectory() as run_dir:
        ticks, net = train(
            Path(run_dir), dataset(not cuda), PAPER if cuda else SMOKE, "cuda" if cuda else "cpu",
            ticks=2, scope="global", seed=1,
        )  # fmt: skip
    result = {"hash": state_hash(net), "ticks": ticks}
    (out / f"rank{os.environ['RANK']}.json").write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny network (default off CUDA)")
    parser.add_argument("--inception-weights", type=Path, help="for the Inception features check")
    parser.add_argument("--ddp-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    smoke = args.smoke or not torch.cuda.is_available()
    if args.ddp_worker:
        return ddp_worker(args.ddp_worker, smoke)
    if smoke:
        torch.set_num_threads(1)  # a tiny network gains nothing from threads, and CI shares cores
    device, why = devices.resolve("cpu" if smoke else "auto")
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"gpu_check: {'smoke (tiny network, CPU)' if smoke else 'paper NCSN++'} on {name}")
    config, data = (SMOKE if smoke else PAPER), dataset(smoke)
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    atexit.register(shutil.rmtree, work, True)  # runs and checkpoints: gigabytes on CUDA
    times = {}

    @check("device")
    def _():
        return f"{device} ({why}); {devices.REQUIREMENT}"

    for aot in (True, False):
        for precision in ("fp32", "bf16"):
            label = f"train {'aot' if aot else 'edm'} {precision} eager"

            @check(label)
            def _(aot=aot, precision=precision, label=label):
                ticks, _ = train(work / label.replace(" ", "-"), data, config, device, aot=aot,
                              precision=precision, channels_last=False)  # fmt: skip
                times[label] = ticks[-1]["sec_per_kimg"]
                return figures(ticks)

    @check("train aot/edm step ratio")
    def _():
        ratios = [
            times[f"train aot {p} eager"] / times[f"train edm {p} eager"] for p in ("fp32", "bf16")
        ]
        return f"fp32 {ratios[0]:.3f}, bf16 {ratios[1]:.3f} (sec/kimg, AOT over baseline)"

    for precision in ("fp32", "bf16"):
        label = f"train aot {precision} compiled"
        if smoke:
            report("SKIP", label, "smoke mode (inductor's first compile takes minutes on a CPU)")
            continue

        @check(label)
        def _(precision=precision, label=label):
            import torch._dynamo.utils as dynamo_utils

            dynamo_utils.counters.clear()
            ticks, _ = train(work / label.replace(" ", "-"), data, config, device,
                          precision=precision, compile=True)  # fmt: skip
            breaks = sum(dynamo_utils.counters["graph_break"].values())
            graphs = dynamo_utils.counters["stats"]["unique_graphs"]
            return f"{figures(ticks)}, graph breaks {breaks}, graphs compiled {graphs}"

    @check("train channels-last")
    def _():
        return figures(train(work / "channels-last", data, config, device, channels_last=True)[0])

    @check("train resume")
    def _():
        # The "train aot fp32 eager" run again, stopped a tick early and resumed.
        run, options = work / "resume", {"precision": "fp32", "channels_last": False}
        train(run, data, config, device, ticks=TICKS - 1, **options)
        resumed, _ = train(run, data, config, device, resume="auto", **options)
        whole = json.loads(
            (work / "train-aot-fp32-eager" / "stats.jsonl").read_text().splitlines()[-1]
        )
        same = resumed[-1]["loss"] == whole["loss"]
        if not same and device == "cpu":  # bit for bit on the CPU; cuDNN need not be
            raise AssertionError(f"resumed loss {resumed[-1]['loss']} != {whole['loss']}")
        return (
            f"last tick loss {'equal to' if same else 'within rounding of'} the uninterrupted run's"
        )

    @check("train global scope")
    def _():
        return figures(train(work / "global", data, config, device, scope="global")[0])

    samples = {}  # the NFE 35 images of each sampling check, and the network they came from

    def sample_rates(name: str, denoiser, latents) -> str:
        """img/s at NFE 27 and 35; the NFE 35 images (uint8) kept in ``samples[name]``."""
        rates = []
        for steps, rho in SAMPLER_POINTS:

            def sample(steps=steps, rho=rho):
                with torch.no_grad():
                    images = heun_sampler(denoiser, latents, num_steps=steps, rho=rho).images
                samples[name] = to_uint8(images).cpu().numpy()

            per_second = paper_cost.rate(sample, len(latents), 1, torch.device(device))
            rates.append(f"NFE {2 * steps - 1} {per_second:.1f} img/s")
        return ", ".join(rates) + f" (batch {len(latents)})"

    n = 4 if smoke else 250
    latents = latents_from_seeds(range(n), data.image_shape, device=device)[0]

    @check("sampling fp32")
    def _():
        checkpoint = find_checkpoints(work / "train-aot-fp32-eager")[-1]
        net = build_network_from_checkpoint(checkpoint, device=device)
        samples["network"] = net  # for the bf16 check
        return (
            f"{sample_rates('fp32', net, latents)}, matmul {devices.float32_precision()['matmul']}"
        )

    @check("sampling bf16 channels-last")
    def _():
        rates = sample_rates("bf16", fast_net(samples["network"]), latents)
        change = np.abs(samples["bf16"].astype(int) - samples["fp32"]).astype(float)
        mean, most = change.mean(), change.max()
        return f"{rates}; vs fp32 at NFE 35: mean |change| {mean:.3f}, max {most:.0f} of 255"

    @check("guided sampling")
    def _():
        # DG's architectures (ADM's 32x32 classifier + head; random weights time the same) on
        # CUDA, a small extractor in smoke mode; NFE 35, weight 2 (DG's unconditional).
        channels, resolution, _ = data.image_shape
        tiny = {"image_size": resolution, "in_channels": channels, "model_channels": 32,
                "out_channels": 10, "num_res_blocks": 1, "attention_ds": (2,),
                "channel_mult": (1, 2), "num_head_channels": 32}  # fmt: skip
        extractor = EncoderUNet(**(tiny if smoke else ADM32_CLASSIFIER))
        head_config = {**DG_HEAD, "image_size": extractor.feature_size,
                       "in_channels": extractor.feature_channels}  # fmt: skip
        disc = Discriminator(extractor, EncoderUNet(**head_config)).to(device)
        guidance = Guidance(disc, 2.0)

        def sample():
            guidance.calls = 0  # so that it counts the last (timed) run's
            with torch.no_grad():
                heun_sampler(samples["network"], latents, num_steps=18, correction=guidance)

        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        per_second = paper_cost.rate(sample, len(latents), 1, torch.device(device))
        text = f"NFE 35 {per_second:.1f} img/s (batch {len(latents)}), {guidance.calls} disc calls"
        if device == "cuda":
            text += f", peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
        return text

    if args.inception_weights is None:
        report("SKIP", "inception features", "no weights (--inception-weights PATH)")
    else:

        @check("inception features")
        def _():
            from aot_model.features import inception_extractor

            extractor = inception_extractor(args.inception_weights, device=device)
            extractor.features([samples["fp32"]], progress=False)  # warm-up
            start = time.perf_counter()
            fp32 = extractor.features([samples["fp32"]], progress=False)
            rate = len(fp32) / (time.perf_counter() - start)
            bf16 = extractor.features([samples["bf16"]], progress=False)
            gap = frechet_distance(*feature_stats(fp32), *feature_stats(bf16))
            return f"{rate:.1f} img/s; FD(fp32 samples, bf16 samples) at NFE 35 {gap:.3f}"

    @check("ddp")
    def _():
        gpus = torch.cuda.device_count() if device == "cuda" else 0
        backend = "nccl" if gpus >= 2 and not smoke else "gloo stand-in (CPU, smoke network)"
        out = work / "ddp"
        out.mkdir()
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node=2", __file__, "--ddp-worker", str(out)]  # fmt: skip
        command += ["--smoke"] if smoke else []
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise RuntimeError(done.stderr.strip().splitlines()[-1])
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
        if ranks[0]["hash"] != ranks[1]["hash"]:
            raise AssertionError("the two ranks ended with different weights")
        return f"{backend}, 2 ranks identical, {figures(ranks[0]['ticks'])}"

    @check("paper cost")
    def _():
        measured = paper_cost.measure(
            paper_cost.TINY if smoke else paper_cost.PAPER, torch.device(device), 1
        )
        hours = paper_cost.gpu_hours(measured)
        size = "tiny network (smoke)" if smoke else "paper NCSN++, FP32"
        return (
            f"{size}: train {measured['train_img_s']:.1f} img/s, one model "
            f"{hours['model_h']:.1f} h, the paper's four {hours['paper_h']:.0f} h"
        )

    print(f"gpu_check: {len(failures)} failed" + (f" ({', '.join(failures)})" if failures else ""))
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
