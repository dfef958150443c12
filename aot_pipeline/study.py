"""The study report: ``docs/results.md`` generated from a seeded AOT-vs-EDM study's outputs.

A study is a params profile whose ``variants`` are arms x training seeds (x conditioning), e.g.
``configs/study-digits.yaml``, run by ``aot demo`` (or ``dvc repro``) into one folder with
``runs/<variant>``, ``sweeps/<variant>`` and ``data/reference``. :func:`study_report` reads those
files only, so rerunning the profile regenerates the page bit for bit on the same machine: means
and spreads per arm and NFE, per-seed paired differences against the baseline (statistics in
:mod:`aot_model.study`), pictures, and a conclusion written from the numbers.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, fields
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch

from aot_model import study
from aot_model.checkpoints import CHECKPOINT_PATTERN, find_checkpoints
from aot_model.features import load_feature_net
from aot_model.files import atomic_write, file_digest, read_json
from aot_model.metrics import TrajectoryStats
from aot_model.plots import plot_curvature_vs_sigma, plot_score_vs_nfe, save_image_grid
from aot_model.study import PairedDifference, Shape, Verdict
from aot_model.sweep import SweepPoint, SweepRow, read_table
from aot_pipeline import pipeline, steps
from aot_pipeline.config import Params, apply_variant

MISSING = "run the study's train and sweep steps first"
GRID_IMAGES = 25  # 5 x 5 cells of 64 px (16 px x 4) with 3 px gaps: three grids fit a page
# The paper's claims the page compares with (method-notes d.1, d.3): CIFAR-10, 200 Mimg.
PAPER = (
    "The paper reports, on CIFAR-10 after 200 Mimg, FID 1.88 at 27 NFE for EDM-AOT against 1.97 "
    "at 35 NFE for EDM, and with EDM's default sampler (35 NFE) 1.95 against 1.98: a clear gain "
    "at few steps that nearly vanishes at 35 NFE."
)


@dataclass(frozen=True)
class _Words:
    """How the page words one verdict of a paired difference, in each place it names one, from
    {arm}, {baseline}, {change} (the mean difference), {interval} (its confidence interval) and,
    for a training step, {steps} (from -> to kimg) and {nfe}."""

    point: str  # the arm against the baseline at one sampler point
    headline: str  # the paper's headline at this study's scale
    step: str  # the last step between the baseline's kept snapshots


# The one verdict-to-words mapping.
VERDICT_WORDS = {
    Verdict.BETTER: _Words(
        "{arm} is better than {baseline}: {change} ({interval})",
        "AOT is better with fewer steps ({change}, {interval})",
        "The last step ({steps} kimg) still improves the NFE {nfe} score beyond the seed noise "
        "({change}, {interval})",
    ),
    Verdict.WORSE: _Words(
        "{arm} is worse than {baseline} here: {change} ({interval})",
        "AOT is worse here ({change}, {interval})",
        "The last step ({steps} kimg) makes it worse beyond the seed noise ({change}, {interval})",
    ),
    Verdict.NO_DIFFERENCE: _Words(
        "no significant difference between {arm} and {baseline}: {change} ({interval}, within "
        "the seed noise)",
        "no significant difference ({change}, {interval})",
        "The last step ({steps} kimg) does not improve it beyond the seed noise ({change}, "
        "{interval})",
    ),
    Verdict.TOO_FEW_SEEDS: _Words(
        "{arm} vs {baseline}: {change} from a single seed (no spread)",
        "{change} from a single seed (no spread)",
        "One training seed: whether the last step ({steps} kimg, {change}) improves beyond the "
        "seed noise cannot be said",
    ),
}
# Per shape of an arm's paired differences across NFE (aot_model.study.pattern): the trend
# sentence ({arm}, {baseline}, {where}; NFE lists {every}, {better}, {worse}, {rest} and {also}, the
# NFEs without a significant difference) and how it compares with the paper.
SHAPE_WORDS = {
    Shape.TOO_FEW_SEEDS: (
        "{arm} vs {baseline} ({where}): too few training seeds for a paired interval, so nothing "
        "can be said beyond the seed noise.",
        "cannot be compared with the paper without more training seeds",
    ),
    Shape.NO_DIFFERENCE: (
        "No significant difference between {arm} and {baseline} at any NFE ({where}, NFE {every}): "
        "every paired {confidence} interval contains 0.",
        "does not reproduce the paper's gain at few steps",
    ),
    Shape.WORSE: (
        "AOT is worse here: {arm} scores worse than {baseline} at NFE {worse} ({where}){also}.",
        "contradicts the paper's result at this scale",
    ),
    Shape.MIXED: (
        "Mixed ({where}): {arm} is better than {baseline} at NFE {better}, but AOT is worse here "
        "at NFE {worse}{also}.",
        "only partly matches the paper, which reports no loss at any NFE",
    ),
    Shape.BETTER_EVERYWHERE: (
        "{arm} is better than {baseline} at every NFE ({where}, NFE {every}).",
        "is a larger effect than the paper's, whose gain nearly vanishes at 35 NFE",
    ),
    Shape.GAIN_SHRINKS: (
        "{arm} is better than {baseline} at NFE {better} only ({where}); at NFE {rest} there is no "
        "significant difference: the gain vanishes with more steps.",
        "matches the shape of the paper's result: a gain at few steps that vanishes at high NFE",
    ),
    Shape.BETTER_SOMEWHERE: (
        "{arm} is better than {baseline} at NFE {better} only ({where}){also}.",
        "does not match the paper's shape, whose gain is at few steps",
    ),
}


@dataclass(frozen=True)
class Model:
    """One trained variant of the study and where its outputs are."""

    name: str
    arm: str
    seed: int
    cond: bool
    aot: bool
    kimg: float
    run_dir: Path
    sweep_dir: Path


def study_models(params: Params, root: str | Path) -> list[Model]:
    """The variants of ``params`` with arm, training seed, conditioning and budget resolved."""
    root = Path(root)
    models = []
    for name, variant in params.variants.items():
        network, train = apply_variant(params.network, params.train, variant)
        models.append(
            Model(
                name=name,
                arm=variant.arm or name,
                seed=train.seed,
                cond=network.cond,
                aot=variant.aot,
                kimg=train.duration_kimg,
                run_dir=pipeline.path(root, "run", name),
                sweep_dir=pipeline.path(root, "sweep", name),
            )
        )
    return models


def check_arms(models: list[Model]) -> None:
    """Each (conditioning, arm) needs one AOT setting and distinct seeds, and every model of one
    conditioning the same budget, or the comparison is void."""
    seen, budget = {}, {}
    for m in models:
        first = seen.setdefault((m.cond, m.arm), m)
        if first is not m and (first.aot != m.aot or first.seed == m.seed):
            raise ValueError(
                f"variants {first.name!r} and {m.name!r} share arm {m.arm!r} but differ in aot "
                "or repeat a seed: an arm's variants must differ by seed only"
            )
        other = budget.setdefault(m.cond, m)
        if other.kimg != m.kimg:
            raise ValueError(
                f"variants {other.name!r} and {m.name!r} are compared but train for different "
                f"budgets (duration_kimg {other.kimg:g} vs {m.kimg:g}): give every variant of "
                "one conditioning the same duration_kimg"
            )


def _curvature(model: Model) -> TrajectoryStats:
    c = read_json(model.sweep_dir / "curvature.json", what="sweep curvature file", remedy=MISSING)
    return TrajectoryStats(**{f.name: np.array(c[f.name]) for f in fields(TrajectoryStats)})


def _pairing_ratio(model: Model) -> float | None:
    """Mean matched/identity distance ratio over the training ticks (None for the baseline)."""
    path = model.run_dir / "stats.jsonl"
    if not model.aot or not path.is_file():
        return None
    ratios = [json.loads(line).get("distance_ratio") for line in path.read_text().splitlines()]
    ratios = [r for r in ratios if r is not None and math.isfinite(r)]
    return float(np.mean(ratios)) if ratios else None


def _samples(model: Model, row: SweepRow) -> dict[str, np.ndarray]:
    """The arrays of a sweep point's samples file, found in the model's sweep folder."""
    with np.load(model.sweep_dir / Path(row.images).name) as f:
        return dict(f)


def _label_agreement(page: _Page, model: Model, rows: dict, point: SweepPoint) -> float | None:
    """Fraction of ``model``'s samples at ``point`` the feature net classifies as their label
    (None where the model has no labelled samples there)."""
    row = next((r for r in rows[model.name] if r.point == point), None)
    samples = {} if row is None else _samples(model, row)
    if "labels" not in samples:
        return None
    with torch.no_grad():
        logits = page.net(torch.from_numpy(samples["images"].astype(np.float32)).to(page.device))
    return float((logits.argmax(1).cpu().numpy() == samples["labels"]).mean())


def _fmt(value: float, sign: str = "") -> str:
    return "-" if math.isnan(value) else f"{value:{sign}.3f}"


def _spread_text(values: list[float], digits: int = 3) -> str:
    """``"mean ± std"`` of ``values`` (just the mean for a single value, "-" for none)."""
    if not values:
        return "-"
    s = study.spread(values)
    return f"{s.mean:.{digits}f}" if s.n < 2 else f"{s.mean:.{digits}f} ± {s.std:.{digits}f}"


def _table(header: list[str], rows: list[list[str]], *above: str) -> list[str]:
    """The lines of a markdown table below the paragraphs (or headings) ``above``, each of them
    and the table followed by an empty line."""
    lines = ["| " + " | ".join(cells) + " |" for cells in [header, *rows]]
    paragraphs = [line for text in above for line in (text, "")]
    return [*paragraphs, lines[0], "|" + "---|" * len(header), *lines[1:], ""]


def _verdict_words(d: PairedDifference, place: str, change: str, **names) -> str:
    """VERDICT_WORDS's sentence for ``place`` (point, headline or step) on ``d``, its {interval}
    the confidence interval of ``d`` and its number of seeds."""
    interval = f"{study.CONFIDENCE:.0%} CI [{d.low:+.3f}, {d.high:+.3f}], {d.n} seeds"
    words = getattr(VERDICT_WORDS[d.verdict], place)
    return words.format(change=change, interval=interval, **names)


def _nfes(nfes) -> str:
    """``"5, 7 and 11"`` (empty for none)."""
    names = [str(n) for n in sorted(nfes)]
    return " and ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else "".join(names)


def _trend(arm: str, baseline: str, diffs: dict[int, PairedDifference], where: str) -> str:
    """One sentence on ``arm`` vs ``baseline`` across every NFE in ``diffs`` (keys) at one sampler
    schedule ``where`` (e.g. ``"rho 7"``), following :func:`aot_model.study.pattern`."""
    nfes = {v: [nfe for nfe, d in diffs.items() if d.verdict is v] for v in Verdict}
    rest = _nfes(nfes[Verdict.NO_DIFFERENCE])
    return SHAPE_WORDS[study.pattern(diffs)][0].format(
        arm=arm,
        baseline=baseline,
        where=where,
        confidence=f"{study.CONFIDENCE:.0%}",
        every=_nfes(diffs),
        better=_nfes(nfes[Verdict.BETTER]),
        worse=_nfes(nfes[Verdict.WORSE]),
        rest=rest,
        also=f"; no significant difference at NFE {rest}" if rest else "",
    )


@dataclass(frozen=True)
class _Page:
    """What every section of the page needs: the profile, the study folder, where pictures go."""

    params: Params
    root: Path
    figures: Path  # beside the page
    net: object  # the feature net (label agreement), or None
    device: str

    def picture(self, name: str) -> tuple[Path, str]:
        """(file, link relative to the page) of picture ``name``."""
        return self.figures / name, f"{self.figures.name}/{name}"


def study_report(params: Params, root: str | Path, out: str | Path, *, device: str = "cpu") -> dict:
    """Write ``out`` (markdown, e.g. ``docs/results.md``) and its pictures in ``<out without
    suffix>/``; return a summary. ``root`` holds the outputs of ``params`` (``aot demo --out``):
    ``runs/``, ``sweeps/`` and ``data/reference``.

    Besides the sweeps, the baseline arm's kept training snapshots are sampled (on ``device``,
    where the feature net also classifies conditional samples) and scored at the sweep's largest
    step count with rho 7 (where its score stops improving); those scores are cached under
    ``<root>/plateau``, keyed by each checkpoint's digest and the profile.
    """
    root, out = Path(root), Path(out)
    models = study_models(params, root)
    check_arms(models)
    rows = {
        m.name: read_table(m.sweep_dir / f"{m.name}_sweep.json", remedy=MISSING) for m in models
    }
    for m in models:  # every baseline's snapshots, before any sampling starts
        if not m.aot and not find_checkpoints(m.run_dir):
            raise FileNotFoundError(
                f"{m.run_dir} holds no training-state-*.pt snapshot of baseline {m.name!r}: "
                "run the study's train step first"
            )
    figures = out.with_suffix("")
    figures.mkdir(parents=True, exist_ok=True)
    feature_net = pipeline.path(root, "reference") / steps.FEATURE_NET
    net = load_feature_net(feature_net, device) if feature_net.is_file() else None
    page = _Page(params, root, figures, net, device)
    lines = _header(params, models)
    summary = {}
    for cond in sorted({m.cond for m in models}):
        group = [m for m in models if m.cond == cond]
        kind = "conditional" if cond else "unconditional"
        section, summary[kind] = _section(page, kind, group, rows)
        lines += section
    lines += _variation_notes(summary)
    text = "\n".join(lines) + "\n"
    atomic_write(out, lambda f: f.write(text.encode()))
    return summary


def _header(params: Params, models: list[Model]) -> list[str]:
    net, train, sweep = params.network, params.train, params.sweep
    seeds = sorted({m.seed for m in models})
    return [
        "# Does AOT help? Results of the seeded study",
        "",
        "Generated by `aot study-report` from the study's pipeline outputs; do not edit by hand.",
        "",
        f"- Data: {params.data.dataset} at {params.data.resolution}x{params.data.resolution}"
        if params.data.dataset == "digits"
        else f"- Data: {params.data.dataset}",
        f"- Network: {net.arch}, {net.model_channels} channels x {net.channel_mult}, "
        f"{net.num_blocks} block(s) per resolution, dropout {net.dropout}",
        f"- Training: batch {train.batch}, lr {train.lr:g}, augmentation p = "
        f"{train.augment_p:g}, budget per model in each section; training seeds {seeds}; "
        "every arm sees the same data order and sampling seeds for a given training seed",
        f"- Sampling: Heun, {sweep.num_images} images per point (seeds {sweep.seed_start}.."
        f"{sweep.seed_start + sweep.num_images - 1}), "
        f"sigma {sweep.sigma_min:g}..{sweep.sigma_max:g}",
        f"- Score: {'FID' if params.score.metric == 'fid' else 'fd_' + params.data.dataset} "
        "(Frechet distance, lower is better); ± is the standard deviation over "
        "training seeds; paired differences are arm minus baseline for the same training seed, "
        f"with a {study.CONFIDENCE:.0%} Student-t interval",
        "",
    ]


def _section(page: _Page, kind: str, group: list[Model], rows: dict) -> tuple[list, dict]:
    arms = defaultdict(list)
    scores = defaultdict(lambda: defaultdict(dict))  # scores[arm][point][seed]
    for m in group:
        arms[m.arm].append(m)
        for r in rows[m.name]:
            scores[m.arm][r.point][m.seed] = r.score
    baseline = next((arm for arm, ms in arms.items() if not ms[0].aot), None)
    metric = rows[group[0].name][0].metric
    points = sorted({p for arm in scores.values() for p in arm}, key=lambda p: p.order)
    rhos = sorted({p.rho for p in points})
    lines = [f"## {kind.capitalize()} models", "", f"Budget: {group[0].kimg:g} kimg per model.", ""]
    diffs = {
        (arm, p): study.paired_difference(s[p], scores[baseline][p])
        for arm, s in scores.items()
        if baseline is not None and arm != baseline
        for p in points
        if p in s and p in scores[baseline]
    }
    plateau_lines, plateau_sentence, plateau = _plateau(page, arms.get(baseline, []), rows, metric)
    lines += _conclusion(kind, scores, baseline, diffs, rhos, metric, plateau_sentence)
    lines += plateau_lines
    lines += _score_tables(scores, points, rhos, metric)
    lines += _diff_table(diffs, baseline, metric)
    guided_lines, guided = _guided(page, group, rows, scores, metric)
    lines += guided_lines
    for rho in rhos:
        results = {
            arm: [(p.nfe, *_mean_std(s[p])) for p in points if p.rho == rho and p in s]
            for arm, s in scores.items()
        } | {label: by_rho[rho] for label, by_rho in guided.items() if rho in by_rho}
        path, link = page.picture(f"{kind}_{metric}_vs_nfe_rho{rho:g}.png")
        plot_score_vs_nfe(results, metric=f"{metric} (rho {rho:g})", path=path)
        lines += [f"![{metric} vs NFE, rho {rho:g}]({link})", ""]
    lines += _trajectories(page, kind, arms)
    lines += _pairing(arms)
    if page.net is not None and any(m.cond for m in group):
        lines += _agreement(page, arms, rows, points)
    lines += _grids(page, kind, arms, rows)
    # the standard deviation over training seeds of every (arm, point)
    stds = [_mean_std(by)[1] for s in scores.values() for by in s.values() if len(by) > 1]
    summary = {
        "metric": metric,
        "arms": {
            arm: {p.named(f"rho{p.rho:g}_nfe{p.nfe}"): _mean_std(s[p])[0] for p in s}
            for arm, s in scores.items()
        },
        "paired": {
            p.named(f"{arm} rho{p.rho:g} nfe{p.nfe}", spaced=True): d.verdict.value
            for (arm, p), d in diffs.items()
        },
        "plateau": plateau,
        "seed_std": {"median": float(np.median(stds)), "min": min(stds), "max": max(stds)}
        if stds
        else {},
        "guided": {
            label: {f"rho{rho:g}_nfe{nfe}": score for rho, pts in by.items() for nfe, score in pts}
            for label, by in guided.items()
        },
    }
    return lines, summary


def _mean_std(by_seed: dict[int, float]) -> tuple[float, float]:
    s = study.spread([by_seed[k] for k in sorted(by_seed)])
    return s.mean, (0.0 if math.isnan(s.std) else s.std)


def _conclusion(kind, scores, baseline, diffs, rhos, metric, plateau) -> list[str]:
    """Per AOT arm: the paired verdicts at the lowest and highest NFE (rho 7), the shape across
    NFE of every series (at every rho), the paper's headline in this study's terms, and the
    paper's view."""
    lines = ["### What the numbers show", ""]
    if baseline is None or not diffs:
        return [*lines, "No baseline arm (aot: false) to compare with.", ""]
    rho = 7.0 if 7.0 in rhos else rhos[0]
    views = []
    for arm in sorted({a for a, _ in diffs}):
        curves = defaultdict(dict)  # (rho, series) -> NFE -> difference
        for (a, p), d in diffs.items():
            if a == arm:
                curves[(p.rho, p.series)][p.nfe] = d
        curves = dict(sorted(curves.items()))
        main = next((ds for (r, _), ds in curves.items() if r == rho), None)
        if main is None:
            continue
        nfes = sorted(main)
        for nfe in sorted({nfes[0], nfes[-1]}):
            d = main[nfe]
            claim = _verdict_words(
                d, "point", f"{d.mean:+.3f} {metric}", arm=arm, baseline=baseline
            )
            lines.append(f"- At NFE {nfe}, rho {rho:g}, {claim}.")
        for (r, _), ds in curves.items():
            lines.append(f"- {_trend(arm, baseline, ds, f'rho {r:g}')}")
        headline = _headline(arm, baseline, scores, rho, max(rhos), metric)
        lines += [f"- {headline}"] if headline else []
        views.append(f"{arm} {SHAPE_WORDS[study.pattern(main)][1]}")
    for arm, s in sorted(scores.items()):
        best = min(s, key=lambda p: _mean_std(s[p])[0])
        lines.append(
            f"- Best point of {arm}: {_mean_std(s[best])[0]:.3f} {metric} at NFE {best.nfe}, "
            f"rho {best.rho:g}."
        )
    if plateau:
        lines.append(f"- Training length of {baseline}: {plateau[0].lower()}{plateau[1:]}")
    view = "; ".join(views) if views else f"no AOT arm was swept at rho {rho:g}"
    lines += [
        "",
        f"Compared with the paper ({kind}, rho {rho:g}, EDM's default schedule): {view}. {PAPER}",
        "",
    ]
    return lines


