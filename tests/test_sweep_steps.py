"""The sampling steps (aot_pipeline/steps.py) on one run: `sweep.precision` reaches the sampler of
every sampling step and is recorded with its results; under torchrun the ranks share the seeds as
EDM's generate.py does and rank 0 writes what one process would."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from edm_fixtures import tiny_network, write_snapshot

from aot_model.checkpoints import build_network_from_checkpoint, find_checkpoints
from aot_model.data import ImageDataset, save_dataset
from aot_model.edm_pickle import import_edm
from aot_model.sweep import SweepPoint, generate_images, seed_batches
from aot_pipeline import steps
from aot_pipeline.config import GuidanceParams, ScoreParams, SweepParams

LABELS = 4
SCORE = ScoreParams(feature_epochs=1)
POINTS = [SweepPoint(2, 7.0), SweepPoint(3, 7.0)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(run folder, reference folder): a conditional 3x8x8 network with every tensor random (an
    EDM-initialised one barely uses its weights, so bf16 would change no pixel), imported as a
    run, and fd reference statistics of 48 random 3x8x8 images."""
    root = tmp_path_factory.mktemp("sampling")
    net, config = tiny_network("ddpmpp", label_dim=LABELS)
    import_edm(write_snapshot(root / "snapshot.pkl", net, config), root / "run")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (48, 3, 8, 8), dtype=np.uint8)
    save_dataset(ImageDataset(images, rng.integers(0, LABELS, 48), LABELS, "toy"), root / "toy.npz")
    steps.reference(SCORE, root / "toy.npz", root / "reference")
    return root / "run", root / "reference"


def sweep_params(precision: str) -> SweepParams:
    return SweepParams(steps=[2, 3], rho=[7.0], num_images=6, batch_size=4, precision=precision)


def test_sweep_precision_reaches_the_sampler_and_is_recorded(run, tmp_path):
    """fp32 rows are the library sampler's images of the EMA network, bit for bit (the path before
    the option existed); bf16 rows differ from them by bf16 rounding, and every row, .npz and the
    curvature record say which precision made them."""
    run_dir, reference = run
    rows = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        steps.sweep(sweep_params(precision), SCORE, run_dir, reference, out, name="m")
        rows[precision] = json.loads((out / "m_sweep.json").read_text())
        assert [row["precision"] for row in rows[precision]] == [precision] * len(POINTS)
        assert json.loads((out / "curvature.json").read_text())["precision"] == precision
    net = build_network_from_checkpoint(find_checkpoints(run_dir)[-1], ema=True)
    for point, fp32, bf16 in zip(POINTS, rows["fp32"], rows["bf16"], strict=True):
        before = generate_images(
            net, point, range(6), img_shape=(3, 8, 8), label_dim=LABELS, batch_size=4
        )
        expected = np.concatenate([batch.images for batch in before])
        with np.load(fp32["images"]) as f32, np.load(bf16["images"]) as f16:
            assert np.array_equal(f32["images"], expected)
            assert np.array_equal(f32["labels"], f16["labels"])  # same seeds, same labels
            assert (str(f32["precision"]), str(f16["precision"])) == ("fp32", "bf16")
            diff = np.abs(f32["images"].astype(int) - f16["images"].astype(int))
        # bf16 keeps 8 mantissa bits: a relative error of ~2**-9 per evaluation. The random
        # network amplifies it at a few pixels, but the images stay the same images.
        assert 0 < diff.mean() < 2, diff.mean()
        assert fp32["score"] != bf16["score"]


def test_fakes_and_the_fid_protocol_record_their_precision(run, tmp_path):
    run_dir, reference = run
    guidance = GuidanceParams(num_fakes=4, fake_steps=2)
    steps.fakes(guidance, sweep_params("bf16"), run_dir, tmp_path / "fakes.npz")
    with np.load(tmp_path / "fakes.npz") as f:
        assert str(f["precision"]) == "bf16"
    point = SweepPoint(2, 7.0)
    result = steps.score_protocol(sweep_params("bf16"), SCORE, run_dir, reference, point, blocks=1)
    assert result["precision"] == "bf16"


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


@pytest.mark.slow
@pytest.mark.integration
def test_two_ranks_sample_the_images_of_one_process(run, tmp_path):
    """`aot sweep` and `aot fid --run-dir` under torchrun with 2 CPU processes (gloo): rank 0
    writes the one-process sweep's .npz and grids byte for byte and its scores, rank 1 writes
    nothing, and the fid protocol gives the one-process values (rank 1 returns nothing). Rank 0
    samples seeds [0, 1] and [4], rank 1 [2, 3] and [5]; one process [0, 1], [2, 3], [4, 5]."""
    run_dir, reference = run
    params = {
        "sweep": {"steps": [2, 3], "rho": [7.0], "num_images": 6, "batch_size": 2},
        "score": {"feature_epochs": 1},
        "point": {"num_steps": 3, "rho": 7.0},
    }
    (tmp_path / "params.json").write_text(json.dumps(params))
    worker = Path(__file__).with_name("sweep_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(worker.parents[1])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               *map(str, (worker, run_dir, reference, tmp_path))]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]

    sweep, score = SweepParams(**params["sweep"]), ScoreParams(**params["score"])
    one = tmp_path / "one"
    steps.sweep(sweep, score, run_dir, reference, one, name="m")
    point = SweepPoint(**params["point"])
    fid = steps.score_protocol(sweep, score, run_dir, reference, point, blocks=2)

    two = tmp_path / "rank0"
    assert not (tmp_path / "rank1").exists()
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
    written = sorted(p.name for p in one.iterdir() if p.suffix in (".npz", ".png"))
    assert written == [f"m_heun_s{n}_r7.{ext}" for n in (2, 3) for ext in ("npz", "png")]
    for name in written:
        assert (two / name).read_bytes() == (one / name).read_bytes(), name
    rows = [json.loads((d / "m_sweep.json").read_text()) for d in (one, two)]
    assert [r["score"] for r in rows[0]] == [r["score"] for r in rows[1]]
    curvature = [json.loads((d / "curvature.json").read_text()) for d in (one, two)]
    assert curvature[0]["curvature"] == curvature[1]["curvature"]
    ranks = [json.loads((tmp_path / f"fid-rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[1] == {}
    assert ranks[0]["blocks"] == ["0-5", "6-11"]
    # The protocol scores each sampled batch as it comes: batches of 2, 2, 1, 1 images here, of
    # 2, 2, 2 in one process, and the feature net's sums over a batch round by batch size.
    assert ranks[0]["values"] == pytest.approx(fid["values"], rel=1e-6, abs=0)
