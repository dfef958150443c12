"""Tests of aot_model.metrics against clean-fid, closed forms and analytic trajectories."""

import hashlib
import math

import numpy as np
import pytest
import torch
from cleanfid import fid as cleanfid_fid
from matplotlib.figure import Figure
from PIL import Image

from aot_model import metrics
from aot_model.data import ImageDataset, load_digits
from aot_model.sampling import SamplerOutput, heun_sampler


@pytest.fixture
def rng():
    return np.random.default_rng(0)


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
    assert abs(metrics.fid_from_features(feats, feats)) < 1e-8
    assert metrics.fid_from_features(feats, feats + 1.0) == pytest.approx(32.0, rel=1e-8)


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
# Feature extraction through clean-fid


def tiny_model():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 5, stride=4)
    return torch.nn.Sequential(
        conv, torch.nn.Tanh(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten()
    )


@pytest.mark.parametrize("channels", [3, 1])
def test_clean_mode_matches_cleanfid_folder_path(tmp_path, rng, channels):
    """In-memory features equal clean-fid's own PNG-folder path (PIL bicubic to 299, RGB)."""
    images = rng.integers(0, 256, size=(5, channels, 20, 20), dtype=np.uint8)
    for k, img in enumerate(images):
        pixels = img[0] if channels == 1 else img.transpose(1, 2, 0)
        Image.fromarray(pixels).save(tmp_path / f"{k:03d}.png")
    model = tiny_model().eval()
    ref = cleanfid_fid.get_folder_features(
        str(tmp_path),
        model=model,
        num_workers=0,
        batch_size=3,
        device=torch.device("cpu"),
        mode="clean",
        verbose=False,
    )
    extractor = metrics.FeatureExtractor(
        "tiny", model, sha256="0", mode="clean", in_channels=3, batch_size=2, resize_threads=2
    )
    ours = extractor.features([images[:3], torch.from_numpy(images[3:])])
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_native_mode_feeds_uint8_values_unresized(rng):
    images = rng.integers(0, 256, size=(4, 3, 12, 12), dtype=np.uint8)
    model = tiny_model().eval()
    extractor = metrics.FeatureExtractor(
        "tiny", model, sha256="0", mode="native", in_channels=3, resolution=12
    )
    with torch.no_grad():
        expected = model(torch.from_numpy(images).float()).numpy()
    np.testing.assert_allclose(extractor.features([images]), expected, rtol=1e-6)


def test_extractor_rejects_bad_batches(rng):
    extractor = metrics.FeatureExtractor(
        "tiny", tiny_model(), sha256="0", mode="native", in_channels=3, resolution=12
    )
    with pytest.raises(ValueError, match="uint8"):
        extractor.features([np.zeros((2, 3, 12, 12), dtype=np.float32)])
    with pytest.raises(ValueError, match="3-channel"):
        extractor.features([np.zeros((2, 2, 12, 12), dtype=np.uint8)])
    with pytest.raises(ValueError, match="12x12"):
        extractor.features([np.zeros((2, 3, 8, 8), dtype=np.uint8)])
    with pytest.raises(ValueError, match="at least one"):
        extractor.features([])
    with pytest.raises(ValueError, match="mode"):
        metrics.FeatureExtractor("x", tiny_model(), sha256="0", mode="legacy", in_channels=3)


# --------------------------------------------------------------------------------------------
# Inception weights


def assert_explains_missing_inception(message):
    for part in (
        metrics.INCEPTION_FILENAME,
        "/tmp/inception-2015-12-05.pt",
        metrics.INCEPTION_URL,
        "AOT_INCEPTION_WEIGHTS",
        "weights_path",
    ):
        assert part in message


def test_missing_inception_weights_explain_how_to_supply_them(tmp_path, monkeypatch):
    missing = tmp_path / metrics.INCEPTION_FILENAME
    with pytest.raises(FileNotFoundError) as err:
        metrics.inception_extractor(missing, download=False)
    assert str(missing) in str(err.value)
    assert_explains_missing_inception(str(err.value))

    monkeypatch.setenv(metrics.INCEPTION_ENV, str(tmp_path))  # a folder without the file
    with pytest.raises(FileNotFoundError) as err:
        metrics.resolve_inception_weights(download=False)
    assert_explains_missing_inception(str(err.value))


def test_inception_weights_must_keep_their_file_name(tmp_path):
    renamed = tmp_path / "inception.pt"
    renamed.write_bytes(b"not used")
    with pytest.raises(FileNotFoundError, match="file name must stay"):
        metrics.resolve_inception_weights(renamed, download=False)


def test_inception_weights_found_via_env_folder(tmp_path, monkeypatch):
    weights = tmp_path / metrics.INCEPTION_FILENAME
    weights.write_bytes(b"placeholder")
    monkeypatch.setenv(metrics.INCEPTION_ENV, str(tmp_path))
    assert metrics.resolve_inception_weights(download=False) == weights


@pytest.mark.slow
def test_inception_features_when_weights_are_present(rng):
    try:
        extractor = metrics.inception_extractor(download=False, batch_size=4)
    except FileNotFoundError:
        pytest.skip("clean-fid's Inception weights are not on this machine")
    feats = extractor.features([rng.integers(0, 256, size=(3, 1, 16, 16), dtype=np.uint8)])
    assert feats.shape == (3, 2048)
    assert extractor.mode == "clean" and len(extractor.sha256) == 64


# --------------------------------------------------------------------------------------------
# Small feature network


@pytest.fixture(scope="module")
def digits():
    return load_digits(resolution=16, channels=1)


def small_subset(digits, n=300):
    return ImageDataset(digits.images[:n], digits.labels[:n], digits.num_classes, "digits-sub")


def test_feature_net_learns_digits(digits):
    net, info = metrics.train_feature_net(digits, epochs=6, seed=0, width=8, lr=5e-3)
    assert info["num_heldout"] == 359 and info["num_train"] == 1438
    assert info["heldout_accuracy"] > 0.85  # chance is 0.1; 30 epochs at width 32 reach ~0.99
    feats = net.features(torch.from_numpy(digits.images[:5]).float())
    assert feats.shape == (5, 16)


def test_feature_net_training_is_seeded(digits):
    subset = small_subset(digits)
    net_a, _ = metrics.train_feature_net(subset, epochs=1, seed=3, width=4)
    net_b, _ = metrics.train_feature_net(subset, epochs=1, seed=3, width=4)
    net_c, _ = metrics.train_feature_net(subset, epochs=1, seed=4, width=4)
    state_a, state_b, state_c = (n.state_dict() for n in (net_a, net_b, net_c))
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not all(torch.equal(state_a[k], state_c[k]) for k in state_a)


def test_train_feature_net_rejects_bad_arguments(digits):
    with pytest.raises(ValueError, match="holdout_fraction"):
        metrics.train_feature_net(digits, epochs=1, holdout_fraction=1.0)
    with pytest.raises(ValueError, match="epochs"):
        metrics.train_feature_net(digits, epochs=0)


def test_feature_net_save_load_roundtrip(tmp_path, digits):
    net = metrics.FeatureNet(1, 16, 10, width=4).eval()
    path = tmp_path / "featnet.pt"
    digest = metrics.save_feature_net(path, net)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    extractor = metrics.feature_net_extractor(path, batch_size=7)
    assert (extractor.name, extractor.sha256, extractor.mode) == ("feature_net", digest, "native")
    with torch.no_grad():
        expected = net.features(torch.from_numpy(digits.images[:20]).float()).numpy()
    np.testing.assert_allclose(extractor.features([digits.images[:20]]), expected, rtol=1e-6)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a feature-net file"):
        metrics.load_feature_net(tmp_path / "other.pt")


# --------------------------------------------------------------------------------------------
# Reference statistics and scores


@pytest.fixture
def featnet_extractor(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "featnet.pt"
    metrics.save_feature_net(path, metrics.FeatureNet(1, 8, 10, width=4))
    return metrics.feature_net_extractor(path)


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
    assert result == {
        "metric": "fd_digits",
        "value": result["value"],
        "feature_net": "feature_net",
        "feature_net_sha256": featnet_extractor.sha256,
        "mode": "native",
        "ref_stats_sha256": ref["sha256"],
        "ref_count": 40,
        "num_images": 25,
        "seeds": "0-24",
    }


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
    assert result["min"] == min(result["values"]) and len(set(result["values"])) == 3
    assert result["mean"] == pytest.approx(np.mean(result["values"]))
    assert (
        result["metric"] == "fd_digits" and result["feature_net_sha256"] == featnet_extractor.sha256
    )


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


# --------------------------------------------------------------------------------------------
# Plots and grids


def test_plots_write_pngs(tmp_path):
    fig = metrics.plot_score_vs_nfe(
        {"edm": [(35, 2.0), (27, 2.4)], "aot": [(27, 1.9), (35, 1.95)]},
        metric="fd_digits",
        path=tmp_path / "nfe.png",
    )
    assert isinstance(fig, Figure) and len(fig.axes[0].lines) == 2
    assert list(fig.axes[0].lines[1].get_xdata()) == [27, 35]
    stats = metrics.trajectory_stats(
        trajectory([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]], [2.0, 1.0, 0.0])
    )
    fig = metrics.plot_curvature_vs_sigma({"a": stats}, path=tmp_path / "curv.png")
    assert fig.axes[0].get_xscale() == "log"
    for name in ("nfe.png", "curv.png"):
        assert Image.open(tmp_path / name).size[0] > 100


@pytest.mark.parametrize("channels", [1, 3])
def test_image_grid_places_first_64_images(tmp_path, channels):
    images = np.random.default_rng(0).integers(0, 256, (70, channels, 3, 2), dtype=np.uint8)
    path = metrics.save_image_grid(images, tmp_path / "grid.png")
    grid = np.asarray(Image.open(path))
    assert grid.shape[:2] == (8 * 3, 8 * 2)
    grid = grid.reshape(24, 16, channels)
    k = 9  # row 1, column 1
    np.testing.assert_array_equal(grid[3:6, 2:4], images[k].transpose(1, 2, 0))
    np.testing.assert_array_equal(grid[21:24, 14:16], images[63].transpose(1, 2, 0))
    with pytest.raises(ValueError, match="uint8"):
        metrics.save_image_grid(images.astype(np.float32), tmp_path / "bad.png")
