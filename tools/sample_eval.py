"""Does pretraining help? Evaluate pretraining checkpoints against random init on the embedded sample.

    python tools/sample_eval.py output/pretrain_tiny/checkpoint-last.pth
    python tools/sample_eval.py output/pretrain_tiny_ms/checkpoint-last.pth --sample data/sentinel2_ms
    python tools/sample_eval.py output/pretrain_tiny_ms_rgb/checkpoint-last.pth --sample data/sentinel2_ms --bands 3 2 1

Protocol (fixed before looking at any checkpoint; the same for every model):

- **Data**: the 225 labelled tiles of ``--sample`` (train.csv + val.csv; default ``data/sentinel2_rgb``), at the
  checkpoint's input size through the evaluation transform (resize the shorter side to input / 0.875, centre crop).
  A sample with a ``band_stats.json`` (``data/sentinel2_ms``: 13 bands at 20 m) is read by
  ``util.data.images.read_raster``
  in the files' units and normalised per band by that file (bilinear resizing, as in raster pretraining); ``--bands``
  picks the bands the checkpoints take (e.g. ``3 2 1``: RGB of the 13-band sample). Otherwise 8-bit RGB, normalised
  with the fMoW-RGB mean and std.
- **Spatial cross-validation**: the scene is cut into 25 blocks of 3 x 3 tiles; fold f holds out the blocks with
  (block_row + 2 x block_col) mod 5 == f (fold 0 is the shipped val.csv). Every tile is evaluated exactly once,
  by a classifier that saw no tile of its block.
- **Classifiers** on frozen features (cls token of the last block, the encoder's final norm as in pretraining):
  weighted kNN (k = 20, T = 0.07, cosine; ``util/eval/knn.py``) and a linear probe (scikit-learn multinomial logistic
  regression on standardised features, C = 1).
- **Uncertainty**: neighbouring tiles are correlated, so accuracies get a 95 % interval from 2000 bootstrap
  resamples of the 25 blocks (not of the tiles); the gain over random init is bootstrapped paired, on the same
  resampled blocks.
- **Reconstruction** (held-out val.csv tiles, 5 fixed masks each): mean squared error on the masked patches of
  the original view in normalised pixels, against predicting each masked patch as the mean colour of the
  image's visible patches. With ``norm_pix_loss`` the prediction is per-patch standardised, so the error is
  taken in that space against predicting each patch's own mean (a stronger baseline: 0 there).

Writes ``sample_eval.md`` and ``sample_eval.json`` next to the first checkpoint (or to ``--output_dir``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models_cross_scale_mae as models_mae
from model_loading import load_mae
from util import config
from util.config import DEFAULT_TRAIN_CSV, FMOW_RGB_MEAN, FMOW_RGB_STD, HelpFormatter
from util.data.datasets import build_dataset
from util.data.transforms import build_raster_transform, build_transform, draft_size_for
from util.errors import UsageError
from util.eval import knn, location_blocks
from util.run.process import run_entry_point

FOLDS = 5
BOOTSTRAP = location_blocks.BOOTSTRAP


def tile_blocks(paths: list[str]) -> np.ndarray:
    """Block code (row block x 100 + column block) of each tile ``r{row}_c{col}.jpg``; blocks are 3 x 3 tiles
    (``util.eval.location_blocks``)."""
    pattern = location_blocks.compile_pattern(location_blocks.TILE_PATTERN)
    return np.array([100 * row + col for _, row, col in (location_blocks.block_of(p, pattern) for p in paths)])


def fold_of(block: int) -> int:
    return (block // 100 + 2 * (block % 100)) % FOLDS


@torch.no_grad()
def encode(mae: models_mae.CrossScaleMAE, images: torch.Tensor) -> np.ndarray:
    mae.eval()
    return np.concatenate(
        [knn.encoder_features(mae.encoder, batch, "cls", mae.encoder_norm).numpy() for batch in images.split(64)]
    )


def cross_validated_predictions(features: np.ndarray, labels: np.ndarray, folds: np.ndarray, classes: int) -> dict:
    """Out-of-fold predictions of weighted kNN and of the linear probe for every tile."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    predictions = {"kNN": np.empty(len(labels), dtype=int), "linear probe": np.empty(len(labels), dtype=int)}
    for fold in range(FOLDS):
        test, train = folds == fold, folds != fold
        memory, queries = torch.from_numpy(features[train]), torch.from_numpy(features[test])
        sims, neighbours = knn.topk_cosine(queries, memory, 20)
        predictions["kNN"][test] = knn.weighted_knn(
            sims, neighbours, torch.from_numpy(labels[train]), classes, 0.07
        ).numpy()
        scaler = StandardScaler().fit(features[train])
        probe = LogisticRegression(C=1.0, max_iter=5000).fit(scaler.transform(features[train]), labels[train])
        predictions["linear probe"][test] = probe.predict(scaler.transform(features[test]))
    return predictions


