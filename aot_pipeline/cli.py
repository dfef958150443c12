"""The ``aot`` command line: one command per pipeline step, plus ``demo`` which chains them.

Every command reads ``params.yaml`` (``--params``), validates all of it before any compute starts,
and can write its metrics dict as JSON (``--metrics``) for ``dvc metrics``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shlex
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from aot_model import devices
from aot_model.checks import check_choice, check_int
from aot_model.files import atomic_write
from aot_model.sampling import SOLVERS
from aot_model.sweep import SweepPoint
from aot_pipeline import dvc_metrics, outbox, pipeline, services, steps, tracked, tracking
from aot_pipeline.config import ConfigError, Params, load_params

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="EDM / EDM-AOT pipeline steps. Each reads and validates params.yaml (--params) first.",
)

ParamsOpt = Annotated[Path, typer.Option("--params", help="parameter file")]
MetricsOpt = Annotated[Path | None, typer.Option(help="also write the metrics dict here (JSON)")]
DeviceOpt = Annotated[
    str, typer.Option(help="auto (cuda when usable, says which and why), cpu, cuda or cuda:N")
]
ReferenceOpt = Annotated[Path, typer.Option("--reference", help="folder from `aot reference`")]
DataOpt = Annotated[Path, typer.Option(help="dataset file from `aot prepare`")]
ExtractorOpt = Annotated[Path, typer.Option("--extractor", help="from `aot extractor`")]
RunDirOpt = Annotated[Path, typer.Option(help="training run of the guided model")]


def _user_errors(command):
    """The one place where user errors become one line and exit status 2: bad parameters or
    options, missing or damaged files (ValueError, DamagedFileError), file-system and network
    failures (OSError: a full disk, a folder that is a file, an unreachable URL) and a diverged
    loss. Output paths are checked before the command starts. AOT_DEBUG=1 shows the traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            for name in ("out", "metrics"):
                if kwargs.get(name) is not None:
                    _check_writable(f"--{name}", kwargs[name])
            return command(*args, **kwargs)
        except (ValueError, OSError, FloatingPointError, tracking.TrackingUnavailable) as error:
            if os.environ.get("AOT_DEBUG"):
                raise
            typer.secho(f"error: {_one_line(error)}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    return wrapper


def _one_line(error: Exception) -> str:
    """An OSError as "<file>: <reason>" (no "[Errno 28]"), anything else as its message."""
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename else ""
        return f"{where}{error.strerror}"
    return str(error)


def _check_writable(option: str, path: Path) -> None:
    """Refuse an output path under a file before any work is done (mkdir would fail later)."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"{option} {path}: {parent} is a file, not a folder")
            return


def _finish(result: dict, metrics: Path | None, numbers: Callable[[], dict] | None = None) -> None:
    """Print ``result``; write ``numbers()`` (default: ``result``) to the ``--metrics`` file."""
    text = json.dumps(result, indent=2, sort_keys=True, default=str)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 speaks (and writes) for all
        return
    if metrics is not None:
        payload = result if numbers is None else numbers()
        body = json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"
        metrics.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(metrics, lambda f: f.write(body.encode()))
    typer.echo(text)


def _pipeline():
    """The MLflow parent run a step command joins: the runner's (AOT_MLFLOW_PARENT_RUN_ID), else
    the one recorded for this workspace and commit (how `dvc repro`'s stages share one run)."""
    name = "dvc-repro" if os.environ.get("DVC_STAGE") else "aot-steps"
    return tracking.pipeline_run(name, handshake=True)


def _run_step(metrics: Path | None, step: Callable[..., dict], *args, **kwargs) -> None:
    """``step(*args, **kwargs)`` (a :mod:`tracked` step) in the pipeline's run, then _finish."""
    with _pipeline():
        result = step(*args, **kwargs)
    _finish(result, metrics)


def _check_variant(params: Params, name: str) -> None:
    if name not in params.variants:
        raise ConfigError(f"--variant must be one of {sorted(params.variants)}, got {name!r}")


def _device(device: str) -> str:
    """The device a ``--device`` option names; ``auto`` says on stderr what it chose and why."""
    chosen, why = devices.resolve(device, "--device")
    if device == "auto":
        typer.echo(f"--device auto: {chosen} ({why})", err=True)
    return chosen


@app.command()
@_user_errors
def prepare(
    out: Annotated[
        Path, typer.Option(help="dataset file (.npz); a .json manifest goes beside it")
    ] = Path("data/dataset.npz"),
    downloads: Annotated[Path, typer.Option(help="where a downloaded tarball is kept")] = Path(
        "data/downloads"
    ),
    params: ParamsOpt = Path("params.yaml"),
    metrics: MetricsOpt = None,
) -> None:
    """Build the dataset array file from params `data` (digits offline, or CIFAR-10 with MD5)."""
    _run_step(metrics, tracked.prepare, load_params(params), out, downloads=downloads)


@app.command()
@_user_errors
def reference(
    data: DataOpt = Path("data/dataset.npz"),
    out: Annotated[Path, typer.Option(help="output folder")] = Path("data/reference"),
    params: ParamsOpt = Path("params.yaml"),
    device: DeviceOpt = "auto",
    metrics: MetricsOpt = None,
) -> None:
    """Reference feature statistics of the dataset (and the fd feature net), from params `score`."""
    _run_step(metrics, tracked.reference, load_params(params), data, out, device=_device(device))


@app.command()
@_user_errors
def train(
    variant: Annotated[str, typer.Option(help="a key of params `variants`, e.g. aot or edm")],
    run_dir: Annotated[Path, typer.Option(help="checkpoints and stats.jsonl go here")],
    data: DataOpt = Path("data/dataset.npz"),
    resume: Annotated[
        str, typer.Option(help="auto (latest checkpoint in run-dir), none, or a checkpoint path")
    ] = "auto",
    params: ParamsOpt = Path("params.yaml"),
    device: DeviceOpt = "auto",
    metrics: MetricsOpt = None,
    downloads: Annotated[
        Path, typer.Option(help="where a variant's checkpoint is downloaded (evaluate-only)")
    ] = Path("data/downloads"),
) -> None:
    """Train one model (params `network`, `train`, `variants`); resumable, works under torchrun.
    A variant that names a `checkpoint` is imported instead (`aot import-edm --variant`)."""
    p, device = load_params(params), _device(device)
    _check_variant(p, variant)
    if resume not in ("auto", "none") and not Path(resume).is_file():
        raise ValueError(f"--resume must be auto, none or a checkpoint file; got {resume!r}")
    with _pipeline():
        result = tracked.train(
            p, variant, data, run_dir, resume=None if resume == "none" else resume,
            device=device, downloads=downloads,
        )  # fmt: skip
    _finish(result, metrics, lambda: dvc_metrics.train(result))


@app.command()
@_user_errors
def sweep(
    variant: Annotated[str, typer.Option(help="model name used in file names")],
    run_dir: Annotated[Path, typer.Option(help="training run to sample (its latest checkpoint)")],
    out: Annotated[Path, typer.Option(help="output folder")],
    reference_dir: ReferenceOpt = Path("data/reference"),
    params: ParamsOpt = Path("params.yaml"),
    device: DeviceOpt = "auto",
    metrics: MetricsOpt = None,
) -> None:
    """Sample the params `sweep` grid with the same seeds everywhere; score; measure curvature."""
    p, device = load_params(params), _device(device)
    _check_variant(p, variant)
    with _pipeline():
        result = tracked.sweep(p, variant, run_dir, reference_dir, out, device=device)
    _finish(result, metrics, lambda: dvc_metrics.sweep(result, out))


@app.command()
@_user_errors
def fid(
    samples: Annotated[
        Path | None, typer.Argument(help=".npz of uint8 images, as `aot sweep` writes them")
    ] = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="instead of SAMPLES: sample this run in memory")
    ] = None,
    steps_: Annotated[
        int | None, typer.Option("--steps", help="with --run-dir: sampler steps [default: 18]")
    ] = None,
    rho: Annotated[
        float | None, typer.Option(help="with --run-dir: schedule exponent [default: 7]")
    ] = None,
    solver: Annotated[
        str | None, typer.Option(help="with --run-dir: heun or euler [default: heun]")
    ] = None,
    blocks: Annotated[
        int | None, typer.Option(help="with --run-dir: seed blocks [default: 3, as EDM]")
    ] = None,
    reference_dir: ReferenceOpt = Path("data/reference"),
    params: ParamsOpt = Path("params.yaml"),
    device: DeviceOpt = "auto",
    metrics: MetricsOpt = None,
) -> None:
    """Score a sample file, or (--run-dir) EDM's protocol: sweep.num_images samples per seed block,
    reporting min and mean (FID with Inception, fd_<dataset> offline)."""
    if (samples is None) == (run_dir is None):
        raise ValueError("give either SAMPLES (an .npz) or --run-dir, not both or neither")
    sampler = {"--steps": steps_, "--rho": rho, "--solver": solver, "--blocks": blocks}
    given = [name for name, value in sampler.items() if value is not None]
    if samples is not None and given:
        raise ValueError(f"{', '.join(given)} apply only with --run-dir, not to a SAMPLES file")
    p, device = load_params(params), _device(device)
    if samples is not None:
        result = steps.score_samples(p.score, samples, reference_dir, device=device)
    else:
        solver = solver or "heun"
        check_choice("--solver", solver, SOLVERS)
        num_steps = check_int("--steps", 18 if steps_ is None else steps_, 2)
        rho = 7.0 if rho is None else rho
        if not 0 < rho < math.inf:
            raise ValueError(f"--rho must be a finite number > 0, got {rho}")
        point = SweepPoint(num_steps, rho, solver)
        blocks = check_int("--blocks", 3 if blocks is None else blocks, 1)
        result = steps.score_protocol(
            p.sweep, p.score, run_dir, reference_dir, point, blocks=blocks, device=device
        )
    _finish(result, metrics)


