"""Tests of aot_model.features: clean-fid's feature path, Inception weights, the feature net."""

import hashlib
import threading

import numpy as np
import pytest
import torch
from cleanfid import fid as cleanfid_fid
from PIL import Image

from aot_model import features
from aot_model.data import ImageDataset, load_digits

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
    extractor = features.FeatureExtractor(
        "tiny", model, sha256="0", mode="clean", in_channels=3, batch_size=2, resize_threads=2
    )
    ours = extractor.features([images[:3], torch.from_numpy(images[3:])])
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)


def test_native_mode_feeds_uint8_values_unresized(rng):
    images = rng.integers(0, 256, size=(4, 3, 12, 12), dtype=np.uint8)
    model = tiny_model().eval()
    extractor = features.FeatureExtractor(
        "tiny", model, sha256="0", mode="native", in_channels=3, resolution=12
    )
    with torch.no_grad():
        expected = model(torch.from_numpy(images).float()).numpy()
    np.testing.assert_allclose(extractor.features([images]), expected, rtol=1e-6)


def test_extractor_rejects_bad_batches(rng):
    extractor = features.FeatureExtractor(
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
        features.FeatureExtractor("x", tiny_model(), sha256="0", mode="legacy", in_channels=3)


# --------------------------------------------------------------------------------------------
# Inception weights


def assert_explains_missing_inception(message):
    for part in (
        features.INCEPTION_FILENAME,
        "/tmp/inception-2015-12-05.pt",
        features.INCEPTION_URL,
        "AOT_INCEPTION_WEIGHTS",
        "weights_path",
    ):
        assert part in message


def test_missing_inception_weights_explain_how_to_supply_them(tmp_path, monkeypatch):
    missing = tmp_path / features.INCEPTION_FILENAME
    with pytest.raises(FileNotFoundError) as err:
        features.inception_extractor(missing, download=False)
    assert str(missing) in str(err.value)
    assert_explains_missing_inception(str(err.value))

    monkeypatch.setenv(features.INCEPTION_ENV, str(tmp_path))  # a folder without the file
    with pytest.raises(FileNotFoundError) as err:
        features.resolve_inception_weights(download=False)
    assert_explains_missing_inception(str(err.value))


def test_inception_weights_must_keep_their_file_name(tmp_path):
    renamed = tmp_path / "inception.pt"
    renamed.write_bytes(b"not used")
    with pytest.raises(FileNotFoundError, match="file name must stay"):
        features.resolve_inception_weights(renamed, download=False)


def test_inception_weights_found_via_env_folder(tmp_path, monkeypatch):
    weights = tmp_path / features.INCEPTION_FILENAME
    weights.write_bytes(b"placeholder")
    monkeypatch.setenv(features.INCEPTION_ENV, str(tmp_path))
    assert features.resolve_inception_weights(download=False) == weights


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_inception_features_match_cleanfid_folder_path_when_weights_are_present(rng, tmp_path):
    """Where the weights exist: our features equal clean-fid's own pipeline (PNG files read,
    resized and embedded by ``cleanfid.fid.get_folder_features``)."""
    try:
        weights = features.resolve_inception_weights(download=False)
    except FileNotFoundError:
        pytest.skip("clean-fid's Inception weights are not on this machine")
    from cleanfid.inception_torchscript import InceptionV3W

    extractor = features.inception_extractor(weights, download=False, batch_size=4)
    images = rng.integers(0, 256, size=(5, 3, 32, 32), dtype=np.uint8)
    for k, image in enumerate(images):
        Image.fromarray(image.transpose(1, 2, 0)).save(tmp_path / f"{k}.png")
    model = InceptionV3W(str(weights.parent), download=False, resize_inside=False)
    expected = cleanfid_fid.get_folder_features(
        str(tmp_path), model, num_workers=0, batch_size=5, device=torch.device("cpu"),
        mode="clean", verbose=False,
    )  # fmt: skip
    feats = extractor.features([images])
    assert feats.shape == (5, 2048)
    np.testing.assert_allclose(feats, expected, rtol=1e-4, atol=1e-4)
    assert feats.std(axis=0).mean() > 0  # images differ, so features do
    assert extractor.mode == "clean" and len(extractor.sha256) == 64
    # Grey images are replicated to RGB, as clean-fid's loader does for "L" PNGs.
    grey = extractor.features([images[:, :1]])
    np.testing.assert_allclose(grey, extractor.features([images[:, :1].repeat(3, 1)]), rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Small feature network


@pytest.fixture(scope="module")
def digits():
    return load_digits(resolution=16, channels=1)


def small_subset(digits, n=300):
    return ImageDataset(digits.images[:n], digits.labels[:n], digits.num_classes, "digits-sub")


def test_feature_net_learns_digits(digits):
    net, info = features.train_feature_net(digits, epochs=6, seed=0, width=8, lr=5e-3)
    assert info["num_heldout"] == 359 and info["num_train"] == 1438
    assert info["heldout_accuracy"] > 0.85  # chance is 0.1; 30 epochs at width 32 reach ~0.99
    feats = net.features(torch.from_numpy(digits.images[:5]).float())
    assert feats.shape == (5, 16)


def test_feature_net_training_is_seeded(digits):
    subset = small_subset(digits)
    net_a, _ = features.train_feature_net(subset, epochs=1, seed=3, width=4)
    net_b, _ = features.train_feature_net(subset, epochs=1, seed=3, width=4)
    net_c, _ = features.train_feature_net(subset, epochs=1, seed=4, width=4)
    state_a, state_b, state_c = (n.state_dict() for n in (net_a, net_b, net_c))
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not all(torch.equal(state_a[k], state_c[k]) for k in state_a)


def test_train_feature_net_rejects_bad_arguments(digits):
    with pytest.raises(ValueError, match="holdout_fraction"):
        features.train_feature_net(digits, epochs=1, holdout_fraction=1.0)
    with pytest.raises(ValueError, match="epochs"):
        features.train_feature_net(digits, epochs=0)


def test_feature_net_rejects_bad_sizes():
    with pytest.raises(ValueError, match=r"img_resolution must be an int >= 2 \(one 2x pooling\)"):
        features.FeatureNet(1, 1, 10)
    with pytest.raises(ValueError, match="width must be an int >= 1, got True"):
        features.FeatureNet(1, 16, 10, width=True)


def test_feature_net_save_load_roundtrip(tmp_path, digits):
    net = features.FeatureNet(1, 16, 10, width=4).eval()
    path = tmp_path / "featnet.pt"
    digest = features.save_feature_net(path, net)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    extractor = features.feature_net_extractor(path, batch_size=7)
    assert (extractor.name, extractor.sha256, extractor.mode) == ("feature_net", digest, "native")
    with torch.no_grad():
        expected = net.features(torch.from_numpy(digits.images[:20]).float()).numpy()
    np.testing.assert_allclose(extractor.features([digits.images[:20]]), expected, rtol=1e-6)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a feature-net file"):
        features.load_feature_net(tmp_path / "other.pt")


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("200000 100000\n", 2), ("150000 100000\n", 2), ("max 100000\n", 8), (None, 8)],
)
def test_resize_threads_follow_the_cpus_the_container_grants(
    tmp_path, monkeypatch, cpu_max, expected
):
    """An affinity mask of 8 CPUs, capped by the cgroup quota (rounded up) where there is one."""
    monkeypatch.setattr(features.os, "sched_getaffinity", lambda pid: set(range(8)))
    path = tmp_path / "cpu.max"
    if cpu_max is not None:
        path.write_text(cpu_max)
    monkeypatch.setattr(features, "CGROUP_CPU_MAX", path)
    assert features.usable_cpus() == expected


def test_the_next_part_is_resized_while_this_one_goes_through_the_network(rng):
    """Part k's forward waits until part k + 1's resize has begun: run one after the other, it
    would wait in vain."""
    resizing = [threading.Event() for _ in range(3)]
    overlapped = []

    class Network(torch.nn.Module):
        def forward(self, x):
            following = len(overlapped) + 1
            overlapped.append(following == 3 or resizing[following].wait(timeout=10))
            return x.flatten(1)[:, :4]

    extractor = features.FeatureExtractor(
        "tiny", Network(), sha256="0", mode="clean", in_channels=3, batch_size=2, resize_threads=1
    )
    prepare = extractor._prepare

    def recording_prepare(images):
        resizing[sum(e.is_set() for e in resizing)].set()
        return prepare(images)

    extractor._prepare = recording_prepare
    images = rng.integers(0, 256, size=(6, 3, 8, 8), dtype=np.uint8)
    assert extractor.features([images], progress=False).shape == (6, 4)
    assert overlapped == [True, True, True]