def bootstrap(
    correct: dict[str, np.ndarray], tile_block: np.ndarray, seed: int = 0
) -> dict[str, tuple[float, float, float]]:
    """(accuracy %, 2.5th, 97.5th percentile) of each entry, resampling blocks with replacement (the same
    resamples for every entry: ``util.eval.location_blocks.resample_blocks``)."""
    samples = {name: [] for name in correct}
    for chosen in location_blocks.resample_blocks(tile_block, BOOTSTRAP, seed):
        for name, values in correct.items():
            samples[name].append(100.0 * values[chosen].mean())
    return {
        name: (100.0 * correct[name].mean(), *location_blocks.percentile_interval(samples[name])) for name in correct
    }


@torch.no_grad()
def reconstruction_ratio(mae: models_mae.CrossScaleMAE, images: torch.Tensor, masks: int = 5) -> tuple[float, float]:
    """(masked-patch MSE of the model, of the mean-colour baseline) over ``masks`` fixed masks per image."""
    mae.eval()
    errors, baseline = [], []
    for seed in range(masks):
        noise = torch.rand(images.shape[0], mae.num_patches, generator=torch.Generator().manual_seed(seed))
        latent, mask, ids_restore = mae.forward_encoder(images, mae.mask_ratio, noise)
        _, pred = mae.forward_decoder(latent, ids_restore)  # [N, L, p*p*C]
        target = mae.patchify(images)
        if mae.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
            guess = torch.zeros_like(target)
        else:
            c = mae.in_chans
            pixels = target.reshape(*target.shape[:2], -1, c)  # [N, L, p*p, C]
            visible = (1 - mask)[..., None, None]
            colour = (pixels * visible).sum((1, 2)) / (visible.sum((1, 2)) * pixels.shape[2])  # [N, C]
            guess = colour[:, None, None, :].expand_as(pixels).reshape_as(target)
        per_patch = lambda p, target=target: ((p - target) ** 2).mean(-1)
        errors.append((per_patch(pred) * mask).sum() / mask.sum())
        baseline.append((per_patch(guess) * mask).sum() / mask.sum())
    return float(torch.stack(errors).mean()), float(torch.stack(baseline).mean())


