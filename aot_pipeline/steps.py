"""Pipeline steps: each takes its ``params.yaml`` section(s) plus input paths, writes output files
and returns a metrics dict. The CLI (``aot <step>``), ``dvc.yaml`` stages and Prefect tasks all call
these functions; a step never knows which runner called it.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from aot_model import distributed, metrics
from aot_model.adm import ADM32_CLASSIFIER, EncoderUNet, load_encoder, save_encoder
from aot_model.checkpoints import build_network_from_checkpoint, find_checkpoints
from aot_model.data import fetch_file, load_cifar10, load_dataset, load_digits, save_dataset
from aot_model.edm_pickle import EDMImportError, holds_run, import_edm
from aot_model.features import (
    FeatureExtractor,
    feature_net_extractor,
    inception_extractor,
    save_feature_net,
    train_feature_net,
)
from aot_model.files import (
    DamagedFileError,
    atomic_write,
    check_digest,
    file_digest,
    read_json,
    read_npz,
)
from aot_model.guidance import (
    Discriminator,
    Guidance,
    check_fakes,
    load_discriminator,
    save_discriminator,
    train_discriminator,
    train_noise_classifier,
)
from aot_model.plots import (
    plot_curvature_vs_sigma,
    plot_discriminator_history,
    plot_score_vs_nfe,
)
from aot_model.progress import progress_bar
from aot_model.rng import seeded
from aot_model.sampling import fast_net, heun_sampler, latents_from_seeds
from aot_model.sweep import (
    SweepPoint,
    SweepRow,
    generate_images,
    read_table,
    run_sweep,
    save_images,
    sweep_grid,
    write_table,
)
from aot_model.training import training_loop
from aot_pipeline.config import (
    DataParams,
    ExtractorParams,
    GuidanceParams,
    NetworkParams,
    ScoreParams,
    SweepParams,
    TrainParams,
    Variant,
    apply_variant,
    train_options,
)
from aot_pipeline.storage import download_s3

FEATURE_NET = "feature_net.pt"
REFERENCE_STATS = "reference_stats.npz"
CURVATURE_POINT = SweepPoint(num_steps=18, rho=7.0, solver="heun")  # EDM's default sampler
CURVATURE_IMAGES = 256
_STATS_KEYS = [f.name for f in fields(metrics.TrajectoryStats)]  # curvature.json's arrays


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
        dataset = load_cifar10(
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
    callback: Callable[[dict], None] | None = None,
) -> dict:
    """Train one model variant on the dataset file into ``run_dir`` (resumable; training_loop)."""
    if variant.checkpoint is not None:
        raise ValueError(
            f"the variant names checkpoint {variant.checkpoint}: it is imported (`aot import-edm "
            "--variant NAME`, steps.import_checkpoint), not trained"
        )
    network, params = apply_variant(network, params, variant)
    result = training_loop(
        run_dir,
        load_dataset(dataset),
        train_options(network, params, aot=variant.aot),
        resume=resume,
        device=device,
        callback=callback,
    )
    return {"checkpoint": str(result["checkpoint"]), "kimg": result["kimg"], **result["metrics"]}


def import_checkpoint(
    source: str | Path,
    run_dir: str | Path,
    *,
    name: str,
    sha256: str | None = None,
    downloads: str | Path = "data/downloads",
) -> dict:
    """The train stage of an evaluate-only variant: fetch an EDM-format network pickle (local
    path, ``s3://`` or ``https://`` URL, downloaded once into ``downloads``), check its SHA-256
    against ``sha256`` when given, and import it into ``run_dir`` without running its code
    (:func:`aot_model.edm_pickle.import_edm`). Returns the import record plus ``checkpoint``."""

    def check(path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found")
        if sha256 is not None and (got := file_digest(path)) != sha256:
            raise DamagedFileError(
                f"{path}: sha256 {got} is not the expected {sha256}; the download is damaged or "
                "another file"
            )

    if holds_run(run_dir):  # before any download
        raise EDMImportError(f"{run_dir}: already holds a run; import into an empty folder")
    local = fetch_file(
        source, downloads, check=check, fetchers={"s3": download_s3}, default_name="network.pkl"
    )
    return import_edm(local, run_dir, name=name)


# ------------------------------------------------------------------------------------------------
# reference statistics and scoring


def _extractor(score: ScoreParams, reference_dir: Path, device: str) -> FeatureExtractor:
    if score.metric == "fid":
        return inception_extractor(score.inception_weights, device=device, mode=score.fid_mode)
    return feature_net_extractor(reference_dir / FEATURE_NET, device=device)


def _scoring(score: ScoreParams, reference_dir: str | Path, device: str):
    """(metric name, extractor, reference stats) of an `aot reference` folder, its files checked
    against the SHA-256s in its reference.json. Built before any sampling, so a damaged folder or
    a missing Inception weights file stops a run before it spends anything."""
    reference_dir = Path(reference_dir)
    manifest = reference_dir / "reference.json"
    remedy = f"rebuild {reference_dir} with `aot reference`"
    info = read_json(manifest, what="reference folder manifest", remedy=remedy)
    if "metric" not in info:
        raise ValueError(f"{manifest} names no metric; {remedy}")
    for name, key in (
        (REFERENCE_STATS, "reference_stats_sha256"),
        (FEATURE_NET, "feature_net_sha256"),
    ):
        if key in info:
            check_digest(reference_dir / name, info[key], recorded_in=manifest, remedy=remedy)
    extractor = _extractor(score, reference_dir, device)
    if info.get("mode", extractor.mode) != extractor.mode:  # never score across FID modes
        raise ValueError(
            f"{manifest} holds {info['mode']} statistics, score.fid_mode is {extractor.mode}; "
            f"{remedy}, or set score.fid_mode: {info['mode']}"
        )
    ref = metrics.load_stats(reference_dir / REFERENCE_STATS)
    ref["source"] = info.get("reference_file") or f"{info.get('dataset')} (aot reference)"
    return info["metric"], extractor, ref


def _check_scorable(extractor: FeatureExtractor, img_shape, checkpoint, reference_dir) -> None:
    """Refuse, before sampling, a model whose images the reference's feature net cannot take."""
    try:
        extractor.check_image_shape(img_shape)
    except ValueError as error:
        raise ValueError(
            f"{checkpoint} makes {'x'.join(map(str, img_shape))} images that the reference in "
            f"{reference_dir} cannot score ({error}); use the reference of the model's dataset"
        ) from None


def _scorer(extractor: FeatureExtractor, ref: dict, metric: str):
    """``scorer(images, seeds) -> score dict`` against the reference statistics."""

    def scorer(images: np.ndarray, seeds) -> dict:
        return metrics.score(
            extractor, [images], ref, num_images=len(images), seeds=seeds, metric=metric
        )

    return scorer


def _sampling(model: Model, params: SweepParams) -> dict:
    """The arguments :func:`generate_images` and :func:`run_sweep` take from the model and sweep."""
    return {
        "img_shape": model.img_shape,
        "label_dim": model.label_dim,
        "batch_size": params.batch_size,
        "sigma_min": params.sigma_min,
        "sigma_max": params.sigma_max,
        "device": model.device,
    }


class Model(NamedTuple):
    """A trained network ready to sample: ``sample`` is the denoiser the sampler calls, the EMA
    network itself or its ``sweep.precision`` fast path (:func:`_trained_network`)."""

    checkpoint: Path
    sample: Callable
    img_shape: tuple[int, int, int]
    label_dim: int
    device: str
    precision: str


def _trained_network(
    run_dir: str | Path, sweep: SweepParams, device: str, checkpoint: Path | None = None
) -> Model:
    """The EMA network of ``checkpoint`` (by default the latest one in ``run_dir``) as every
    sampling step uses it: in fp32 as trained, or through ``sweep.precision``'s bf16 fast path.
    Under torchrun it starts the process group, and ``device`` becomes this rank's."""
    device = str(distributed.init(device)[2])
    if checkpoint is None:
        found = find_checkpoints(run_dir)
        if not found:
            raise FileNotFoundError(
                f"no training-state-*.pt checkpoint in {run_dir}; run `aot train`"
            )
        checkpoint = found[-1]
    net = build_network_from_checkpoint(checkpoint, ema=True, device=device)
    sample = net
    if sweep.precision == "bf16":
        # Channels-last pays on CUDA's NHWC bf16 convolutions; on the CPU it only reorders.
        sample = fast_net(net, bf16=True, channels_last=device.startswith("cuda"))
    img_shape = (net.img_channels, net.img_resolution, net.img_resolution)
    return Model(checkpoint, sample, img_shape, net.label_dim, device, sweep.precision)


def reference(
    score: ScoreParams, dataset: str | Path, out_dir: str | Path, *, device: str = "cpu"
) -> dict:
    """Reference statistics of the dataset, computed once and versioned with their hash.

    ``fd``: first trains the small feature classifier (``feature_net.pt``) on the dataset.
    ``fid``: clean-fid's Inception; stops before any work when its weights file is missing.
    """
    out_dir = Path(out_dir)
    data = load_dataset(dataset)
    # fid only for Inception; otherwise fd_<dataset family> (e.g. fd_digits)
    metric = "fid" if score.metric == "fid" else f"fd_{data.name.split('-')[0]}"
    info = {"dataset": data.name, "metric": metric}
    if score.metric == "fd":
        net, train_info = train_feature_net(
            data, epochs=score.feature_epochs, seed=score.feature_seed, device=device
        )
        info["feature_net_sha256"] = save_feature_net(out_dir / FEATURE_NET, net)
        info.update({f"feature_net_{k}": v for k, v in train_info.items()})
    extractor = _extractor(score, out_dir, device)
    if score.reference_file is not None:  # fid only (config): the user's mu and sigma, as they are
        info.update(_copy_reference(score.reference_file, out_dir / REFERENCE_STATS))
    else:
        stats = metrics.reference_stats(extractor, data.images)
        info["reference_stats_sha256"] = metrics.save_stats(out_dir / REFERENCE_STATS, stats)
        info["count"] = int(stats["count"])
    info.update(extractor=extractor.name, mode=extractor.mode)
    _write_json(out_dir / "reference.json", info)
    return info


INCEPTION_FEATURES = 2048  # pool3 width of clean-fid's (and EDM's) Inception-v3


def _copy_reference(path: str | Path, out: Path) -> dict:
    """Copy user-supplied Inception statistics (``mu`` [2048], ``sigma`` [2048, 2048], finite;
    e.g. EDM's fid-refs/cifar10-32x32.npz) byte for byte; returns their provenance."""
    stats = metrics.load_stats(path)  # no pickle; mu and sigma present
    dim = INCEPTION_FEATURES
    mu, sigma = stats["mu"], stats["sigma"]
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise DamagedFileError(
            f"{path}: mu has shape {list(mu.shape)} and sigma {list(sigma.shape)}, Inception "
            f"statistics are mu [{dim}] and sigma [{dim}, {dim}]"
        )
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise DamagedFileError(f"{path}: mu or sigma holds NaN or Inf")
    data = Path(path).read_bytes()
    digest = atomic_write(out, lambda f: f.write(data))
    return {
        "reference_file": str(path),
        "reference_file_sha256": digest,
        "reference_stats_sha256": digest,
    }


def score_samples(
    score: ScoreParams, samples: str | Path, reference_dir: str | Path, *, device: str = "cpu"
) -> dict:
    """Score one ``.npz`` of uint8 samples (as ``aot sweep`` writes them) against the reference."""
    metric, extractor, ref = _scoring(score, reference_dir, device)
    arrays = read_npz(
        samples,
        ("images", "seeds"),
        what="a sample file (images, seeds)",
        remedy="pass an .npz written by `aot sweep`",
    )
    return _scorer(extractor, ref, metric)(arrays["images"], arrays["seeds"].tolist())


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
    model = _trained_network(run_dir, params, device)
    metric, extractor, ref = _scoring(score, reference_dir, model.device)
    _check_scorable(extractor, model.img_shape, model.checkpoint, reference_dir)

    def generate(seeds):
        batches = generate_images(model.sample, point, seeds, **_sampling(model, params))
        return (batch.images for batch in batches)

    if distributed.rank() != 0:  # under torchrun: sample this rank's share; rank 0 scores
        for seeds in metrics.seed_blocks(params.num_images, blocks):
            collections.deque(generate(seeds), maxlen=0)
        return {}

    result = metrics.fid_protocol(
        extractor,
        generate,
        ref,
        num_images=params.num_images,
        num_blocks=blocks,
        metric=metric,
    )
    return {
        **result,
        "checkpoint": str(model.checkpoint),
        "point": point.tag,
        "nfe": point.nfe,
        "precision": model.precision,
    }


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
    model, metric, rows = _sweep_points(
        params, score, run_dir, reference_dir, out_dir, points, name=name, device=device
    )
    if distributed.rank() != 0:  # under torchrun: sampled its share; rank 0 writes and scores
        return {}
    curvature = _curvature(model, params)
    # Written last, with the table's digest: `report` trusts a table only when they match, so a
    # sweep killed while rewriting the table of an earlier one is caught.
    curvature["sweep_sha256"] = file_digest(out_dir / f"{name}_sweep.json")
    _write_json(out_dir / "curvature.json", curvature)
    return {
        "model": name,
        "checkpoint": str(model.checkpoint),
        "metric": metric,
        **_best(rows),
        **curvature["summary"],
    }


def _best(rows: list[SweepRow]) -> dict:
    """The best score of a sweep, its NFE and point, as the sweep steps return them."""
    best = min(rows, key=lambda row: row.score)
    return {"best_score": best.score, "best_nfe": best.point.nfe, "best_point": best.point.label}


def _sweep_points(
    params,
    score,
    run_dir,
    reference_dir,
    out_dir,
    points,
    *,
    name,
    device,
    guide=None,
    checkpoint=None,
):
    """:func:`run_sweep` of the EMA network of ``checkpoint`` (default: the latest snapshot) at
    ``points`` with the sweep section's seeds, scored; returns (the :class:`Model`, metric name,
    rows)."""
    model = _trained_network(run_dir, params, device, checkpoint)
    metric, extractor, ref = _scoring(score, reference_dir, model.device)
    _check_scorable(extractor, model.img_shape, model.checkpoint, reference_dir)
    rows = run_sweep(
        model.sample,
        points,
        range(params.seed_start, params.seed_start + params.num_images),
        out_dir=out_dir,
        **_sampling(model, params),
        scorer=_scorer(extractor, ref, metric),
        name=name,
        guide=guide,
        precision=model.precision,
    )
    return model, metric, rows


def snapshot_sweep(
    params: SweepParams,
    score: ScoreParams,
    checkpoint: str | Path,
    reference_dir: str | Path,
    out_dir: str | Path,
    points: list[SweepPoint],
    *,
    name: str,
    device: str = "cpu",
) -> list[SweepRow]:
    """:func:`sweep`'s sampling and scoring of one kept training snapshot (not only the latest),
    e.g. to see where a model stops improving; no curvature. Returns the table's rows."""
    checkpoint = Path(checkpoint)
    return _sweep_points(
        params,
        score,
        checkpoint.parent,
        reference_dir,
        out_dir,
        points,
        name=name,
        device=device,
        checkpoint=checkpoint,
    )[-1]


def _curvature(model: Model, params: SweepParams) -> dict:
    """Trajectory statistics of the sweep's first CURVATURE_IMAGES seeds at CURVATURE_POINT."""
    seeds = list(range(params.seed_start, params.seed_start + params.num_images))[:CURVATURE_IMAGES]
    latents, labels = latents_from_seeds(
        seeds, model.img_shape, label_dim=model.label_dim, device=model.device
    )
    output = heun_sampler(
        model.sample,
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
        "precision": model.precision,
        **{key: getattr(stats, key).tolist() for key in _STATS_KEYS},
        "summary": stats.summary(),
    }


# ------------------------------------------------------------------------------------------------
# report


def report(
    sweep_dirs: dict[str, str | Path],
    out_dir: str | Path,
    *,
    discriminator_dir: str | Path | None = None,
    log_column: Callable[[str, dict], None] | None = None,
) -> dict:
    """Compare models: score-vs-NFE and curvature-vs-sigma pictures and a markdown table.

    Guided sweeps (rows with a ``guidance_weight``) appear as one column per weight
    (``aot-dg w=2``) and in a guided-vs-unguided table against their ``base_model`` at equal NFE;
    ``discriminator_dir`` adds the discriminator's per-epoch curves and chosen epoch.
    ``log_column(name, summary)`` receives each column's summary under its name spelled as
    series are (``aot-dg_w2``; MLflow refuses "=" in metric names).
    """
    out_dir = Path(out_dir)
    tables, curvature = {}, {}
    for name, directory in sweep_dirs.items():
        tables[name], stats = _finished_sweep(name, Path(directory))
        if stats is not None:  # guided sweeps measure no curvature
            curvature[name] = stats
    mode = _one_mode(tables)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = _columns(tables)
    metric = next(iter(tables.values()))[0].metric
    for rho in sorted({row.point.rho for rows in tables.values() for row in rows}):
        results = {
            f"{name} rho={rho:g}": points
            for (name, _), rows in columns.items()
            if (points := [(r.point.nfe, r.score) for r in rows if r.point.rho == rho])
        }
        plot_score_vs_nfe(results, metric=metric, path=out_dir / f"{metric}_vs_nfe_rho{rho:g}.png")
    if curvature:
        plot_curvature_vs_sigma(curvature, path=out_dir / "curvature_vs_sigma.png")
    text = _markdown_table(columns, curvature, metric) + _guidance_table(tables, metric)
    if metric == "fid" and mode is not None:
        text = f"FID in clean-fid's {mode} mode.\n" + text
    if discriminator_dir is not None:
        text += _discriminator_section(Path(discriminator_dir), out_dir)
    atomic_write(out_dir / "report.md", lambda f: f.write(text.encode()))
    summary = {
        name: {"best_score": min(r.score for r in rows)} for (name, _), rows in columns.items()
    }
    for name, c in curvature.items():
        summary[name].update(
            straightness_mean=float(c.straightness.mean()), curvature_mean=float(c.curvature.mean())
        )
    _write_json(out_dir / "summary.json", summary)
    if log_column is not None:
        for name, machine_name in columns:
            log_column(machine_name, summary[name])
    return {"table": text, **summary}


def _one_mode(tables: dict) -> str | None:
    """The feature mode every scored row shares (``clean``, ``legacy_tensorflow``, ``native``);
    scores of different modes are never put in one table."""
    modes = {
        name: sorted({row.score_info["mode"] for row in rows if row.score_info is not None})
        for name, rows in tables.items()
    }
    found = {mode for names in modes.values() for mode in names}
    if len(found) > 1:
        listed = ", ".join(f"{name}: {'/'.join(m)}" for name, m in modes.items() if m)
        raise ValueError(
            f"the sweeps were scored in different modes ({listed}); scores of different modes "
            "are never compared in one table: score them all with one score.fid_mode"
        )
    return found.pop() if found else None


def _finished_sweep(
    name: str, directory: Path
) -> tuple[list[SweepRow], metrics.TrajectoryStats | None]:
    """(table rows, curvature) of a sweep that ran to its end, or a one-line error. A guided
    sweep measures no curvature (None)."""
    remedy = f"run `aot sweep --variant {name} --out {directory}` (again) first"
    if not directory.is_dir():
        raise NotADirectoryError(f"sweep folder of {name!r} is not a folder: {directory}; {remedy}")
    table = directory / f"{name}_sweep.json"
    rows = read_table(table, remedy=remedy)
    if not rows:
        raise ValueError(f"{directory} holds an empty sweep; {remedy}")
    path = directory / "curvature.json"
    if all(row.point.guidance_weight for row in rows) and not path.exists():
        return rows, None
    c = read_json(path, what="sweep curvature file", remedy=remedy)
    if "sweep_sha256" in c:
        check_digest(table, c["sweep_sha256"], recorded_in=path, remedy=remedy)
    if any(key not in c for key in _STATS_KEYS):
        raise ValueError(f"{directory} holds an incomplete sweep; {remedy}")
    return rows, metrics.TrajectoryStats(**{key: np.array(c[key]) for key in _STATS_KEYS})


def _columns(tables: dict[str, list[SweepRow]]) -> dict[tuple[str, str], list[SweepRow]]:
    """One column per model and guidance weight, by its names for people and for machines:
    (``aot``, ``aot``), (``aot-dg w=2``, ``aot-dg_w2``), ..."""
    columns: dict[tuple[str, str], list[SweepRow]] = {}
    for name, rows in tables.items():
        for row in rows:
            names = (row.point.named(name, spaced=True), row.point.named(name))
            columns.setdefault(names, []).append(row)
    return columns


def _markdown_table(columns: dict, curvature: dict, metric: str) -> str:
    """Scores by point (rows, the guidance weight aside) and column."""
    names = [name for name, _ in columns]
    scores = {
        (name, r.point.unguided): r.score for (name, _), rows in columns.items() for r in rows
    }
    lines = [
        "| solver | steps | rho | NFE | " + " | ".join(f"{metric} {n}" for n in names) + " |",
        "|---|---|---|---|" + "---|" * len(names),
    ]
    for p in sorted({p for _, p in scores}, key=lambda p: p.order):
        cells = [f"{scores[(n, p)]:.3f}" if (n, p) in scores else "-" for n in names]
        lines.append(
            f"| {p.solver} | {p.num_steps} | {p.rho:g} | {p.nfe} | " + " | ".join(cells) + " |"
        )
    if curvature:
        lines += [
            "",
            "| model | straightness (mean) | curvature 1-cos (mean over steps) |",
            "|---|---|---|",
        ]
        for name, c in curvature.items():
            lines.append(f"| {name} | {c.straightness.mean():.4f} | {c.curvature.mean():.4f} |")
    return "\n".join(lines) + "\n"


def _guidance_table(tables: dict[str, list[SweepRow]], metric: str) -> str:
    """Guided vs unguided at each sampler point (same seeds, same NFE), lower is better."""
    lines = []
    for name, rows in tables.items():
        for row in rows:
            p = row.point
            base = {b.point: b.score for b in tables.get(row.base_model, [])}
            if not p.guidance_weight or p.unguided not in base:
                continue
            plain = base[p.unguided]
            change = row.score - plain
            lines.append(
                f"| {row.base_model} | {name} | {p.guidance_weight:g} | {p.solver} | "
                f"{p.num_steps} | {p.rho:g} | {p.nfe} | {row.disc_calls:g} | "
                f"{plain:.3f} | {row.score:.3f} | {change:+.3f} | {'yes' if change < 0 else 'no'} |"
            )
    if not lines:
        return ""
    better = sum(line.endswith("| yes |") for line in lines)
    orders = {row.second_order for rows in tables.values() for row in rows
              if row.point.guidance_weight}  # fmt: skip
    header = [
        "",
        f"Discriminator guidance: {better} of {len(lines)} guided points beat the unguided model "
        f"at the same NFE ({metric}, lower is better; disc calls = discriminator forward + "
        "backward passes per image, not counted in NFE). "
        + " ".join(note for order, note in _WEIGHT_NOTES.items() if order in orders),
        "",
        f"| base | guided | w | solver | steps | rho | NFE | disc calls | {metric} unguided | "
        f"{metric} guided | change | improves |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(header + lines) + "\n"


# How to read w (method-notes g.4), by the guided sweeps' second_order: DG's default guides the
# Euler slope only, and Heun's average of a guided and an unguided slope follows the ODE guided
# with w/2.
_WEIGHT_NOTES = {
    False: "w guides the Euler step only (second_order false, DG's released default): Heun's "
    "average then follows the probability-flow ODE guided with w/2, not w, so even a perfect "
    "discriminator at w = 1 does not reach the data distribution; compare these w with DG's "
    "papers accordingly.",
    True: "With second_order true both Heun slopes are guided: the ODE's weight is w.",
    None: "Some guided sweeps do not record whether the Heun corrector was guided.",
}


def _discriminator_section(directory: Path, out_dir: Path) -> str:
    info = read_json(
        directory / DISCRIMINATOR_HISTORY,
        what="discriminator history",
        remedy="run `aot discriminator` (again)",
    )
    history, chosen = info["history"], info["chosen_epoch"]
    plot_discriminator_history(
        history, chosen, metric=info["select_metric"], path=out_dir / "discriminator_curves.png"
    )
    lines = [
        "",
        f"Discriminator: epoch {chosen} of {len(history)} chosen by the "
        f"{info['select_metric']} of guided samples at {info['select_point']} (not by accuracy).",
        "",
        "| epoch | loss | accuracy | held-out loss | held-out accuracy | guided score |",
        "|---|---|---|---|---|---|",
    ]
    for row in history:
        mark = " (chosen)" if row["epoch"] == chosen else ""
        lines.append(
            f"| {row['epoch']}{mark} | {row['loss']:.4f} | {row['accuracy']:.3f} | "
            f"{row['heldout_loss']:.4f} | {row['heldout_accuracy']:.3f} | "
            f"{row.get('score', float('nan')):.3f} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# discriminator guidance (method-notes g)

DISCRIMINATOR = "discriminator.pt"
DISCRIMINATOR_HISTORY = "history.json"


def fakes(
    guidance: GuidanceParams,
    sweep: SweepParams,
    run_dir: str | Path,
    out: str | Path,
    *,
    device: str = "cpu",
) -> dict:
    """Generate the discriminator's fake training images with the project's sampler from the
    latest EMA snapshot of ``run_dir``: one ``.npz`` with the images, seeds, (labels) and the
    provenance (checkpoint and its SHA-256, sampler settings)."""
    model = _trained_network(run_dir, sweep, device)
    point = SweepPoint(guidance.fake_steps, guidance.fake_rho)
    start = guidance.fake_seed_start
    seeds = list(range(start, start + guidance.num_fakes))
    images, labels = _sample(model, point, seeds, sweep, desc="fakes")
    if distributed.rank() != 0:  # under torchrun: sampled its share; rank 0 writes
        return {}
    checkpoint = model.checkpoint
    settings = {
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": file_digest(checkpoint),
        "sigma_min": sweep.sigma_min,
        "sigma_max": sweep.sigma_max,
        "precision": model.precision,
        **vars(point),
    }
    sha = save_images(Path(out), images, seeds, labels, settings)
    return {"count": len(images), "sha256": sha, "checkpoint": str(checkpoint), "nfe": point.nfe}


def _sample(model: Model, point, seeds, sweep: SweepParams, *, desc, correction=None):
    """All images (and labels, or None) of ``seeds`` at ``point``, with a progress bar."""
    batches = generate_images(
        model.sample, point, seeds, **_sampling(model, sweep), correction=correction
    )
    images, labels = [], []
    with progress_bar(total=len(seeds), desc=desc, unit="img") as bar:
        for batch in batches:
            images.append(batch.images)
            labels.append(batch.labels)
            bar.update(len(batch.images))
    return np.concatenate(images), None if model.label_dim == 0 else np.concatenate(labels)


def _extractor_config(params: ExtractorParams, data) -> dict:
    """EncoderUNet arguments of the extractor for ``data``; ADM's fixed shape for ``adm``."""
    channels, resolution = data.images.shape[1], data.images.shape[2]
    if params.kind == "adm":
        need = (ADM32_CLASSIFIER["in_channels"], ADM32_CLASSIFIER["image_size"])
        if (channels, resolution) != need:
            raise ValueError(
                f"guidance.extractor.kind 'adm' takes {need[0]}x{need[1]}x{need[1]} images, the "
                f"dataset has {channels}x{resolution}x{resolution}; use kind 'own'"
            )
        return dict(ADM32_CLASSIFIER)
    return {
        "image_size": resolution,
        "in_channels": channels,
        "model_channels": params.model_channels,
        "out_channels": int(data.num_classes),
        "num_res_blocks": params.num_blocks,
        "attention_ds": tuple(sorted({resolution // r for r in params.attn_resolutions if r})),
        "channel_mult": tuple(params.channel_mult),
        "num_head_channels": params.num_head_channels,
    }


def extractor(
    guidance: GuidanceParams, dataset: str | Path, out: str | Path, *, device: str = "cpu"
) -> dict:
    """The frozen DG feature extractor as an encoder file: ADM's classifier converted from the
    user's checkpoint (``adm``), or a noise-aware classifier trained on the dataset (``own``)."""
    params, data = guidance.extractor, load_dataset(dataset)
    config = _extractor_config(params, data)
    if params.kind == "adm":
        remedy = "set guidance.extractor.checkpoint to DG's ADM 32x32 classifier state dict"
        net, _ = load_encoder(params.checkpoint, config, device=device, remedy=remedy)
        info = {"source": params.checkpoint, "source_sha256": file_digest(params.checkpoint)}
    else:
        net, info = train_noise_classifier(
            data.images,
            data.labels,
            config,
            epochs=params.epochs,
            batch_size=params.batch,
            lr=params.lr,
            seed=guidance.seed,
            sigma_range=(guidance.sigma_min, guidance.sigma_max),
            device=device,
        )
    sha = save_encoder(out, net, dataset=data.name, **info)
    summary = {k: v for k, v in info.items() if k != "history"}
    parameters = sum(p.numel() for p in net.parameters())
    return {"kind": params.kind, "sha256": sha, "parameters": parameters, **summary}


def discriminator(
    guidance: GuidanceParams,
    sweep: SweepParams,
    score: ScoreParams,
    dataset: str | Path,
    fakes_file: str | Path,
    extractor_file: str | Path,
    run_dir: str | Path,
    reference_dir: str | Path,
    out_dir: str | Path,
    *,
    device: str = "cpu",
) -> dict:
    """Train DG's head on real vs fake images; keep the epoch whose guided samples score best.

    Each epoch, ``select_images`` samples (seeds from ``select_seed_start``, apart from the
    sweep's) are drawn at ``select_steps``/``select_rho`` with the first guidance weight and scored
    like the sweep; loss and accuracy (train and held-out) and that score are logged per epoch in
    ``history.json``; the chosen head goes to ``discriminator.pt``.
    """
    out_dir = Path(out_dir)
    data = load_dataset(dataset)
    fakes_arrays = read_npz(
        fakes_file,
        ["images"],
        optional=["labels"],
        what="fake samples (`aot fakes` output)",
        remedy="run `aot fakes` (again)",
    )
    fake, fake_labels = fakes_arrays["images"], fakes_arrays.get("labels")
    check_fakes(data.images, fake)
    metric, feature_extractor, ref = _scoring(score, reference_dir, device)
    model = _trained_network(run_dir, sweep, device)
    extractor_net, _ = load_encoder(
        extractor_file, device=device, remedy="run `aot extractor` (again)"
    )
    conditional = model.label_dim > 0
    head_config = {
        "image_size": extractor_net.feature_size,
        "in_channels": extractor_net.feature_channels,
        "model_channels": guidance.head_channels,
        "out_channels": 1,
        "num_res_blocks": guidance.head_blocks,
        "attention_ds": (1,),
        "channel_mult": (1,),
        "num_head_channels": guidance.extractor.num_head_channels,
        "num_classes": int(data.num_classes) if conditional else 0,
    }
    with seeded(guidance.seed):
        disc = Discriminator(extractor_net, EncoderUNet(**head_config))
    point = SweepPoint(guidance.select_steps, guidance.select_rho, "heun", guidance.weights[0])
    scorer = _scorer(feature_extractor, ref, metric)
    start = guidance.select_seed_start
    seeds = list(range(start, start + guidance.select_images))

    def evaluate(epoch: int, d: Discriminator) -> float:
        hook = _guidance_hook(guidance, d, point.guidance_weight)
        images, _ = _sample(model, point, seeds, sweep, desc=f"select {epoch}", correction=hook)
        return scorer(images, seeds)["value"]

    disc, info = train_discriminator(
        disc,
        data.images,
        fake,
        real_labels=data.labels if conditional else None,
        fake_labels=fake_labels,
        epochs=guidance.epochs,
        batch_size=guidance.batch,
        lr=guidance.lr,
        weight_decay=guidance.weight_decay,
        sigma_range=(guidance.sigma_min, guidance.sigma_max),
        pairing=guidance.noise,
        seed=guidance.seed,
        evaluate=evaluate,
        device=device,
    )
    chosen = info["history"][info["chosen_epoch"] - 1]
    summary = {
        "chosen_epoch": info["chosen_epoch"],
        "select_metric": metric,
        "select_point": point.tag,
        "select_score": chosen["score"],
        "heldout_accuracy": chosen["heldout_accuracy"],
        "heldout_loss": chosen["heldout_loss"],
        "last_heldout_accuracy": info["history"][-1]["heldout_accuracy"],
        "num_real": info["num_real"],
        "num_fake": info["num_fake"],
        "generator_checkpoint": str(model.checkpoint),
        "select_precision": model.precision,
    }
    sha = save_discriminator(
        out_dir / DISCRIMINATOR, disc, extractor_sha256=file_digest(extractor_file), **summary
    )
    _write_json(out_dir / DISCRIMINATOR_HISTORY, {**summary, "history": info["history"]})
    plot_discriminator_history(info["history"], info["chosen_epoch"], metric=metric,
                               path=out_dir / "discriminator_curves.png")  # fmt: skip
    return {**summary, "sha256": sha}


def _guidance_hook(guidance: GuidanceParams, disc: Discriminator, weight: float) -> Guidance:
    return Guidance(
        disc,
        weight,
        sigma_threshold=guidance.sigma_threshold,
        second_order=guidance.second_order,
    )


def guided_sweep(
    guidance: GuidanceParams,
    params: SweepParams,
    score: ScoreParams,
    run_dir: str | Path,
    reference_dir: str | Path,
    extractor_file: str | Path,
    discriminator_dir: str | Path,
    out_dir: str | Path,
    *,
    name: str,
    device: str = "cpu",
) -> dict:
    """The sweep grid, with rho ``guidance.rho`` (default the sweep's), times ``guidance.weights``
    with the trained discriminator, same seeds as the unguided sweep; rows add
    ``guidance_weight``, ``disc_calls`` and ``base_model``."""
    out_dir = Path(out_dir)
    rhos = guidance.rho or params.rho
    points = sweep_grid(params.steps, rhos, params.solver, guidance.weights)
    disc = load_discriminator(
        Path(discriminator_dir) / DISCRIMINATOR,
        extractor_file,
        extractor_sha256=file_digest(extractor_file),
        device=device,
    )
    model, metric, rows = _sweep_points(
        params,
        score,
        run_dir,
        reference_dir,
        out_dir,
        points,
        name=name,
        device=device,
        guide=lambda weight: _guidance_hook(guidance, disc, weight),
    )
    if distributed.rank() != 0:  # under torchrun: sampled its share; rank 0 writes and scores
        return {}
    rows = [
        replace(row, base_model=guidance.variant, second_order=guidance.second_order)
        for row in rows
    ]
    write_table(rows, out_dir / f"{name}_sweep")
    return {
        "model": name,
        "base_model": guidance.variant,
        "checkpoint": str(model.checkpoint),
        "metric": metric,
        **_best(rows),
    }
