"""Each pipeline step run with tracking: the one glue between :mod:`aot_pipeline.steps` and MLflow.

``aot <step>``, ``aot demo`` and the Prefect flow's tasks all call these functions (inside a
:func:`aot_pipeline.tracking.pipeline_run`); each opens the step's nested run, logs the step's
``params.yaml`` section(s) and provenance, runs the step, and logs its metrics and files. With
``AOT_TRACKING=off`` they are the plain steps. They return the step's result dict unchanged.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import yaml

from aot_model.adm import load_encoder
from aot_model.checkpoints import STATS_FILE, find_checkpoints
from aot_model.edm_pickle import IMPORT_FILE
from aot_model.files import file_digest, read_json
from aot_model.plots import plot_score_vs_nfe, save_image_grid
from aot_model.sweep import read_table
from aot_pipeline import outbox, steps, tracking
from aot_pipeline.config import Params
from aot_pipeline.pipeline import logged_sections


@contextlib.contextmanager
def _step_run(
    p: Params, step: str, model: str | None = None, params: dict | None = None
) -> Iterator[tracking.StepRun]:
    """:func:`tracking.step_run` with the step's sections of ``p`` (or ``params``) as run params;
    a tracked step that succeeds also gets the resolved parameters (defaults filled in) as
    ``params.yaml``."""
    sections = logged_sections(p, step, model) if params is None else params
    with tracking.step_run(step, model, sections) as run:
        yield run
        if run.run_id is not None:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "params.yaml"
                path.write_text(yaml.safe_dump(p.model_dump(mode="json"), sort_keys=False))
                run.log_artifact(path)


def _numbers(result: dict) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in result.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def _manifest(dataset: str | Path) -> dict:
    """The JSON manifest `aot prepare` writes beside the dataset file (tracked runs record its
    hash and shape; untracked steps do without it)."""
    return read_json(
        Path(dataset).with_suffix(".json"),
        what="dataset manifest",
        remedy=f"rebuild {dataset} with `aot prepare`",
    )


def _reference(reference_dir: str | Path) -> dict:
    """The manifest of an `aot reference` folder (its stats hash is logged with every score)."""
    return read_json(
        Path(reference_dir) / "reference.json",
        what="reference folder manifest",
        remedy=f"rebuild {reference_dir} with `aot reference`",
    )


def prepare(p: Params, out: str | Path, *, downloads: str | Path) -> dict:
    with _step_run(p, "prepare") as run:
        result = steps.prepare(p.data, out, downloads=downloads)
        run.log_params({"dataset_sha256": result["sha256"]})
        run.log_metrics(_numbers(result))
        run.log_artifact(Path(out).with_suffix(".json"), "data")
    return result


def reference(p: Params, dataset: str | Path, out_dir: str | Path, *, device: str) -> dict:
    with _step_run(p, "reference") as run:
        if run.run_id is not None:
            run.log_params({"dataset_sha256": _manifest(dataset)["sha256"]})
        result = steps.reference(p.score, dataset, out_dir, device=device)
        run.log_params({"reference_stats_sha256": result["reference_stats_sha256"]})
        run.log_metrics(_numbers(result))
        run.log_artifact(Path(out_dir) / "reference.json", "reference")
    return result


class _CheckpointCopies:
    """Copies each new checkpoint of a training run to ``<checkpoint_url>/<run>/`` on S3."""

    def __init__(self, base_url: str, run_dir: Path, run_id: str | None):
        self.run_dir, self.seen = run_dir, set(find_checkpoints(run_dir))
        self.prefix = f"{base_url.rstrip('/')}/{run_id or 'untracked'}"
        self.uploader = outbox.Uploader()

    def scan(self) -> None:
        for path in find_checkpoints(self.run_dir):
            if path not in self.seen:
                self.seen.add(path)
                self.uploader.submit(path, f"{self.prefix}/{path.name}")

    def close(self) -> list[str]:
        self.scan()
        return self.uploader.close(timeout=60)


def train(
    p: Params,
    name: str,
    dataset: str | Path,
    run_dir: str | Path,
    *,
    resume: str | None = "auto",
    device: str | None = None,
    downloads: str | Path = "data/downloads",
) -> dict:
    """Train variant ``name``: tick metrics live, S3 checkpoint copies in the background, then
    stats.jsonl, the final checkpoint inside a registered pyfunc sampler, optional snapshots.

    A variant that names a ``checkpoint`` is evaluate-only: its train stage imports the checkpoint
    (:func:`import_checkpoint`, downloaded once into ``downloads``); a run folder that already
    holds that variant's import is left as it is, as a finished training run is."""
    variant = p.variants[name]
    run_dir = Path(run_dir)
    if variant.checkpoint is not None:
        record = run_dir / IMPORT_FILE
        if record.is_file():
            done = json.loads(record.read_text())
            if variant.checkpoint_sha256 in (None, done["source_sha256"]):
                print(f"{run_dir}: holds the import of {done['source']}; left as is")
                return {**done, "checkpoint": str(find_checkpoints(run_dir)[-1])}
        return import_checkpoint(p, name, run_dir, dataset=dataset, downloads=downloads)
    with _step_run(p, "train", name) as run:
        if run.run_id is not None:
            manifest = _manifest(dataset)
            run.log_params({"dataset_sha256": manifest["sha256"], "dataset": manifest["name"]})
            if p.train.tick_kimg != round(p.train.tick_kimg):
                run.use_image_steps()
        url = p.tracking.checkpoint_url
        copies = _CheckpointCopies(url, run_dir, run.run_id) if url else None

        def callback(metrics: dict) -> None:
            if run.callback is not None:
                run.callback(metrics)
            if copies is not None:
                copies.scan()  # the previous snapshot is complete by the time the next tick ends

        result = steps.train(
            p.network,
            p.train,
            variant,
            dataset,
            run_dir,
            resume=resume,
            device=device,
            callback=callback,
        )
        owed = copies.close() if copies is not None else []
        if owed:
            print(f"s3: {len(owed)} checkpoint copies still unsent; run `aot sync` later")
        if run.run_id is not None:
            _log_training_files(run, p, name, manifest, Path(result["checkpoint"]))
    return result


