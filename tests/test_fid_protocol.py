"""EDM's evaluation protocol beside clean-fid's: the legacy_tensorflow feature mode, reference
statistics from a user's file, EDM's per-image seeding, modes never mixed in one report, and the
guided table's note on DG's weight."""

import hashlib
import json

import numpy as np
import pytest
import torch
import yaml
from builders import TINY_PARAMS
from test_report import write_guided_sweep, write_sweep
from typer.testing import CliRunner

from aot_model import features, metrics
from aot_model.data import load_digits, save_dataset
from aot_model.sampling import latents_from_seeds
from aot_pipeline import steps
from aot_pipeline.cli import app
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


class FakeLayers(torch.nn.Module):
    def forward(self, x):
        stats = torch.cat([x.mean(dim=(2, 3)), x.amax(dim=(2, 3))], 1)  # [B, 6]
        return torch.cat([stats.repeat(1, 341), stats[:, :2]], 1)  # [B, 2048]


class FakeInception(torch.nn.Module):
    """Stands in for inception-2015-12-05.pt (a TorchScript file with ``layers``)."""

    def __init__(self):
        super().__init__()
        self.layers = FakeLayers()

    def forward(self, x, return_features: bool = False):
        return self.layers(x) + 1000.0  # marks the graph's own (resizing) entry point


@pytest.fixture
def fake_inception(tmp_path):
    path = tmp_path / "weights" / features.INCEPTION_FILENAME
    path.parent.mkdir()
    torch.jit.save(torch.jit.script(FakeInception()), str(path))
    return path


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


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "data.npz"
    save_dataset(load_digits(resolution=8, channels=3), path, source="digits")
    return path


def write_reference(path, mu, sigma):
    np.savez(path, mu=mu, sigma=sigma)
    return path


def fid_score(fake_inception, reference_file, mode="legacy_tensorflow"):
    reference = None if reference_file is None else str(reference_file)
    weights = str(fake_inception)
    return ScoreParams(
        metric="fid", inception_weights=weights, fid_mode=mode, reference_file=reference
    )


def test_reference_file_is_checked_copied_and_recorded(tmp_path, fake_inception, dataset):
    dim = steps.INCEPTION_FEATURES
    src = write_reference(tmp_path / "cifar10-32x32.npz", np.zeros(dim), np.eye(dim))
    out = tmp_path / "ref"
    info = steps.reference(fid_score(fake_inception, src), dataset, out)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    assert (out / steps.REFERENCE_STATS).read_bytes() == src.read_bytes()
    assert json.loads((out / "reference.json").read_text()) == info == {
        "dataset": "digits-8x8", "metric": "fid", "reference_file": str(src),
        "reference_file_sha256": digest, "reference_stats_sha256": digest,
        "extractor": "inception_v3", "mode": "legacy_tensorflow",
    }  # fmt: skip
    metric, extractor, ref = steps._scoring(fid_score(fake_inception, src), out, "cpu")
    assert (metric, extractor.mode, ref["source"], ref["sha256"]) == (
        "fid", "legacy_tensorflow", str(src), digest)  # fmt: skip
    with pytest.raises(ValueError) as error:  # clean-mode scoring against legacy statistics
        steps._scoring(fid_score(fake_inception, src, mode="clean"), out, "cpu")
    assert str(error.value) == (
        f"{out / 'reference.json'} holds legacy_tensorflow statistics, score.fid_mode is clean; "
        f"rebuild {out} with `aot reference`, or set score.fid_mode: legacy_tensorflow"
    )


@pytest.mark.parametrize(
    ("mu", "sigma", "reason"),
    [
        (np.zeros(64), np.eye(64), "mu has shape [64] and sigma [64, 64], Inception statistics "
         "are mu [2048] and sigma [2048, 2048]"),
        (np.full(2048, np.nan), np.eye(2048), "mu or sigma holds NaN or Inf"),
    ],
)  # fmt: skip
def test_bad_reference_files_are_refused(tmp_path, fake_inception, dataset, mu, sigma, reason):
    src = write_reference(tmp_path / "ref.npz", mu, sigma)
    params = tmp_path / "params.yaml"
    score = {"metric": "fid", "inception_weights": str(fake_inception), "reference_file": str(src)}
    params.write_text(yaml.safe_dump({**TINY_PARAMS, "score": score}))
    out = tmp_path / "ref"
    result = CliRunner().invoke(
        app,
        ["reference", "--data", str(dataset), "--out", str(out), "--params", str(params),
         "--device", "cpu"],
    )  # fmt: skip
    assert (result.exit_code, result.output) == (2, f"error: {src}: {reason}\n")
    assert not out.exists()


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


# ------------------------------------------------------------------------------------------------
# The report: one mode per table; DG's w read right


def set_mode(folder, name, mode):
    path = folder / f"{name}_sweep.json"
    rows = json.loads(path.read_text())
    for row in rows:
        row["metric"], row["score_info"] = "fid", {"mode": mode}
    path.write_text(json.dumps(rows))


def test_report_never_compares_modes(tmp_path):
    dirs = {name: write_sweep(tmp_path / name, name) for name in ("aot", "edm")}
    set_mode(dirs["aot"], "aot", "legacy_tensorflow")
    set_mode(dirs["edm"], "edm", "clean")
    with pytest.raises(ValueError) as error:
        steps.report(dirs, tmp_path / "report")
    assert str(error.value) == (
        "the sweeps were scored in different modes (aot: legacy_tensorflow, edm: clean); scores "
        "of different modes are never compared in one table: score them all with one "
        "score.fid_mode"
    )
    assert not (tmp_path / "report").exists()
    set_mode(dirs["edm"], "edm", "legacy_tensorflow")
    text = steps.report(dirs, tmp_path / "report")["table"]
    assert text.startswith("FID in clean-fid's legacy_tensorflow mode.\n| solver |")


@pytest.mark.parametrize(
    ("second_order", "note"),
    [
        (False, "w guides the Euler step only (second_order false, DG's released default): "
         "Heun's average then follows the probability-flow ODE guided with w/2, not w, so even "
         "a perfect discriminator at w = 1 does not reach the data distribution; compare these "
         "w with DG's papers accordingly."),
        (True, "With second_order true both Heun slopes are guided: the ODE's weight is w."),
    ],
)  # fmt: skip
def test_guided_table_says_how_to_read_w(tmp_path, second_order, note):
    dirs = {"aot": write_sweep(tmp_path / "aot", "aot")}
    dirs["aot-dg"] = write_guided_sweep(tmp_path / "aot-dg")
    path = dirs["aot-dg"] / "aot-dg_sweep.json"
    rows = [{**row, "second_order": second_order} for row in json.loads(path.read_text())]
    path.write_text(json.dumps(rows))
    text = steps.report(dirs, tmp_path / "report")["table"]
    guided = next(p for p in text.split("\n\n") if p.startswith("Discriminator guidance:"))
    assert guided.endswith("not counted in NFE). " + note)
