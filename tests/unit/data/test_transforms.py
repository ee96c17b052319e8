"""util/data/transforms.py: the per-image transforms and their on-device batch version."""

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from util.data import transforms
from util.data.datasets import build_dataset
from util.data.transforms import build_transform


def test_real_fmow_jpegs_decode_and_transform(fmow_samples):
    dataset = build_dataset(
        fmow_samples, "folder", build_transform(True, 64), draft_size=transforms.draft_size_for(True, 64)
    )
    img, _ = dataset[(0, 1234)]
    assert img.shape == (3, 64, 64) and img.dtype == torch.float32
    assert -3 < img.mean() < 3


def test_train_transform_crops_before_normalising_with_fmow_statistics():
    transform = build_transform(False, 32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    img = transform(Image.new("RGB", (64, 48), (255, 128, 0)))
    assert img.shape == (3, 32, 32)
    torch.testing.assert_close(img[:, 0, 0], torch.tensor([2.0, 0.0078, -2.0]), atol=1e-3, rtol=0)


def test_batch_augment_equals_crop_resize_and_flip_of_each_image():
    augment = transforms.BatchAugment(16, mean=(0.0, 0.0, 0.0), std=(1 / 255, 1 / 255, 1 / 255))
    images = torch.randint(0, 256, (6, 3, 32, 40), dtype=torch.uint8)
    torch.manual_seed(3)
    out = augment(images)
    torch.manual_seed(3)
    boxes = augment.sample_boxes(6, 32, 40)
    flips = torch.rand(2, 6) < 0.5
    for i, (left, top, right, bottom) in enumerate(boxes.int().tolist()):
        expected = v2.functional.resized_crop(
            images[i].float(),
            top,
            left,
            bottom - top,
            right - left,
            [16, 16],
            interpolation=v2.InterpolationMode.BILINEAR,
            antialias=False,
        )
        expected = expected.flip(-1) if flips[0, i] else expected
        expected = expected.flip(-2) if flips[1, i] else expected
        torch.testing.assert_close(out[i], expected, atol=1e-3, rtol=0)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (32 * 40)
    assert ((area >= 0.24) & (area <= 1.0)).all() and (boxes[:, 2] <= 40).all() and (boxes[:, 3] <= 32).all()


@pytest.mark.cuda
def test_batch_augment_on_the_gpu_equals_the_cpu_result(cuda_device):
    images = torch.randint(0, 256, (6, 3, 40, 40), dtype=torch.uint8)
    augment = transforms.BatchAugment(32, transforms.FMOW_RGB_MEAN, transforms.FMOW_RGB_STD)
    torch.manual_seed(3)
    on_cpu = augment(images)
    torch.manual_seed(3)  # boxes and flips come from the CPU generator either way
    pinned = images.pin_memory() if cuda_device.type == "cuda" else images
    on_gpu = augment.to(cuda_device)(pinned.to(cuda_device, non_blocking=True))
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
def test_uint16_thirteen_band_batches_with_nodata_on_the_gpu_equal_the_cpu_result(cuda_device):
    """Sentinel-2 L1C-like batches: 13 bands of uint16 with a no-data value; the filled pixels, the validity band and
    the normalisation on the device are the CPU's."""
    g = torch.Generator().manual_seed(4)
    images = torch.randint(0, 10000, (4, 13, 40, 40), generator=g, dtype=torch.int32).to(torch.uint16)
    images[:, :, :6, :9] = 0  # a no-data corner (every band)
    images[1, 5, 20:30, 20:30] = 0  # no-data in one band only: the pixel is no-data
    mean, std = [1500.0 + 100 * band for band in range(13)], [900.0 + 10 * band for band in range(13)]
    augment = transforms.BatchAugment(32, mean, std, value_scale=1.0, nodata=0)
    torch.manual_seed(5)
    on_cpu = augment(images)
    torch.manual_seed(5)
    on_device = augment.to(cuda_device)(images.to(cuda_device, non_blocking=True))
    assert on_device.device == cuda_device and on_cpu.shape == (4, 14, 32, 32)  # 13 bands + validity
    assert 0 < on_cpu[:, -1].mean() < 1  # some pixels valid, some not: the check means something
    torch.testing.assert_close(on_device.cpu(), on_cpu, atol=1e-4, rtol=1e-4)