def _headline(arm, baseline, scores, rho, large_rho, metric) -> str | None:
    """The paper's headline (AOT at 27 NFE against EDM at 35) at this study's scale: the arm at the
    largest NFE <= 27/35 of the baseline's largest (with the large rho, as the paper's AOT
    schedules use) against the baseline at its largest NFE with ``rho``."""
    base = [p for p in scores[baseline] if p.rho == rho]
    if not base:
        return None
    top = max(base, key=lambda p: p.nfe)
    fewer = [p for p in scores[arm] if p.rho == large_rho and p.nfe <= top.nfe * 27 / 35]
    if not fewer:
        return None
    point = max(fewer, key=lambda p: p.nfe)
    d = study.paired_difference(scores[arm][point], scores[baseline][top])
    outcome = _verdict_words(d, "headline", f"{d.mean:+.3f} {metric}")
    return (
        f"The paper's headline (EDM-AOT at 27 NFE against EDM at 35) at this scale, {arm} at "
        f"NFE {point.nfe} (rho {large_rho:g}) against {baseline} at NFE {top.nfe} (rho {rho:g}): "
        f"{outcome}."
    )


# ------------------------------------------------------------------------------------------------
# where the baseline stops improving: its kept snapshots at the sweep's largest step count


def _snapshot_score(page: _Page, model: Model, checkpoint: Path, point: SweepPoint) -> float:
    """Score of ``checkpoint``'s EMA network at ``point`` with the sweep's seeds, sampler and
    scorer (:func:`steps.snapshot_sweep`), cached in the study folder."""
    out_dir = pipeline.path(page.root, "plateau") / model.name
    name = f"{model.name}-{CHECKPOINT_PATTERN.match(checkpoint.name)[1]}"
    reference = pipeline.path(page.root, "reference")
    sweep, scoring = page.params.sweep, page.params.score
    key = {
        "checkpoint": checkpoint.name,
        "checkpoint_sha256": file_digest(checkpoint),
        "point": point.tag,
        "sweep": sweep.model_dump(mode="json"),
        "score": scoring.model_dump(mode="json"),
        "reference_sha256": file_digest(reference / steps.REFERENCE_STATS),
        "device": page.device,
    }
    cache = out_dir / f"{name}_{point.tag}_score.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("key") == key:
            return saved["score"]
    table = steps.snapshot_sweep(
        sweep, scoring, checkpoint, reference, out_dir, [point], name=name, device=page.device
    )
    body = json.dumps({"key": key, "score": table[0].score}, indent=1, sort_keys=True)
    atomic_write(cache, lambda f: f.write(body.encode()))
    return table[0].score


