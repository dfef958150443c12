"""Tests of aot_model.sweep: NFE bookkeeping, identical latents across points, files and tables."""

import csv
import dataclasses
import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from aot_model import devices, features, metrics, sweep
from aot_model.sampling import latents_from_seeds
from aot_model.sweep import seed_batches

IMG_SHAPE = (1, 8, 8)
SIGMA_MAX = 80.0


class RecordingDenoiser(torch.nn.Module):
    """A tiny conv denoiser that records the input of the first call of every sampler run."""

    def __init__(self, channels=1, label_dim=0):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.label_scale = torch.nn.Linear(label_dim, channels) if label_dim else None
        self.first_inputs, self.first_labels = [], []
        self._last_sigma = None

    def forward(self, x, sigma, class_labels=None):
        if self._last_sigma is None or sigma[0] > self._last_sigma:  # sigma rose: a new run
            self.first_inputs.append(x / sigma.reshape(-1, 1, 1, 1))
            self.first_labels.append(class_labels)
        self._last_sigma = sigma[0]
        out = torch.tanh(self.conv(x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt()))
        if self.label_scale is not None:
            out = out + self.label_scale(class_labels)[:, :, None, None]
        return out


def test_paper_settings_nfe():
    assert [p.nfe for p in sweep.PAPER_POINTS] == [35, 27, 29]
    assert [(p.num_steps, p.rho) for p in sweep.PAPER_POINTS] == [(18, 7.0), (14, 90.0), (15, 72.0)]
    assert sweep.SweepPoint(18, 7.0, "euler").nfe == 18
    assert sweep.SweepPoint(14, 90.0).tag == "heun_s14_r90"


def test_sweep_grid_is_the_full_product_in_order():
    grid = sweep.sweep_grid([14, 18], [7, 90], ["heun", "euler"])
    assert len(grid) == 8
    assert grid[0] == sweep.SweepPoint(14, 7.0, "heun")
    assert grid[1] == sweep.SweepPoint(14, 7.0, "euler")
    assert grid[-1] == sweep.SweepPoint(18, 90.0, "euler")
    guided = sweep.sweep_grid([9], [7], ["heun"], [0, 2])  # guidance weights are the innermost
    assert guided == [sweep.SweepPoint(9, 7.0), sweep.SweepPoint(9, 7.0, guidance_weight=2.0)]


# Another value of every axis: a new axis must be added here.
OTHER = {"num_steps": 6, "rho": 90.0, "solver": "euler", "guidance_weight": 2.0}


@pytest.mark.parametrize("axis", OTHER)
def test_points_differing_in_one_axis_have_their_own_key_and_names(axis):
    """Tables, the report and the study key rows by the point, metrics by its series (every axis
    but the step count), files by its tag: none may merge two points that differ in one axis."""
    assert set(OTHER) == {f.name for f in dataclasses.fields(sweep.SweepPoint)}
    point = sweep.SweepPoint(5, 7.0)
    other = dataclasses.replace(point, **{axis: OTHER[axis]})
    assert len({point, other}) == 2 and point.tag != other.tag and point.label != other.label
    assert (point.series == other.series) == (axis == "num_steps")
    rows = [sweep.SweepRow(p, model="m", score=1.0) for p in (point, other)]
    assert [sweep.SweepRow.from_dict(row.to_dict()) for row in rows] == rows


def test_a_guided_points_names():
    point = sweep.SweepPoint(18, 7.0, guidance_weight=2.0)
    assert (point.tag, point.series) == ("heun_s18_r7_w2", "heun_rho7_w2")
    assert point.label == "heun steps=18 rho=7 w=2"  # spaced, for people


def test_a_missing_sweep_table_is_named_with_its_remedy(tmp_path):
    path = tmp_path / "aot_sweep.json"
    with pytest.raises(FileNotFoundError) as error:
        sweep.read_table(path)
    assert str(error.value) == f"sweep table not found: {path}; run the sweep (again)"
    with pytest.raises(FileNotFoundError, match=r"; train first$"):
        sweep.read_table(path, remedy="train first")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((1, 7.0), "num_steps must be an int >= 2, got 1"),
        ((18.0, 7.0), "num_steps must be an int >= 2, got 18.0"),
        ((18, 0.0), "rho must be a finite number > 0, got 0.0"),
        ((18, math.inf), "rho must be a finite number > 0, got inf"),
        ((18, 7.0, "dpm"), "solver must be one of ('heun', 'euler'), got 'dpm'"),
        ((18, 7.0, "heun", math.nan), "guidance_weight must be a finite number, got nan"),
    ],
)
def test_sweep_point_rejects_bad_settings(args, message):
    with pytest.raises(ValueError) as caught:
        sweep.SweepPoint(*args)
    assert str(caught.value) == message


