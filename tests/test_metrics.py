"""Tests of aot_model.metrics against clean-fid, closed forms and analytic trajectories."""

import hashlib
import inspect
import math

import numpy as np
import pytest
import torch
from cleanfid import fid as cleanfid_fid

from aot_model import features, metrics
from aot_model.sampling import SamplerOutput, heun_sampler


def random_stats(rng, num, dim, scale=1.0, shift=0.0):
    feats = rng.normal(size=(num, dim)) * scale + shift
    return feats.mean(0), np.cov(feats, rowvar=False)


# --------------------------------------------------------------------------------------------
# Fréchet distance


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # clean-fid passes scipy's old `disp`
@pytest.mark.parametrize("num", [200, 6])  # 6 < dim: singular covariance
def test_frechet_distance_matches_cleanfid(rng, num):
    stats1 = random_stats(rng, num, 16)
    stats2 = random_stats(rng, 300, 16, scale=1.3, shift=0.2)
    ours = metrics.frechet_distance(stats1[0], stats1[1], stats2[0], stats2[1])
    ref = cleanfid_fid.frechet_distance(stats1[0], stats1[1], stats2[0], stats2[1])
    assert isinstance(ours, float)
    assert ours == pytest.approx(ref, rel=1e-10)


def test_frechet_distance_closed_form_diagonal():
    # Commuting covariances: d² = ||mu1 - mu2||² + sum_j (sqrt(a_j) - sqrt(b_j))².
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1.0 + 4.0 + (1 - 3) ** 2 + (2 - 1) ** 2 + 0.0
    got = metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-12)


def test_fid_of_features_against_themselves_is_zero(rng):
    feats = rng.normal(size=(500, 32)) * 3.0

    def fd(a, b):
        return metrics.frechet_distance(*metrics.feature_stats(a), *metrics.feature_stats(b))

    assert abs(fd(feats, feats)) < 1e-8
    assert fd(feats, feats + 1.0) == pytest.approx(32.0, rel=1e-8)  # |shift|^2 = 32


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="mu1 and mu2"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma1 and sigma2"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))


def test_feature_stats_unbiased_float64():
    mu, sigma = metrics.feature_stats(np.array([[0.0], [2.0]], dtype=np.float32))
    assert mu.dtype == sigma.dtype == np.float64
    assert mu.tolist() == [1.0]
    assert sigma.tolist() == [[2.0]]  # (1 + 1) / (2 - 1), not / 2
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.feature_stats(np.zeros((1, 4)))


# --------------------------------------------------------------------------------------------
# Reference statistics and scores