@app.command("import-edm")
@_user_errors
def import_edm(
    src: Annotated[
        str | None,
        typer.Argument(help="EDM network-snapshot .pkl: local path, s3:// or https:// URL"),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="run folder to create (empty)")] = None,
    name: Annotated[
        str | None, typer.Option(help="with SRC: the model's name (default: SRC's file stem)")
    ] = None,
    variant: Annotated[
        str | None, typer.Option(help="instead of SRC: import params variants.<name>.checkpoint")
    ] = None,
    sha256: Annotated[str | None, typer.Option(help="with SRC: expected SHA-256")] = None,
    data: Annotated[
        Path | None, typer.Option(help="dataset file whose name the registered model takes")
    ] = None,
    downloads: Annotated[Path, typer.Option(help="where a downloaded file is kept")] = Path(
        "data/downloads"
    ),
    params: ParamsOpt = Path("params.yaml"),
    metrics: MetricsOpt = None,
) -> None:
    """Import an EDM-format network pickle (NVlabs/edm, EDM-AOT) into a run folder that `aot
    sweep`, `aot fid --run-dir` and `aot fakes` sample, without running any code from the file."""
    if (src is None) == (variant is None):
        raise ValueError("give either SRC or --variant, not both or neither")
    if out is None:
        raise ValueError("--out RUN_DIR is required")
    if variant is not None and (sha256 is not None or name is not None):
        raise ValueError(
            "--name and --sha256 apply to SRC; --variant names the model and its "
            "variants.<name>.checkpoint_sha256 the digest"
        )
    p = load_params(params)
    if variant is not None:
        _check_variant(p, variant)
    model = variant or name or Path(urllib.parse.urlsplit(src).path).stem
    with _pipeline():
        result = tracked.import_checkpoint(
            p, model, out, source=src, sha256=sha256, dataset=data, downloads=downloads
        )
    for line in result["warnings"]:
        typer.secho(f"warning: {line}", fg=typer.colors.YELLOW, err=True)
    _finish(result, metrics)


