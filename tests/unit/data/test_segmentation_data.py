"""util/data/segmentation.py: palettes both ways, lossless masks (JPEG refused), LoveDA's reduce_zero_label, pairs from
folders and CSVs, joint transforms that keep labels (nearest only, ignore preserved)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from util.data import segmentation
from util.data.datasets import DataError
from util.data.segmentation import ISPRS, Palette


def test_isprs_palette_converts_colours_to_indices_and_back():
    colours = np.array(
        [
            [[255, 255, 255], [0, 0, 255], [0, 255, 255]],
            [[0, 255, 0], [255, 255, 0], [255, 0, 0]],
            [[12, 34, 56], [0, 0, 254], [255, 255, 255]],
        ],
        dtype=np.uint8,
    )
    index = segmentation.rgb_to_index(colours, ISPRS)
    assert index.tolist() == [[0, 1, 2], [3, 4, 5], [255, 255, 0]]  # colours not in the palette -> ignore
    back = segmentation.index_to_rgb(index, ISPRS, ignore_color=(0, 0, 0))
    assert np.array_equal(back[:2], colours[:2]) and back[2, 0].tolist() == [0, 0, 0]


def test_palette_json_round_trip_and_errors(tmp_path):
    palette = Palette(("water", "land"), ((0, 0, 255), (200, 180, 120)))
    (tmp_path / "p.json").write_text(
        json.dumps([{"name": "water", "color": [0, 0, 255]}, {"name": "land", "color": [200, 180, 120]}])
    )
    assert segmentation.load_palette(tmp_path / "p.json") == palette
    assert segmentation.load_palette("ISPRS") is ISPRS
    (tmp_path / "bad.json").write_text('[{"name": "a", "color": [0, 0, 300]}]')
    with pytest.raises(DataError, match="0..255"):
        segmentation.load_palette(tmp_path / "bad.json")
    for colour in ("[0, 0.9, 0]", "[0, 254.6, 0]", "[true, 0, 0]", '"0f0"'):  # int() made them other colours
        (tmp_path / "bad.json").write_text(f'[{{"name": "a", "color": {colour}}}, {{"name": "b", "color": [1, 2, 3]}}]')
        with pytest.raises(DataError, match=r"bad.json: every colour must be 3 integers in 0..255, got \["):
            segmentation.load_palette(tmp_path / "bad.json")
    with pytest.raises(DataError, match="share a colour"):
        Palette(("a", "b"), ((1, 2, 3), (1, 2, 3)))


def test_rgb_mask_file_is_decoded_through_the_palette(tmp_path):
    rgb = np.zeros((4, 6, 3), dtype=np.uint8)
    rgb[:, :3] = (0, 0, 255)  # building
    rgb[:, 3:] = (255, 255, 0)  # car
    Image.fromarray(rgb).save(tmp_path / "label.png")
    assert segmentation.read_mask(tmp_path / "label.png", ISPRS).tolist() == [[1, 1, 1, 4, 4, 4]] * 4
    with pytest.raises(DataError, match="needs --palette"):
        segmentation.read_mask(tmp_path / "label.png")


def test_palette_png_is_written_and_read_losslessly(tmp_path):
    mask = np.random.default_rng(0).integers(0, 6, size=(17, 23))
    mask[0, :5] = 255
    segmentation.write_mask(tmp_path / "m.png", mask, ISPRS)
    with Image.open(tmp_path / "m.png") as img:
        assert img.mode == "P" and img.getpalette()[3:6] == [0, 0, 255]  # coloured for viewers
    assert np.array_equal(segmentation.read_mask(tmp_path / "m.png"), mask)  # pixel values are the indices
    with pytest.raises(DataError, match="PNG only"):
        segmentation.write_mask(tmp_path / "m.jpg", mask)


def test_a_palette_png_whose_table_orders_the_colours_otherwise_is_read_by_its_colours(tmp_path):
    """An RGB mask quantised by an image editor: a P-mode PNG of arbitrary indices (here building 0, car 1, ignore
    255). Its pixel values read as classes were impervious_surfaces and building, with exit 0; its colours tell."""
    rgb = np.zeros((4, 6, 3), dtype=np.uint8)
    rgb[:, :3], rgb[:, 3:] = (0, 0, 255), (255, 255, 0)  # building, car
    quantised = Image.fromarray(rgb).quantize(colors=2)
    table = quantised.getpalette()[:6]
    assert table in ([0, 0, 255, 255, 255, 0], [255, 255, 0, 0, 0, 255])  # another order than ISPRS's
    pixels = np.asarray(quantised).copy()
    pixels[0, 0] = 255
    quantised = Image.fromarray(pixels, mode="P")
    quantised.putpalette(table + [0] * (768 - 6))  # 256 entries: the PNG keeps 8 bits per pixel
    quantised.save(tmp_path / "q.png")
    expected = [[1, 1, 1, 4, 4, 4] for _ in range(4)]
    expected[0][0] = 255
    assert segmentation.read_mask(tmp_path / "q.png", ISPRS).tolist() == expected
    with pytest.raises(DataError, match="q.png: --reduce_zero_label is for class-index masks"):
        segmentation.read_mask(tmp_path / "q.png", ISPRS, zero_is_nodata=True)
    mask = np.array([[0, 1, 255]])
    segmentation.write_mask(tmp_path / "m.png", mask, Palette(("a", "b"), ((1, 1, 1), (2, 2, 2))))
    assert segmentation.read_mask(tmp_path / "m.png", ISPRS).tolist() == [[0, 1, 255]]  # no ISPRS colour: indices
    mixed = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), mode="P")
    mixed.putpalette([0, 0, 255, 9, 9, 9])  # building at index 0, and a colour ISPRS has not
    mixed.save(tmp_path / "mixed.png")
    with pytest.raises(
        DataError,
        match=r"mixed.png: a palette-mode mask whose colour table shows --palette's colours "
        r"at other indices \(index 0 is \(0, 0, 255\) \(--palette's building\)\) and colours not",
    ):
        segmentation.read_mask(tmp_path / "mixed.png", ISPRS)


def test_masks_beyond_max_image_pixels_are_refused_in_one_line(tmp_path):
    """Masks were opened under PIL's process-wide limit (another reader's, or its default): a mask beyond twice it
    ended in a raw DecompressionBombError, one between once and twice it was decoded whatever --max_image_pixels."""
    Image.fromarray(np.zeros((300, 300), np.uint8)).save(tmp_path / "m.png")
    for limit, expected in (
        (60_000, "declares 300 x 300 pixels, more than --max_image_pixels 60000"),
        (1_000, "exceeds"),
    ):
        with pytest.raises(DataError, match=f"m.png: .*{expected}"):
            segmentation.read_mask(tmp_path / "m.png", max_pixels=limit)
    assert segmentation.read_mask(tmp_path / "m.png", max_pixels=90_000).shape == (300, 300)


def test_jpeg_masks_are_refused_in_one_line(tmp_path):
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(tmp_path / "m.jpg")
    with pytest.raises(DataError) as e:
        segmentation.read_mask(tmp_path / "m.jpg")
    assert "JPEG masks are refused" in str(e.value) and "\n" not in str(e.value)


def test_reduce_zero_label_maps_nodata_to_ignore_and_shifts_the_rest():
    loveda = np.array([[0, 1, 2], [7, 255, 3]])
    assert segmentation.reduce_zero_label(loveda).tolist() == [[255, 0, 1], [6, 255, 2]]


def write_pair(root, stem, label, size=(8, 8), image_suffix=".jpg"):
    (root / "images").mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((*size, 3), 40 * label, dtype=np.uint8)).save(root / "images" / f"{stem}{image_suffix}")
    segmentation.write_mask(root / "masks" / f"{stem}.png", np.full(size, label))


def test_folders_are_matched_by_stem_and_a_csv_lists_pairs(tmp_path):
    for i, stem in enumerate(["b", "a", "c"]):
        write_pair(tmp_path / "set", stem, i)
    pairs = segmentation.find_pairs(tmp_path / "set")
    assert [(p.split("/")[-1], m.split("/")[-1]) for p, m in pairs] == [
        ("a.jpg", "a.png"),
        ("b.jpg", "b.png"),
        ("c.jpg", "c.png"),
    ]
    (tmp_path / "set" / "pairs.csv").write_text("image,mask\nimages/a.jpg,masks/a.png\nimages/c.jpg,masks/c.png\n")
    assert [p[1].split("/")[-1] for p in segmentation.find_pairs(tmp_path / "set" / "pairs.csv")] == ["a.png", "c.png"]
    (tmp_path / "set" / "masks" / "c.png").unlink()
    with pytest.raises(DataError, match="1 image.s. without a mask .first: c"):
        segmentation.find_pairs(tmp_path / "set")


def test_dataset_returns_normalised_image_and_int64_mask_and_checks_labels(tmp_path):
    write_pair(tmp_path / "set", "a", 2)
    dataset = segmentation.SegDataset(
        segmentation.find_pairs(tmp_path / "set"), segmentation.eval_transform((0, 0, 0), (1, 1, 1)), num_classes=3
    )
    image, mask = dataset[0]
    assert image.dtype == torch.float32 and image.shape == (3, 8, 8) and abs(image.max().item() - 80 / 255) < 0.02
    assert mask.dtype == torch.int64 and mask.unique().tolist() == [2]
    with pytest.raises(DataError, match=r"label\(s\) \[2\] outside 0..1"):
        segmentation.SegDataset(dataset.pairs, None, num_classes=2)[0]


def quadrants(size=64):
    """Image whose colour tells the label: labels 0 and 2 side by side (bilinear would invent 1), ignore (255) below."""
    colours = {0: (250, 0, 0), 2: (0, 0, 250), 255: (0, 250, 0)}
    mask = np.zeros((size, size), dtype=np.int64)
    mask[:, size // 2 :] = 2
    mask[size * 3 // 4 :, :] = 255
    image = np.zeros((size, size, 3), dtype=np.uint8)
    for label, colour in colours.items():
        image[mask == label] = colour
    return (
        tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1)),
        tv_tensors.Mask(torch.from_numpy(mask)),
        colours,
    )


@pytest.mark.parametrize("seed", range(6))
def test_joint_training_transform_keeps_labels_with_the_pixels(seed):
    image, mask, colours = quadrants()
    transform = segmentation.train_transform(48, (0, 0, 0), (1, 1, 1), scale=(0.1, 1.0))
    torch.manual_seed(seed)
    out_image, out_mask = transform(image, mask)
    assert out_image.shape == (3, 48, 48) and out_mask.shape == (48, 48) and out_mask.dtype == torch.int64
    assert set(out_mask.unique().tolist()) <= {0, 2, 255}  # nearest neighbour only: no label 1 between 0 and 2
    for label, colour in colours.items():
        where = out_mask == label
        if where.sum() < 20:
            continue
        expected = torch.tensor(colour, dtype=torch.float32).view(3, 1) / 255
        agrees = ((out_image[:, where] - expected).abs().max(0).values < 0.1).float().mean().item()
        assert agrees > 0.9, (label, agrees)  # pixel and label moved together (boundary pixels blend in the image only)


def test_padding_gives_the_mask_ignore_and_the_image_zeros():
    image = tv_tensors.Image(torch.full((3, 10, 12), 7, dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.ones(10, 12, dtype=torch.int64))
    padded_image, padded_mask = segmentation.PadTo(16, ignore_index=255)(image, mask)
    assert padded_mask.shape == (16, 16) and padded_image.shape == (3, 16, 16)
    assert (padded_mask[:10, :12] == 1).all() and (padded_mask[10:] == 255).all() and (padded_mask[:, 12:] == 255).all()
    assert (padded_image[:, 10:] == 0).all() and (padded_image[:, :10, :12] == 7).all()