def test_to_uint8_matches_edm_quantisation():
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.999, 1.0, 3.0])
    # (x * 127.5 + 128) = [-127, 0.5, 64.25, 128, 255.37, 255.5, 510.5], clipped then truncated
    assert sweep.to_uint8(x).tolist() == [0, 0, 64, 128, 255, 255, 255]
    assert sweep.to_uint8(x).dtype == torch.uint8


def test_run_sweep_uses_identical_latents_and_writes_files(tmp_path):
    net = RecordingDenoiser()
    points = [sweep.SweepPoint(3, 7.0), sweep.SweepPoint(4, 90.0, "euler")]
    seeds = [5, 6, 7, 8, 9]
    rows = sweep.run_sweep(
        net,
        points,
        seeds,
        out_dir=tmp_path,
        img_shape=IMG_SHAPE,
        batch_size=2,
        sigma_max=SIGMA_MAX,
        name="tiny",
        progress=False,
    )
    expected, _ = latents_from_seeds(seeds, IMG_SHAPE)
    per_point = [torch.cat(net.first_inputs[:3]), torch.cat(net.first_inputs[3:])]
    assert len(net.first_inputs) == 6  # 3 batches per point
    for latents in per_point:
        torch.testing.assert_close(latents, expected)

    assert [(r.point, r.num_images, r.seeds) for r in rows] == [(p, 5, "5-9") for p in points]
    images = []
    for row, point in zip(rows, points, strict=True):
        with np.load(row.images) as data:
            assert data["images"].dtype == np.uint8 and data["images"].shape == (5, *IMG_SHAPE)
            assert data["seeds"].tolist() == seeds and "labels" not in data
            assert (data["num_steps"].item(), data["rho"].item()) == (point.num_steps, point.rho)
            assert data["solver"].item() == point.solver
            images.append(data["images"])
        assert row.images.endswith(f"tiny_{point.tag}.npz")
        assert (tmp_path / f"tiny_{point.tag}.png").is_file()
        assert row.img_per_s > 0
    assert not np.array_equal(images[0], images[1])  # the sampler setting really changed

    with open(tmp_path / "tiny_sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [(r["solver"], r["num_steps"], r["nfe"]) for r in table] == [
        ("heun", "3", "5"),
        ("euler", "4", "4"),
    ]
    assert sweep.read_table(tmp_path / "tiny_sweep.json") == rows
    columns = ["model", "solver", "num_steps", "rho", "guidance_weight", "nfe", "disc_calls",
               "num_images", "seeds", "seconds", "img_per_s", "precision", "float32_precision",
               "images", "grid"]  # fmt: skip
    written = json.loads((tmp_path / "tiny_sweep.json").read_text())
    assert [list(row) for row in written] == [columns, columns]  # the layout other tools read


def test_run_sweep_images_do_not_depend_on_batch_size(tmp_path):
    point = [sweep.SweepPoint(3, 7.0)]
    runs = []
    for batch_size in (2, 5):
        out = tmp_path / f"b{batch_size}"
        rows = sweep.run_sweep(
            RecordingDenoiser(),
            point,
            range(5),
            out_dir=out,
            img_shape=IMG_SHAPE,
            batch_size=batch_size,
            progress=False,
        )
        with np.load(rows[0].images) as data:
            runs.append(data["images"])
    np.testing.assert_array_equal(runs[0], runs[1])


def test_run_sweep_conditional_labels_follow_seeds(tmp_path):
    net = RecordingDenoiser(label_dim=3)
    points = [sweep.SweepPoint(2, 7.0), sweep.SweepPoint(2, 20.0)]
    rows = sweep.run_sweep(
        net,
        points,
        range(6),
        out_dir=tmp_path,
        img_shape=IMG_SHAPE,
        label_dim=3,
        batch_size=6,
        progress=False,
    )
    _, one_hot = latents_from_seeds(range(6), IMG_SHAPE, label_dim=3)
    torch.testing.assert_close(net.first_labels[0], one_hot)
    torch.testing.assert_close(net.first_labels[1], one_hot)
    with np.load(rows[0].images) as data:
        assert data["labels"].tolist() == one_hot.argmax(1).tolist()
        assert data["labels"].dtype == np.int64