def _log_training_files(run, p: Params, name: str, manifest: dict, checkpoint: Path) -> None:
    from aot_pipeline import registry

    for record in (STATS_FILE, IMPORT_FILE):  # a trained run's ticks, an imported run's record
        if (checkpoint.parent / record).exists():
            run.log_artifact(checkpoint.parent / record)
    if p.tracking.log_snapshots:
        for path in find_checkpoints(checkpoint.parent):
            if path != checkpoint:
                run.log_artifact(path, "checkpoints")
    digest = file_digest(checkpoint)
    run.set_tags({"aot.checkpoint": checkpoint.name, "aot.checkpoint_sha256": digest})
    registry.log_sampler(run, checkpoint, image_shape=tuple(manifest["shape"][1:]))
    if p.tracking.register_models:
        tags = {"checkpoint_sha256": digest, "checkpoint": checkpoint.name, "variant": name}
        registered = registry_name(manifest["name"], name)
        try:
            registry.register(run.client, run.run_id, registered, tags)
        except Exception as error:
            print(f"tracking: could not register {registered} ({error}); `aot sync` retries")
            outbox.put({"kind": "register", "run_id": run.run_id, "name": registered, "tags": tags})


def registry_name(dataset: str, variant: str) -> str:
    """Registered model name of a variant trained on a dataset: ``aot-<dataset>-<variant>``."""
    return f"aot-{dataset}-{variant}"


def sweep(
    p: Params,
    name: str,
    run_dir: str | Path,
    reference_dir: str | Path,
    out_dir: str | Path,
    *,
    device: str,
) -> dict:
    """Sweep variant ``name``: score per (solver, rho) series at step = NFE, curvature, grids;
    tags the registered version of the sampled checkpoint with its best score."""
    out_dir, reference_dir = Path(out_dir), Path(reference_dir)
    with _step_run(p, "sweep", model=name) as run:
        ref = _reference(reference_dir)
        run.log_params({"reference_stats_sha256": ref["reference_stats_sha256"]})
        result = steps.sweep(
            p.sweep, p.score, run_dir, reference_dir, out_dir, name=name, device=device
        )
        if run.run_id is not None:
            from aot_pipeline import registry

            score = _log_scores(run, name, out_dir, result)
            run.log_artifact(out_dir / "curvature.json", "curvature")
            if p.tracking.register_models:
                registered = registry_name(ref["dataset"], name)
                try:
                    registry.annotate(
                        run.client, registered, file_digest(result["checkpoint"]), score
                    )
                except Exception as error:
                    print(f"tracking: could not tag the registered {name} model ({error})")
    return result


def _checkpoint_params(checkpoint: str | Path) -> dict[str, str]:
    """The sampled checkpoint's file name and SHA-256."""
    return {"checkpoint": Path(checkpoint).name, "checkpoint_sha256": file_digest(checkpoint)}