@app.command()
@_user_errors
def fakes(
    run_dir: Annotated[Path, typer.Option(help="training run whose latest checkpoint samples")],
    out: Annotated[Path, typer.Option(help="output .npz")] = Path("guidance/fakes.npz"),
    params: ParamsOpt = Path("params.yaml"),
    device: DeviceOpt = "auto",
    metrics: MetricsOpt = None,
) -> None:
    """Generate the discriminator's fake images (params `guidance`: num_fakes, fake_steps, ...)."""
    _run_step(metrics, tracked.fakes, load_params(params), run_dir, out, device=_device(device))


@app.command()
@_user_errors
def extractor(
    data: DataOpt = Path("data/dataset.npz"),
    out: Annotated[Path, typer.Option(help="encoder file")] = Path("guidance/extractor.pt"),
    params: ParamsOpt = Path("params.yaml"),
    device: DeviceOpt = "auto",
    metrics: MetricsOpt = None,
) -> None:
    """DG's frozen feature extractor: train a noise-aware classifier on the data (kind own) or
    convert the user's ADM 32x32 classifier checkpoint (kind adm)."""
    _run_step(metrics, tracked.extractor, load_params(params), data, out, device=_device(device))


@app.command()
@_user_errors
def discriminator(
    run_dir: RunDirOpt,
    data: DataOpt = Path("data/dataset.npz"),
    fakes_file: Annotated[Path, typer.Option("--fakes", help="from `aot fakes`")] = Path(
        "guidance/fakes.npz"
    ),
    extractor_file: ExtractorOpt = Path("guidance/extractor.pt"),
    out: Annotated[Path, typer.Option(help="output folder")] = Path("guidance/discriminator"),
    reference_dir: ReferenceOpt = Path("data/reference"),
    params: ParamsOpt = Path("params.yaml"),
    device: DeviceOpt = "auto",
    metrics: MetricsOpt = None,
) -> None:
    """Train the discriminator head on real vs fake images; keep the epoch with the best guided
    score (params `guidance`)."""
    p, device = load_params(params), _device(device)
    with _pipeline():
        result = tracked.discriminator(
            p, data, fakes_file, extractor_file, run_dir, reference_dir, out, device=device
        )
    _finish(result, metrics)