def test_given_labels_replace_the_drawn_ones_whatever_the_batching():
    """The registry's class_label column: image k has label k and the latent of seed k alone."""
    point, labels = sweep.SweepPoint(2, 7.0), [2, 0, 1, 1, 2]
    args = {"img_shape": IMG_SHAPE, "label_dim": 3}
    runs = []
    for batch_size in (2, 5):
        net = RecordingDenoiser(label_dim=3)
        batches = list(
            sweep.generate_images(
                net, point, range(5), batch_size=batch_size, labels=labels, **args
            )
        )
        assert np.concatenate([b.labels for b in batches]).tolist() == labels
        torch.testing.assert_close(torch.cat(net.first_labels).argmax(1), torch.tensor(labels))
        latents, _ = latents_from_seeds(range(5), IMG_SHAPE, label_dim=3)
        torch.testing.assert_close(torch.cat(net.first_inputs), latents)
        runs.append(np.concatenate([b.images for b in batches]))
    np.testing.assert_array_equal(runs[0], runs[1])
    with pytest.raises(ValueError, match=r"^got 2 labels for 5 seeds$"):
        next(sweep.generate_images(net, point, range(5), labels=[0, 1], **args))


def test_seed_batches_are_generate_py_s():
    """ceil(n / (batch * W)) * W batches by torch.tensor_split, dealt to ranks in turn (EDM's
    generate.py): written out for a few cases."""
    assert seed_batches(range(6), 2, 2) == [[0, 1], [2, 3], [4], [5]]
    assert seed_batches(range(6), 2) == [[0, 1], [2, 3], [4, 5]]
    assert seed_batches(range(7), 4) == [[0, 1, 2, 3], [4, 5, 6]]
    assert seed_batches(range(5), 4, 4) == [[0, 1], [2], [3], [4]]
    assert seed_batches(range(3), 2, 4) == [[0], [1], [2], []]  # rank 3 samples nothing
    # 9 seeds in ceil(9 / 4) * 2 = 6 batches: 9 = 6 + 3, so the first three hold two
    assert seed_batches(range(10, 19), 2, 2) == [[10, 11], [12, 13], [14, 15], [16], [17], [18]]


def test_run_sweep_scores_each_point(tmp_path):
    path = tmp_path / "featnet.pt"
    torch.manual_seed(0)
    features.save_feature_net(path, features.FeatureNet(1, 8, 10, width=4))
    extractor = features.feature_net_extractor(path)
    ref_images = np.random.default_rng(0).integers(0, 256, (20, *IMG_SHAPE), dtype=np.uint8)
    ref = metrics.reference_stats(extractor, ref_images)
    calls = []

    def scorer(images, seeds):
        calls.append(list(seeds))
        return metrics.score(
            extractor, [images], ref, num_images=len(images), seeds=seeds, metric="fd_test"
        )

    rows = sweep.run_sweep(
        RecordingDenoiser(),
        [sweep.SweepPoint(2, 7.0)],
        range(4),
        out_dir=tmp_path / "out",
        img_shape=IMG_SHAPE,
        scorer=scorer,
        name="m",
        progress=False,
    )
    assert calls == [[0, 1, 2, 3]]
    row = rows[0]
    assert row.metric == "fd_test" and row.score == row.score_info["value"] > 0
    assert row.score_info["feature_net_sha256"] == extractor.sha256
    with open(tmp_path / "out" / "m_sweep.csv") as f:
        header = next(csv.reader(f))
    assert "score" in header and "score_info" not in header
    assert (
        b"\r" not in (tmp_path / "out" / "m_sweep.csv").read_bytes()
    )  # one line ending everywhere


