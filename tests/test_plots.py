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
    path = plots.save_image_grid(images, tmp_path / "grid.png", scale=1, gap=0)
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


def test_image_grid_enlarges_cells_and_separates_them(tmp_path):
    """Default: each pixel becomes 3x3, cells 2 white pixels apart, no gap at the outer edge."""
    images = np.random.default_rng(1).integers(0, 200, (5, 1, 4, 3), dtype=np.uint8)
    grid = np.asarray(Image.open(plots.save_image_grid(images, tmp_path / "g.png")))
    cell_h, cell_w = 4 * 3, 3 * 3
    assert grid.shape == (2 * cell_h + 2, 3 * cell_w + 2 * 2)  # 3 columns, 2 rows
    top, left = cell_h + 2, cell_w + 2  # image 4: row 1, column 1
    expected = images[4, 0].repeat(3, axis=0).repeat(3, axis=1)
    np.testing.assert_array_equal(grid[top : top + cell_h, left : left + cell_w], expected)
    assert (grid[cell_h : cell_h + 2] == 255).all() and (grid[:, cell_w : cell_w + 2] == 255).all()
    assert (grid[top:, 2 * left :] == 255).all()  # the unused sixth cell stays blank
    with pytest.raises(ValueError, match="scale"):
        plots.save_image_grid(images, tmp_path / "bad.png", scale=0)


def test_score_and_curvature_bands(tmp_path):
    fig = plots.plot_score_vs_nfe(
        {"edm": [(35, 2.0, 0.1), (27, 2.4, 0.2)]}, metric="fd_digits", path=tmp_path / "b.png"
    )
    band = fig.axes[0].collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == pytest.approx(1.9) and band[:, 1].max() == pytest.approx(2.6)
    assert fig.axes[0].get_title() == "fd_digits vs NFE (mean +- std over seeds)"
    fig = plots.plot_score_vs_nfe({"edm": [(35, 2.0)]}, metric="fd_digits", path=tmp_path / "a.png")
    assert fig.axes[0].get_title() == "fd_digits vs NFE"
    runs = [
        TrajectoryStats(
            sigmas=np.array([2.0, 1.0, 0.0]),
            curvature=np.array([c]),
            angle=np.array([0.0]),
            drift=np.array([1.0, 0.5]),
            straightness=np.array([0.9]),
        )
        for c in (0.1, 0.3)
    ]
    fig = plots.plot_curvature_vs_sigma({"aot": runs}, path=tmp_path / "c.png")
    assert list(fig.axes[0].lines[0].get_ydata()) == pytest.approx([0.2])
    assert len(fig.axes[0].collections) == 1
