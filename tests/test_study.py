"""The seeded study: statistics against closed forms and scipy; the report on synthetic outputs."""

import json
import math
import statistics
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import yaml

from aot_model import study
from aot_model.checkpoints import CHECKPOINT_PATTERN
from aot_model.features import FeatureNet, save_feature_net
from aot_model.sweep import SweepPoint, SweepRow
from aot_pipeline import study as study_page
from aot_pipeline.config import ConfigError, apply_variant, parse_params
from aot_pipeline.study import check_arms, study_models, study_report

# ------------------------------------------------------------------------------------------------
# aot_model.study


def test_spread_is_mean_and_sample_std(rng):
    values = rng.normal(3.0, 2.0, 7)
    s = study.spread(values)
    assert (s.mean, s.std, s.n) == (
        pytest.approx(statistics.fmean(values)),
        pytest.approx(statistics.stdev(values)),
        7,
    )
    single = study.spread([0.5])
    assert (single.mean, single.n) == (0.5, 1) and math.isnan(single.std)
    with pytest.raises(ValueError, match="values"):
        study.spread([])


@pytest.mark.parametrize("confidence", [study.CONFIDENCE, 0.8])
def test_paired_difference_is_scipys_paired_t(rng, confidence):
    baseline = dict(enumerate(rng.normal(5.0, 1.0, 6)))
    arm = {s: v + rng.normal(0.5, 0.3) for s, v in baseline.items()} | {9: 0.0}  # 9: no partner
    d = study.paired_difference(arm, baseline, confidence=confidence)
    diffs = [arm[s] - baseline[s] for s in range(6)]
    low, high = scipy.stats.t.interval(
        confidence, df=5, loc=statistics.fmean(diffs), scale=scipy.stats.sem(diffs)
    )
    p_value = scipy.stats.ttest_rel([arm[s] for s in range(6)], list(baseline.values())).pvalue
    assert (d.mean, d.std, d.n) == (
        pytest.approx(statistics.fmean(diffs)),
        pytest.approx(statistics.stdev(diffs)),
        6,
    )
    assert (d.low, d.high, d.p_value) == (
        pytest.approx(low),
        pytest.approx(high),
        pytest.approx(p_value),
    )


def test_paired_difference_closed_form():
    d = study.paired_difference({0: 6.0, 1: 8.0, 2: 10.0}, {0: 5.0, 1: 6.0, 2: 7.0})
    assert (d.mean, d.std, d.n) == (2.0, 1.0, 3)
    half = 4.302652729911275 / math.sqrt(3)  # t_{0.975, 2} * std / sqrt(n)
    assert (d.low, d.high) == (pytest.approx(2 - half), pytest.approx(2 + half))
    assert d.verdict is study.Verdict.NO_DIFFERENCE  # the interval contains 0
    # Every seed moved by the same amount: no spread, so the interval is the point itself.
    same = study.paired_difference({0: 7.0, 1: 8.0}, {0: 5.0, 1: 6.0})
    assert (same.low, same.high, same.p_value, same.verdict) == (2.0, 2.0, 0.0, study.Verdict.WORSE)
    none = study.paired_difference({0: 5.0, 1: 6.0}, {0: 5.0, 1: 6.0})
    assert (none.p_value, none.verdict) == (1.0, study.Verdict.NO_DIFFERENCE)


@pytest.mark.parametrize(
    ("arm", "verdict"),
    [
        ({0: 4.0, 1: 4.9, 2: 6.1}, study.Verdict.BETTER),  # d = -1, -1.1, -0.9
        ({0: 6.0, 1: 7.1, 2: 7.9}, study.Verdict.WORSE),  # d = 1, 1.1, 0.9
        ({0: 4.0, 1: 7.0, 2: 7.5}, study.Verdict.NO_DIFFERENCE),  # d = -1, 1, 0.5
    ],
)
def test_verdicts(arm, verdict):
    assert study.paired_difference(arm, {0: 5.0, 1: 6.0, 2: 7.0}).verdict is verdict


def test_single_seed_has_no_interval():
    d = study.paired_difference({0: 1.0}, {0: 2.0})
    assert (d.mean, d.n, d.verdict) == (-1.0, 1, study.Verdict.TOO_FEW_SEEDS)
    assert all(math.isnan(v) for v in (d.std, d.low, d.high, d.p_value))
    with pytest.raises(ValueError, match="common seeds"):
        study.paired_difference({0: 1.0}, {1: 1.0})