def sample_reading(args: argparse.Namespace, size: int, in_chans: int) -> dict:
    """``build_dataset``'s transform, draft size and band reading: rasters normalised by the sample's
    ``band_stats.json`` where it has one (``--bands`` of its bands), else 8-bit RGB with the fMoW-RGB statistics.

    Raises:
        UsageError: --bands without band statistics, or bands (or RGB) other than the checkpoints' input channels.
    """
    stats = Path(args.sample) / "band_stats.json"
    if not stats.exists():
        if args.bands or in_chans != 3:
            raise UsageError(
                f"--sample {args.sample} has no band_stats.json: 8-bit RGB only, but the checkpoints take "
                f"{in_chans} band(s)" + (" and --bands was given" if args.bands else "")
            )
        return {
            "transform": build_transform(False, size, FMOW_RGB_MEAN, FMOW_RGB_STD),
            "draft_size": draft_size_for(False, size),
        }
    bands = config.resolve_bands(
        config.flags(
            in_chans=in_chans,
            bands=args.bands,
            mean=list(FMOW_RGB_MEAN),
            std=list(FMOW_RGB_STD),
            band_stats=str(stats),
            nodata=config.band_stats_source(str(stats)).get("nodata"),
            rgb_bands=None,
            checkpoint_rgb_bands=None,
            stretch=False,
            max_image_pixels=config.MAX_IMAGE_PIXELS,
        )
    )  # UsageError naming the file when counts differ
    return {"transform": build_raster_transform(False, size, bands.mean, bands.std), "bands": bands}


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    models = {}
    for path in args.checkpoints:
        mae, _ = load_mae(path)
        models[path] = mae
    first = models[args.checkpoints[0]]
    model_config = first.model_config
    torch.manual_seed(args.seed)
    models["random init"] = models_mae.create_model(model_config["name"], **model_config["kwargs"])
    sizes = {(m.encoder.patch_embed.img_size[0], m.in_chans) for m in models.values()}
    if len(sizes) != 1:
        raise UsageError(f"the checkpoints differ in input size or bands ({sorted(sizes)}); evaluate them separately")
    size = first.encoder.patch_embed.img_size[0]

    tiles = [
        build_dataset(Path(args.sample) / name, "auto", **sample_reading(args, size, first.in_chans))
        for name in ("train.csv", "val.csv")
    ]
    paths = [p for dataset in tiles for p, _ in dataset.samples]
    labels = np.array([label for dataset in tiles for label in dataset.targets])
    images = torch.stack([dataset[i][0] for dataset in tiles for i in range(len(dataset))])
    held_out = torch.arange(len(tiles[0]), len(paths))  # val.csv: never seen in train.sh's pretraining
    tile_block = tile_blocks(paths)
    folds = np.array([fold_of(b) for b in tile_block])
    classes = int(labels.max()) + 1

    correct, recon = {}, {}
    majority = np.bincount(labels).argmax()
    correct["majority class"] = labels == majority
    for name, mae in models.items():
        predictions = cross_validated_predictions(encode(mae, images), labels, folds, classes)
        for classifier, predicted in predictions.items():
            correct[f"{name} | {classifier}"] = predicted == labels
        recon[name] = reconstruction_ratio(mae, images[held_out])
    trained = [name for name in models if name != "random init"]
    gains = {
        f"{name} | {c} (gain)": correct[f"{name} | {c}"].astype(float) - correct[f"random init | {c}"]
        for name in trained
        for c in ("kNN", "linear probe")
    }
    stats = bootstrap({**correct, **gains}, tile_block)

    bands = f", bands {' '.join(map(str, args.bands))}" if args.bands else ""
    lines = [
        f"# Pretrained vs random init on {args.sample}{bands} ({len(labels)} tiles, {len(np.unique(tile_block))} "
        "blocks, "
        f"{FOLDS}-fold spatial CV, 95 % block-bootstrap intervals)",
        "",
        "| model | kNN top-1 (%) | linear probe top-1 (%) | masked-patch MSE / baseline |",
        "|---|---|---|---|",
    ]
    fmt = lambda s: f"{s[0]:.1f} [{s[1]:.1f}, {s[2]:.1f}]"
    for name in models:
        error, base = recon[name]
        lines.append(
            f"| {name} | {fmt(stats[f'{name} | kNN'])} | {fmt(stats[f'{name} | linear probe'])} | "
            f"{error:.3f} / {base:.3f} = **{error / base:.2f}** |"
        )
    lines.append(f"| majority class | {fmt(stats['majority class'])} | | |")
    lines += ["", "| gain over random init (points) | kNN | linear probe |", "|---|---|---|"]
    for name in trained:
        lines.append(
            f"| {name} | {fmt(stats[f'{name} | kNN (gain)'])} | {fmt(stats[f'{name} | linear probe (gain)'])} |"
        )
    baseline = (
        "each patch's own mean (norm_pix_loss)" if first.norm_pix_loss else "the mean colour of the visible patches"
    )
    lines += [
        "",
        f"Reconstruction: {len(held_out)} held-out tiles (val.csv), 5 masks each, mask ratio {first.mask_ratio}; "
        f"baseline = {baseline}.",
    ]
    table = "\n".join(lines)
    print(table, flush=True)
    out = Path(args.output_dir or Path(args.checkpoints[0]).parent)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sample_eval.md").write_text(table + "\n")
    (out / "sample_eval.json").write_text(
        json.dumps(
            {
                "sample": str(args.sample),
                "bands": args.bands,
                "accuracy": {k: list(v) for k, v in stats.items()},
                "reconstruction": {k: {"mse": e, "baseline": b, "ratio": e / b} for k, (e, b) in recon.items()},
            },
            indent=1,
        )
    )
    print(f"\nwritten: {out / 'sample_eval.md'}, {out / 'sample_eval.json'}", flush=True)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="pretraining checkpoints of one architecture and input size")
    parser.add_argument("--output_dir", default=None, help="default: the folder of the first checkpoint")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random-init encoder")
    parser.add_argument(
        "--sample",
        default=str(DEFAULT_TRAIN_CSV.parent),
        help="folder of the labelled sample (train.csv, val.csv, tiles named rRR_cCC; band_stats.json: rasters)",
    )
    parser.add_argument(
        "--bands",
        type=int,
        nargs="+",
        default=None,
        metavar="I",
        help="0-based bands of a raster sample the checkpoints take (default: all)",
    )
    return parser


if __name__ == "__main__":
    run_entry_point(main, get_args_parser().parse_args())
