"""Pipeline steps: each takes its ``params.yaml`` section(s) plus input paths, writes output files
and returns a metrics dict. The CLI (``aot <step>``), ``dvc.yaml`` stages and Prefect tasks all call
these functions; a step never knows which runner called it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import numpy as np

from aot_model import metrics
from aot_model.data import load_cifar10 as _load_cifar10
from aot_model.data import load_dataset, load_digits, save_dataset
from aot_model.features import (
    FeatureExtractor,
    feature_net_extractor,
    inception_extractor,
    save_feature_net,
    train_feature_net,
)
from aot_model.files import atomic_write
from aot_model.plots import plot_curvature_vs_sigma, plot_score_vs_nfe
from aot_model.sampling import heun_sampler, latents_from_seeds
from aot_model.sweep import SweepPoint, generate_images, run_sweep, sweep_grid
from aot_model.training import build_network_from_checkpoint, find_checkpoints, training_loop
from aot_pipeline.config import (
    DataParams,
    NetworkParams,
    ScoreParams,
    SweepParams,
    TrainParams,
    Variant,
    apply_variant,
)
from aot_pipeline.storage import download_s3

Callback = Callable[[dict], None]

FEATURE_NET = "feature_net.pt"
REFERENCE_STATS = "reference_stats.npz"
CURVATURE_POINT = SweepPoint(num_steps=18, rho=7.0, solver="heun")  # EDM's default sampler
CURVATURE_IMAGES = 256


def _write_json(path: Path, payload: dict) -> None:
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


# ------------------------------------------------------------------------------------------------
# prepare


def prepare(data: DataParams, out: str | Path, *, downloads: str | Path = "data/downloads") -> dict:
    """Build the dataset array file ``out`` (``.npz``) and its JSON manifest beside it.

    ``digits`` needs nothing from outside; ``cifar10`` fetches the official tarball from
    ``data.source`` (URL, local path or ``s3://``) into ``downloads`` and verifies its MD5 first.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if data.dataset == "digits":
        dataset = load_digits(resolution=data.resolution, channels=data.channels)
        source = "sklearn.datasets.load_digits"
    else:
        Path(downloads).mkdir(parents=True, exist_ok=True)
        dataset = _load_cifar10(
            data.source, downloads, data.split, md5=data.md5, fetchers={"s3": download_s3}
        )
        source = data.source
    manifest = save_dataset(dataset, out, source=source)
    return {"count": len(dataset), "num_classes": dataset.num_classes, "sha256": manifest["sha256"]}


# ------------------------------------------------------------------------------------------------
# train


def train(
    network: NetworkParams,
    params: TrainParams,
    variant: Variant,
    dataset: str | Path,
    run_dir: str | Path,
    *,
    resume: str | None = "auto",
    device: str | None = None,
    callback: Callback | None = None,
) -> dict:
    """Train one model variant on the dataset file into ``run_dir`` (resumable; training_loop)."""
    network, params = apply_variant(network, params, variant)
    net = network.model_dump()
    arch, cond = net.pop("arch"), net.pop("cond")
    opts = params.model_dump()
    aot = opts.pop("aot")
    result = training_loop(
        run_dir,
        load_dataset(dataset),
        arch=arch,
        cond=cond,
        model_kwargs=net,
        aot=variant.aot,
        pool_size=aot["pool_size"],
        cost=aot["cost"],
        solver=aot["solver"],
        match_scope=aot["scope"],
        prefetch=aot["prefetch"],
        resume=resume,
        device=device,
        callback=callback,
        **opts,
    )
    return {"checkpoint": str(result["checkpoint"]), "kimg": result["kimg"], **result["metrics"]}


# ------------------------------------------------------------------------------------------------
# reference statistics and scoring


def _metric_name(score: ScoreParams, dataset_name: str) -> str:
    """``fid`` only for Inception; otherwise ``fd_<dataset family>`` (e.g. ``fd_digits``)."""
    return "fid" if score.metric == "fid" else f"fd_{dataset_name.split('-')[0]}"


def _extractor(score: ScoreParams, reference_dir: Path, device: str) -> FeatureExtractor:
    if score.metric == "fid":
        return inception_extractor(score.inception_weights, device=device)
    return feature_net_extractor(reference_dir / FEATURE_NET, device=device)


def _scoring(score: ScoreParams, reference_dir: str | Path, device: str):
    """(metric name, extractor, reference stats) of an `aot reference` folder. Built before any
    sampling, so a missing Inception weights file stops a run before it spends anything."""
    reference_dir = Path(reference_dir)
    metric = json.loads((reference_dir / "reference.json").read_text())["metric"]
    extractor = _extractor(score, reference_dir, device)
    return metric, extractor, metrics.load_stats(reference_dir / REFERENCE_STATS)


def _trained_network(run_dir: str | Path, device: str):
    """(checkpoint, EMA network, image shape) of the latest checkpoint in ``run_dir``."""
    found = find_checkpoints(run_dir)
    if not found:
        raise FileNotFoundError(f"no training-state-*.pt checkpoint in {run_dir}; run `aot train`")
    checkpoint = found[-1]
    net = build_network_from_checkpoint(checkpoint, ema=True, device=device)
    return checkpoint, net, (net.img_channels, net.img_resolution, net.img_resolution)


def reference(
    score: ScoreParams, dataset: str | Path, out_dir: str | Path, *, device: str = "cpu"
) -> dict:
    """Reference statistics of the dataset, computed once and versioned with their hash.

    ``fd``: first trains the small feature classifier (``feature_net.pt``) on the dataset.
    ``fid``: clean-fid's Inception; stops before any work when its weights file is missing.
    """
    out_dir = Path(out_dir)
    data = load_dataset(dataset)
    info = {"dataset": data.name, "metric": _metric_name(score, data.name)}
    if score.metric == "fd":
        net, train_info = train_feature_net(
            data, epochs=score.feature_epochs, seed=score.feature_seed, device=device
        )
        info["feature_net_sha256"] = save_feature_net(out_dir / FEATURE_NET, net)
        info.update({f"feature_net_{k}": v for k, v in train_info.items()})
    extractor = _extractor(score, out_dir, device)
    stats = metrics.reference_stats(extractor, data.images)
    info["reference_stats_sha256"] = metrics.save_stats(out_dir / REFERENCE_STATS, stats)
    info.update(count=int(stats["count"]), extractor=extractor.name, mode=extractor.mode)
    _write_json(out_dir / "reference.json", info)
    return info


def score_samples(
    score: ScoreParams, samples: str | Path, reference_dir: str | Path, *, device: str = "cpu"
) -> dict:
    """Score one ``.npz`` of uint8 samples (as ``aot sweep`` writes them) against the reference."""
    metric, extractor, ref = _scoring(score, reference_dir, device)
    with np.load(samples) as f:
        images, seeds = f["images"], f["seeds"].tolist()
    return metrics.score(
        extractor, [images], ref, num_images=len(images), seeds=seeds, metric=metric
    )


def score_protocol(
    params: SweepParams,
    score: ScoreParams,
    run_dir: str | Path,
    reference_dir: str | Path,
    point: SweepPoint,
    *,
    blocks: int = 3,
    device: str = "cpu",
) -> dict:
    """EDM's protocol (method-notes b.7): ``sweep.num_images`` samples for each of ``blocks`` seed
    blocks (0..n-1, n..2n-1, ...) at one sampler ``point``, scored in memory; min and mean."""
    metric, extractor, ref = _scoring(score, reference_dir, device)
    checkpoint, net, img_shape = _trained_network(run_dir, device)

    def generate(seeds):
        batches = generate_images(
            net,
            point,
            seeds,
            img_shape=img_shape,
            label_dim=net.label_dim,
            batch_size=params.batch_size,
            sigma_min=params.sigma_min,
            sigma_max=params.sigma_max,
            device=device,
        )
        return (images for images, _ in batches)

    result = metrics.fid_protocol(
        extractor,
        generate,
        ref,
        num_images=params.num_images,
        num_blocks=blocks,
        metric=metric,
    )
    return {**result, "checkpoint": str(checkpoint), "point": point.tag, "nfe": point.nfe}


# ------------------------------------------------------------------------------------------------
# sweep


def sweep(
    params: SweepParams,
    score: ScoreParams,
    run_dir: str | Path,
    reference_dir: str | Path,
    out_dir: str | Path,
    *,
    name: str,
    device: str = "cpu",
) -> dict:
    """Sample the latest EMA snapshot of ``run_dir`` at every grid point with the same seeds, score
    each point, and measure trajectory curvature at EDM's default sampler (18 steps, rho 7)."""
    out_dir = Path(out_dir)
    points = sweep_grid(params.steps, params.rho, params.solver)
    metric, extractor, ref = _scoring(score, reference_dir, device)
    checkpoint, net, img_shape = _trained_network(run_dir, device)

    def scorer(images: np.ndarray, seeds) -> dict:
        return metrics.score(
            extractor, [images], ref, num_images=len(images), seeds=seeds, metric=metric
        )

    seeds = range(params.seed_start, params.seed_start + params.num_images)
    rows = run_sweep(
        net,
        points,
        seeds,
        out_dir=out_dir,
        img_shape=img_shape,
        label_dim=net.label_dim,
        batch_size=params.batch_size,
        sigma_min=params.sigma_min,
        sigma_max=params.sigma_max,
        device=device,
        scorer=scorer,
        name=name,
    )
    curvature = _curvature(net, params, seeds, img_shape, device)
    _write_json(out_dir / "curvature.json", curvature)
    best = min(rows, key=lambda row: row["score"])
    return {
        "model": name,
        "checkpoint": str(checkpoint),
        "metric": metric,
        "best_score": best["score"],
        "best_nfe": best["nfe"],
        "best_point": f"{best['solver']} steps={best['num_steps']} rho={best['rho']:g}",
        **curvature["summary"],
    }


def _curvature(net, params: SweepParams, seeds, img_shape, device) -> dict:
    """Trajectory statistics of the first CURVATURE_IMAGES seeds at CURVATURE_POINT."""
    seeds = list(seeds)[:CURVATURE_IMAGES]
    latents, labels = latents_from_seeds(seeds, img_shape, label_dim=net.label_dim, device=device)
    output = heun_sampler(
        net,
        latents,
        labels,
        num_steps=CURVATURE_POINT.num_steps,
        rho=CURVATURE_POINT.rho,
        sigma_min=params.sigma_min,
        sigma_max=params.sigma_max,
        return_trajectory=True,
    )
    stats = metrics.trajectory_stats(output)
    return {
        "point": CURVATURE_POINT.tag,
        "num_images": len(seeds),
        "sigmas": stats.sigmas.tolist(),
        "curvature": stats.curvature.tolist(),
        "angle": stats.angle.tolist(),
        "drift": stats.drift.tolist(),
        "straightness": stats.straightness.tolist(),
        "summary": stats.summary(),
    }


# ------------------------------------------------------------------------------------------------
# report


def report(sweep_dirs: dict[str, str | Path], out_dir: str | Path) -> dict:
    """Compare models: score-vs-NFE and curvature-vs-sigma pictures and a markdown table."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables, curvature = {}, {}
    for name, directory in sweep_dirs.items():
        tables[name] = json.loads((Path(directory) / f"{name}_sweep.json").read_text())
        c = json.loads((Path(directory) / "curvature.json").read_text())
        curvature[name] = metrics.TrajectoryStats(
            **{f.name: np.array(c[f.name]) for f in fields(metrics.TrajectoryStats)}
        )
    metric = next(iter(tables.values()))[0]["metric"]
    for rho in sorted({row["rho"] for rows in tables.values() for row in rows}):
        results = {
            f"{name} rho={rho:g}": [(r["nfe"], r["score"]) for r in rows if r["rho"] == rho]
            for name, rows in tables.items()
        }
        plot_score_vs_nfe(results, metric=metric, path=out_dir / f"{metric}_vs_nfe_rho{rho:g}.png")
    plot_curvature_vs_sigma(curvature, path=out_dir / "curvature_vs_sigma.png")
    text = _markdown_table(tables, curvature, metric)
    atomic_write(out_dir / "report.md", lambda f: f.write(text.encode()))
    summary = {
        name: {
            "best_score": min(r["score"] for r in rows),
            "straightness_mean": float(curvature[name].straightness.mean()),
            "curvature_mean": float(curvature[name].curvature.mean()),
        }
        for name, rows in tables.items()
    }
    _write_json(out_dir / "summary.json", summary)
    return {"table": text, **summary}


def _markdown_table(tables: dict, curvature: dict, metric: str) -> str:
    names = list(tables)
    keys = {(r["solver"], r["num_steps"], r["rho"], r["nfe"]) for t in tables.values() for r in t}
    scores = {
        (name, r["solver"], r["num_steps"], r["rho"]): r["score"]
        for name in names
        for r in tables[name]
    }
    lines = [
        "| solver | steps | rho | NFE | " + " | ".join(f"{metric} {n}" for n in names) + " |",
        "|---|---|---|---|" + "---|" * len(names),
    ]
    for solver, steps, rho, nfe in sorted(keys, key=lambda k: (k[2], k[3])):
        cells = [
            f"{scores[(n, solver, steps, rho)]:.3f}" if (n, solver, steps, rho) in scores else "-"
            for n in names
        ]
        lines.append(f"| {solver} | {steps} | {rho:g} | {nfe} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| model | straightness (mean) | curvature 1-cos (mean over steps) |",
        "|---|---|---|",
    ]
    for name in names:
        c = curvature[name]
        lines.append(f"| {name} | {c.straightness.mean():.4f} | {c.curvature.mean():.4f} |")
    return "\n".join(lines) + "\n"