def _diffs(verdicts: str, nfes=(5, 11, 35)) -> dict:
    """Fabricated paired differences, one per NFE: b(etter), w(orse), n(o difference), 1 seed."""
    baseline = {0: 5.0, 1: 6.0, 2: 7.0}
    arms = {
        "b": {0: 4.0, 1: 4.9, 2: 6.1},
        "w": {0: 6.0, 1: 7.1, 2: 7.9},
        "n": {0: 4.0, 1: 7.0, 2: 7.5},
        "1": {0: 4.0},
    }
    return {
        nfe: study.paired_difference(arms[v], baseline)
        for nfe, v in zip(nfes, verdicts, strict=True)
    }


# The verdicts at NFE 5, 11 and 35 (as in `_diffs`) of each case, and its shape.
SHAPES = {
    "nnn": study.Shape.NO_DIFFERENCE,
    "nwn": study.Shape.WORSE,
    "www": study.Shape.WORSE,
    "bbn": study.Shape.GAIN_SHRINKS,
    "bbb": study.Shape.BETTER_EVERYWHERE,
    "nnb": study.Shape.BETTER_SOMEWHERE,
    "bnb": study.Shape.BETTER_SOMEWHERE,
    "bwn": study.Shape.MIXED,
    "b1n": study.Shape.TOO_FEW_SEEDS,
}


@pytest.mark.parametrize(("verdicts", "shape"), SHAPES.items())
def test_pattern_of_the_paired_intervals(verdicts, shape):
    assert study.pattern(_diffs(verdicts)) is shape
    with pytest.raises(ValueError, match="at least one NFE"):
        study.pattern({})


# ------------------------------------------------------------------------------------------------
# variants: arms x seeds x conditioning


def _study_params(cond_arms=False, **train):
    variants = {
        f"{arm}-s{seed}": {"aot": arm != "edm", "arm": arm, "seed": seed}
        for arm in ("edm", "aot")
        for seed in (0, 1, 2)
    }
    if cond_arms:
        variants.update(
            {f"c-{k}": {**v, "cond": True} for k, v in variants.items() if v["seed"] < 2}
        )
    raw = {"train": {"batch": 64, **train}, "variants": variants, "sweep": {"steps": [3, 6]}}
    return parse_params(raw)