def _plateau(page: _Page, baselines: list[Model], rows: dict, metric: str) -> tuple:
    """Table kimg x seed of the baseline's snapshots at the plateau point, and one sentence on
    whether its last step still improves beyond the seed noise (paired by training seed); that
    sentence; the mean score per snapshot for the summary."""
    if not baselines:
        return [], None, {}
    # The sweep's largest step count with EDM's default rho 7 (NFE 35 in the study).
    sweep = page.params.sweep
    point = SweepPoint(max(sweep.steps), 7.0, "heun" if "heun" in sweep.solver else sweep.solver[0])
    by_nimg = defaultdict(dict)  # nimg -> seed -> score
    for m in sorted(baselines, key=lambda m: m.seed):
        for checkpoint in find_checkpoints(m.run_dir):
            nimg = int(CHECKPOINT_PATTERN.match(checkpoint.name)[1])
            by_nimg[nimg][m.seed] = _snapshot_score(page, m, checkpoint, point)
    seeds = sorted(m.seed for m in baselines)
    table, summary = [], {}
    for nimg, by_seed in sorted(by_nimg.items()):
        spread = _spread_text([by_seed[s] for s in sorted(by_seed)])
        table.append([f"{nimg / 1000:g}", *(_fmt(by_seed.get(s, math.nan)) for s in seeds), spread])
        summary[f"kimg{nimg / 1000:g}"] = _mean_std(by_seed)[0]
    sentence = _plateau_sentence(by_nimg, point)
    lines = _table(
        ["kimg", *(f"seed {s}" for s in seeds), "mean ± std"],
        table,
        f"### Training length: {baselines[0].arm} at NFE {point.nfe} (rho {point.rho:g}) of each "
        "kept snapshot",
        f"{metric} of the EMA network of each kept training snapshot, sampled and scored like the "
        "sweep (same seeds, sampler and scorer).",
    )
    return [*lines, sentence, _swept_check(baselines, rows, by_nimg, point), ""], sentence, summary


