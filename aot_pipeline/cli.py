"""The ``aot`` command line: one command per pipeline step, plus ``demo`` which chains them.

Every command reads ``params.yaml`` (``--params``), validates all of it before any compute starts,
and can write its metrics dict as JSON (``--metrics``) for ``dvc metrics``.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Annotated

import typer

from aot_model.sweep import SweepPoint
from aot_pipeline import steps, study
from aot_pipeline.config import ConfigError, Params, load_params

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="EDM / EDM-AOT pipeline steps. Each reads and validates params.yaml (--params) first.",
)

ParamsOpt = Annotated[Path, typer.Option("--params", help="parameter file")]
MetricsOpt = Annotated[Path | None, typer.Option(help="also write the metrics dict here (JSON)")]
DeviceOpt = Annotated[str, typer.Option(help="auto (cuda when available), cpu or cuda")]
ReferenceOpt = Annotated[Path, typer.Option("--reference", help="folder from `aot reference`")]
DataOpt = Annotated[Path, typer.Option(help="dataset file from `aot prepare`")]


def _user_errors(command):
    """Bad input ends with one clear line and exit status 2 (AOT_DEBUG=1 shows the traceback)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (ConfigError, ValueError, FileNotFoundError) as error:
            if os.environ.get("AOT_DEBUG"):
                raise
            typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2) from None

    return wrapper


def _finish(result: dict, metrics: Path | None) -> None:
    text = json.dumps(result, indent=2, sort_keys=True, default=str)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 speaks for all
        return
    if metrics is not None:
        metrics.parent.mkdir(parents=True, exist_ok=True)
        metrics.write_text(text + "\n")
    typer.echo(text)


def _variant(params: Params, name: str):
    if name not in params.variants:
        raise ConfigError(f"--variant must be one of {sorted(params.variants)}, got {name!r}")
    return params.variants[name]


def _device(device: str) -> str:
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"--device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but CUDA is not available")
    return device


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
    _finish(steps.prepare(load_params(params).data, out, downloads=downloads), metrics)


@app.command()
@_user_errors
def reference(
    data: Annotated[Path, typer.Option(help="dataset file from `aot prepare`")] = Path(
        "data/dataset.npz"
    ),
    out: Annotated[Path, typer.Option(help="output folder")] = Path("data/reference"),
    params: ParamsOpt = Path("params.yaml"),
    device: DeviceOpt = "auto",
    metrics: MetricsOpt = None,
) -> None:
    """Reference feature statistics of the dataset (and the fd feature net), from params `score`."""
    _finish(steps.reference(load_params(params).score, data, out, device=_device(device)), metrics)


@app.command()
@_user_errors
def train(
    variant: Annotated[str, typer.Option(help="a key of params `variants`, e.g. aot or edm")],
    run_dir: Annotated[Path, typer.Option(help="checkpoints and stats.jsonl go here")],
    data: Annotated[Path, typer.Option(help="dataset file from `aot prepare`")] = Path(
        "data/dataset.npz"
    ),
    resume: Annotated[
        str, typer.Option(help="auto (latest checkpoint in run-dir), none, or a checkpoint path")
    ] = "auto",
    params: ParamsOpt = Path("params.yaml"),
    device: DeviceOpt = "auto",
    metrics: MetricsOpt = None,
) -> None:
    """Train one model (params `network`, `train`, `variants`); resumable, works under torchrun."""
    p = load_params(params)
    result = steps.train(
        p.network,
        p.train,
        _variant(p, variant),
        data,
        run_dir,
        resume=None if resume == "none" else resume,
        device=_device(device),
    )
    _finish(result, metrics)


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
    p = load_params(params)
    result = steps.sweep(
        p.sweep, p.score, run_dir, reference_dir, out, name=variant, device=_device(device)
    )
    _finish(result, metrics)


@app.command()
@_user_errors
def fid(
    samples: Annotated[
        Path | None, typer.Argument(help=".npz of uint8 images, as `aot sweep` writes them")
    ] = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="instead of SAMPLES: sample this run in memory")
    ] = None,
    steps_: Annotated[int, typer.Option("--steps", help="with --run-dir: sampler steps")] = 18,
    rho: Annotated[float, typer.Option(help="with --run-dir: schedule exponent")] = 7.0,
    solver: Annotated[str, typer.Option(help="with --run-dir: heun or euler")] = "heun",
    blocks: Annotated[int, typer.Option(help="with --run-dir: seed blocks (EDM: 3)")] = 3,
    reference_dir: ReferenceOpt = Path("data/reference"),
    params: ParamsOpt = Path("params.yaml"),
    device: DeviceOpt = "auto",
    metrics: MetricsOpt = None,
) -> None:
    """Score a sample file, or (--run-dir) EDM's protocol: sweep.num_images samples per seed block,
    reporting min and mean (FID with Inception, fd_<dataset> offline)."""
    if (samples is None) == (run_dir is None):
        raise ValueError("give either SAMPLES (an .npz) or --run-dir, not both or neither")
    p = load_params(params)
    device = _device(device)
    if samples is not None:
        result = steps.score_samples(p.score, samples, reference_dir, device=device)
    else:
        point = SweepPoint(steps_, rho, solver)
        result = steps.score_protocol(
            p.sweep, p.score, run_dir, reference_dir, point, blocks=blocks, device=device
        )
    _finish(result, metrics)


@app.command()
@_user_errors
def report(
    sweeps: Annotated[list[str], typer.Option("--sweep", help="NAME=FOLDER, once per model")],
    out: Annotated[Path, typer.Option(help="output folder")] = Path("report"),
    metrics: MetricsOpt = None,
) -> None:
    """Score-vs-NFE and curvature pictures and a markdown table comparing the swept models."""
    pairs = dict(item.split("=", 1) for item in sweeps if "=" in item)
    if len(pairs) != len(sweeps):
        raise ValueError(f"--sweep takes NAME=FOLDER, got {sweeps}")
    result = steps.report(pairs, out)
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
    result = study.study_report(load_params(params), root, out, device=_device(device))
    _finish(result, metrics)


@app.command()
@_user_errors
def demo(
    out: Annotated[Path, typer.Option(help="everything goes under this folder")] = Path("demo"),
    params: ParamsOpt = Path("params.yaml"),
    device: DeviceOpt = "auto",
) -> None:
    """The main job end to end: prepare -> reference -> train each variant -> sweep -> report."""
    p = load_params(params)
    device = _device(device)
    dataset, reference_dir = out / "data" / "dataset.npz", out / "data" / "reference"
    _say("prepare", steps.prepare(p.data, dataset, downloads=out / "data" / "downloads"))
    _say("reference", steps.reference(p.score, dataset, reference_dir, device=device))
    sweep_dirs = {}
    for name, variant in p.variants.items():
        run_dir, sweep_dirs[name] = out / "runs" / name, out / "sweeps" / name
        _say(
            f"train {name}",
            steps.train(p.network, p.train, variant, dataset, run_dir, device=device),
        )
        _say(
            f"sweep {name}",
            steps.sweep(
                p.sweep, p.score, run_dir, reference_dir, sweep_dirs[name], name=name, device=device
            ),
        )
    result = steps.report(sweep_dirs, out / "report")
    typer.echo(result["table"])
    typer.echo(f"pictures and report: {out / 'report'}")


def _say(what: str, result: dict) -> None:
    typer.secho(f"[{what}] " + json.dumps(result, default=str), fg=typer.colors.GREEN)


if __name__ == "__main__":
    app()
