"""The pipeline, declared once: every stage, the params sections it reads, its inputs and outputs in
one folder layout, whether it runs once or per model, and when it is enabled.

Everything that runs the pipeline is derived from :data:`STAGES`:

* ``dvc.yaml`` (``aot pipeline dvc-yaml``): one stage each, ``foreach`` over ``variants`` for the
  per-model stages, every input a dep, every output an out;
* ``aot demo``: :func:`run_stage` over :func:`shared_stages`, each model's
  :func:`model_stages` and :func:`final_stages`, one after the other in one process;
* the Prefect flow ``aot`` (flows/aot_flow.py): the shared and final stages as tasks of the parent
  flow run, each model's stages as a child flow run on the work pool, cache keys from
  :func:`cache_inputs`;
* the params sections the tracked steps log to MLflow (:func:`logged_sections`), and the study
  report's paths (:func:`path`).

A stage's options are the ``aot <command>`` options of the same names, so a dvc.yaml command and
an in-process call run the same step with the same files.
"""

from __future__ import annotations

import enum
import functools
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aot_pipeline.config import Params, apply_variant


class Scope(enum.Enum):
    SHARED = "shared"  # once, before the models (their common inputs)
    MODEL = "model"  # once per model (variant), in that model's branch
    FINAL = "final"  # once, after every model


# The folder layout, relative to the work folder (`aot demo --out`, the flow's `out`, or the
# folder of dvc.yaml). {model} is a params `variants` key.
LAYOUT = {
    "dataset": "data/dataset.npz",
    "manifest": "data/dataset.json",
    "downloads": "data/downloads",
    "reference": "data/reference",
    "run": "runs/{model}",
    "sweep": "sweeps/{model}",
    "guided_sweep": "sweeps/{model}-dg",
    "train_metrics": "metrics/train-{model}.json",
    "sweep_metrics": "metrics/sweep-{model}.json",
    "guided_metrics": "metrics/sweep-{model}-dg.json",
    "fakes": "guidance/fakes.npz",
    "extractor": "guidance/extractor.pt",
    "discriminator": "guidance/discriminator",
    "report": "report",
    "study_page": "study/results.md",
    "study_figures": "study/results",
    "plateau": "plateau",
}


def path(root: str | Path, key: str, model: str | None = None) -> Path:
    """Where ``key`` of the layout lies under ``root`` (for ``model``)."""
    return Path(root) / LAYOUT[key].format(model=model)


@dataclass(frozen=True)
class Plan:
    """What one execution of the pipeline runs: the models, the guided one (None: no guided arm)
    and whether the study report is written."""

    params: Params
    guided: str | None
    study: bool

    @property
    def models(self) -> list[str]:
        return list(self.params.variants)


def model_tags(plan: Plan, model: str) -> dict[str, str]:
    """How a model is grouped in MLflow and Prefect: its arm, training seed, conditioning and
    budget (a variant's overrides applied)."""
    variant = plan.params.variants[model]
    network, train = apply_variant(plan.params.network, plan.params.train, variant)
    return {
        "aot.arm": variant.arm or model,
        "aot.seed": str(train.seed),
        "aot.cond": str(network.cond).lower(),
        "aot.budget_kimg": f"{train.duration_kimg:g}",
    }