def _plateau_sentence(by_nimg: dict, point: SweepPoint) -> str:
    """Whether the last step between kept snapshots still improves beyond the seed noise, and the
    earliest snapshot after which no step does."""
    nimgs = sorted(by_nimg)
    if len(nimgs) < 2:
        return (
            f"Only one snapshot is kept, so where the NFE {point.nfe} score stops improving "
            "cannot be measured: set train.keep_snapshots to 2 or more."
        )
    kimg = [f"{n / 1000:g}" for n in nimgs]
    moves = [study.paired_difference(by_nimg[b], by_nimg[a]) for a, b in pairwise(nimgs)]
    last, change = moves[-1], f"{moves[-1].mean:+.3f}"
    moved = _verdict_words(last, "step", change, steps=f"{kimg[-2]} -> {kimg[-1]}", nfe=point.nfe)
    if last.verdict is Verdict.TOO_FEW_SEEDS:
        return f"{moved}."
    if last.verdict is Verdict.BETTER:
        return (
            f"{moved}: the baseline has not stopped improving, so a longer budget could change "
            "the comparison."
        )
    since = max((i + 1 for i, d in enumerate(moves) if d.verdict is Verdict.BETTER), default=0)
    earliest = " (the earliest kept snapshot, so possibly before)" if since == 0 else ""
    still = (
        f"; its mean still falls ({change}), so more seeds or a longer run could still show a "
        "gain after it"
        if last.mean < 0
        else ""
    )
    return (
        f"{moved}. No step after {kimg[since]} kimg{earliest} improves the NFE {point.nfe} score "
        f"beyond the seed noise: that is where it stops improving, as far as {last.n} seeds can "
        f"tell{still}."
    )


