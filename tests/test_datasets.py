import numpy as np
import pytest
import torch
from PIL import Image
from conftest import make_image

from torchvision.transforms import v2

from util import datasets, loaders, transforms
from util.datasets import DataError, build_dataset
from util.images import load_image
from util.transforms import build_transform


def test_csv_labels_and_relative_paths(csv_dataset):
    dataset = build_dataset(csv_dataset, "fmow_rgb", build_transform(False, 32))
    assert len(dataset) == 8
    assert dataset.targets == [0, 1] * 4
    img, label = dataset[1]
    assert img.shape == (3, 32, 32) and label == 1
    assert dataset.samples[0][0] == str(csv_dataset.parent / "images" / "train_0.jpg")


def test_auto_detects_each_format(csv_dataset, image_folder, tmp_path):
    assert datasets.detect_dataset_type(csv_dataset) == "fmow_rgb"
    assert datasets.detect_dataset_type(image_folder) == "imagefolder"
    assert datasets.detect_dataset_type(image_folder / "dark") == "folder"


def test_image_folder_classes_and_unlabelled_folder(image_folder):
    labelled = build_dataset(image_folder, "auto")
    assert labelled.classes == ["bright", "dark"] and labelled.targets == [0, 0, 0, 1, 1, 1]
    unlabelled = build_dataset(image_folder, "folder")
    assert len(unlabelled) == 6 and set(unlabelled.targets) == {-1}


def test_grayscale_rgba_and_16_bit_images_become_rgb(tmp_path):
    Image.new("L", (20, 20), 100).save(tmp_path / "gray.png")
    Image.new("RGBA", (20, 20), (10, 20, 30, 0)).save(tmp_path / "rgba.png")
    ramp = (np.arange(400, dtype=np.uint16).reshape(20, 20) * 150)
    Image.fromarray(ramp).save(tmp_path / "sixteen.png")
    dataset = build_dataset(tmp_path, "folder")
    images = {p.split("/")[-1]: dataset[i][0] for i, (p, _) in enumerate(dataset.samples)}
    assert all(img.mode == "RGB" for img in images.values())
    assert images["gray.png"].getpixel((0, 0)) == (100, 100, 100)
    assert images["rgba.png"].getpixel((0, 0)) == (10, 20, 30)
    sixteen = np.asarray(images["sixteen.png"])
    assert sixteen.min() == 0 and sixteen.max() == 255


def test_real_fmow_jpegs_decode_and_transform(fmow_samples):
    dataset = build_dataset(fmow_samples, "folder", build_transform(True, 64), transforms.draft_size_for(True, 64))
    img, _ = dataset[(0, 1234)]
    assert img.shape == (3, 64, 64) and img.dtype == torch.float32
    assert -3 < img.mean() < 3


def test_train_transform_crops_before_normalising_with_fmow_statistics():
    transform = build_transform(False, 32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    img = transform(Image.new("RGB", (64, 48), (255, 128, 0)))
    assert img.shape == (3, 32, 32)
    torch.testing.assert_close(img[:, 0, 0], torch.tensor([2.0, 0.0078, -2.0]), atol=1e-3, rtol=0)


def test_seeded_samples_repeat_their_augmentation(csv_dataset):
    dataset = build_dataset(csv_dataset, "fmow_rgb", build_transform(True, 32))
    torch.manual_seed(0)
    first = dataset[(3, 42)][0]
    torch.manual_seed(1)
    again = dataset[(3, 42)][0]
    other = dataset[(3, 43)][0]
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_sampler_seeds_depend_on_epoch_and_skip_finished_batches(csv_dataset):
    dataset = build_dataset(csv_dataset, "fmow_rgb")
    sampler = loaders.SeededSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert sorted(i for i, _ in epoch0) == list(range(8)) and epoch0 != epoch1
    sampler.set_epoch(0)
    sampler.set_start(4)
    assert list(sampler) == epoch0[4:] and len(sampler) == 4


@pytest.mark.parametrize(
    "content, message",
    [
        ("label\n0\n", r"row 2: needs 2 columns \(label, image path\), found 1"),
        ("label,path\nwater,a.jpg\n", r"row 2: label 'water' in column 0 is not an integer"),
        ("label,path\n0,missing.jpg\n", r"1 image path\(s\) do not exist, first row 2: .*missing.jpg"),
        ("label,path\n", r"no images found"),
    ],
)
def test_bad_csv_files_are_named_with_the_row(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        build_dataset(path)


def test_corrupt_image_error_names_file_and_row(csv_dataset):
    image = csv_dataset.parent / "images" / "train_2.jpg"
    image.write_bytes(image.read_bytes()[:40])
    dataset = build_dataset(csv_dataset, "fmow_rgb", build_transform(False, 32))
    with pytest.raises(DataError, match=r"train_2.jpg \(row 4 of .*train.csv\): cannot read image"):
        dataset[2]


def test_missing_path_and_unknown_type(tmp_path):
    with pytest.raises(DataError, match="nowhere: no such file or folder"):
        build_dataset(tmp_path / "nowhere")
    with pytest.raises(DataError, match="--dataset_type 'naip' is not supported"):
        build_dataset(tmp_path, "naip")


def test_jpeg_draft_decodes_large_images_at_reduced_size(tmp_path):
    make_image(0, seed=1, size=512).save(tmp_path / "big.jpg")
    assert load_image(str(tmp_path / "big.jpg"), draft_size=100).size == (128, 128)
    assert load_image(str(tmp_path / "big.jpg")).size == (512, 512)


def test_batch_augment_equals_crop_resize_and_flip_of_each_image():
    augment = transforms.BatchAugment(16, mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))
    images = torch.randint(0, 256, (6, 3, 32, 40), dtype=torch.uint8)
    torch.manual_seed(3)
    out = augment(images)
    torch.manual_seed(3)
    boxes = augment.sample_boxes(6, 32, 40)
    flips = torch.rand(2, 6) < 0.5
    for i, (left, top, right, bottom) in enumerate(boxes.int().tolist()):
        expected = v2.functional.resized_crop(images[i].float(), top, left, bottom - top, right - left, [16, 16],
                                              interpolation=v2.InterpolationMode.BILINEAR, antialias=False)
        expected = expected.flip(-1) if flips[0, i] else expected
        expected = expected.flip(-2) if flips[1, i] else expected
        torch.testing.assert_close(out[i], expected, atol=1e-3, rtol=0)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (32 * 40)
    assert ((area >= 0.24) & (area <= 1.0)).all() and (boxes[:, 2] <= 40).all() and (boxes[:, 3] <= 32).all()