def plan(params: Params, guidance: bool = True) -> Plan:
    """The guided arm runs when asked for and the params file has a ``guidance`` section; the
    study report when the variants carry arms (arms x seeds, e.g. configs/study-digits.yaml)."""
    guided = params.guidance.variant if guidance and params.guided else None
    study = any(v.arm is not None for v in params.variants.values())
    return Plan(params, guided, study)


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline: ``aot <command>`` with options from the layout.

    ``deps`` and ``outs`` map an option to its layout key (inputs and outputs: dvc.yaml's deps and
    outs, the flow's cache inputs); ``args`` are other options (``{model}``, ``{root}`` filled in);
    ``sections`` the params sections it reads (``variants.{model}``: the model's own variant).
    ``enabled`` says, for a plan and a model (None outside the model scope), whether it runs.
    """

    name: str
    command: str
    scope: Scope
    sections: tuple[str, ...]
    deps: dict[str, str] = field(default_factory=dict)
    outs: dict[str, str] = field(default_factory=dict)
    args: dict[str, str] = field(default_factory=dict)
    work: dict[str, str] = field(default_factory=dict)  # working folders: passed, not outputs
    metrics: str | None = None  # layout key of the dvc metrics file (--metrics)
    persist: bool = False  # dvc: kept across reruns (a resumable training run)
    enabled: Callable[[Plan, str | None], bool] = lambda plan, model: True
    io_retries: bool = False  # downloads, S3: retried with backoff by the flow
    sweeps: bool = False  # compares every swept model (--sweep NAME=FOLDER each)
    reads: Callable[[Plan, str | Path], list[Path]] | None = None  # inputs beyond deps
    extra_outs: tuple[str, ...] = ()  # layout keys it writes beside its options' paths

    def paths(self, root: str | Path, model: str | None) -> dict[str, Path]:
        """Every input and output option of this stage for ``model``, under ``root``."""
        keys = self.deps | self.outs | self.work
        return {opt: path(root, key, model) for opt, key in keys.items()}


def _guided_model(plan: Plan, model: str | None) -> bool:
    return model is not None and model == plan.guided


def report_inputs(plan: Plan, root: str | Path) -> dict[str, Path]:
    """The sweeps the report compares, {model name: folder}, the guided sweep last."""
    inputs = {model: path(root, "sweep", model) for model in plan.models}
    if plan.guided:
        inputs[f"{plan.guided}-dg"] = path(root, "guided_sweep", plan.guided)
    return inputs


def _report_reads(plan: Plan, root: str | Path) -> list[Path]:
    """The report's inputs: every sweep it compares, and the discriminator when guided."""
    paths = list(report_inputs(plan, root).values())
    return [*paths, path(root, "discriminator")] if plan.guided else paths


def study_inputs(plan: Plan, root: str | Path) -> list[Path]:
    """What the study report reads: the reference, every model's run and sweep, and the guided
    sweep."""
    paths = [path(root, "reference")]
    paths += [path(root, key, m) for m in plan.models for key in ("run", "sweep")]
    if plan.guided:
        paths.append(path(root, "guided_sweep", plan.guided))
    return paths


STAGES = (
    Stage(
        "prepare", "prepare", Scope.SHARED, ("data",),
        outs={"out": "dataset"}, work={"downloads": "downloads"}, extra_outs=("manifest",),
        io_retries=True,
    ),
    Stage(
        "reference", "reference", Scope.SHARED, ("score",),
        deps={"data": "dataset"}, outs={"out": "reference"},
    ),
    Stage(
        "extractor", "extractor", Scope.SHARED, ("guidance",),
        deps={"data": "dataset"}, outs={"out": "extractor"},
        enabled=lambda plan, model: plan.guided is not None,
    ),
    Stage(
        "train", "train", Scope.MODEL, ("network", "train", "variants.{model}"),
        deps={"data": "dataset"}, outs={"run-dir": "run"}, work={"downloads": "downloads"},
        args={"variant": "{model}", "resume": "auto"}, metrics="train_metrics", persist=True,
    ),
    Stage(
        "sweep", "sweep", Scope.MODEL, ("sweep", "score"),
        deps={"run-dir": "run", "reference": "reference"}, outs={"out": "sweep"},
        args={"variant": "{model}"}, metrics="sweep_metrics",
    ),
    # Discriminator Guidance on the guidance.variant model (method-notes g).
    Stage(
        "fakes", "fakes", Scope.MODEL, ("guidance", "sweep"),
        deps={"run-dir": "run"}, outs={"out": "fakes"}, enabled=_guided_model,
    ),
    Stage(
        "discriminator", "discriminator", Scope.MODEL, ("guidance", "sweep", "score"),
        deps={
            "run-dir": "run", "data": "dataset", "fakes": "fakes", "extractor": "extractor",
            "reference": "reference",
        },
        outs={"out": "discriminator"}, enabled=_guided_model,
    ),
    Stage(
        "guided_sweep", "guided-sweep", Scope.MODEL, ("guidance", "sweep", "score"),
        deps={
            "run-dir": "run", "reference": "reference", "extractor": "extractor",
            "discriminator": "discriminator",
        },
        outs={"out": "guided_sweep"}, args={"name": "{model}-dg"}, metrics="guided_metrics",
        enabled=_guided_model,
    ),
    Stage(
        "report", "report", Scope.FINAL, (), outs={"out": "report"}, sweeps=True,
        reads=_report_reads,
    ),
    # The seeded study's page (docs/results.md), when the variants are arms x seeds.
    Stage(
        "study_report", "study-report", Scope.FINAL,
        ("network", "train", "variants", "sweep", "score"),
        outs={"out": "study_page"}, args={"root": "{root}"}, reads=study_inputs,
        extra_outs=("study_figures", "plateau"), enabled=lambda plan, model: plan.study,
    ),
)  # fmt: skip
BY_NAME = {stage.name: stage for stage in STAGES}


def _stages(plan: Plan, scope: Scope, model: str | None = None) -> list[Stage]:
    return [s for s in STAGES if s.scope is scope and s.enabled(plan, model)]


def shared_stages(plan: Plan) -> list[Stage]:
    return _stages(plan, Scope.SHARED)


def model_stages(plan: Plan, model: str) -> list[Stage]:
    return _stages(plan, Scope.MODEL, model)


def final_stages(plan: Plan) -> list[Stage]:
    return _stages(plan, Scope.FINAL)


def cache_inputs(stage: Stage, plan: Plan, root: str | Path, model: str | None) -> list[Path]:
    """Every file or folder whose content decides the stage's outputs."""
    paths = [path(root, key, model) for key in stage.deps.values()]
    if stage.reads is not None:
        paths += stage.reads(plan, root)
    variant = plan.params.variants.get(model)  # none for a shared stage, or dvc.yaml's ${key}
    if stage.name == "train" and variant and variant.checkpoint and "://" not in variant.checkpoint:
        paths.append(Path(variant.checkpoint))  # an evaluate-only variant's local file
    return paths


def section_values(params: Params, stage: Stage, model: str | None) -> dict[str, object]:
    """The params sections ``stage`` reads, by dotted name, as plain data."""
    dumped = params.model_dump(mode="json")
    names = [dotted.format(model=model) for dotted in stage.sections]
    return {name: functools.reduce(operator.getitem, name.split("."), dumped) for name in names}


def logged_sections(params: Params, name: str, model: str | None = None) -> dict[str, object]:
    """What a tracked step logs as its params: its sections, the model's variant as ``variant``."""
    values = section_values(params, BY_NAME[name], model)
    if model is not None and f"variants.{model}" in values:
        values["variant"] = values.pop(f"variants.{model}")
    return values


def run_stage(plan: Plan, stage: Stage, root: str | Path, model: str | None, device: str) -> dict:
    """Run one stage in this process (its tracked step: MLflow run, params, metrics, files)."""
    from aot_pipeline import tracked

    p, a = plan.params, stage.paths(root, model)
    match stage.name:
        case "prepare":
            return tracked.prepare(p, a["out"], downloads=a["downloads"])
        case "reference":
            return tracked.reference(p, a["data"], a["out"], device=device)
        case "extractor":
            return tracked.extractor(p, a["data"], a["out"], device=device)
        case "train":  # an evaluate-only variant's checkpoint is imported instead
            return tracked.train(
                p, model, a["data"], a["run-dir"], device=device, downloads=a["downloads"]
            )
        case "sweep":
            return tracked.sweep(p, model, a["run-dir"], a["reference"], a["out"], device=device)
        case "fakes":
            return tracked.fakes(p, a["run-dir"], a["out"], device=device)
        case "discriminator":
            return tracked.discriminator(
                p, a["data"], a["fakes"], a["extractor"], a["run-dir"], a["reference"],
                a["out"], device=device,
            )  # fmt: skip
        case "guided_sweep":
            return tracked.guided_sweep(
                p, f"{model}-dg", a["run-dir"], a["reference"], a["extractor"],
                a["discriminator"], a["out"], device=device,
            )  # fmt: skip
        case "report":
            disc = path(root, "discriminator") if plan.guided else None
            return tracked.report(report_inputs(plan, root), a["out"], discriminator_dir=disc)
        case "study_report":
            return tracked.study_report(p, root, a["out"], device=device)
    raise AssertionError(f"stage {stage.name} has no runner")


# ------------------------------------------------------------------------------------------------
# dvc.yaml, generated


DVC_HEADER = """\
# Generated by `aot pipeline dvc-yaml` from the declaration in aot_pipeline/pipeline.py for
# {params}: do not edit; after changing `variants` or `guidance` there, or adding a section,
# generate it again (`aot pipeline dvc-yaml --check` tells whether it is current).
# Each stage lists exactly the params sections it reads, so `dvc repro` reruns only what changed;
# every stage joins one MLflow parent run (.aot/mlflow-parent.json; docs/architecture.md).
# Training runs are persistent outputs: `aot train --resume auto` continues an interrupted run.
"""


def command(
    stage: Stage, plan: Plan, root: str | Path = ".", model: str | None = None
) -> list[str]:
    """The ``aot`` command line of ``stage`` for ``model`` with the layout under ``root``."""
    argv = ["aot", stage.command]
    if stage.sweeps:
        for name, folder in report_inputs(plan, root).items():
            argv += ["--sweep", f"{name}={folder.as_posix()}"]
        if plan.guided:
            argv += ["--discriminator", path(root, "discriminator").as_posix()]
    filled = {"model": model, "root": Path(root).as_posix()}
    options = {opt: value.format(**filled) for opt, value in stage.args.items()}
    options |= {opt: p.as_posix() for opt, p in stage.paths(root, model).items()}
    if stage.metrics:
        options["metrics"] = path(root, stage.metrics, model).as_posix()
    for option, value in options.items():
        argv += [f"--{option}", value]
    return argv


def _dvc_stage(stage: Stage, plan: Plan, model: str) -> dict:
    """One dvc.yaml stage; ``model`` is "${key}" inside a foreach, or a model's name."""
    deps = [p.as_posix() for p in cache_inputs(stage, plan, ".", model)]
    body: dict = {"cmd": " ".join(command(stage, plan, ".", model))}
    if deps:
        body["deps"] = deps
    # DVC refuses a params section missing from params.yaml: list those the file sets (a section
    # left to the schema's defaults is added to dvc.yaml when the file gains it, by regenerating).
    given = plan.params.model_fields_set
    sections = [s.format(model=model) for s in stage.sections if s.split(".")[0] in given]
    if sections:
        body["params"] = sections
    outs = [path(".", key, model).as_posix() for key in (*stage.outs.values(), *stage.extra_outs)]
    body["outs"] = [{o: {"persist": True}} if stage.persist else o for o in outs]
    if stage.metrics:
        body["metrics"] = [{path(".", stage.metrics, model).as_posix(): {"cache": False}}]
    return body


def dvc_yaml(plan: Plan) -> dict:
    """dvc.yaml's content for ``plan``: per-model stages of every model as ``foreach`` over
    ``variants``, the guided arm's for its model, and a score-vs-NFE plot of every sweep."""
    stages = {}
    for stage in STAGES:
        model = plan.guided if stage.scope is Scope.MODEL else None
        if stage.scope is Scope.MODEL and stage.enabled is not _guided_model:
            stages[stage.name] = {"foreach": "${variants}", "do": _dvc_stage(stage, plan, "${key}")}
        elif stage.enabled(plan, model):  # once: shared, final, or the guided arm for its model
            stages[stage.name] = _dvc_stage(stage, plan, model or "")
    csv = {
        f"{folder.as_posix()}/{name}_sweep.csv": "score"
        for name, folder in report_inputs(plan, ".").items()
    }
    plots = [{"score_vs_nfe": {"template": "linear", "x": "nfe", "y": csv}}]
    return {"stages": stages, "plots": plots}


def dvc_yaml_text(plan: Plan, params_name: str = "params.yaml") -> str:
    import yaml

    body = yaml.safe_dump(dvc_yaml(plan), sort_keys=False, width=100)
    return DVC_HEADER.format(params=params_name) + body