def _swept_check(baselines, rows, by_nimg, point) -> str:
    """The last snapshot is the model the sweep scored: say whether the two scores agree."""
    last = by_nimg[max(by_nimg)]
    swept = {m.seed: r.score for m in baselines for r in rows[m.name] if r.point == point}
    common = sorted(set(swept) & set(last))
    if not common:
        return ""
    gap = max(abs(swept[s] - last[s]) for s in common)
    if gap == 0:
        return (
            "The last snapshot is the model the sweep scored, and its scores here equal the "
            "sweep table's bit for bit."
        )
    if gap <= 1e-6 * max(abs(swept[s]) for s in common):
        return (
            "The last snapshot is the model the sweep scored; its scores here agree with the "
            f"sweep table's to {gap:.2g} (float rounding, e.g. another CPU thread count)."
        )
    return (
        f"The last snapshot's scores here differ from the sweep table's by up to {gap:.3g}: the "
        "sweep scored another checkpoint, or sampling is not deterministic on this machine."
    )


# ------------------------------------------------------------------------------------------------
# the guided arm: Discriminator Guidance on one model of the study (params `guidance`)


def _guided(page: _Page, group: list[Model], rows: dict, scores: dict, metric: str):
    """Lines comparing the guided sweep of ``guidance.variant`` with its unguided sweep (same
    seed, paired at each point), and the guided curves for the plot: {label: {rho: [(nfe,
    score)]}}. Nothing when the profile guides no model of this group."""
    params = page.params
    base = next((m for m in group if params.guided and m.name == params.guidance.variant), None)
    if base is None:
        return [], {}
    table = pipeline.path(page.root, "guided_sweep", base.name) / f"{base.name}-dg_sweep.json"
    title = f"### Discriminator Guidance on {base.arm}, training seed {base.seed} only"
    if not table.is_file():
        return [title, "", f"No guided sweep at {table}: run `aot demo` with guidance.", ""], {}
    unguided = {r.point: r.score for r in rows[base.name]}
    weights = defaultdict(dict)  # weight -> point (unguided, to pair with it) -> score
    for r in read_table(table):
        weights[r.point.guidance_weight][r.point.unguided] = r.score
    lines, curves = [title, ""], {}
    for w, guided in sorted(weights.items()):
        label = f"{base.arm} + DG (w={w:g}), seed {base.seed} only"
        table, curve = [], defaultdict(list)
        for p in sorted(guided, key=lambda p: p.order):
            plain = unguided.get(p, math.nan)
            cells = [_fmt(plain), _fmt(guided[p]), _fmt(guided[p] - plain, "+")]
            table.append([f"{p.rho:g}", str(p.nfe), *cells])
            curve[p.rho].append((p.nfe, guided[p]))
        curves[label] = dict(curve)
        lines += _table(
            ["rho", "NFE", f"{base.arm} seed {base.seed}", label, "DG minus unguided"],
            table,
            f"One guided model, so no error bars: {label} against the same model unguided "
            f"(seed {base.seed}, same sampling seeds); {metric}, negative difference = DG better.",
        )
        lines += [_guided_sentence(base, label, guided, unguided, scores[base.arm], metric), ""]
    return lines, curves