@app.command("guided-sweep")
@_user_errors
def guided_sweep(
    run_dir: RunDirOpt,
    out: Annotated[Path, typer.Option(help="output folder")],
    name: Annotated[str, typer.Option(help="model name in file names and the report")],
    extractor_file: ExtractorOpt = Path("guidance/extractor.pt"),
    discriminator_dir: Annotated[
        Path, typer.Option("--discriminator", help="folder from `aot discriminator`")
    ] = Path("guidance/discriminator"),
    reference_dir: ReferenceOpt = Path("data/reference"),
    params: ParamsOpt = Path("params.yaml"),
    device: DeviceOpt = "auto",
    metrics: MetricsOpt = None,
) -> None:
    """The params `sweep` grid (rho: `guidance.rho` when set) times `guidance.weights`, same
    seeds; NFE and discriminator calls."""
    p, device = load_params(params), _device(device)
    with _pipeline():
        result = tracked.guided_sweep(
            p, name, run_dir, reference_dir, extractor_file, discriminator_dir, out, device=device
        )
    _finish(result, metrics, lambda: dvc_metrics.sweep(result, out))


@app.command()
@_user_errors
def report(
    sweeps: Annotated[list[str], typer.Option("--sweep", help="NAME=FOLDER, once per model")],
    out: Annotated[Path, typer.Option(help="output folder")] = Path("report"),
    discriminator_dir: Annotated[
        Path | None, typer.Option("--discriminator", help="folder from `aot discriminator`")
    ] = None,
    metrics: MetricsOpt = None,
) -> None:
    """Score-vs-NFE and curvature pictures and a markdown table comparing the swept models
    (guided sweeps also against their unguided model at each NFE)."""
    pairs = {}
    for item in sweeps:
        name, _, folder = item.partition("=")
        if not name or not folder:
            raise ValueError(f"--sweep takes NAME=FOLDER, got {item!r}")
        if name in pairs:
            raise ValueError(f"--sweep names {name!r} twice; give each model once")
        pairs[name] = folder
    with _pipeline():
        result = tracked.report(pairs, out, discriminator_dir=discriminator_dir)
    if metrics is not None:
        _finish({k: v for k, v in result.items() if k != "table"}, metrics)
    typer.echo(result["table"])


@app.command("study-report")
@_user_errors
def study_report(
    root: Annotated[Path, typer.Option(help="folder with runs/, sweeps/, data/reference")] = Path(
        "."
    ),
    out: Annotated[Path, typer.Option(help="markdown page; pictures go beside it")] = Path(
        "docs/results.md"
    ),
    params: ParamsOpt = Path("params.yaml"),
    device: DeviceOpt = "auto",
    metrics: MetricsOpt = None,
) -> None:
    """Seeded study page: mean ± std per arm and NFE, paired differences, pictures, conclusion."""
    _run_step(metrics, tracked.study_report, load_params(params), root, out, device=_device(device))


@app.command()
@_user_errors
def demo(
    out: Annotated[Path, typer.Option(help="everything goes under this folder")] = Path("demo"),
    params: ParamsOpt = Path("params.yaml"),
    device: DeviceOpt = "auto",
    guidance: Annotated[
        bool, typer.Option(help="add the discriminator-guided arm for params guidance.variant")
    ] = True,
) -> None:
    """The whole pipeline of aot_pipeline/pipeline.py in this process, one stage after the other:
    prepare -> reference (-> extractor) -> per model: train -> sweep (-> fakes -> discriminator
    -> guided sweep) -> report (-> study report). The Prefect flow runs the same stages with the
    models side by side on a work pool."""
    plan = pipeline.plan(load_params(params), guidance)
    device = _device(device)
    with tracking.pipeline_run("demo", tags={"aot.out": str(out)}) as run_id:
        for stage in pipeline.shared_stages(plan):
            _say(stage.name, pipeline.run_stage(plan, stage, out, None, device))
        for model in plan.models:
            with tracking.model_run(model, pipeline.model_tags(plan, model)):
                for stage in pipeline.model_stages(plan, model):
                    result = pipeline.run_stage(plan, stage, out, model, device)
                    _say(f"{stage.name} {model}", result)
        for stage in pipeline.final_stages(plan):
            result = pipeline.run_stage(plan, stage, out, None, device)
            if stage.sweeps:
                typer.echo(result["table"])
    typer.echo(f"pictures and report: {pipeline.path(out, 'report')}")
    if run_id is not None:
        typer.echo(f"MLflow run {run_id} in {tracking.tracking_uri()} (see README: Tracking)")