class ExplodingNet(torch.nn.Module):
    def forward(self, x, sigma, class_labels=None):
        raise AssertionError("sampling must not start when the arguments are bad")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sigma_min": 100.0}, "sigma_min"),
        ({"img_shape": (8, 8)}, "img_shape"),
        ({"batch_size": 0}, "batch_size"),
        ({"seeds": []}, "^seeds must be a non-empty sequence of ints >= 0$"),
        ({"points": []}, "^points must be a non-empty sequence of SweepPoint$"),
        ({"points": [sweep.SweepPoint(18, 1 / 3)]}, r"ends at 0\.001997\d+, not sigma_min 0\.002"),
        (
            {"points": [sweep.SweepPoint(5, 0.1)]},
            r"^point heun_s5_r0\.1: Eq\. 5 with rho 0\.1 ends at 0,",
        ),
        (
            {"precision": "fp16"},
            r"^precision must be one of \('fp32', 'bf16'\), got 'fp16'$",
        ),
    ],
)
def test_run_sweep_rejects_bad_arguments_before_sampling(tmp_path, kwargs, match):
    args = {"points": [sweep.SweepPoint(3, 7.0)], "seeds": [0, 1], "img_shape": IMG_SHAPE}
    args.update(kwargs)
    points, seeds = args.pop("points"), args.pop("seeds")
    with pytest.raises(ValueError, match=match):
        sweep.run_sweep(ExplodingNet(), points, seeds, out_dir=tmp_path, progress=False, **args)
    assert not list(tmp_path.iterdir())


def test_sweep_arguments_at_their_bounds_are_accepted():
    """A batch of one; rho 0.5, whose Eq. 5 end point misses sigma_min by 6e-8 (relative), well
    inside the 1e-6 the check allows."""
    args = ([sweep.SweepPoint(3, 0.5)], np.array([0, 3]), IMG_SHAPE, 0, 1, 0.002, 80.0)
    assert sweep._check_sweep_args(*args) == [0, 3]


class SigmaRecorder(torch.nn.Module):
    """A denoiser whose output depends on sigma; records every sigma it is called with."""

    def __init__(self):
        super().__init__()
        self.sigmas = []

    def forward(self, x, sigma, class_labels=None):
        self.sigmas.append(sigma[0].item())
        return x / (1 + sigma.reshape(-1, 1, 1, 1) ** 2)