def _guided_sentence(base, label, guided, unguided, arm_scores, metric) -> str:
    """DG's change at the largest NFE (rho 7 if guided there), set against the arm's seed spread."""
    paired = [p for p in guided if p in unguided]
    if not paired:
        return "The guided sweep shares no sampler point with the unguided one."
    rhos = {p.rho for p in paired}
    rho = 7.0 if 7.0 in rhos else min(rhos)
    point = max((p for p in paired if p.rho == rho), key=lambda p: p.nfe)
    d = guided[point] - unguided[point]
    spread = study.spread([arm_scores[point][s] for s in sorted(arm_scores.get(point, {}))])
    scale = (
        f"{'within' if abs(d) <= spread.std else 'beyond'} one seed-to-seed standard deviation "
        f"of {base.arm} there ({spread.std:.3f})"
        if spread.n > 1
        else "with no seed spread to compare with"
    )
    return (
        f"At NFE {point.nfe}, rho {point.rho:g}, {label} changes {metric} by {d:+.3f} "
        f"({unguided[point]:.3f} -> {guided[point]:.3f}), {scale}; one seed, so this is no "
        "significance test."
    )


def _score_tables(scores, points, rhos, metric) -> list[str]:
    arms = sorted(scores)
    lines = []
    for rho in rhos:
        table = [
            [str(p.nfe), *(_spread_text(list(scores[arm].get(p, {}).values())) for arm in arms)]
            for p in points
            if p.rho == rho
        ]
        lines += _table(
            ["NFE", *arms], table, f"### {metric}, rho {rho:g}: mean ± std over training seeds"
        )
    return lines