def test_variant_overrides_apply_and_validate():
    p = parse_params(
        {
            "train": {"batch": 64, "seed": 7},
            "variants": {
                "a": {"aot": True, "pool_size": 64, "seed": 3, "cond": True, "duration_kimg": 9}
            },
        }
    )
    network, train = apply_variant(p.network, p.train, p.variants["a"])
    assert (network.cond, train.seed, train.aot.pool_size, train.duration_kimg) == (True, 3, 64, 9)
    assert (p.network.cond, p.train.seed, p.train.aot.pool_size) == (False, 7, 512)
    assert p.train.duration_kimg != 9
    for bad, message in [
        ({"aot": False, "pool_size": 64}, "only applies to AOT"),
        ({"aot": True, "pool_size": 100}, "multiple of the micro-batch"),
        ({"aot": True, "arm": "a b"}, "arm"),
        ({"aot": True, "seeds": 1}, "seeds"),
        ({"aot": True, "seed": -1}, "seed"),
        ({"aot": True, "duration_kimg": 0}, "duration_kimg"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_params({"train": {"batch": 64}, "variants": {"a": bad}})


def test_study_profiles_are_valid_and_balanced():
    from aot_pipeline.config import load_params

    for path, seeds in (("configs/study-digits.yaml", 3), ("configs/study-digits-smoke.yaml", 2)):
        models = study_models(load_params(path), "x")
        for cond in (False, True):
            arms = {}
            for m in models:
                if m.cond == cond:
                    arms.setdefault(m.arm, set()).add(m.seed)
            assert set(arms) == {"edm", "aot512", "aotbatch"}
            assert all(s == set(range(seeds)) for s in arms.values())


# ------------------------------------------------------------------------------------------------
# the report on synthetic pipeline outputs


SNAPSHOTS = (512, 1024, 1536)  # images seen at each kept snapshot of the fake runs


def _fake_outputs(root, params, score_of, with_labels=False, points=((3, 7.0), (6, 7.0))):
    """Write what train and sweep would: sweep tables at ``points`` (steps, rho), scored
    ``score_of(arm, seed, nfe, rho)``, curvature, samples, training stats, and (empty) snapshot
    files for the baseline's plateau check."""
    rng = np.random.default_rng(0)
    for m in study_models(params, root):
        m.sweep_dir.mkdir(parents=True)
        m.run_dir.mkdir(parents=True)
        for nimg in SNAPSHOTS:
            (m.run_dir / f"training-state-{nimg:09d}.pt").touch()
        rows = []
        for steps, rho in points:
            nfe = 2 * steps - 1
            npz = m.sweep_dir / f"{m.name}_heun_s{steps}_r{rho:g}.npz"
            arrays = {"images": rng.integers(0, 256, (16, 1, 16, 16), dtype=np.uint8)}
            if m.cond:
                arrays["labels"] = np.arange(16) % 10
            np.savez(npz, **arrays)
            score = score_of(m.arm, m.seed, nfe, rho)
            rows.append(
                {
                    "metric": "fd_digits",
                    "rho": rho,
                    "nfe": nfe,
                    "num_steps": steps,
                    "solver": "heun",
                    "score": score,
                    "images": str(npz),
                }
            )
        (m.sweep_dir / f"{m.name}_sweep.json").write_text(json.dumps(rows))
        curvature = 0.1 if m.arm == "edm" else 0.05
        (m.sweep_dir / "curvature.json").write_text(
            json.dumps(
                {
                    "sigmas": [80.0, 1.0, 0.1, 0.0],
                    "curvature": [curvature + 0.01 * m.seed] * 2,
                    "angle": [0.1, 0.1],
                    "drift": [2.0, 1.0, 0.5],
                    "straightness": [0.9],
                }
            )
        )
        if m.aot:
            ticks = [{"distance_ratio": 0.9 + 0.01 * m.seed}, {"distance_ratio": 0.92}]
            (m.run_dir / "stats.jsonl").write_text("\n".join(json.dumps(t) for t in ticks))
    if with_labels:
        reference = root / "data" / "reference"
        reference.mkdir(parents=True)
        save_feature_net(reference / "feature_net.pt", FeatureNet(1, 16, 10, width=4))


@pytest.fixture
def snapshots(monkeypatch):
    """Fabricated snapshot scores instead of sampling the (empty) snapshot files: set
    ``snapshots["score"] = f(model, nimg)``; default: flat (1 + seed / 10)."""
    scores = {"score": lambda model, nimg: 1.0 + model.seed / 10}
    calls = []

    def fake(page, model, checkpoint, point):
        assert (point.num_steps, point.rho, point.solver) == (6, 7.0, "heun")
        assert not model.aot  # only the baseline's snapshots are scored
        calls.append((model.name, checkpoint.name))
        return scores["score"](model, int(CHECKPOINT_PATTERN.match(checkpoint.name)[1]))

    monkeypatch.setattr(study_page, "_snapshot_score", fake)
    scores["calls"] = calls
    return scores


def test_report_tables_pictures_and_verdicts(tmp_path, snapshots):
    params = _study_params()
    seed_noise = {0: 0.0, 1: 0.3, 2: -0.2}

    def score(arm, seed, nfe, rho):  # AOT 0.5 lower at NFE 5 for every seed, equal at NFE 11
        return 10.0 / nfe + seed_noise[seed] - (0.5 if arm == "aot" and nfe == 5 else 0.0)

    _fake_outputs(tmp_path, params, score)
    out = tmp_path / "docs" / "results.md"
    summary = study_report(params, tmp_path, out)
    text = out.read_text()
    assert "## Unconditional models" in text and "Conditional" not in text
    mean5 = np.mean([10 / 5 + n for n in seed_noise.values()])
    std5 = np.std([10 / 5 + n for n in seed_noise.values()], ddof=1)
    assert f"| 5 | {mean5 - 0.5:.3f} ± {std5:.3f} | {mean5:.3f} ± {std5:.3f} |" in text
    assert "| aot | 0.9150 ± 0.0050 |" in text  # mean pairing ratio per seed: .91, .915, .92
    assert summary["unconditional"]["paired"] == {
        "aot rho7 nfe5": "better",
        "aot rho7 nfe11": "no significant difference",
    }
    pictures = ("fd_digits_vs_nfe_rho7", "curvature_vs_sigma", "aot_nfe5_rho7", "edm_nfe11_rho7")
    for picture in (f"unconditional_{p}.png" for p in pictures):
        assert (tmp_path / "docs" / "results" / picture).is_file()
        assert f"(results/{picture})" in text
    # Regenerated bit for bit from the same outputs.
    first = {p.name: p.read_bytes() for p in (tmp_path / "docs").rglob("*") if p.is_file()}
    study_report(params, tmp_path, out)
    assert first == {p.name: p.read_bytes() for p in (tmp_path / "docs").rglob("*") if p.is_file()}
    for picture in (tmp_path / "docs").rglob("*.png"):  # no timestamp chunk
        assert b"tIME" not in {kind for kind, _ in _png_chunks(picture)}


def test_report_covers_conditional_models(tmp_path, snapshots):
    params = _study_params(cond_arms=True)

    def score(arm, seed, nfe, rho):  # AOT 0.4 +- 0.05 higher everywhere
        return 3.0 + (0.4 + 0.05 * (seed - 1) if arm == "aot" else 0.0)

    _fake_outputs(tmp_path, params, score, with_labels=True)
    out = tmp_path / "results.md"
    summary = study_report(params, tmp_path, out)
    text = out.read_text()
    assert "## Conditional models" in text and "## Unconditional models" in text
    for kind in ("conditional", "unconditional"):
        assert set(summary[kind]["paired"].values()) == {"worse"}, kind
    section = text.split("## Conditional models")[1]
    assert "### Label agreement" in section
    rows = [line for line in section.splitlines() if line.startswith("| 7 | ")]
    rates = [float(cell.split(" ± ")[0]) for row in rows for cell in row.split("|")[3:5]]
    assert rates and all(0 <= r <= 1 for r in rates)


def test_report_rejects_an_arm_mixing_aot_settings(tmp_path):
    params = parse_params(
        {"variants": {"a": {"aot": True, "arm": "x"}, "b": {"aot": False, "arm": "x", "seed": 1}}}
    )
    with pytest.raises(ValueError, match="share arm 'x'"):
        study_report(params, tmp_path, tmp_path / "r.md")


def test_report_rejects_compared_variants_with_different_budgets(tmp_path):
    variants = {
        "e": {"aot": False, "arm": "edm", "duration_kimg": 2},
        "a": {"aot": True, "arm": "aot", "duration_kimg": 3},
        "c": {"aot": True, "arm": "aot", "cond": True, "duration_kimg": 5},  # its own comparison
    }
    with pytest.raises(ValueError, match=r"'e' and 'a' .*duration_kimg 2 vs 3"):
        study_report(parse_params({"variants": variants}), tmp_path, tmp_path / "r.md")
    variants["a"]["duration_kimg"] = 2
    check_arms(study_models(parse_params({"variants": variants}), tmp_path))


def test_report_names_missing_outputs(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"edm-s0_sweep\.json"):
        study_report(_study_params(), tmp_path, tmp_path / "r.md")
    params = _study_params()
    _fake_outputs(tmp_path, params, lambda arm, seed, nfe, rho: 1.0)
    for snapshot in (tmp_path / "runs" / "edm-s1").iterdir():
        snapshot.unlink()
    with pytest.raises(
        FileNotFoundError, match=r"no training-state-.* snapshot of baseline 'edm-s1'"
    ):
        study_report(params, tmp_path, tmp_path / "r.md")
    assert not (tmp_path / "r.md").exists()


def _unconditional(with_guidance=False):
    """Two arms x three seeds; with a guidance section guiding aot-s0."""
    variants = {
        f"{arm}-s{seed}": {"aot": arm != "edm", "arm": arm, "seed": seed}
        for arm in ("edm", "aot")
        for seed in (0, 1, 2)
    }
    raw = {"train": {"batch": 64}, "variants": variants, "sweep": {"steps": [3, 6]}}
    if with_guidance:
        raw["guidance"] = {"variant": "aot-s0"}
    return parse_params(raw)


_EDM_SEEDS = [m for m in study_models(_unconditional(), "x") if m.arm == "edm"]


# Baseline snapshot scores (model, nimg) -> score at the plateau point, one per shape of training.
PLATEAU_CASES = {
    "still improving": lambda m, nimg: 1.2 - 0.2 * SNAPSHOTS.index(nimg) + 0.01 * m.seed**2,
    "flat after 1.024 kimg": lambda m, nimg: (
        {512: 2.0, 1024: 1.0, 1536: 1.0}[nimg] + 0.1 * (nimg == 1536) * (m.seed - 1)
    ),
    "mean still falls": lambda m, nimg: (
        {512: 2.0, 1024: 1.0, 1536: 1.0}[nimg] + (nimg == 1536) * (-0.3, 0.1, -0.1)[m.seed]
    ),
    "flat from the first": lambda m, nimg: 1.0 + 0.1 * m.seed * (nimg == 1024),
    "worse at the last step": lambda m, nimg: (
        1.0 + 0.3 * (nimg == 1536) + 0.01 * m.seed * (nimg == 1536)
    ),
}


def test_plateau_table_in_the_report(tmp_path, snapshots):
    params = _unconditional()
    _fake_outputs(tmp_path, params, lambda arm, seed, nfe, rho: 1.0 + seed)

    def score(m, nimg):  # improving 1.0 -> 0.8 -> 0.6 (+- seed)
        return 1.2 - 0.2 * SNAPSHOTS.index(nimg) + 0.01 * m.seed**2

    snapshots["score"] = score
    out = tmp_path / "results.md"
    summary = study_report(params, tmp_path, out)
    assert sorted(snapshots["calls"]) == sorted(
        (f"edm-s{s}", f"training-state-{n:09d}.pt") for s in (0, 1, 2) for n in SNAPSHOTS
    )
    section = out.read_text().split("### Training length: edm at NFE 11 (rho 7)")[1]
    assert "| kimg | seed 0 | seed 1 | seed 2 | mean ± std |" in section
    for nimg in SNAPSHOTS:
        by_seed = [score(m, nimg) for m in _EDM_SEEDS]
        cells = " | ".join(f"{v:.3f}" for v in by_seed)
        spread = f"{np.mean(by_seed):.3f} ± {np.std(by_seed, ddof=1):.3f}"
        assert f"| {nimg / 1000:g} | {cells} | {spread} |" in section
    assert summary["unconditional"]["plateau"]["kimg1.536"] == pytest.approx(
        np.mean([score(m, 1536) for m in _EDM_SEEDS])
    )


def test_points_differing_in_one_axis_stay_apart(tmp_path, snapshots):
    """Scores are keyed by the whole sweep point: Euler with 9 steps shares its 9 NFE with Heun's 5
    steps and its step count with Heun's 9, and replaces neither on the page."""
    params = _unconditional()
    heun = ((5, 7.0), (9, 7.0))
    _fake_outputs(tmp_path, params, lambda arm, seed, nfe, rho: 10.0 / nfe + seed, points=heun)
    for m in study_models(params, tmp_path):
        table = m.sweep_dir / f"{m.name}_sweep.json"
        rows = json.loads(table.read_text())
        point = SweepPoint(9, 7.0, "euler")
        euler = SweepRow(point, images=rows[0]["images"], metric="fd_digits", score=5.0 + m.seed)
        table.write_text(json.dumps([*rows, euler.to_dict()]))
    out = tmp_path / "results.md"
    study_report(params, tmp_path, out)
    text = out.read_text()
    for mean, nfe in ((2.111, 9), (6.0, 9), (1.588, 17)):  # Heun 5, Euler 9, Heun 9 steps
        assert f"| {nfe} | {mean:.3f} ± 1.000 | {mean:.3f} ± 1.000 |" in text  # seeds 0..2
    assert text.count("| aot | 7 | 9 | ") == 2 and text.count("| aot | 7 | 17 | ") == 1


def _guided_sweep(root, base, rows):
    """A guided sweep table as `aot demo` writes it for ``base`` (sweeps/<base>-dg)."""
    folder = root / "sweeps" / f"{base}-dg"
    folder.mkdir(parents=True)
    table = [
        {"metric": "fd_digits", "rho": rho, "nfe": nfe, "num_steps": (nfe + 1) // 2,
         "solver": "heun", "guidance_weight": 2.0, "score": score, "base_model": base}
        for rho, nfe, score in rows
    ]  # fmt: skip
    (folder / f"{base}-dg_sweep.json").write_text(json.dumps(table))


def test_guided_arm_beside_its_unguided_seed(tmp_path, snapshots):
    params = _unconditional(with_guidance=True)
    assert [m.name for m in study_models(params, tmp_path)] == list(params.variants)  # no -dg
    _fake_outputs(tmp_path, params, lambda arm, seed, nfe, rho: 10.0 / nfe + 0.3 * seed)
    _guided_sweep(tmp_path, "aot-s0", [(7.0, 5, 1.5), (7.0, 11, 0.95)])  # rho 7 only
    out = tmp_path / "docs" / "results.md"
    summary = study_report(params, tmp_path, out)
    text = out.read_text()
    section = text.split("### Discriminator Guidance on aot, training seed 0 only")[1]
    assert "| rho | NFE | aot seed 0 | aot + DG (w=2), seed 0 only | DG minus unguided |" in section
    assert "| 7 | 5 | 2.000 | 1.500 | -0.500 |" in section
    assert "| 7 | 11 | 0.909 | 0.950 | +0.041 |" in section
    assert summary["unconditional"]["guided"] == {
        "aot + DG (w=2), seed 0 only": {"rho7_nfe5": 1.5, "rho7_nfe11": 0.95}
    }
    assert (tmp_path / "docs" / "results" / "unconditional_fd_digits_vs_nfe_rho7.png").is_file()
    # The guided sweep missing (e.g. `aot demo --no-guidance`) is not fatal.
    for path in (tmp_path / "sweeps" / "aot-s0-dg").iterdir():
        path.unlink()
    assert study_report(params, tmp_path, out)["unconditional"]["guided"] == {}


def test_guided_curve_in_the_plot(tmp_path, snapshots, monkeypatch):
    params = _unconditional(with_guidance=True)
    _fake_outputs(tmp_path, params, lambda arm, seed, nfe, rho: 1.0 + seed)
    _guided_sweep(tmp_path, "aot-s0", [(7.0, 5, 1.5), (7.0, 11, 0.95)])
    plotted = {}

    def plot(results, *, metric, path):
        plotted[metric] = results
        path.write_bytes(b"")

    monkeypatch.setattr(study_page, "plot_score_vs_nfe", plot)
    study_report(params, tmp_path, tmp_path / "results.md")
    curves = plotted["fd_digits (rho 7)"]
    assert curves["aot + DG (w=2), seed 0 only"] == [(5, 1.5), (11, 0.95)]  # no band: one seed
    assert curves["edm"] == [(5, 2.0, 1.0), (11, 2.0, 1.0)]  # mean, std over seeds 0..2


def _png_chunks(path) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk of a PNG file."""
    data, chunks, at = path.read_bytes(), [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        chunks.append((data[at + 4 : at + 8], data[at + 8 : at + 8 + length]))
        at += 12 + length
    return chunks


@pytest.mark.slow
def test_study_chain_regenerates_the_page_bit_for_bit(tmp_path):
    """A real (tiny) study: the snapshot scores come from the sweep's own sampler and scorer (the
    last snapshot's equal the sweep table's), are cached, and the page is the same bytes twice."""
    from builders import TINY_PARAMS
    from typer.testing import CliRunner

    from aot_pipeline.cli import app

    raw = {k: v for k, v in TINY_PARAMS.items() if k != "guidance"}
    raw["train"] = {**raw["train"], "keep_snapshots": 2}
    raw["variants"] = {
        f"{arm}-s{seed}": {"aot": arm == "aot", "arm": arm, "seed": seed}
        for arm in ("edm", "aot")
        for seed in (0, 1)
    }
    profile = tmp_path / "study.yaml"
    profile.write_text(yaml.safe_dump(raw))
    root, docs = tmp_path / "study", tmp_path / "docs"

    def invoke(*args):
        result = CliRunner().invoke(app, [str(a) for a in (*args, "--params", profile)])
        assert result.exit_code == 0, result.output
        return result

    invoke("demo", "--out", root)
    invoke("study-report", "--root", root, "--out", docs / "results.md")
    text = (docs / "results.md").read_text()
    assert "### Training length: edm at NFE 7 (rho 7)" in text
    assert "its scores here equal the sweep table's bit for bit" in text
    cached = sorted((root / "plateau").rglob("*_score.json"))
    assert len(cached) == 4  # 2 seeds x 2 snapshots of the baseline
    first = {p.relative_to(docs): p.read_bytes() for p in docs.rglob("*") if p.is_file()}
    stamps = {p: p.stat().st_mtime_ns for p in cached}
    invoke("study-report", "--root", root, "--out", docs / "results.md")
    assert {p: p.stat().st_mtime_ns for p in cached} == stamps  # reused, not sampled again
    assert first == {p.relative_to(docs): p.read_bytes() for p in docs.rglob("*") if p.is_file()}
    pictures = [p for p in docs.rglob("*.png")]
    assert len(pictures) >= 5
    for picture in pictures:  # nothing in the pictures that changes from run to run
        chunks = _png_chunks(picture)
        assert b"tIME" not in {kind for kind, _ in chunks}
        assert all(b"Software" in body for kind, body in chunks if kind == b"tEXt")


# ------------------------------------------------------------------------------------------------
# the rendered words against a committed snapshot (.venv/bin/python tests/test_study.py rewrites it)

SNAPSHOT = Path(__file__).parent / "data" / "study_page.md"
# Paired arm-minus-baseline offsets by seed: b(etter), w(orse), n(o significant difference).
OFFSET = {
    "b": lambda seed: -0.5 + 0.05 * (seed - 1),
    "w": lambda seed: 0.5 + 0.05 * (seed - 1),
    "n": lambda seed: 0.3 * (seed - 1),
}
# Each AOT arm's verdicts at NFE 3, 5 and 11, per rho: every shape of `study.pattern` but two at
# rho 7 or rho 3 (the trend cases below have them all), every verdict at the lowest and highest
# NFE and in the paper's headline (NFE 5 against the baseline's NFE 11); `one` has one seed.
ARMS = {
    "gain": {7.0: "bbn", 3.0: "nnn"},
    "worse": {7.0: "wwn", 3.0: "www"},
    "mixed": {7.0: "bnw", 3.0: "bbb"},
    "one": {7.0: "bbb", 3.0: "bbb"},
}


def _snapshot_params():
    variants = {f"edm-s{seed}": {"aot": False, "arm": "edm", "seed": seed} for seed in (0, 1, 2)}
    for arm in ARMS:
        for seed in (0,) if arm == "one" else (0, 1, 2):
            variants[f"{arm}-s{seed}"] = {"aot": True, "arm": arm, "seed": seed}
    # Every value the page's header prints is set here, so schema defaults do not move the page.
    raw = {
        "data": {"dataset": "digits", "resolution": 16},
        "network": {"arch": "ncsnpp", "model_channels": 16, "channel_mult": [1, 2],
                    "num_blocks": 1, "dropout": 0.1},
        "train": {"batch": 64, "lr": 0.001, "augment_p": 0.12, "duration_kimg": 2},
        "sweep": {"steps": [2, 3, 6], "rho": [3.0, 7.0], "solver": ["heun"], "num_images": 16,
                  "seed_start": 0, "sigma_min": 0.002, "sigma_max": 80.0},
        "score": {"metric": "fd"},
        "guidance": {"variant": "gain-s0"},
        "variants": variants,
    }  # fmt: skip
    return parse_params(raw)


def _snapshot_score(arm, seed, nfe, rho):
    """Equal at NFE 5 and 11 (rho 7), so the headline's verdict is the arm's own at NFE 5."""
    base = 2.0 + (nfe == 3) + 0.25 * (rho == 3.0) + {0: 0.0, 1: 0.3, 2: -0.2}[seed]
    if arm == "edm":
        return base
    return base + OFFSET[ARMS[arm][rho][(3, 5, 11).index(nfe)]](seed)


def _snapshot_page(tmp) -> str:
    """The page of a fabricated study (``tmp``: an empty folder for its outputs)."""
    params = _snapshot_params()
    points = [(steps, rho) for rho in (3.0, 7.0) for steps in (2, 3, 6)]
    _fake_outputs(tmp, params, _snapshot_score, points=points)
    _guided_sweep(tmp, "gain-s0", [(7.0, 5, 1.5), (7.0, 11, 2.2)])

    def snapshot_score(page, model, checkpoint, point):  # better, then flat within the noise
        nimg = int(CHECKPOINT_PATTERN.match(checkpoint.name)[1])
        step = {512: 1.0, 1024: 0.1 * (model.seed - 1), 1536: 0.0}[nimg]
        return _snapshot_score("edm", model.seed, point.nfe, point.rho) + step

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(study_page, "_snapshot_score", snapshot_score)
        patch.setattr(study_page, "plot_score_vs_nfe", lambda results, *, metric, path: None)
        patch.setattr(study_page, "plot_curvature_vs_sigma", lambda stats, *, path: None)
        patch.setattr(study_page, "save_image_grid", lambda images, path, **kwargs: None)
        study_report(params, tmp, tmp / "docs" / "results.md")
    return (tmp / "docs" / "results.md").read_text()


def _snapshot_sentences() -> list[str]:
    """The sentences the fabricated page cannot reach: each shape's trend and view, each
    plateau case, each agreement of the last snapshot with the sweep, each guided comparison."""
    lines = ["## Trend and the paper's view per shape (rho 7, NFE 5, 11 and 35)", ""]
    for verdicts, shape in SHAPES.items():
        trend = study_page._trend("aot", "edm", _diffs(verdicts), "rho 7")
        lines.append(f"- `{verdicts}`: {trend} View: {study_page.SHAPE_WORDS[shape][1]}.")
    lines += ["", "## Where the baseline stops improving (NFE 11, rho 7)", ""]
    point = SweepPoint(6, 7.0)  # NFE 11
    for name, score in PLATEAU_CASES.items():
        by_nimg = {nimg: {m.seed: score(m, nimg) for m in _EDM_SEEDS} for nimg in SNAPSHOTS}
        lines.append(f"- {name}: {study_page._plateau_sentence(by_nimg, point)}")
    one_seed = study_page._plateau_sentence({512: {0: 1.0}, 1024: {0: 0.5}}, point)
    one_snapshot = study_page._plateau_sentence({512: {0: 1.0, 1: 2.0}}, point)
    lines += [f"- one seed: {one_seed}", f"- one snapshot: {one_snapshot}"]
    lines += ["", "## The last snapshot against the sweep", ""]
    rows = {m.name: [SweepRow(point, score=1.0 + m.seed)] for m in _EDM_SEEDS}
    for name, moved in (("equal", 0.0), ("rounding", 1e-9), ("different", 0.5)):
        last = {m.seed: 1.0 + m.seed + moved * (m.seed == 2) for m in _EDM_SEEDS}
        lines.append(f"- {name}: {study_page._swept_check(_EDM_SEEDS, rows, {1536: last}, point)}")
    lines += ["", "## Discriminator Guidance against the arm's seed spread (NFE 11, rho 7)", ""]
    base, label = _EDM_SEEDS[0], "edm + DG (w=2), seed 0 only"
    spread = {point: {m.seed: 1.0 + 0.3 * m.seed for m in _EDM_SEEDS}}
    for name, guided, arm_scores in (
        ("within", {point: 1.1}, spread),
        ("beyond", {point: 2.0}, spread),
        ("one seed", {point: 1.1}, {point: {0: 1.0}}),
        ("no common point", {SweepPoint(3, 7.0): 1.1}, spread),
    ):
        says = study_page._guided_sentence(
            base, label, guided, {point: 1.0}, arm_scores, "fd_digits"
        )
        lines.append(f"- {name}: {says}")
    return [*lines, ""]


def _snapshot_text(tmp) -> str:
    return "\n".join(
        [
            "<!-- Generated by `.venv/bin/python tests/test_study.py`; do not edit by hand. -->",
            "",
            "# The page of a fabricated study",
            "",
            *_snapshot_page(tmp).splitlines(),
            "",
            "# Sentences the page does not reach",
            "",
            *_snapshot_sentences(),
        ]
    )


def test_rendered_words_match_the_snapshot(tmp_path):
    assert _snapshot_text(tmp_path) == SNAPSHOT.read_text(), (
        "the study's words changed: if intended, regenerate tests/data/study_page.md with "
        "`.venv/bin/python tests/test_study.py` and review its diff"
    )


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        SNAPSHOT.write_text(_snapshot_text(Path(tmp)))
    print(f"wrote {SNAPSHOT}")