def eq5_schedule(num_steps, sigma_min, sigma_max, rho):
    """EDM Eq. 5 written out in NumPy (independent of aot_model.sampling), plus t_N = 0."""
    i = np.arange(num_steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return np.append((hi + i / (num_steps - 1) * (lo - hi)) ** rho, 0.0)


def test_sweep_points_differing_only_in_rho_sample_and_record_their_schedule(tmp_path):
    """Non-default sigma_min/sigma_max and two rhos: the network sees exactly Eq. 5's noise levels
    for each point, and the .npz records the schedule the sampler used."""
    sigma_min, sigma_max = 0.01, 5.0
    points = [sweep.SweepPoint(4, 7.0, "euler"), sweep.SweepPoint(4, 90.0, "euler")]
    net = SigmaRecorder()
    rows = sweep.run_sweep(
        net,
        points,
        range(3),
        out_dir=tmp_path,
        img_shape=IMG_SHAPE,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        progress=False,
    )
    images = []
    for k, (row, point) in enumerate(zip(rows, points, strict=True)):
        expected = eq5_schedule(4, sigma_min, sigma_max, point.rho)
        # Euler: one call per step, at t_0..t_{N-1}, in float32.
        np.testing.assert_allclose(net.sigmas[4 * k : 4 * k + 4], expected[:-1], rtol=1e-6)
        with np.load(row.images) as data:
            np.testing.assert_allclose(data["sigmas"], expected, rtol=1e-12)
            assert data["rho"].item() == point.rho
            assert data["sigma_max"].item() == pytest.approx(sigma_max, rel=1e-12)
            assert data["sigma_min"].item() == pytest.approx(sigma_min, rel=1e-12)
            assert data["num_steps"].item() == 4
            images.append(data["images"])
    assert not np.array_equal(images[0], images[1])


def test_used_settings_refuses_a_schedule_other_than_asked():
    point = sweep.SweepPoint(14, 90.0)
    schedule = eq5_schedule(14, 0.002, 80.0, 7.0)  # a sampler that ignored rho
    with pytest.raises(RuntimeError, match="rho"):
        sweep.used_settings([schedule], point, 0.002, 80.0)
    schedule = eq5_schedule(14, 0.002, 80.0, 90.0)
    assert sweep.used_settings([schedule], point, 0.002, 80.0)["rho"] == 90.0
    with pytest.raises(RuntimeError, match="sigma_max"):
        sweep.used_settings([schedule], point, 0.002, 20.0)
    with pytest.raises(RuntimeError, match="batches"):
        sweep.used_settings([schedule, schedule[::-1]], point, 0.002, 80.0)


def test_defaults_are_edms_schedule_unconditional_and_model_named(tmp_path):
    point = sweep.SweepPoint(3, 7.0)
    out = tmp_path / "not" / "yet"  # parents are made
    rows = sweep.run_sweep(RecordingDenoiser(), [point], range(2), out_dir=out, img_shape=IMG_SHAPE)
    assert rows[0].model == "model" and (out / "model_sweep.json").is_file()
    with np.load(rows[0].images) as data:
        assert (data["sigma_min"].item(), data["sigma_max"].item()) == pytest.approx((0.002, 80.0))
        assert "labels" not in data
    (batch,) = sweep.generate_images(RecordingDenoiser(), point, range(2), img_shape=IMG_SHAPE)
    assert batch.labels is None
    np.testing.assert_allclose(batch.sigmas, eq5_schedule(3, 0.002, SIGMA_MAX, 7.0), rtol=1e-12)


def test_progress_counts_batches_per_point_and_can_be_silenced(tmp_path, capsys):
    points = [sweep.SweepPoint(2, 7.0), sweep.SweepPoint(3, 7.0)]
    args = {"out_dir": tmp_path, "img_shape": IMG_SHAPE, "batch_size": 2, "name": "m"}
    sweep.run_sweep(RecordingDenoiser(), points, range(5), **args)  # 3 batches per point
    err = capsys.readouterr().err
    assert "m heun_s3_r7" in err and "6/6" in err
    assert re.search(r"[\d.]+(batch/s|s/batch)", err)
    sweep.run_sweep(RecordingDenoiser(), points, range(5), progress=False, **args)
    assert capsys.readouterr().err == ""


def test_rows_time_each_point_and_record_its_weight_and_precision(tmp_path):
    start = time.perf_counter()
    devices.set_float32_precision(True)
    try:
        rows = sweep.run_sweep(
            RecordingDenoiser(),
            [sweep.SweepPoint(2, 7.0)],
            range(3),
            out_dir=tmp_path,
            img_shape=IMG_SHAPE,
            scorer=lambda images, seeds: {"metric": "m", "value": 1.0},
            progress=False,
        )
    finally:
        devices.set_float32_precision(False)  # torch's defaults
        torch.backends.cudnn.allow_tf32 = True
    wall = time.perf_counter() - start
    assert rows[0].float32_precision == {"matmul": "high", "cudnn_tf32": True}
    row = rows[0]
    assert 0 < row.seconds < wall and 0 <= row.score_seconds < wall
    assert row.img_per_s == pytest.approx(3 / row.seconds)
    assert row.point == sweep.SweepPoint(2, 7.0, "heun", 0.0) and row.disc_calls == 0
    stem = tmp_path / "model_heun_s2_r7"
    assert (row.images, row.grid) == (f"{stem}.npz", f"{stem}.png")
    assert Path(row.grid).is_file()
    assert row.precision == "fp32"  # the default: the network as the caller passed it
    saved = np.load(row.images)
    assert (float(saved["guidance_weight"]), float(saved["rho"])) == (0.0, 7.0)
    assert str(saved["precision"]) == "fp32"


class CountingHook:
    """A correction that changes nothing and counts its calls (``calls``, as Guidance does)."""

    def __init__(self, second_order=None):
        self.calls = 0
        if second_order is not None:
            self.second_order = second_order

    def __call__(self, x, t, class_labels):
        self.calls += 1
        return None


def test_guided_points_get_their_hook_and_weight(tmp_path):
    weights, hooks = [], []

    def guide(weight):
        weights.append(weight)
        hooks.append(CountingHook())
        return hooks[-1]

    points = [sweep.SweepPoint(3, 7.0), sweep.SweepPoint(3, 7.0, guidance_weight=2.0)]
    rows = sweep.run_sweep(
        RecordingDenoiser(),
        points,
        range(4),
        out_dir=tmp_path,
        img_shape=IMG_SHAPE,
        batch_size=2,
        guide=guide,
        progress=False,
    )
    assert weights == [2.0] and hooks[0].calls > 0
    assert rows[0].disc_calls == 0 and rows[1].disc_calls == hooks[0].calls / 2
    with pytest.raises(
        ValueError, match=r"^guided sweep points need guide= \(a weight -> Guidance factory\)$"
    ):
        sweep.run_sweep(
            ExplodingNet(), points, range(2), out_dir=tmp_path, img_shape=IMG_SHAPE, progress=False
        )


def test_generate_images_hook_only_for_guided_points_and_second_order_on_request():
    guided, plain = sweep.SweepPoint(4, 7.0, guidance_weight=1.0), sweep.SweepPoint(4, 7.0)
    message = (
        r"^point heun_s4_r7_w1: a correction hook is needed exactly when guidance_weight != 0$"
    )
    with pytest.raises(ValueError, match=message):
        next(sweep.generate_images(ExplodingNet(), guided, [0], img_shape=IMG_SHAPE))
    with pytest.raises(ValueError, match="needed exactly"):
        next(
            sweep.generate_images(
                ExplodingNet(), plain, [0], img_shape=IMG_SHAPE, correction=CountingHook()
            )
        )
    calls = {}
    for second_order in (None, False, True):  # None: a hook without the attribute
        hook = CountingHook(second_order)
        next(
            sweep.generate_images(
                RecordingDenoiser(), guided, [0], img_shape=IMG_SHAPE, correction=hook
            )
        )
        calls[second_order] = hook.calls
    assert calls[None] == calls[False] > 0
    assert calls[True] > calls[False]  # the Heun corrector is corrected too


@pytest.mark.parametrize(
    ("num_steps", "rho"), [(3, 7.0), (6, 0.5), (18, 7.3333333333), (14, 90.0), (35, 1000.0)]
)
def test_used_settings_recovers_rho_from_three_steps_to_the_log_uniform_limit(num_steps, rho):
    point = sweep.SweepPoint(num_steps, rho)
    schedule = eq5_schedule(num_steps, 0.002, SIGMA_MAX, rho)
    assert sweep.used_settings([schedule], point, 0.002, SIGMA_MAX)["rho"] == pytest.approx(rho)
    other = eq5_schedule(num_steps, 0.002, SIGMA_MAX, rho * 2)  # also caught with three steps
    with pytest.raises(RuntimeError, match="rho"):
        sweep.used_settings([other], point, 0.002, SIGMA_MAX)


@pytest.mark.parametrize(
    "sigmas",
    [
        [80.0, 0.002, 0.0],  # N = 2: rho changes nothing
        [80.0, 80.0, 0.002, 0.0],  # not strictly falling
        [80.0, 1.0, 1.0, 0.0],
        eq5_schedule(5, 0.002, SIGMA_MAX, 0.1),  # t_{N-1} cancels to 0 at small rho
    ],
)
def test_schedule_rho_of_a_degenerate_schedule_is_the_default(sigmas):
    assert sweep._schedule_rho(np.asarray(sigmas), 7.0) == 7.0


@pytest.mark.parametrize(
    ("num_seeds", "batch_size", "dealt"),
    [
        # 10 seeds, 2 per batch, 2 ranks: ceil(10 / 4) * 2 = 6 batches of 2, 2, 2, 2, 1, 1 seeds,
        # dealt 0, 1, 0, 1, ... (EDM generate.py).
        (10, 2, {0: [[0, 1], [4, 5], [8]], 1: [[2, 3], [6, 7], [9]]}),
        (1, 1, {0: [[0]], 1: []}),  # fewer seeds than batches: rank 1's batch is empty
    ],
)
def test_each_rank_samples_its_dealt_batches_and_yields_all_in_seed_order(
    monkeypatch, num_seeds, batch_size, dealt
):
    """Two torchrun ranks simulated in one process (stand-ins for the rank, the gather and the
    sampler): each rank samples only the batches dealt to it, with their own labels, and yields
    every rank's batches round by round, in rank order."""
    seeds, labels = list(range(num_seeds)), [s % 3 for s in range(num_seeds)]
    theirs = ("other", None)
    for rank in (0, 1):
        sampled, rounds = [], []

        def sample(net, point, seeds, *args, rank=rank, sampled=sampled):
            sampled.append((seeds, args[-1]))
            return (rank, seeds)

        def gather(obj, rank=rank, rounds=rounds):
            rounds.append(obj)
            return [obj, theirs] if rank == 0 else [theirs, obj]

        monkeypatch.setattr(sweep, "_sample_batch", sample)
        monkeypatch.setattr(sweep.distributed, "rank", lambda rank=rank: rank)
        monkeypatch.setattr(sweep.distributed, "world_size", lambda: 2)
        monkeypatch.setattr(sweep.distributed, "all_gather_object", gather)
        point, shape = sweep.SweepPoint(2, 7.0), (1, 2, 2)
        out = list(sweep.generate_images(None, point, seeds, img_shape=shape, label_dim=3,
                                         batch_size=batch_size, labels=labels))  # fmt: skip
        assert sampled == [(b, [s % 3 for s in b]) for b in dealt[rank]]
        assert len(rounds) == len(dealt[0])  # one gather per round, also with nothing to sample
        mine = [(rank, b) for b in dealt[rank]]
        assert rounds == mine + [None] * (len(rounds) - len(mine))
        expected = [x for own in rounds for x in ([own, theirs] if rank == 0 else [theirs, own])]
        assert out == [x for x in expected if x is not None]


def test_rank_0_of_a_two_rank_sweep_writes_the_one_process_table(monkeypatch, tmp_path, capsys):
    """Rank 0 of two torchrun ranks simulated in one process: the stand-in gather samples rank 1's
    batch of each round with the real sampler and a hook of its own, as rank 1 would. Rank 0
    writes the one-process images and disc_calls (its hook counts its own batches only), and its
    progress bar ends at its total: 6 seeds in 2 per batch are 4 batches on two ranks, not 3."""
    points = [sweep.SweepPoint(3, 7.0), sweep.SweepPoint(3, 7.0, guidance_weight=2.0)]
    args = {"img_shape": IMG_SHAPE, "batch_size": 2, "guide": lambda w: CountingHook()}
    alone = sweep.run_sweep(RecordingDenoiser(), points, range(6), out_dir=tmp_path / "one",
                            progress=False, **args)  # fmt: skip
    rank1_batches = iter(seed_batches(range(6), 2, 2)[1::2] * len(points))
    sample_batch = sweep._sample_batch

    def gather(batch):
        # Rank 1 samples its next dealt batch at the point and with the labels rank 0 just used.
        seeds = next(rank1_batches)
        net, point, _, *rest, correction, labels = last_call
        hook = None if correction is None else CountingHook()
        return [batch, sample_batch(net, point, seeds, *rest, hook, labels)]

    def record(*call):
        nonlocal last_call
        last_call = call
        return sample_batch(*call)

    last_call = None
    monkeypatch.setattr(sweep, "_sample_batch", record)
    monkeypatch.setattr(sweep.distributed, "rank", lambda: 0)
    monkeypatch.setattr(sweep.distributed, "world_size", lambda: 2)
    monkeypatch.setattr(sweep.distributed, "all_gather_object", gather)
    capsys.readouterr()
    rows = sweep.run_sweep(RecordingDenoiser(), points, range(6), out_dir=tmp_path / "two", **args)
    assert "8/8" in capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]
    assert [r.disc_calls for r in rows] == [r.disc_calls for r in alone] != [0, 0]
    for two, one in zip(rows, alone, strict=True):
        assert np.array_equal(np.load(two.images)["images"], np.load(one.images)["images"])


