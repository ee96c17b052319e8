"""util/eval/iou.py: IoU / F1 / OA on hand-made confusion matrices, ignored pixels, absent classes, sliding
window, and the resolution-degradation protocol."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from util.eval import inference, iou


def test_scores_on_a_hand_made_confusion_matrix_leave_out_a_class_absent_from_both():
    confusion = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])  # rows: truth; class 2 never occurs nor is predicted
    s = iou.scores(confusion)
    assert s["IoU"][0] == pytest.approx(75.0) and s["IoU"][1] == pytest.approx(200 / 3) and math.isnan(s["IoU"][2])
    assert s["mIoU"] == pytest.approx((75.0 + 200 / 3) / 2)
    assert s["F1"][0] == pytest.approx(600 / 7) and s["F1"][1] == pytest.approx(80.0)
    assert s["mF1"] == pytest.approx((600 / 7 + 80.0) / 2)
    assert s["OA"] == pytest.approx(500 / 6) and s["classes_counted"] == 2


def test_a_class_predicted_but_absent_from_the_ground_truth_counts_with_iou_zero():
    s = iou.scores(torch.tensor([[2, 1], [0, 0]]))
    assert s["IoU"] == pytest.approx([200 / 3, 0.0]) and s["mIoU"] == pytest.approx(100 / 3)


def test_excluded_classes_leave_the_means_but_keep_their_iou():
    confusion = torch.tensor([[4, 0, 0], [0, 1, 1], [0, 1, 1]])
    s = iou.scores(confusion, exclude=[2])
    assert s["mIoU"] == pytest.approx((100.0 + 100 / 3) / 2) and s["IoU"][2] == pytest.approx(100 / 3)
    assert s["OA"] == pytest.approx(600 / 8)  # overall accuracy counts every pixel


def test_confusion_matrix_skips_ignored_pixels():
    target = torch.tensor([[0, 1, 255], [2, 255, 1]])
    pred = torch.tensor([[0, 2, 1], [2, 0, 1]])
    confusion = iou.confusion_matrix(pred, target, 3, ignore_index=255)
    assert confusion.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 1]] and confusion.sum() == 4


def bincount_confusion(pred, target, num_classes, ignore_index):
    """The per-image matrix as it was computed before (boolean indexing + bincount: host synchronisations)."""
    valid = target != ignore_index
    index = target[valid] * num_classes + pred[valid]
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def test_batched_confusion_matrices_equal_the_per_image_bincount():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 5, (6, 17, 13), generator=g)
    target = torch.randint(0, 5, (6, 17, 13), generator=g)
    target[torch.rand(target.shape, generator=g) < 0.2] = 255
    target[4] = 255  # an image without a counted pixel
    batched = iou.confusion_matrices(pred, target, 5, ignore_index=255)
    expected = torch.stack([bincount_confusion(p, t, 5, 255) for p, t in zip(pred, target)])
    assert batched.dtype == torch.long and torch.equal(batched, expected) and batched[4].sum() == 0


@pytest.mark.cuda
def test_confusion_matrices_and_eroded_boundaries_on_the_gpu_never_wait_for_it(cuda_device):
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randint(0, 4, (3, 32, 32), generator=g), torch.randint(0, 4, (3, 32, 32), generator=g)
    target[:, :3] = 255
    pred_on_device, target_on_device = pred.to(cuda_device), target.to(cuda_device)  # copies wait: before the check
    if cuda_device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        eroded = iou.ignore_boundaries(target_on_device, 2, 4)
        on_device = iou.confusion_matrices(pred_on_device, eroded, 4)
    finally:
        if cuda_device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(on_device.cpu(), iou.confusion_matrices(pred, iou.ignore_boundaries(target, 2, 4), 4))


def test_window_starts_cover_the_side_and_end_flush():
    assert inference.window_starts(100, 32, 21) == [0, 21, 42, 63, 68]
    assert inference.window_starts(32, 32, 21) == [0] and inference.window_starts(20, 32, 21) == [0]


def test_sliding_window_equals_whole_image_inference_when_the_image_is_the_window():
    import models_vit
    from models_segmentation import Segmenter

    torch.manual_seed(0)
    encoder = models_vit.vision_transformer(**models_vit.PRESETS["tiny"].encoder(), img_size=32, patch_size=8)
    model = Segmenter(encoder, 3, decoder_channels=16).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        whole = model(images).softmax(1)
    torch.testing.assert_close(inference.sliding_window(model, images, 3, crop=32), whole)


def test_sliding_window_of_a_pointwise_model_equals_the_model_on_any_size():
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, 4, 1)  # translation-equivariant per pixel: every window agrees wherever they overlap
    for h, w in [(100, 70), (20, 45)]:  # larger than the crop; smaller on one side (padded)
        images = torch.randn(2, 3, h, w)
        with torch.no_grad():
            expected = model(images).softmax(1)
        got = inference.sliding_window(model, images, 4, crop=32, overlap=0.5, batch=3)
        assert got.shape == (2, 4, h, w)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_degrade_keeps_the_size_and_removes_detail():
    image = torch.zeros(1, 1, 16, 16)
    image[..., ::2, :] = 1.0  # one-pixel stripes
    assert torch.equal(inference.degrade(image, 1.0), image)
    half = inference.degrade(image, 0.5)
    assert half.shape == image.shape and torch.allclose(half, torch.full_like(image, 0.5))  # area averaging
    assert torch.allclose(inference.degrade(torch.full((1, 3, 20, 20), 0.3), 0.125), torch.full((1, 3, 20, 20), 0.3))


def _rank_confusion(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        pred, target = _whole_set()
        mine = range(
            rank, len(pred), 2
        )  # util.data.loaders.eval_loader's shards: rank 0 images 0, 2, 4; rank 1: 1, 3 (unequal)
        local = torch.stack([iou.confusion_matrix(pred[i], target[i], 4) for i in mine])
        torch.save({"local": local, "gathered": iou.gather_confusions(local)}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _whole_set():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (5, 9, 7), generator=g)
    target[target == 3] = 255  # class 3 only ever ignored
    return torch.randint(0, 4, (5, 9, 7), generator=g), target


def test_two_process_per_image_confusions_equal_one_process_on_the_whole_set(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_confusion, args=(port, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    pred, target = _whole_set()
    per_image = torch.stack([iou.confusion_matrix(p, t, 4) for p, t in zip(pred, target)])
    assert len(ranks[0]["local"]) == 3 and len(ranks[1]["local"]) == 2
    assert torch.equal(ranks[0]["gathered"], per_image) and torch.equal(
        ranks[1]["gathered"], per_image
    )  # in dataset order
    assert torch.equal(per_image.sum(0), iou.confusion_matrix(pred, target, 4))
    assert per_image.sum() == (target != 255).sum()


def test_ignore_boundaries_erodes_a_disc_around_class_changes_only():
    mask = torch.zeros(1, 15, 15, dtype=torch.long)
    mask[0, 7, 7] = 1  # one pixel of class 1 in class 0
    mask[0, 0, :] = 255  # ignored row: no class, erodes nothing
    out = iou.ignore_boundaries(mask, 2, 2)
    ys, xs = torch.nonzero(out[0] == 255, as_tuple=True)
    inside = {(y, x) for y, x in zip(ys.tolist(), xs.tolist()) if y > 0}
    assert inside == {(y, x) for y in range(15) for x in range(15) if (y - 7) ** 2 + (x - 7) ** 2 <= 4}  # a disc, r = 2
    assert (out[0, 0] == 255).all() and (out[0, 1] == 0).all()  # the row next to the ignored one stays
    assert torch.equal(iou.ignore_boundaries(mask, 0, 2), mask)
    assert (iou.ignore_boundaries(torch.ones(1, 5, 5, dtype=torch.long), 3, 2) == 1).all()  # image edges: no boundary


def test_block_bootstrap_interval_is_seeded_and_collapses_without_variation():
    same = torch.tensor([[8, 2], [1, 9]]).expand(6, 2, 2)
    low, high = iou.block_bootstrap_miou(same, np.array([0, 0, 1, 1, 2, 2]), resamples=50)
    assert low == pytest.approx(iou.scores(same[0])["mIoU"]) and high == pytest.approx(low)
    varied = torch.randint(0, 20, (6, 3, 3), generator=torch.Generator().manual_seed(0))
    blocks = np.array([0, 0, 1, 1, 2, 2])
    first = iou.block_bootstrap_miou(varied, blocks, resamples=100)
    assert first == iou.block_bootstrap_miou(varied, blocks, resamples=100) and first[0] < first[1]
    assert first != iou.block_bootstrap_miou(varied, blocks, resamples=100, seed=1)


def test_a_boundary_radius_beyond_the_image_diagonal_erodes_as_the_diagonal_without_a_huge_kernel():
    mask = torch.zeros(2, 20, 30, dtype=torch.long)
    mask[:, :, 17:] = 1
    mask[1, 0, 0] = 255
    eroded = iou.ignore_boundaries(mask, 36, 2)
    assert torch.equal(iou.ignore_boundaries(mask, 10**6, 2), eroded)  # 10**6: a (2e6 + 1)^2 kernel before
    assert (eroded == 255).all()


def test_boundary_erosion_ignores_a_convolutions_rounding(monkeypatch):
    """cuDNN may count the disc's pixels with an FFT / Winograd convolution: counts off by rounding must not make
    pixels boundaries (or not)."""
    mask = torch.zeros(1, 9, 9, dtype=torch.long)
    mask[0, :, 5:] = 1
    exact = iou.ignore_boundaries(mask, 2, 2)
    conv2d = iou.F.conv2d

    def rounded_off(*args, **kwargs):
        counts = conv2d(*args, **kwargs)
        return counts + torch.rand(counts.shape, generator=torch.Generator().manual_seed(0)) * 1e-3

    monkeypatch.setattr(iou.F, "conv2d", rounded_off)
    assert torch.equal(iou.ignore_boundaries(mask, 2, 2), exact)
    assert (exact[0, :, :3] == 0).all() and (exact[0, :, 3:7] == 255).all()  # erodes what it should, no more