def _log_scores(run, name: str, out_dir: Path, result: dict) -> dict[str, str]:
    """What every sweep (unguided or guided) logs: score series at step = NFE, throughput (and
    discriminator calls of guided points), the checkpoint, sample grids, score tables, the
    score-vs-NFE plot and the best-score tags, which it returns."""
    metric = result["metric"]
    curves: dict[str, list] = {}
    for row in read_table(out_dir / f"{name}_sweep.json"):
        point = row.point
        values = {f"{metric}_{point.series}": row.score}
        # Throughput does not depend on rho: one series per solver (and weight).
        values[point.named(f"img_per_s_{point.solver}")] = row.img_per_s
        if point.guidance_weight:
            values[point.named(f"disc_calls_{point.solver}")] = row.disc_calls
        run.log_metrics(values, step=point.nfe)
        label = point.named(f"{name} {point.solver} rho={point.rho:g}", spaced=True)
        curves.setdefault(label, []).append((point.nfe, row.score))
    run.log_metrics(_numbers(result))
    run.log_params(_checkpoint_params(result["checkpoint"]))
    for path in sorted(out_dir.glob(f"{name}_*.png")):
        run.log_artifact(path, "samples")
    for path in (out_dir / f"{name}_sweep.json", out_dir / f"{name}_sweep.csv"):
        run.log_artifact(path, "scores")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{metric}_vs_nfe_{name}.png"
        plot_score_vs_nfe(curves, metric=metric, path=path)
        run.log_artifact(path, "plots")
    score = {
        "metric": metric,
        "best_score": f"{result['best_score']:.6g}",
        "best_nfe": str(result["best_nfe"]),
        "best_point": result["best_point"],
    }
    run.set_tags({f"aot.{k}": v for k, v in score.items()})
    return score


# ------------------------------------------------------------------------------------------------
# discriminator guidance: the guidance.variant model's fakes, extractor, discriminator, guided sweep


def fakes(p: Params, run_dir: str | Path, out: str | Path, *, device: str) -> dict:
    """Fake images for the discriminator: count, NFE, their digest, a grid of the first ones."""
    with _step_run(p, "fakes", model=p.guidance.variant) as run:
        result = steps.fakes(p.guidance, p.sweep, run_dir, out, device=device)
        if run.run_id is not None:
            run.log_params(
                {"fakes_sha256": result["sha256"], **_checkpoint_params(result["checkpoint"])}
            )
            run.log_metrics(_numbers(result))
            with np.load(out) as f, tempfile.TemporaryDirectory() as tmp:
                run.log_artifact(save_image_grid(f["images"], Path(tmp) / "fakes.png"), "samples")
    return result


def _per_epoch(row: dict) -> dict[str, float]:
    return {k: v for k, v in _numbers(row).items() if k != "epoch"}


def extractor(p: Params, dataset: str | Path, out: str | Path, *, device: str) -> dict:
    """DG's feature extractor; a trained one (kind own) logs loss and accuracy per epoch."""
    with _step_run(p, "extractor") as run:
        if run.run_id is not None:
            run.log_params({"dataset_sha256": _manifest(dataset)["sha256"]})
        result = steps.extractor(p.guidance, dataset, out, device=device)
        if run.run_id is not None:
            run.log_params({"extractor_sha256": result["sha256"]})
            for row in load_encoder(out)[1].get("history", []):
                run.log_metrics(_per_epoch(row), step=row["epoch"])
            run.log_metrics(_numbers(result))
    return result


def discriminator(
    p: Params,
    dataset: str | Path,
    fakes_file: str | Path,
    extractor_file: str | Path,
    run_dir: str | Path,
    reference_dir: str | Path,
    out_dir: str | Path,
    *,
    device: str,
) -> dict:
    """DG's discriminator: loss and accuracy (train and held-out) and the guided selection score
    per epoch at step = epoch, the chosen epoch, the curves picture and history.json."""
    out_dir = Path(out_dir)
    with _step_run(p, "discriminator", model=p.guidance.variant) as run:
        result = steps.discriminator(
            p.guidance,
            p.sweep,
            p.score,
            dataset,
            fakes_file,
            extractor_file,
            run_dir,
            reference_dir,
            out_dir,
            device=device,
        )
        if run.run_id is not None:
            history = json.loads((out_dir / steps.DISCRIMINATOR_HISTORY).read_text())["history"]
            for row in history:
                values = _per_epoch(row)
                if "score" in values:  # the guided selection score of this epoch's head
                    values[f"select_{result['select_metric']}"] = values.pop("score")
                run.log_metrics(values, step=row["epoch"])
            run.log_params(
                {
                    "discriminator_sha256": result["sha256"],
                    "fakes_sha256": file_digest(fakes_file),
                    "extractor_sha256": file_digest(extractor_file),
                    "select_point": result["select_point"],
                }
            )
            summary = _numbers(result)
            for key in ("heldout_loss", "heldout_accuracy"):  # the chosen epoch's, not a series
                summary[f"chosen_{key}"] = summary.pop(key)
            run.log_metrics(summary)
            run.log_artifact(out_dir / "discriminator_curves.png", "plots")
            run.log_artifact(out_dir / steps.DISCRIMINATOR_HISTORY, "discriminator")
    return result