def test_rank_1_of_a_two_rank_sweep_samples_its_share_at_every_point_and_writes_nothing(
    monkeypatch, tmp_path
):
    """Rank 1 simulated in one process (stand-ins for the rank and the gather): it samples the
    batches dealt to it at every point, for rank 0 to write, and returns no rows."""
    points = [sweep.SweepPoint(2, 7.0), sweep.SweepPoint(3, 7.0)]
    sampled = []

    def sample(net, point, seeds, *args):
        sampled.append((point, seeds))
        return sweep.Batch(np.zeros((len(seeds), *IMG_SHAPE), np.uint8), None, np.zeros(3))

    monkeypatch.setattr(sweep, "_sample_batch", sample)
    monkeypatch.setattr(sweep.distributed, "rank", lambda: 1)
    monkeypatch.setattr(sweep.distributed, "world_size", lambda: 2)
    monkeypatch.setattr(sweep.distributed, "all_gather_object", lambda own: [None, own])
    rows = sweep.run_sweep(None, points, range(6), out_dir=tmp_path / "out", img_shape=IMG_SHAPE,
                           batch_size=2, progress=False)  # fmt: skip
    assert rows == [] and not (tmp_path / "out").exists()
    assert sampled == [(p, b) for p in points for b in seed_batches(range(6), 2, 2)[1::2]]