@app.command()
@_user_errors
def sync() -> None:
    """Send what an S3 or MLflow outage left in the outbox (.aot/outbox): checkpoint copies,
    metrics, artifacts, run status. Exits 1 while anything is still unsent."""
    delivered, left = outbox.sync(tracking.client)
    typer.echo(f"sent {delivered} item(s); {len(left)} still unsent")
    for line in left:
        typer.echo(f"  {line}", err=True)
    if left:
        raise typer.Exit(1)


def _say(what: str, result: dict) -> None:
    typer.secho(f"[{what}] " + json.dumps(result, default=str), fg=typer.colors.GREEN)


pipeline_app = typer.Typer(
    no_args_is_help=True, help="The pipeline's declaration (aot_pipeline/pipeline.py) as files"
)
app.add_typer(pipeline_app, name="pipeline")


@pipeline_app.command("dvc-yaml")
@_user_errors
def pipeline_dvc_yaml(
    params: ParamsOpt = Path("params.yaml"),
    out: Annotated[
        Path | None, typer.Option(help="dvc.yaml to write [default: beside --params]")
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="write nothing; exit 1 if the file differs")
    ] = False,
) -> None:
    """Generate dvc.yaml for a params file: every stage of the declaration, per-model stages as
    foreach over `variants`. For a profile, give it its own folder: copy the profile there as
    params.yaml, generate, and run `dvc repro FOLDER/dvc.yaml` (outputs land in FOLDER)."""
    out = out or params.parent / "dvc.yaml"
    text = pipeline.dvc_yaml_text(pipeline.plan(load_params(params)), params.name)
    if check:
        if not out.is_file() or out.read_text() != text:
            typer.echo(
                f"{out} differs from the declaration for {params}: run `aot pipeline "
                f"dvc-yaml --params {params}`",
                err=True,
            )
            raise typer.Exit(1)
        return
    atomic_write(out, lambda f: f.write(text.encode()))
    typer.echo(f"wrote {out}", err=True)


services_app = typer.Typer(
    no_args_is_help=True,
    help="Local S3 (moto), MLflow and Prefect servers on loopback ports (aot_pipeline/services.py)",
)
app.add_typer(services_app, name="services")


@services_app.command("up")
@_user_errors
def services_up(
    worker: Annotated[bool, typer.Option(help="also start Prefect process workers")] = False,
    gpus: Annotated[
        str | None,
        typer.Option(help="GPU indices, e.g. 0,1: one model worker per GPU [env AOT_GPUS]"),
    ] = None,
) -> None:
    """Start what is not running yet (reusing what is) and wait for each health check; with
    --worker, the work pool's queues (models limited to AOT_MODEL_SLOTS, or one per GPU)."""
    settings = services.Settings.from_env()
    if gpus is not None:
        settings = dataclasses.replace(settings, gpus=tuple(g for g in gpus.split(",") if g))
    names = services.SERVICE_NAMES if worker else ("s3", "mlflow", "prefect")
    try:
        services.up(settings, names, say=lambda line: typer.echo(line, err=True))
    except RuntimeError as error:
        raise ValueError(str(error)) from None
    typer.echo(
        f"# pid files and logs: {settings.state_dir}; use with: eval $(aot services env)", err=True
    )


@services_app.command("down")
@_user_errors
def services_down() -> None:
    """Stop the services `aot services up` started (and nothing else)."""
    services.down(services.Settings.from_env(), say=typer.echo)


@services_app.command("status")
@_user_errors
def services_status() -> None:
    """Health and pid of each service, as JSON."""
    typer.echo(json.dumps(services.status(services.Settings.from_env()), indent=2))


@services_app.command("env")
@_user_errors
def services_env() -> None:
    """Shell `export` lines pointing clients at the local services (no secrets: dummy S3 keys)."""
    for key, value in services.Settings.from_env().client_env().items():
        typer.echo(f"export {key}={shlex.quote(value)}")


if __name__ == "__main__":
    app()
