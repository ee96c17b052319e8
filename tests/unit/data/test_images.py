"""util/data/images.py: decoding any image file to 8-bit RGB."""

import numpy as np
import pytest
from conftest import make_image
from PIL import Image

from util.data.images import NotEightBitError, load_image


def test_grayscale_rgba_and_16_bit_images_become_rgb(tmp_path):
    Image.new("L", (20, 20), 100).save(tmp_path / "gray.png")
    Image.new("RGBA", (20, 20), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    ramp = np.arange(400, dtype=np.uint16).reshape(20, 20) * 150
    Image.fromarray(ramp).save(tmp_path / "sixteen.png")
    images = {path.name: load_image(str(path), stretch=True) for path in tmp_path.iterdir()}  # --stretch: 16-bit too
    assert all(img.mode == "RGB" for img in images.values())
    assert images["gray.png"].getpixel((0, 0)) == (100, 100, 100)
    assert images["rgba.png"].getpixel((0, 0)) == (10, 20, 30)
    sixteen = np.asarray(images["sixteen.png"])
    assert sixteen.min() == 0 and sixteen.max() == 255


def test_jpeg_draft_decodes_large_images_at_reduced_size(tmp_path):
    make_image(0, seed=1, size=512).save(tmp_path / "big.jpg")
    assert load_image(str(tmp_path / "big.jpg"), draft_size=100).size == (128, 128)
    assert load_image(str(tmp_path / "big.jpg")).size == (512, 512)


def test_16_bit_images_are_refused_without_stretch_naming_the_tool(tmp_path):
    Image.fromarray(np.full((8, 8), 1000, np.uint16)).save(tmp_path / "sixteen.png")
    with pytest.raises(NotEightBitError, match="tools/band_stats.py"):
        load_image(str(tmp_path / "sixteen.png"))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_an_image_error_in_a_dataloader_worker_is_still_one_line(tmp_path, num_workers):
    """PyTorch re-raises a worker's exception as ``type(error)(message)``: the image errors must accept that (a
    RuntimeError and a 40-line traceback otherwise), and ``run_entry_point`` reduces it to the original line."""
    import torch
    from torch.utils.data import DataLoader

    from util.data.datasets import build_dataset
    from util.run.process import run_entry_point

    (tmp_path / "tiles").mkdir()
    Image.fromarray(np.full((8, 8), 1000, np.uint16)).save(tmp_path / "tiles" / "a.png")
    dataset = build_dataset(tmp_path / "tiles", "folder")

    def main(_):
        next(iter(DataLoader(dataset, num_workers=num_workers, collate_fn=lambda batch: torch.zeros(1))))

    with pytest.raises(SystemExit) as info:
        run_entry_point(main, None)
    message = str(info.value)
    assert message.startswith("error: ") and "\n" not in message and "a.png" in message and "not 8-bit" in message
