"""EDM's evaluation protocol beside clean-fid's: the legacy_tensorflow feature mode, reference
statistics from a user's file, EDM's per-image seeding. The steps that use them (`aot reference`
with a user's file, the report's one mode per table and its note on DG's weight) are tested in
tests/test_steps.py."""

import numpy as np
import pytest
import torch
from conftest import FakeLayers

from aot_model import features, metrics
from aot_model.sampling import latents_from_seeds
from aot_pipeline.config import ScoreParams


def edm_latents(seeds, shape, label_dim, device):
    """generate.py's StackedRandomGenerator, as method-notes b.8 describes it: one generator per
    image on the sampling device, seeded with seed % 2**32; the latents of all images, then the
    labels (each from its own generator, after its latent)."""
    gens = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]
    latents = torch.stack([torch.randn(shape, generator=g, device=device) for g in gens])
    labels = torch.stack([torch.randint(label_dim, size=[], generator=g, device=device)
                          for g in gens])  # fmt: skip
    return latents, torch.eye(label_dim, device=device)[labels]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_latents_and_labels_are_generate_py_s(device):
    seeds = [0, 1, 7, 2**32 + 7, 49_999]
    latents, labels = latents_from_seeds(seeds, (3, 8, 8), label_dim=10, device=device)
    expected_latents, expected_labels = edm_latents(seeds, (3, 8, 8), 10, device)
    assert latents.device.type == device
    assert torch.equal(latents, expected_latents) and torch.equal(labels, expected_labels)
    assert torch.equal(latents[2], latents[3])  # 2**32 + 7 is seed 7, as in generate.py


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_latents_come_from_cuda_generators():
    cuda, _ = latents_from_seeds([0, 1], (3, 8, 8), device="cuda")
    cpu, _ = latents_from_seeds([0, 1], (3, 8, 8))
    assert not torch.equal(cuda.cpu(), cpu)


# ------------------------------------------------------------------------------------------------
# legacy_tensorflow: the images go into the Inception graph unresized


def test_legacy_tensorflow_feeds_the_graph_unresized_pixels(fake_inception, rng):
    images = rng.integers(0, 256, size=(3, 3, 8, 8), dtype=np.uint8)
    legacy = features.inception_extractor(fake_inception, mode="legacy_tensorflow")
    with torch.no_grad():
        expected = FakeLayers()(torch.from_numpy(images).float()) + 1000.0
    assert legacy.mode == "legacy_tensorflow"
    np.testing.assert_array_equal(legacy.features([images]), expected.numpy())
    clean = features.inception_extractor(fake_inception, mode="clean", resize_threads=1)
    assert clean.mode == "clean" and clean.features([images]).max() < 1000  # layers at 299
    with pytest.raises(ValueError, match="mode"):
        features.inception_extractor(fake_inception, mode="native")


# ------------------------------------------------------------------------------------------------
# Reference statistics from the user's file


def test_fid_options_apply_to_fid_only():
    with pytest.raises(ValueError, match="fid_mode, reference_file apply to metric fid only"):
        ScoreParams(metric="fd", fid_mode="legacy_tensorflow", reference_file="x.npz")


def test_score_records_where_the_reference_came_from(rng):
    extractor = features.FeatureExtractor(
        "tiny", lambda x: x.flatten(1)[:, :4], sha256="0", mode="native", in_channels=1
    )
    ref = {"mu": np.zeros(4), "sigma": np.eye(4), "sha256": "abc", "source": "refs/x.npz"}
    images = rng.integers(0, 256, size=(6, 1, 2, 2), dtype=np.uint8)
    result = metrics.score(extractor, [images], ref, num_images=6, metric="fd_x")
    assert (result["mode"], result["ref_source"], result["ref_stats_sha256"]) == (
        "native", "refs/x.npz", "abc")  # fmt: skip