@pytest.fixture
def featnet_extractor(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "featnet.pt"
    features.save_feature_net(path, features.FeatureNet(1, 8, 10, width=4))
    return features.feature_net_extractor(path)


def random_images(seed, n):
    return np.random.default_rng(seed).integers(0, 256, size=(n, 1, 8, 8), dtype=np.uint8)


def test_stats_save_load_roundtrip_with_hash(tmp_path, featnet_extractor):
    stats = metrics.reference_stats(featnet_extractor, random_images(0, 40))
    path = tmp_path / "stats" / "ref.npz"
    digest = metrics.save_stats(path, stats)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [p.name for p in path.parent.iterdir()] == ["ref.npz"]  # no temporary left
    loaded = metrics.load_stats(path)
    np.testing.assert_array_equal(loaded["mu"], stats["mu"])
    np.testing.assert_array_equal(loaded["sigma"], stats["sigma"])
    assert loaded["sigma"].dtype == np.float64 and loaded["sigma"].shape == (8, 8)
    for key in ("count", "extractor", "extractor_sha256", "mode"):
        assert loaded[key] == stats[key]
    assert loaded["count"] == 40 and loaded["sha256"] == digest
    with pytest.raises(ValueError, match="lack the keys"):
        metrics.save_stats(path, {"mu": stats["mu"], "sigma": stats["sigma"]})


def test_cleanfid_style_stats_load_without_metadata(tmp_path):
    np.savez(tmp_path / "cifar10_clean_train_32.npz", mu=np.zeros(3), sigma=np.eye(3))
    loaded = metrics.load_stats(tmp_path / "cifar10_clean_train_32.npz")
    assert loaded["extractor"] is None and loaded["count"] is None and len(loaded["sha256"]) == 64
    np.testing.assert_array_equal(loaded["sigma"], np.eye(3))


def test_score_value_and_provenance(tmp_path, featnet_extractor):
    ref = metrics.reference_stats(featnet_extractor, random_images(0, 40))
    metrics.save_stats(tmp_path / "ref.npz", ref)
    ref = metrics.load_stats(tmp_path / "ref.npz")
    pulled = []

    def batches():  # 4 batches of 10; only 25 images are needed
        for k in range(4):
            pulled.append(k)
            yield random_images(k + 1, 10)

    result = metrics.score(
        featnet_extractor, batches(), ref, num_images=25, seeds=range(25), metric="fd_digits"
    )
    expected_feats = featnet_extractor.features([random_images(k + 1, 10) for k in range(3)])[:25]
    expected = metrics.frechet_distance(
        *metrics.feature_stats(expected_feats), ref["mu"], ref["sigma"]
    )
    assert result["value"] == pytest.approx(expected, rel=1e-12)
    assert pulled == [0, 1, 2]  # stops sampling once it has enough
    for num_images, wanted in ((20, [0, 1]), (21, [0, 1, 2])):  # exactly full; one image short
        pulled.clear()
        metrics.score(featnet_extractor, batches(), ref, num_images=num_images, metric="fd_digits")
        assert pulled == wanted
    assert result == {
        "metric": "fd_digits",
        "value": result["value"],
        "feature_net": "feature_net",
        "feature_net_sha256": featnet_extractor.sha256,
        "mode": "native",
        "ref_stats_sha256": ref["sha256"],
        "ref_source": None,
        "ref_count": 40,
        "num_images": 25,
        "seeds": "0-24",
        "float32_precision": {"matmul": "highest", "cudnn_tf32": True},  # torch's defaults
    }
    named = {**ref, "source": "cifar10_train.npz (user's file)"}  # steps.reference records it
    again = metrics.score(featnet_extractor, batches(), named, num_images=20, metric="fd_digits")
    assert again["ref_source"] == "cifar10_train.npz (user's file)"


def test_score_refuses_wrong_names_and_stats(featnet_extractor):
    ref = metrics.reference_stats(featnet_extractor, random_images(0, 20))
    images = [random_images(1, 10)]
    with pytest.raises(ValueError, match="reserved for Inception"):
        metrics.score(featnet_extractor, images, ref, num_images=10, metric="FID")
    with pytest.raises(ValueError, match="metric must be given"):
        metrics.score(featnet_extractor, images, ref, num_images=10)
    with pytest.raises(ValueError, match="extractor_sha256"):
        metrics.score(
            featnet_extractor,
            images,
            {**ref, "extractor_sha256": "f" * 64},
            num_images=10,
            metric="fd_x",
        )
    with pytest.raises(ValueError, match="seeds must hold"):
        metrics.score(featnet_extractor, images, ref, num_images=10, seeds=[1], metric="fd_x")
    with pytest.raises(ValueError, match="ran out after 10"):
        metrics.score(featnet_extractor, images, ref, num_images=12, metric="fd_x")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # clean-fid passes scipy's old `disp`
def test_fid_protocol_scores_consecutive_seed_blocks(featnet_extractor):
    ref = metrics.reference_stats(featnet_extractor, random_images(0, 30))
    requested = []

    def generate(seeds):
        requested.append(seeds)
        return [random_images(seeds[0] + 100, len(seeds))]

    result = metrics.fid_protocol(
        featnet_extractor, generate, ref, num_images=12, num_blocks=3, metric="fd_digits"
    )
    assert requested == [range(0, 12), range(12, 24), range(24, 36)]
    assert result["blocks"] == ["0-11", "12-23", "24-35"]
    # Each block's value is clean-fid's Fréchet distance of that block's features (np.cov, not
    # this module's statistics), and min/mean summarise those independent numbers.
    expected = []
    for start in (0, 12, 24):
        feats = featnet_extractor.features([random_images(start + 100, 12)], progress=False)
        expected.append(
            cleanfid_fid.frechet_distance(
                feats.mean(0), np.cov(feats, rowvar=False), ref["mu"], ref["sigma"]
            )
        )
    assert result["values"] == pytest.approx(expected, rel=1e-4)
    assert len(set(expected)) == 3
    assert result["min"] == pytest.approx(min(expected), rel=1e-4)
    assert result["mean"] == pytest.approx(sum(expected) / 3, rel=1e-4)
    assert (
        result["metric"] == "fd_digits" and result["feature_net_sha256"] == featnet_extractor.sha256
    )
    assert "value" not in result and "seeds" not in result  # per-block, in values and blocks
    with pytest.raises(ValueError, match=r"^num_blocks must be >= 1, got 0$"):
        metrics.fid_protocol(featnet_extractor, generate, ref, num_blocks=0, metric="fd_digits")
    one = metrics.fid_protocol(
        featnet_extractor, generate, ref, num_images=12, num_blocks=1, metric="fd_digits"
    )
    assert one["values"] == result["values"][:1]
    defaults = inspect.signature(metrics.fid_protocol).parameters  # the paper's protocol
    assert (defaults["num_images"].default, defaults["num_blocks"].default) == (50_000, 3)


def test_format_seeds():
    assert metrics.format_seeds([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert metrics.format_seeds(range(50_000)) == "0-49999"


# --------------------------------------------------------------------------------------------
# Trajectory curvature


def trajectory(points, sigmas, denoised=None):
    xs = torch.tensor(points, dtype=torch.float64)[:, None]  # one image: [N+1, 1, P]
    den = xs[:-1] if denoised is None else torch.tensor(denoised, dtype=torch.float64)[:, None]
    return SamplerOutput(xs[-1], 0, torch.tensor(sigmas, dtype=torch.float64), xs, den)


def test_curvature_closed_forms_on_hand_made_paths():
    straight = metrics.trajectory_stats(
        trajectory([[0.0, 0.0], [3.0, 4.0], [3.6, 4.8], [6.0, 8.0]], [5.0, 2.0, 1.0, 0.0])
    )
    np.testing.assert_allclose(straight.curvature, [0.0, 0.0], atol=1e-15)
    np.testing.assert_allclose(straight.straightness, [1.0])
    bent = metrics.trajectory_stats(
        trajectory([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]], [2.0, 1.0, 0.0], [[0.0, 0.0], [1.0, 0.0]])
    )
    np.testing.assert_allclose(bent.curvature, [1.0])  # 1 - cos 90°
    np.testing.assert_allclose(bent.angle, [math.pi / 2])
    np.testing.assert_allclose(bent.straightness, [math.sqrt(2) / 2])
    np.testing.assert_allclose(bent.drift, [math.sqrt(2), 1.0])  # ||D(x_i) - x_N||


class GaussianDenoiser(torch.nn.Module):
    """Exact denoiser of N(mu, diag(var)) data: D(x; σ) = mu + var / (var + σ²) (x - mu)."""

    def __init__(self, mu, var):
        super().__init__()
        self.mu, self.var = mu.double(), var.double()

    def forward(self, x, sigma, class_labels=None):
        sigma = sigma.double().reshape(-1, *([1] * (x.ndim - 1)))
        return (self.mu + self.var / (self.var + sigma**2) * (x.double() - self.mu)).float()


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_isotropic_gaussian_trajectories_are_straight(generator, solver):
    """Equal variances: x_i - mu stays parallel to x_0 - mu, for the ODE and both solvers.

    sigma_min = 0.2 keeps every step far above float32 rounding of the stored trajectory.
    """
    mu = torch.randn(2, 4, 4, generator=generator)
    net = GaussianDenoiser(mu, torch.tensor(1.0))
    latents = torch.randn(6, 2, 4, 4, generator=generator)
    out = heun_sampler(
        net, latents, num_steps=8, sigma_min=0.2, solver=solver, return_trajectory=True
    )
    stats = metrics.trajectory_stats(out)
    assert stats.curvature.shape == (7,) and stats.drift.shape == (8,)
    np.testing.assert_allclose(stats.straightness, 1.0, atol=1e-9)
    assert np.abs(stats.curvature).max() < 1e-9
    assert stats.angle.max() < 1e-4
    assert np.all(np.diff(stats.drift) < 0)  # the prediction approaches the sample as σ falls


def test_anisotropic_gaussian_trajectories_bend(generator):
    var = torch.linspace(0.05, 2.0, 32).reshape(2, 4, 4)
    net = GaussianDenoiser(torch.zeros(2, 4, 4), var)
    latents = torch.randn(6, 2, 4, 4, generator=generator)
    out = heun_sampler(net, latents, num_steps=8, sigma_min=0.2, return_trajectory=True)
    stats = metrics.trajectory_stats(out)
    assert np.all(stats.straightness < 1.0 - 1e-5)
    assert stats.curvature.max() > 1e-4


def test_trajectory_stats_needs_a_trajectory(generator):
    out = heun_sampler(
        GaussianDenoiser(torch.zeros(1), torch.ones(1)),
        torch.randn(2, 1, generator=generator),
        num_steps=3,
    )
    with pytest.raises(ValueError, match="return_trajectory=True"):
        metrics.trajectory_stats(out)


def test_score_seeds_metric_default_and_image_count_bounds(featnet_extractor, monkeypatch):
    ref = metrics.reference_stats(featnet_extractor, random_images(0, 20))
    images = [random_images(1, 10)]
    for seeds, recorded in (
        (None, None),
        ("0-9 of the sweep", "0-9 of the sweep"),
        (range(2), "0-1"),
    ):
        run = metrics.score(
            featnet_extractor, images, ref, num_images=2, seeds=seeds, metric="fd_x"
        )
        assert run["seeds"] == recorded
    with pytest.raises(ValueError, match=r"^num_images must be >= 2, got 1$"):
        metrics.score(featnet_extractor, images, ref, num_images=1, metric="fd_x")
    with pytest.raises(ValueError, match="mode"):
        metrics.score(
            featnet_extractor, images, {**ref, "mode": "clean"}, num_images=2, metric="fd_x"
        )
    monkeypatch.setattr(featnet_extractor, "name", "inception_v3")  # Inception: FID by default
    assert metrics.score(featnet_extractor, images, ref, num_images=2)["metric"] == "fid"


def test_damaged_stats_file_names_what_it_is_and_the_remedy(tmp_path):
    path = tmp_path / "ref.npz"
    path.write_bytes(b"not an npz")
    message = (
        r"\(expected reference statistics \(mu, sigma\)\); rebuild them with the reference step$"
    )
    with pytest.raises(Exception, match=message):
        metrics.load_stats(path)


def test_frechet_distance_computes_in_float64_and_refuses_non_covariances(rng):
    mu1, mu2 = rng.standard_normal((2, 64)).astype(np.float32)
    a, b = rng.standard_normal((2, 64, 80)).astype(np.float32)
    s1, s2 = a @ a.T / 80, b @ b.T / 80
    wide = [x.astype(np.float64) for x in (mu1, s1, mu2, s2)]
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == metrics.frechet_distance(*wide)
    eye = np.eye(2)
    # sqrt(-0.01 I) = 0.1i: an imaginary part far above rounding
    message = r"^sigma1 @ sigma2 has no real square root \(max imaginary part 0\.1\); are both PSD"
    with pytest.raises(ValueError, match=message):
        metrics.frechet_distance(np.zeros(2), -0.01 * eye, np.zeros(2), eye)


def test_frechet_distance_offsets_a_singular_product_and_drops_rounding_imaginary_parts(
    monkeypatch,
):
    calls, real_sqrtm = [], metrics.linalg.sqrtm

    def sqrtm(m):
        calls.append(m)
        if len(calls) == 1:  # the product was singular: sqrtm gave no finite root
            return np.full_like(m, np.inf)
        return real_sqrtm(m) + 1e-6j * np.eye(len(m))  # rounding-sized imaginary parts

    monkeypatch.setattr(metrics.linalg, "sqrtm", sqrtm)
    s1, s2, offset = np.diag([1.0, 2.0]), np.diag([3.0, 4.0]), 1e-6 * np.eye(2)
    value = metrics.frechet_distance(np.zeros(2), s1, np.ones(2), s2)
    assert len(calls) == 2
    np.testing.assert_array_equal(calls[1], (s1 + offset) @ (s2 + offset))  # eps = 1e-6
    root = np.sqrt((1 + 1e-6) * (3 + 1e-6)) + np.sqrt((2 + 1e-6) * (4 + 1e-6))
    assert isinstance(value, float) and value == pytest.approx(2 + 10 - 2 * root, rel=1e-12)


def test_trajectory_angles_step_by_step_and_per_image():
    # The turn from the first step to the third is 180°, not the 90° between neighbours.
    paths = [
        [[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 2.0]],
        [[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]],
    ]
    xs = torch.tensor(paths, dtype=torch.float64).transpose(0, 1)  # [N+1, B, P]
    sigmas = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0], dtype=torch.float64)
    stats = metrics.trajectory_stats(SamplerOutput(xs[-1], 0, sigmas, xs, xs[:-1]))
    # image 0 turns 90°, 90°, 90° (e1, e2, -e1, e2); image 1 goes straight: per-step means pi/4
    assert stats.angle.shape == stats.curvature.shape == (3,)
    np.testing.assert_allclose(stats.angle, [math.pi / 4] * 3)
    np.testing.assert_allclose(stats.curvature, [0.5] * 3)
    np.testing.assert_array_equal(stats.sigmas, sigmas.numpy())
    np.testing.assert_allclose(stats.straightness, [0.5, 1.0])
    assert stats.summary() == pytest.approx(
        {"curvature_mean": 0.5, "angle_deg_mean": 45.0, "straightness_mean": 0.75}
    )


def test_trajectory_stats_names_what_is_missing_or_mis_shaped():
    out = trajectory([[0.0], [1.0], [2.0]], [2.0, 1.0, 0.0])
    message = r"^output has no trajectory; sample with return_trajectory=True$"
    for missing in ({"xs": None}, {"denoised": None}):
        with pytest.raises(ValueError, match=message):
            metrics.trajectory_stats(out._replace(**missing))
    shapes = (
        r"^need xs \[N\+1, B, \.\.\.\], denoised \[N, B, \.\.\.\], sigmas \[N\+1\] "
        r"with N >= 2, got "
    )
    for bad in ({"denoised": out.denoised[:1]}, {"sigmas": out.sigmas[:2]}):
        with pytest.raises(ValueError, match=shapes + r"\(3, 1, 1\), \(\d, 1, 1\), \(\d,\)$"):
            metrics.trajectory_stats(out._replace(**bad))
