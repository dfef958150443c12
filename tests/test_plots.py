"""Tests of aot_model.plots: figures written as PNGs, image grids copied pixel for pixel."""

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from aot_model import plots
from aot_model.metrics import TrajectoryStats


def test_plots_write_pngs(tmp_path):
    fig = plots.plot_score_vs_nfe(
        {"edm": [(35, 2.0), (27, 2.4)], "aot": [(27, 1.9), (35, 1.95)]},
        metric="fd_digits",
        path=tmp_path / "nfe.png",
    )
    assert isinstance(fig, Figure) and len(fig.axes[0].lines) == 2
    assert list(fig.axes[0].lines[1].get_xdata()) == [27, 35]
    stats = TrajectoryStats(
        sigmas=np.array([2.0, 1.0, 0.0]),
        curvature=np.array([1.0]),
        angle=np.array([np.pi / 2]),
        drift=np.array([1.5, 1.0]),
        straightness=np.array([0.7]),
    )
    fig = plots.plot_curvature_vs_sigma({"a": stats}, path=tmp_path / "curv.png")
    assert fig.axes[0].get_xscale() == "log"
    assert list(fig.axes[0].lines[0].get_xdata()) == [1.0]  # curvature sits at t_1..t_{N-1}
    assert list(fig.axes[1].lines[0].get_xdata()) == [2.0, 1.0]  # drift at t_0..t_{N-1}
    for name in ("nfe.png", "curv.png"):
        assert Image.open(tmp_path / name).size[0] > 100


@pytest.mark.parametrize("channels", [1, 3])
def test_image_grid_places_first_64_images(tmp_path, channels):
    images = np.random.default_rng(0).integers(0, 256, (70, channels, 3, 2), dtype=np.uint8)
    path = plots.save_image_grid(images, tmp_path / "grid.png")
    grid = np.asarray(Image.open(path))
    assert grid.shape[:2] == (8 * 3, 8 * 2)
    grid = grid.reshape(24, 16, channels)
    k = 9  # row 1, column 1
    np.testing.assert_array_equal(grid[3:6, 2:4], images[k].transpose(1, 2, 0))
    np.testing.assert_array_equal(grid[21:24, 14:16], images[63].transpose(1, 2, 0))
    with pytest.raises(ValueError, match="uint8"):
        plots.save_image_grid(images.astype(np.float32), tmp_path / "bad.png")


def test_discriminator_history_panels(tmp_path):
    rows = [
        {
            "epoch": e,
            "loss": 1 / e,
            "heldout_loss": 1.1 / e,
            "accuracy": 0.6,
            "heldout_accuracy": 0.6,
        }
        for e in (1, 2)
    ]
    fig = plots.plot_discriminator_history(rows, 2, path=tmp_path / "d.png")
    assert len(fig.axes) == 2 and Image.open(tmp_path / "d.png").format == "PNG"
    scored = [{**row, "score": 3.0 - row["epoch"]} for row in rows]
    fig = plots.plot_discriminator_history(scored, 1, metric="fd_digits")
    assert [ax.get_title() for ax in fig.axes] == ["loss", "accuracy", "guided fd_digits"]