def _diff_table(diffs, baseline, metric) -> list[str]:
    if not diffs:
        return []
    table = []
    for (arm, p), d in sorted(diffs.items(), key=lambda item: (item[0][0], item[0][1].order)):
        spread = f"{d.mean:.3f}" if d.n < 2 else f"{d.mean:.3f} ± {d.std:.3f}"
        interval = f"[{_fmt(d.low)}, {_fmt(d.high)}]"
        table.append(
            [arm, f"{p.rho:g}", str(p.nfe), spread, interval, _fmt(d.p_value), d.verdict.value]
        )
    header = ["arm", "rho", "NFE", "mean ± std", "95% CI", "p", "verdict"]
    title = f"### Arm minus {baseline}, paired by training seed ({metric}; negative = arm better)"
    return _table(header, table, title)


def _trajectories(page: _Page, kind: str, arms) -> list[str]:
    stats = {
        arm: [_curvature(m) for m in sorted(ms, key=lambda m: m.seed)] for arm, ms in arms.items()
    }
    path, link = page.picture(f"{kind}_curvature_vs_sigma.png")
    plot_curvature_vs_sigma(stats, path=path)
    table = []
    for arm, runs in sorted(stats.items()):
        straight = _spread_text([float(r.straightness.mean()) for r in runs], 4)
        curv = _spread_text([float(r.curvature.mean()) for r in runs], 4)
        table.append([arm, straight, curv])
    header = ["arm", "straightness (1 = straight)", "curvature 1 - cos (mean over steps)"]
    title = "### Trajectories (Heun, 18 steps, rho 7; mean ± std over training seeds)"
    return [*_table(header, table, title), f"![curvature vs sigma]({link})", ""]