def guided_sweep(
    p: Params,
    name: str,
    run_dir: str | Path,
    reference_dir: str | Path,
    extractor_file: str | Path,
    discriminator_dir: str | Path,
    out_dir: str | Path,
    *,
    device: str,
) -> dict:
    """The guided sweep of model ``name``: logged like :func:`sweep` (series per solver, rho and
    guidance weight at step = NFE, grids, plot) plus discriminator calls per point."""
    out_dir = Path(out_dir)
    with _step_run(p, "guided_sweep", model=name) as run:
        ref = _reference(reference_dir)
        run.log_params({"reference_stats_sha256": ref["reference_stats_sha256"]})
        result = steps.guided_sweep(
            p.guidance,
            p.sweep,
            p.score,
            run_dir,
            reference_dir,
            extractor_file,
            discriminator_dir,
            out_dir,
            name=name,
            device=device,
        )
        if run.run_id is not None:
            disc = Path(discriminator_dir) / steps.DISCRIMINATOR
            run.log_params({"discriminator_sha256": file_digest(disc)})
            _log_scores(run, name, out_dir, result)
    return result


def report(
    sweep_dirs: dict[str, str | Path],
    out_dir: str | Path,
    *,
    discriminator_dir: str | Path | None = None,
) -> dict:
    """Compare the swept models; the pictures, report.md and summary.json go to the report run."""
    with tracking.step_run("report") as run:

        def log_column(name: str, summary: dict) -> None:
            run.log_metrics({f"{name}.{k}": v for k, v in _numbers(summary).items()})

        result = steps.report(
            sweep_dirs, out_dir, discriminator_dir=discriminator_dir, log_column=log_column
        )
        run.log_artifact(out_dir, "report")
    return result


def study_report(p: Params, root: str | Path, out: str | Path, *, device: str) -> dict:
    """The seeded study's page (aot_pipeline/study.py); the page and its pictures go to the run."""
    from aot_pipeline import study

    out = Path(out)
    with tracking.step_run("study_report", params=logged_sections(p, "study_report")) as run:
        result = study.study_report(p, root, out, device=device)
        run.log_artifact(out, "study")
        run.log_artifact(out.with_suffix(""), "study")
    return result


# ------------------------------------------------------------------------------------------------
# evaluate-only variants: a released EDM-format network instead of training


def import_checkpoint(
    p: Params,
    name: str,
    run_dir: str | Path,
    *,
    source: str | Path | None = None,
    sha256: str | None = None,
    dataset: str | Path | None = None,
    downloads: str | Path = "data/downloads",
) -> dict:
    """The train stage of an evaluate-only variant: :func:`steps.import_checkpoint` of
    ``variants.<name>.checkpoint`` (or ``source`` with ``sha256``) into ``run_dir``, as one MLflow
    run ``import-<name>`` logged like a trained model (import.json, the pyfunc sampler, registered
    as ``aot-<dataset>-<name>``; ``dataset``'s manifest names the dataset, else the snapshot's own
    dataset_kwargs path does)."""
    variant = p.variants.get(name)
    if source is None:
        if variant is None or variant.checkpoint is None:
            raise ValueError(f"variants.{name} names no checkpoint to import; give SRC")
        source, sha256 = variant.checkpoint, variant.checkpoint_sha256
    section = {"variant": variant.model_dump()} if variant is not None else {}
    with _step_run(p, "import", model=name, params=section) as run:
        result = steps.import_checkpoint(
            source, run_dir, name=name, sha256=sha256, downloads=downloads
        )
        if run.run_id is not None:
            kwargs = result["network_kwargs"]
            channels, resolution = kwargs["img_channels"], kwargs["img_resolution"]
            if dataset is not None:
                dataset_name = _manifest(dataset)["name"]
            else:
                edm_data = result["other_entries"].get("dataset_kwargs") or {}
                dataset_name = Path(str(edm_data.get("path", "edm"))).stem
            manifest = {"name": dataset_name, "shape": [0, channels, resolution, resolution]}
            run.log_params(
                {
                    "source": str(source),
                    "source_sha256": result["source_sha256"],
                    "architecture": result["architecture"],
                }
            )
            run.set_tags({"aot.imported_from": result["source_sha256"]})
            _log_training_files(run, p, name, manifest, Path(result["checkpoint"]))
    return result
