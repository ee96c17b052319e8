"""Figures: titled reconstructions large enough to read, kNN plots that name their evaluation set and its noise."""

import matplotlib.pyplot as plt
import pytest
import torch
from PIL import Image

from models_cross_scale_mae import create_model
from util.eval import figures


@pytest.fixture
def closed_figures(monkeypatch):
    """The figures the code closes, for inspection (titles, bands)."""
    closed, close = [], plt.close
    monkeypatch.setattr(figures.plt, "close", closed.append)
    yield closed
    for fig in closed:
        close(fig)


def test_reconstruction_figure_has_column_titles_a_title_and_a_readable_size(tmp_path, closed_figures):
    torch.manual_seed(0)
    model = create_model("cross_scale_mae_vit_tiny", input_size=32, patch_size=8)
    images, names = figures.reconstruction_columns(model, torch.randn(3, 3, 32, 32), (0.5,) * 3, (0.25,) * 3)
    assert images.shape == (3, 6, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
    assert [n.split("\n")[0] for n in names] == ["original", "masked 75%", "reconstruction"] * 2
    assert names[0].endswith("scale 1 (full)") and names[3].endswith("scale 2 (crop)")
    size = figures.save_reconstruction_png(images, names, tmp_path / "r.png", "cross_scale_mae_vit_tiny: epoch 7")
    width, height = Image.open(tmp_path / "r.png").size
    assert (width, height) == size
    assert width == 6 * figures.MIN_CELL_PX and 3 * figures.MIN_CELL_PX < height < 3 * figures.MIN_CELL_PX + 120
    fig = closed_figures[-1]
    assert fig._suptitle.get_text() == "cross_scale_mae_vit_tiny: epoch 7"
    assert [ax.get_title() for ax in fig.axes[:6]] == names
    assert all(im.get_interpolation() == "nearest" for ax in fig.axes for im in ax.get_images())
    tensorboard = figures.grid_image(images)
    assert tensorboard.dtype == torch.uint8 and tensorboard.shape == (3, 3 * 34 + 2, 6 * 34 + 2)


def test_wilson_interval():
    low, high = figures.wilson_interval(50.0, 16)
    assert low == pytest.approx(28.0, abs=0.1) and high == pytest.approx(72.0, abs=0.1)
    assert figures.wilson_interval(100.0, 6)[1] == pytest.approx(100.0) and figures.wilson_interval(0.0, 6)[
        0
    ] == pytest.approx(0.0)
    assert figures.wilson_interval(100.0, 6)[0] == pytest.approx(61.0, abs=0.1)  # 6 of 6 right: still as low as 61 %


def test_knn_plot_names_the_evaluation_set_and_its_size_and_draws_intervals(tmp_path, closed_figures):
    scales = [0.25, 1.0]
    table = {
        (label, c, s): 50.0 + 6.25 * i
        for i, label in enumerate(["a", "b"])
        for c in ("weighted", "majority")
        for s in scales
    }
    figures.save_knn_plot(
        table, ["a", "b"], scales, ("weighted", "majority"), tmp_path / "k.png", evaluation="val.csv", images=16
    )
    fig = closed_figures[-1]
    assert fig._suptitle.get_text() == "Multi-scale kNN top-1: val.csv, 16 evaluation images"
    assert all(len(ax.collections) == 2 for ax in fig.axes)  # one Wilson band per line
    bottom, top = fig.axes[0].get_ylim()
    assert bottom < 30 and top > 75  # the bands (16 images: about +-22 points) fit: a one-image step looks small
    assert Image.open(tmp_path / "k.png").size[0] >= 1000
