"""The seeded study: statistics against closed forms and scipy; the report on synthetic outputs."""

import json
import math

import numpy as np
import pytest
import scipy.stats

from aot_model import study
from aot_model.features import FeatureNet, save_feature_net
from aot_pipeline.config import ConfigError, apply_variant, parse_params
from aot_pipeline.study import study_models, study_report

# ------------------------------------------------------------------------------------------------
# aot_model.study


def test_spread_is_mean_and_sample_std():
    s = study.spread([1.0, 2.0, 4.0])
    assert s.mean == pytest.approx(7 / 3)
    assert s.std == pytest.approx(
        math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    )
    assert s.text(2) == "2.33 ± 1.53"
    single = study.spread([0.5])
    assert math.isnan(single.std) and single.text() == "0.500"
    with pytest.raises(ValueError, match="values"):
        study.spread([])


def test_paired_difference_closed_form_and_scipy():
    baseline = {0: 5.0, 1: 6.0, 2: 7.0}
    arm = {0: 6.0, 1: 8.0, 2: 10.0, 9: 0.0}  # seed 9 has no partner and is ignored
    d = study.paired_difference(arm, baseline)
    assert (d.mean, d.std, d.n) == (2.0, 1.0, 3)
    half = 4.302652729911275 / math.sqrt(3)  # t_{0.975, 2} * std / sqrt(n)
    assert (d.low, d.high) == (pytest.approx(2 - half), pytest.approx(2 + half))
    expected_p = scipy.stats.ttest_rel([6.0, 8.0, 10.0], [5.0, 6.0, 7.0]).pvalue
    assert d.p_value == pytest.approx(expected_p)
    assert d.verdict == "no significant difference"  # the interval contains 0


@pytest.mark.parametrize(
    ("arm", "verdict"),
    [
        ({0: 4.0, 1: 4.9, 2: 6.1}, "better"),
        ({0: 6.0, 1: 7.1, 2: 7.9}, "worse"),
        ({0: 4.0, 1: 7.0, 2: 7.5}, "no significant difference"),
    ],
)
def test_verdicts(arm, verdict):
    d = study.paired_difference(arm, {0: 5.0, 1: 6.0, 2: 7.0})
    assert d.verdict == verdict
    text = study.describe("aot", "edm", "NFE 7, rho 7", d, "fd_digits")
    assert {"better": "is better", "worse": "is worse", "no significant difference": "no sig"}[
        verdict
    ] in text


def test_single_seed_has_no_interval():
    d = study.paired_difference({0: 1.0}, {0: 2.0})
    assert d.verdict == "too few seeds" and math.isnan(d.low)
    assert "single seed" in study.describe("aot", "edm", "NFE 5", d, "fd")
    with pytest.raises(ValueError, match="common seeds"):
        study.paired_difference({0: 1.0}, {1: 1.0})


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
            "variants": {"a": {"aot": True, "pool_size": 64, "seed": 3, "cond": True}},
        }
    )
    network, train = apply_variant(p.network, p.train, p.variants["a"])
    assert (network.cond, train.seed, train.aot.pool_size) == (True, 3, 64)
    assert (p.network.cond, p.train.seed, p.train.aot.pool_size) == (False, 7, 512)
    for bad, message in [
        ({"aot": False, "pool_size": 64}, "only applies to AOT"),
        ({"aot": True, "pool_size": 100}, "multiple of the micro-batch"),
        ({"aot": True, "arm": "a b"}, "arm"),
        ({"aot": True, "seeds": 1}, "seeds"),
        ({"aot": True, "seed": -1}, "seed"),
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


def _fake_outputs(root, params, score_of, with_labels=False):
    """Write what train and sweep would: sweep tables, curvature, samples, training stats."""
    rng = np.random.default_rng(0)
    for m in study_models(params, root):
        m.sweep_dir.mkdir(parents=True)
        m.run_dir.mkdir(parents=True)
        rows = []
        for steps in (3, 6):
            nfe = 2 * steps - 1
            npz = m.sweep_dir / f"{m.name}_heun_s{steps}_r7.npz"
            arrays = {"images": rng.integers(0, 256, (16, 1, 16, 16), dtype=np.uint8)}
            if m.cond:
                arrays["labels"] = np.arange(16) % 10
            np.savez(npz, **arrays)
            score = score_of(m.arm, m.seed, nfe)
            rows.append(
                {
                    "metric": "fd_digits",
                    "rho": 7.0,
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


def test_report_says_better_when_aot_wins_beyond_the_seed_noise(tmp_path):
    params = _study_params()
    seed_noise = {0: 0.0, 1: 0.3, 2: -0.2}

    def score(arm, seed, nfe):  # AOT 0.5 lower at NFE 5 for every seed, equal at NFE 11
        return 10.0 / nfe + seed_noise[seed] - (0.5 if arm == "aot" and nfe == 5 else 0.0)

    _fake_outputs(tmp_path, params, score)
    out = tmp_path / "docs" / "results.md"
    summary = study_report(params, tmp_path, out)
    text = out.read_text()
    assert "## Unconditional models" in text and "Conditional" not in text
    assert "At NFE 5, rho 7, aot is better than edm: -0.500 fd_digits" in text
    assert "At NFE 11, rho 7, no significant difference between aot and edm: +0.000" in text
    assert "the same shape as the paper's" in text
    mean5 = np.mean([10 / 5 + n for n in seed_noise.values()])
    std5 = np.std([10 / 5 + n for n in seed_noise.values()], ddof=1)
    assert f"| 5 | {mean5 - 0.5:.3f} ± {std5:.3f} | {mean5:.3f} ± {std5:.3f} |" in text
    assert "| aot | 0.9150 ± 0.0050 |" in text  # mean pairing ratio per seed: .91, .915, .92
    assert summary["unconditional"]["paired"]["aot rho7 nfe5"] == "better"
    pictures = ("fd_digits_vs_nfe_rho7", "curvature_vs_sigma", "aot_nfe5_rho7", "edm_nfe11_rho7")
    for picture in (f"unconditional_{p}.png" for p in pictures):
        assert (tmp_path / "docs" / "results" / picture).is_file()
        assert f"(results/{picture})" in text
    # Regenerated bit for bit from the same outputs.
    first = {p.name: p.read_bytes() for p in (tmp_path / "docs").rglob("*") if p.is_file()}
    study_report(params, tmp_path, out)
    assert first == {p.name: p.read_bytes() for p in (tmp_path / "docs").rglob("*") if p.is_file()}


def test_report_says_worse_and_covers_conditional_models(tmp_path):
    params = _study_params(cond_arms=True)

    def score(arm, seed, nfe):  # AOT 0.4 +- 0.05 higher everywhere
        return 3.0 + (0.4 + 0.05 * (seed - 1) if arm == "aot" else 0.0)

    _fake_outputs(tmp_path, params, score, with_labels=True)
    out = tmp_path / "results.md"
    study_report(params, tmp_path, out)
    text = out.read_text()
    assert "## Conditional models" in text and "## Unconditional models" in text
    assert "At NFE 5, rho 7, aot is worse than edm here: +0.400" in text
    assert "AOT is worse than the baseline at some NFE here" in text
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


def test_report_names_missing_outputs(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"edm-s0_sweep\.json"):
        study_report(_study_params(), tmp_path, tmp_path / "r.md")