def _pairing(arms) -> list[str]:
    ratios = {
        arm: [r for m in ms if (r := _pairing_ratio(m)) is not None] for arm, ms in arms.items()
    }
    table = [[arm, _spread_text(rs, 4)] for arm, rs in sorted(ratios.items()) if rs]
    if not table:
        return []
    title = "### Pairing: matched / identity image-noise distance, mean over training (1 = EDM)"
    return _table(["arm", "ratio"], table, title)


def _agreement(page: _Page, arms, rows, points) -> list[str]:
    names = sorted(arms)
    table = []
    for p in points:
        rates = [
            [r for m in arms[arm] if (r := _label_agreement(page, m, rows, p)) is not None]
            for arm in names
        ]
        table.append([f"{p.rho:g}", str(p.nfe), *map(_spread_text, rates)])
    title = "### Label agreement: samples the feature net classifies as their class label"
    return _table(["rho", "NFE", *names], table, title)


def _grids(page: _Page, kind: str, arms, rows) -> list[str]:
    """Samples of each arm's first-seed model at the lowest, a middle and the highest NFE (rho 7
    if swept), side by side."""
    header, table = None, []
    for arm, ms in sorted(arms.items()):
        m = min(ms, key=lambda m: m.seed)
        swept = rows[m.name]
        rho = 7.0 if any(r.point.rho == 7.0 for r in swept) else swept[0].point.rho
        at_rho = sorted((r for r in swept if r.point.rho == rho), key=lambda r: r.point.nfe)
        picks = [at_rho[k] for k in sorted({0, len(at_rho) // 2, len(at_rho) - 1})]
        header = header or ["arm", *(f"NFE {r.point.nfe} (rho {rho:g})" for r in picks)]
        cells = []
        for r in picks:
            path, link = page.picture(f"{kind}_{arm}_nfe{r.point.nfe}_rho{rho:g}.png")
            save_image_grid(_samples(m, r)["images"], path, max_images=GRID_IMAGES, scale=4, gap=3)
            cells.append(f"![{arm} NFE {r.point.nfe}]({link})")
        table.append([arm, *cells])
    title = "### Samples (first training seed, same sampling seeds in every cell)"
    return _table(header, table, title)


def _variation_notes(summary: dict) -> list[str]:
    seed = [
        f"{kind} {s['metric']}: median {v['median']:.3f} (from {v['min']:.3f} to {v['max']:.3f}) "
        "over arms and sampler points"
        for kind, s in summary.items()
        if (v := s["seed_std"])
    ]
    return [
        "## Reproducibility",
        "",
        "- Seed to seed: the ± columns are the standard deviation over training seeds ("
        + ("; ".join(seed) if seed else "one seed per arm: not measured")
        + "); the paired columns remove what the arms share for a given seed.",
        "- Run to run on one machine: training, sampling and scoring are seeded and deterministic "
        "on the CPU, and this page and its pictures carry no timestamps, so rerunning the profile "
        "with the same software and thread count (OMP_NUM_THREADS) regenerates them bit for bit "
        "(tests/test_study.py runs a tiny study and writes its page twice, comparing the bytes "
        "of every file).",
        "- Machine to machine: the bits above depend on the CPU (its model and math library) as "
        "well as the software and thread count. AOT's cost is an exact float64 fixed-point value "
        "(`aot_model.pairing.fixed_point`, method-notes a.5), so pairings do not depend on the "
        "CPU; the network's float32 arithmetic does, for every arm alike. docs/benchmarks.md "
        '("The study on two machines") measures how much two runs of this profile on two '
        "machines of the same kind differ.",
        "",
    ]
