"""Per-pixel logistic regression on the band values: the floor a segmentation model must beat to mean anything.

    python tools/seg_baseline.py                       # the embedded sample: (R, G, B) -> water / vegetation / other
    python tools/seg_baseline.py --train_path potsdam/train --test_path potsdam/val --palette isprs --exclude_classes 5
    python tools/seg_baseline.py --in_chans 4 --band_stats stats.json --train_path s2/train --test_path s2/val

Protocol (the one ``main_segment.py`` evaluates with; the flags are its own, ``config.add_segmentation_data_args`` /
``config.add_segmentation_evaluation_args``):

- **Features**: each pixel's band values after the same reading and normalisation as ``main_segment.py`` (8-bit
  RGB: [0, 1] then fMoW-RGB mean / std; rasters: ``--band_stats`` or ``--mean`` / ``--std`` in the file's units);
  no neighbourhood, no position.
- **Training**: ``--pixels`` pixels drawn without replacement from the non-ignored pixels of the training images,
  as evenly over the images as they allow (``--seed``); scikit-learn's multinomial ``LogisticRegression`` (lbfgs,
  L2, ``--C``). Training images are used at full resolution, as the segmenters are.
- **Evaluation**: ``engine_segment.final_evaluation``: every ``--scales`` value (down-sample by area, up-sample back),
  the same classes counted (``--exclude_classes``, ``--eval_ignore_boundary``) and the mIoU's 95 % interval from a
  bootstrap over location blocks (``--block_pattern``). A class never seen in training is never predicted.

Writes seg_results.csv / .md, seg_confusion.json and the figures into ``--output_dir``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# before any third-party import: one error line where this Python lacks the requirements (util/__init__.py)
import util  # noqa: F401

# isort: split

import numpy as np
import torch
import torch.nn as nn

import engine_segment
from util import config
from util.data import segmentation
from util.errors import DataError
from util.eval import location_blocks
from util.run import process
from util.run.process import run_entry_point
from util.run.threads import configure_threads


class PixelLogistic(nn.Module):
    """A fitted ``LogisticRegression`` as a 1 x 1 convolution: [B, C, H, W] -> class logits [B, K, H, W].

    sklearn's multinomial model gives logits ``coef_ @ x + intercept_`` over its ``classes_`` (softmax = its
    ``predict_proba``); with two classes it stores one row, the logit of ``classes_[1]`` against ``classes_[0]``
    (logit 0). Classes absent from ``classes_`` get logit -inf: never predicted.
    """

    def __init__(self, fitted, num_classes: int) -> None:
        super().__init__()
        coef, intercept = np.asarray(fitted.coef_, dtype=np.float32), np.asarray(fitted.intercept_, dtype=np.float32)
        if len(fitted.classes_) == 2:
            coef, intercept = (
                np.concatenate([np.zeros_like(coef), coef]),
                np.concatenate([[0.0], intercept]).astype(np.float32),
            )
        self.conv = nn.Conv2d(coef.shape[1], num_classes, 1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.bias.fill_(-math.inf)
            index = torch.as_tensor(np.asarray(fitted.classes_, dtype=np.int64))
            self.conv.weight[index, :, 0, 0] = torch.from_numpy(coef)
            self.conv.bias[index] = torch.from_numpy(intercept)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def training_pixels(dataset: segmentation.SegDataset, budget: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """([P, C] float32 normalised band values, [P] int64 classes) of at most ``budget`` non-ignored pixels, drawn
    without replacement; each image gives an equal share (budget / images, or all its pixels when it has fewer).

    Raises:
        DataError: no labelled pixel in the training images.
    """
    rng = np.random.default_rng(seed)
    share = max(budget // len(dataset), 1)
    features, labels = [], []
    for index in range(len(dataset)):
        image, mask = dataset[index]  # [C, H, W] normalised, [H, W]
        valid = np.flatnonzero((mask != dataset.ignore_index).numpy().ravel())
        chosen = rng.choice(valid, size=min(share, len(valid)), replace=False)
        features.append(image.flatten(1)[:, chosen].T.numpy())
        labels.append(mask.flatten()[chosen].numpy())
    features, labels = np.concatenate(features), np.concatenate(labels)
    if not len(labels):
        raise DataError(f"{dataset.source or 'training set'}: no labelled (non-ignored) pixel to fit on")
    return features, labels


def fit(features: np.ndarray, labels: np.ndarray, C: float, max_iter: int):
    """scikit-learn ``LogisticRegression`` (multinomial, lbfgs, L2 penalty of strength 1 / ``C``).

    Raises:
        DataError: the pixels hold one class only.
    """
    from sklearn.linear_model import LogisticRegression

    if len(np.unique(labels)) < 2:
        raise DataError(f"the training pixels hold one class only ({int(labels[0])}): nothing to separate")
    return LogisticRegression(C=C, max_iter=max_iter).fit(features, labels)


def get_args_parser() -> config.Parser:
    parser = config.new_parser(config.summary(__doc__))
    config.add_segmentation_data_args(parser)
    config.add_segmentation_evaluation_args(parser)
    group = parser.add_argument_group("logistic regression")
    group.add_argument(
        "--pixels", type=int, default=200_000, help="training pixels drawn (spread evenly over the images)"
    )
    group.add_argument("--C", type=float, default=1.0, help="inverse L2 strength (scikit-learn's C)")
    group.add_argument("--max_iter", type=int, default=1000, help="lbfgs iterations")
    group.add_argument("--seed", type=int, default=0, help="seed of the pixel draw")
    group.add_argument("--output_dir", default="output/seg_baseline", help="folder of the tables and figures")
    return parser


def main(flags: config.Flags) -> None:
    config.check_segmentation_evaluation_flags(flags)
    bands = config.resolve_bands(flags)
    location_blocks.block_ids([], flags.block_pattern, flags.block_size)  # checks the pattern and the size
    print(configure_threads(), flush=True)
    class_names, palette = engine_segment.classes_of(flags)
    transform = segmentation.eval_transform(bands.mean, bands.std)
    train_set = engine_segment.dataset_of(
        flags.train_path, transform, bands, flags, len(class_names), palette, "training"
    )
    test_path = config.evaluation_path(flags.train_path, flags.test_path, split=False)
    val_set = engine_segment.dataset_of(test_path, transform, bands, flags, len(class_names), palette, "evaluation")
    evaluation = engine_segment.protocol(flags)
    engine_segment.evaluation_blocks(val_set, evaluation)  # before fitting
    features, labels = training_pixels(train_set, flags.pixels, flags.seed)
    fitted = fit(features, labels, flags.C, flags.max_iter)
    counts = np.bincount(labels, minlength=len(class_names))
    print(
        f"fitted on {len(labels):,} pixels of {len(train_set)} images "
        f"({', '.join(f'{n} {c:,}' for n, c in zip(class_names, counts))}), "
        f"{features.shape[1]} features; training accuracy {100 * fitted.score(features, labels):.2f}%",
        flush=True,
    )
    out = Path(flags.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    run = process.Run(0, 1, 0, torch.device("cpu"), None, out)
    model = PixelLogistic(fitted, len(class_names))
    engine_segment.final_evaluation(
        model,
        val_set,
        evaluation,
        bands,
        run,
        class_names,
        palette,
        out,
        "per-pixel logistic regression",
        flags.num_workers,
    )
    (out / "seg_baseline.json").write_text(
        json.dumps(
            {
                "pixels": int(len(labels)),
                "class_pixels": counts.tolist(),
                "C": flags.C,
                "seed": flags.seed,
                "coef": np.asarray(fitted.coef_).tolist(),
                "intercept": np.asarray(fitted.intercept_).tolist(),
                "classes": np.asarray(fitted.classes_).tolist(),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    run_entry_point(main, config.parse_args(get_args_parser()))
