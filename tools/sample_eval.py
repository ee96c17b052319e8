"""Does pretraining help? Pretraining checkpoints (several seeds per model) against random init and each other, on an
embedded sample.

    python tools/sample_eval.py output/pretrain_tiny/checkpoint-last.pth
    python tools/sample_eval.py output/budget/*_seed*/checkpoint-last.pth          # models x seeds: paired gains
    python tools/sample_eval.py output/pretrain_tiny_ms/checkpoint-last.pth --sample data/sentinel2_ms
    python tools/sample_eval.py rgb=output/pretrain_tiny_ms_rgb/checkpoint-last.pth --sample data/sentinel2_ms \
        --bands 3 2 1

Protocol (fixed before looking at any checkpoint; the same for every model):

- **Models and seeds**: checkpoints are grouped by their model (``model_config`` name, or ``LABEL=PATH``); the
  checkpoints of one model are its seeds, and must differ in ``--seed`` and in nothing of the recipe
  (``RECIPE_FLAGS``: schedule, learning rate, optimiser, input and its statistics, masking, losses, ``--init``;
  flags only one of them records are not compared), and hold other weights: else label them apart. The random
  baseline is the encoder's own architecture (``models_vit``: width, depth, heads, patch, input size, bands)
  initialised with ``--init_seeds`` seeds (0, 1, ...): it does not depend on which pretraining model or checkpoint is
  listed. Its final LayerNorm is treated as the checkpoints' (applied only where pretraining applied it,
  ``--encoder_norm``).
- **Data**: the 225 labelled tiles of ``--sample`` (train.csv + val.csv; default ``data/sentinel2_rgb``), at the
  checkpoints' input size through the evaluation transform (resize the shorter side to input / 0.875, centre crop).
  A sample with a ``band_stats.json`` (``data/sentinel2_ms``) is read in the files' units and normalised per band by
  that file; ``--bands`` picks the bands the checkpoints take. Otherwise 8-bit RGB with the fMoW-RGB statistics.
- **Numerics**: features are computed in float64 with the encoder in float64 (autocast off), and the probe is fitted
  to convergence (``PROBE_TOL``): the table is the same on CPUs with other kernels (AVX2 or AVX-512, bf16 or not) up
  to float64 rounding; a rounding difference would have to move a tile onto a decision boundary to change a number.
- **Spatial cross-validation**: the scene is cut into 25 blocks of 3 x 3 tiles; fold f holds out the blocks with
  (block_row + 2 x block_col) mod 5 == f (fold 0 is the shipped val.csv). Every tile is evaluated exactly once,
  by classifiers that saw no tile of its block.
- **Classifiers** on frozen features (cls token of the last block): weighted kNN (k = 20, T = 0.07, cosine;
  ``util/eval/knn.py``); a linear probe (scikit-learn multinomial logistic regression on standardised features,
  C = 1); and the multi-scale kNN of Scale-MAE: the held-out tiles area down-sampled to each ``--scales`` fraction
  and resized back (bicubic), the memory tiles at full resolution.
- **Uncertainty**: neighbouring tiles are correlated, and a second pretraining run would differ, so a 95 % interval
  comes from 2000 hierarchical bootstrap resamples: the 25 blocks with replacement (not the tiles) and, within each
  model, its seeds with replacement. A model's accuracy is the mean over its seeds; gains between two models are
  paired over the same resampled blocks.
- **Reconstruction** (held-out val.csv tiles, 5 fixed masks each): masked-patch MSE of the original view in
  normalised pixels against predicting each masked patch as the mean colour of the image's visible patches; with
  ``norm_pix_loss`` in the standardised space against predicting each patch's own mean (0 there).
- **Complete runs only**: a checkpoint that did not finish its schedule (stopped, or an intermediate one) is
  refused, naming its epoch of the schedule, unless ``--allow_partial`` (then the table says PARTIAL).

Writes ``sample_eval.md``, ``sample_eval.json`` and ``sample_eval_scales.png`` next to the first checkpoint (or to
``--output_dir``).
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from util import config

FOLDS = 5
K, TEMPERATURE = 20, 0.07  # weighted kNN (InstDisc / Scale-MAE)
PROBE_C, PROBE_TOL, PROBE_ITERATIONS = 1.0, 1e-10, 100_000  # fitted to convergence: the optimum is unique
SCALES = (0.125, 0.25, 0.5, 1.0)


def get_args_parser() -> config.Parser:
    parser = config.new_parser(config.summary(__doc__))
    parser.add_argument(
        "checkpoints",
        nargs="+",
        metavar="[LABEL=]PATH",
        help="pretraining checkpoints of one encoder architecture; one model's checkpoints are its seeds",
    )
    parser.add_argument(
        "--sample",
        default=str(config.DEFAULT_TRAIN_CSV.parent),
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
    parser.add_argument("--init_seeds", type=int, default=5, help="seeds of the random-init baseline (0, 1, ...)")
    parser.add_argument(
        "--scales",
        type=float,
        nargs="+",
        default=list(SCALES),
        help="multi-scale kNN: fractions of the side the held-out tiles are down-sampled to",
    )
    parser.add_argument("--bootstrap", type=int, default=config.BOOTSTRAP, help="hierarchical bootstrap resamples")
    parser.add_argument(
        "--allow_partial",
        action="store_true",
        help="evaluate checkpoints that did not finish their schedule (marked PARTIAL)",
    )
    parser.add_argument("--output_dir", default=None, help="folder of the outputs (default: the first checkpoint's)")
    return parser


def main(flags: config.Flags) -> None:
    """Check the flags, then evaluate (torch and scikit-learn load after the flags are known to work)."""
    if flags.init_seeds < 1 or flags.bootstrap < 1:
        raise config.UsageError("--init_seeds and --bootstrap must be at least 1")
    if any(not 0 < s <= 1 for s in flags.scales):
        raise config.UsageError(f"--scales must lie in (0, 1], got {' '.join(map(str, flags.scales))}")
    if flags.bands and min(flags.bands) < 0:
        raise config.UsageError(f"--bands are 0-based indices, got {' '.join(map(str, flags.bands))}")
    for spec in flags.checkpoints:
        path = Path(split_spec(spec)[1])
        if not path.is_file():
            raise config.UsageError(f"{path.resolve()}: no such checkpoint file")
    evaluate(flags)


def split_spec(spec: str) -> tuple[str, str]:
    """``LABEL=PATH`` -> (LABEL, PATH); a plain path -> ("", PATH) (the label is then the checkpoint's model name)."""
    label, sep, path = spec.partition("=")
    return (label, path) if sep and not Path(spec).exists() else ("", spec)


# The pretraining flags that make a recipe: the checkpoints of one model must agree on them (``args`` of our
# checkpoints), or they are not seeds of one model. ``lr`` is the rate used (``--lr``, or ``--blr`` scaled by the
# effective batch); ``mean`` / ``std`` / ``nodata`` / ``stretch`` how pixels became inputs. Paths, workers, devices,
# autocast and logging are not part of it.
RECIPE_FLAGS = (
    "epochs", "warmup_epochs", "lr", "blr", "min_lr", "weight_decay", "clip_grad", "input_size", "patch_size",
    "in_chans", "bands", "mean", "std", "nodata", "stretch", "mask_ratio", "norm_pix_loss", "loss_weights",
    "scale_range", "crop_mode", "contrastive", "temperature", "gather_negatives", "sync_bn", "encoder_norm",
    "norm_style", "init", "checkpoint_rgb_bands",
)  # fmt: skip


def recipe(args: dict) -> dict:
    """The recipe of a pretraining run (those of ``RECIPE_FLAGS`` its checkpoint's ``args`` record, and the effective
    batch) from its checkpoint's ``args``."""
    out = {flag: args[flag] for flag in RECIPE_FLAGS if flag in args}
    if "batch_size" in args:
        out["effective batch"] = args["batch_size"] * args.get("accum_iter", 1) * args.get("world_size", 1)
    return out


@dataclass
class Model:
    """A model and its seeds: ``encoders`` (float64, eval mode) and what each checkpoint saw of its schedule."""

    label: str
    encoders: list = field(default_factory=list)
    final_norms: list[bool] = field(default_factory=list)
    schedules: list[str] = field(default_factory=list)
    maes: list = field(default_factory=list)  # for the reconstruction column; none for random init
    partial: bool = False
    # (path, args or None, model_config name) of each of ``encoders``
    runs: list[tuple[str, dict | None, str]] = field(default_factory=list)

    def check_seed(self, path: str, args: dict | None, encoder, name: str) -> None:
        """Refuse ``path`` (``args``: its run's flags, None for upstream's checkpoints, which record none; ``encoder``:
        its weights; ``name``: its ``model_config`` name) as one more seed of this model where an earlier checkpoint of
        it is another model (a ``LABEL`` given to two), has the same weights (the same file twice, or a copy), the same
        ``--seed``, or another recipe (``RECIPE_FLAGS``; flags only one of the two records are not compared): two runs
        of different recipes averaged as seeds make a table of neither (``all`` and ``adapted`` runs of one model name
        were), and one run counted twice narrows the interval.

        Raises:
            UsageError: naming both checkpoints and what they share or where they differ.
        """
        import torch

        from util.run.checkpoint import same_flag_value

        label = Path(path).parent.name or Path(path).resolve().parent.name
        advice = f"label each (LABEL=PATH, e.g. {label.replace('=', '-')}={path}) to compare them as models"
        weights = encoder.state_dict()
        for (other, seen, other_name), earlier in zip(self.runs, self.encoders):
            if name != other_name:
                raise config.UsageError(
                    f"{other} ({other_name}) and {path} ({name}) are both labelled {self.label}: not seeds of one "
                    "model; give each model its own label"
                )
            if args is not None and seen is not None and "seed" in args and args["seed"] == seen.get("seed"):
                raise config.UsageError(
                    f"{other} and {path} are both {self.label} with --seed {args['seed']}: not two seeds of one "
                    f"model; {advice}"
                )
            then, now = recipe(seen or {}), recipe(args or {})
            in_chans = now.get("in_chans", then.get("in_chans"))
            differ = [k for k in now if k in then and not same_flag_value(k, then[k], now[k], in_chans)]
            if differ:
                shown = ", ".join(f"{k} {then[k]} / {now[k]}" for k in differ)
                raise config.UsageError(
                    f"{other} and {path} are both {self.label} but pretrained differently ({shown}): not seeds of "
                    f"one model; {advice}"
                )
            if all(torch.equal(value, weights[name]) for name, value in earlier.state_dict().items()):
                raise config.UsageError(
                    f"{other} and {path} hold the same weights: not two seeds of {self.label} (one checkpoint given "
                    "twice, or a copy of it)"
                )
        self.runs.append((path, args, name))


def load_models(flags: config.Flags) -> list[Model]:
    """The checkpoints grouped by model (``LABEL=PATH`` or the checkpoint's model name), in the order given.

    Raises:
        UsageError: a checkpoint that did not finish its schedule (without --allow_partial); two checkpoints of one
            model with the same seed or different recipes (``Model.check_seed``).
        CheckpointError: unreadable or foreign checkpoints.
    """
    from model_loading import load_mae
    from util.run import checkpoint

    models: dict[str, Model] = {}
    for spec in flags.checkpoints:
        label, path = split_spec(spec)
        state = checkpoint.read_checkpoint(path)
        schedule, complete = checkpoint.schedule_seen(state)
        if not complete and not flags.allow_partial:
            raise config.UsageError(
                f"{path}: saw {schedule} of its schedule: not a finished run; continue it (--resume auto) or give "
                "--allow_partial to evaluate it anyway (marked PARTIAL)"
            )
        mae, _ = load_mae(path)
        model = models.setdefault(label or mae.model_config["name"], Model(label or mae.model_config["name"]))
        encoder = copy.deepcopy(mae.encoder).double().eval()  # the MAE stays float32
        args = state.get("args")
        # upstream's checkpoints record no flags
        model.check_seed(path, args if isinstance(args, dict) else None, encoder, mae.model_config["name"])
        model.encoders.append(encoder)
        model.final_norms.append(mae.encoder_norm)
        model.schedules.append(schedule)
        model.maes.append(mae)
        model.partial |= not complete
    return list(models.values())


def random_init(reference, seeds: int, final_norm: bool) -> Model:
    """The random baseline: ``reference``'s encoder architecture (``models_vit``), initialised by ``torch.manual_seed``
    of each seed; independent of which pretraining model the checkpoints are."""
    import torch

    import models_vit

    shape = dict(
        img_size=reference.patch_embed.img_size[0],
        patch_size=reference.patch_embed.patch_size[0],
        in_chans=reference.patch_embed.proj.in_channels,
        embed_dim=reference.embed_dim,
        depth=len(reference.blocks),
        num_heads=reference.blocks[0].attn.num_heads,
        num_classes=0,
    )
    model = Model(f"random init ({models_vit.shape_text(reference)}; {seeds} init seeds)")
    for seed in range(seeds):
        torch.manual_seed(seed)
        model.encoders.append(models_vit.vision_transformer(**shape).double().eval())
        model.final_norms.append(final_norm)
        model.schedules.append(f"init seed {seed}")
    return model


def sample_reading(flags: config.Flags, size: int, in_chans: int) -> dict:
    """``build_dataset``'s transform, draft size and band reading: rasters normalised by the sample's
    ``band_stats.json`` where it has one (``--bands`` of its bands), else 8-bit RGB with the fMoW-RGB statistics.

    Raises:
        UsageError: --bands without band statistics, or bands (or RGB) other than the checkpoints' input channels.
    """
    from util.data.transforms import build_raster_transform, build_transform, draft_size_for

    stats = Path(flags.sample) / "band_stats.json"
    if not stats.exists():
        if flags.bands or in_chans != 3:
            raise config.UsageError(
                f"--sample {flags.sample} has no band_stats.json: 8-bit RGB only, but the checkpoints take "
                f"{in_chans} band(s)" + (" and --bands was given" if flags.bands else "")
            )
        return {"transform": build_transform(False, size), "draft_size": draft_size_for(False, size)}
    bands = config.resolve_bands(
        config.flags(
            in_chans=in_chans,
            bands=flags.bands,
            mean=list(config.FMOW_RGB_MEAN),
            std=list(config.FMOW_RGB_STD),
            band_stats=str(stats),
            nodata=config.band_stats_source(str(stats)).get("nodata"),
            rgb_bands=None,
            checkpoint_rgb_bands=None,
            stretch=False,
            max_image_pixels=config.MAX_IMAGE_PIXELS,
        )
    )  # UsageError naming the file when counts differ
    return {"transform": build_raster_transform(False, size, bands.mean, bands.std), "bands": bands}


def tile_blocks(paths: list[str]) -> np.ndarray:
    """Block code (row block x 100 + column block) of each tile ``r{row}_c{col}``; blocks are 3 x 3 tiles
    (``util.eval.location_blocks``).

    Raises:
        DataError: a tile whose name is not ``rRR_cCC``: the sample's layout decides the folds.
    """
    import numpy as np

    from util.errors import DataError
    from util.eval import location_blocks

    pattern = location_blocks.compile_pattern(config.TILE_PATTERN)
    codes = []
    for path in paths:
        block = location_blocks.block_of(path, pattern)
        if block[0] != "grid":
            raise DataError(
                f"{path}: tiles of a sample are named rRR_cCC (row, column), which decide its spatial "
                "folds and blocks; this name is not"
            )
        codes.append(100 * block[1] + block[2])
    return np.array(codes)


def fold_of(block: int) -> int:
    return (block // 100 + 2 * (block % 100)) % FOLDS


def check_folds(labels: np.ndarray, folds: np.ndarray, sample: str) -> None:
    """Refuse a ``--sample`` the out-of-fold evaluation cannot score: an unlabelled tile (label < 0), or a fold whose
    other folds hold fewer than 2 classes (nothing to tell apart: the kNN has no neighbour, the probe cannot fit).

    Raises:
        DataError: naming the sample, and the fold and its tiles.
    """
    import numpy as np

    from util.errors import DataError

    if labels.min() < 0:
        raise DataError(
            f"--sample {sample}: {int((labels < 0).sum())} tile(s) labelled {int(labels.min())} (unlabelled) in "
            "train.csv / val.csv: every tile of a sample needs its class (0, 1, ...)"
        )
    for fold in np.unique(folds):
        learned = labels[folds != fold]
        if len(np.unique(learned)) < 2:
            raise DataError(
                f"--sample {sample}: fold {fold} ({int((folds == fold).sum())} tile(s)) would be scored by "
                f"{len(learned)} tile(s) of {len(np.unique(learned))} class(es) outside it: a sample needs tiles of at "
                f"least 2 classes outside each spatial fold (blocks of 3 x 3 tiles rRR_cCC, fold = (block row + 2 x "
                f"block column) mod {FOLDS})"
            )


def features(encoder, final_norm: bool, images, scale: float = 1.0):
    """L2-normalised cls features [N, D] (float64) of ``images`` [N, C, S, S] area down-sampled to ``scale`` x S and
    resized back (the multi-scale kNN protocol)."""
    import torch

    from util.eval import knn

    with torch.no_grad():
        patch = encoder.patch_embed.patch_size[0]
        return torch.cat(
            [
                knn.encoder_features(encoder, knn.rescale(batch, scale, patch, "resize"), "cls", final_norm)
                for batch in images.split(64)
            ]
        ).double()


def predictions(memory_features, query_features, labels, folds, classes: int) -> np.ndarray:
    """Out-of-fold weighted kNN predictions of every tile: memory = the other folds at full resolution."""
    import numpy as np
    import torch

    from util.eval import knn

    predicted = np.empty(len(labels), dtype=int)
    for fold in np.unique(folds):  # a small --sample may leave a fold without tiles
        test, train = folds == fold, folds != fold
        sims, neighbours = knn.topk_cosine(query_features[test], memory_features[train], K)
        predicted[test] = knn.weighted_knn(
            sims, neighbours, torch.from_numpy(labels[train]), classes, TEMPERATURE
        ).numpy()
    return predicted


def probe_predictions(feature_rows, labels, folds) -> np.ndarray:
    """Out-of-fold predictions of the linear probe (standardised features, multinomial logistic regression, C = 1,
    fitted to convergence)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    values = feature_rows.numpy()
    predicted = np.empty(len(labels), dtype=int)
    for fold in np.unique(folds):
        test, train = folds == fold, folds != fold
        scaler = StandardScaler().fit(values[train])
        probe = LogisticRegression(C=PROBE_C, tol=PROBE_TOL, max_iter=PROBE_ITERATIONS)
        probe.fit(scaler.transform(values[train]), labels[train])
        predicted[test] = probe.predict(scaler.transform(values[test]))
    return predicted


def reconstruction_ratio(mae, images, masks: int = 5) -> tuple[float, float]:
    """(masked-patch MSE of the model, of the baseline) over ``masks`` fixed masks per image (float32, no autocast)."""
    import torch

    mae.eval()
    errors, baseline = [], []
    with torch.no_grad():
        for seed in range(masks):
            noise = torch.rand(images.shape[0], mae.num_patches, generator=torch.Generator().manual_seed(seed))
            latent, mask, ids_restore = mae.forward_encoder(images, mae.mask_ratio, noise)
            _, pred = mae.forward_decoder(latent, ids_restore)  # [N, L, p*p*C]
            target = mae.patchify(images)
            if mae.norm_pix_loss:
                target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
                guess = torch.zeros_like(target)
            else:
                pixels = target.reshape(*target.shape[:2], -1, mae.in_chans)  # [N, L, p*p, C]
                visible = (1 - mask)[..., None, None]
                colour = (pixels * visible).sum((1, 2)) / (visible.sum((1, 2)) * pixels.shape[2])  # [N, C]
                guess = colour[:, None, None, :].expand_as(pixels).reshape_as(target)
            for values, out in ((pred, errors), (guess, baseline)):
                out.append((((values - target) ** 2).mean(-1) * mask).sum() / mask.sum())
    return float(torch.stack(errors).mean()), float(torch.stack(baseline).mean())


def hierarchical_bootstrap(
    correct: dict[str, np.ndarray],
    tile_block,
    resamples: int,
    pairs: list[tuple[str, str]],
    seed: int = 0,
) -> dict[str, tuple[float, float, float]]:
    """(mean %, 2.5th, 97.5th percentile) of each model's accuracy and of each pair's gain.

    ``correct[model]``: [seeds, tiles] booleans. Each resample draws the location blocks with replacement (the same
    draw for every model: gains are paired over blocks) and, per model, its seeds with replacement; a model's
    accuracy is the mean over its drawn seeds of the accuracy on the drawn tiles.
    """
    import numpy as np

    from util.eval import location_blocks

    rng = np.random.default_rng(seed)
    samples = {name: [] for name in correct}
    for chosen in location_blocks.resample_blocks(tile_block, resamples, seed):
        for name, values in correct.items():
            drawn = values[rng.integers(0, len(values), len(values))]
            samples[name].append(100.0 * drawn[:, chosen].mean())
    out = {
        name: (100.0 * values.mean(), *location_blocks.percentile_interval(samples[name]))
        for name, values in correct.items()
    }
    for a, b in pairs:
        gain = np.subtract(samples[a], samples[b])
        out[f"{a} - {b}"] = (out[a][0] - out[b][0], *location_blocks.percentile_interval(gain))
    return out


def evaluate(flags: config.Flags) -> None:
    """Evaluate every model (seeds) and the random baseline; write and print the tables.

    Raises:
        UsageError: checkpoints of different encoder architectures, input sizes or bands; partial runs.
        DataError: a sample whose tiles are not named rRR_cCC.
    """
    import numpy as np
    import torch

    from util.data.datasets import build_dataset
    from util.eval.figures import save_accuracy_vs_scale

    models = load_models(flags)
    shapes = {
        (tuple(e.pos_embed.shape), e.patch_embed.patch_size, e.patch_embed.proj.in_channels)
        for m in models
        for e in m.encoders
    }
    if len(shapes) != 1:
        raise config.UsageError(
            f"the checkpoints differ in encoder width, input size, patch or bands ({sorted(shapes)}); "
            "evaluate them separately"
        )
    reference = models[0].encoders[0]
    final_norms = {norm for m in models for norm in m.final_norms}
    baseline = random_init(reference, flags.init_seeds, final_norm=final_norms == {True})
    everything = [*models, baseline]
    size, in_chans = reference.patch_embed.img_size[0], reference.patch_embed.proj.in_channels

    tiles = [
        build_dataset(Path(flags.sample) / name, "auto", **sample_reading(flags, size, in_chans))
        for name in ("train.csv", "val.csv")
    ]
    paths = [p for dataset in tiles for p, _ in dataset.samples]
    labels = np.array([label for dataset in tiles for label in dataset.targets])
    images = torch.stack([dataset[i][0] for dataset in tiles for i in range(len(dataset))])  # [N, C, S, S]
    held_out = torch.arange(len(tiles[0]), len(paths))  # val.csv: never seen in train.sh's pretraining
    tile_block = tile_blocks(paths)
    folds = np.array([fold_of(b) for b in tile_block])
    check_folds(labels, folds, flags.sample)
    classes = int(labels.max()) + 1
    scales = sorted(set(flags.scales) | {1.0})

    correct: dict[str, np.ndarray] = {"majority class": (labels == np.bincount(labels).argmax())[None]}
    for model in everything:
        per_seed = {("kNN",): [], ("linear probe",): [], **{("kNN", s): [] for s in scales}}
        for encoder, final_norm in zip(model.encoders, model.final_norms):
            full = features(encoder, final_norm, images.double())
            per_seed[("kNN",)].append(predictions(full, full, labels, folds, classes) == labels)
            per_seed[("linear probe",)].append(probe_predictions(full, labels, folds) == labels)
            for scale in scales:
                query = full if scale == 1.0 else features(encoder, final_norm, images.double(), scale)
                per_seed[("kNN", scale)].append(predictions(full, query, labels, folds, classes) == labels)
        for key, rows in per_seed.items():
            correct[" | ".join([model.label, *map(str, key)])] = np.stack(rows)
        mean_scales = np.mean([np.stack(per_seed[("kNN", s)]) for s in scales], axis=0)
        correct[f"{model.label} | multi-scale kNN mean"] = mean_scales
    recon = {m.label: np.mean([reconstruction_ratio(mae, images[held_out]) for mae in m.maes], axis=0) for m in models}

    names = [m.label for m in everything]
    pairs = [
        (f"{a} | {c}", f"{b} | {c}")
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        for c in ("kNN", "linear probe", "multi-scale kNN mean")
    ]
    stats = hierarchical_bootstrap(correct, tile_block, flags.bootstrap, pairs)
    per_seed_accuracy = {name: (100.0 * values.mean(axis=1)).tolist() for name, values in correct.items()}
    write_report(flags, everything, stats, per_seed_accuracy, recon, scales, len(labels), tile_block, held_out)
    out = output_dir(flags)
    save_accuracy_vs_scale(
        {m.label: [stats[f"{m.label} | kNN | {s}"] for s in scales] for m in everything},
        scales,
        out / "sample_eval_scales.png",
        title=f"multi-scale kNN on {Path(flags.sample).name} ({len(labels)} tiles, {FOLDS}-fold spatial CV)",
        ylabel="weighted kNN top-1 (%), 95 % interval (blocks and seeds)",
        one_sample=100.0 / len(labels),
    )


def output_dir(flags: config.Flags) -> Path:
    out = Path(flags.output_dir or Path(split_spec(flags.checkpoints[0])[1]).parent)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_report(
    flags,
    models: list[Model],
    stats: dict,
    per_seed: dict,
    recon: dict,
    scales: list[float],
    tiles: int,
    tile_block,
    held_out,
) -> None:
    """``sample_eval.md`` (printed too) and ``sample_eval.json``."""
    import numpy as np

    from util.files import write_atomically

    fmt = lambda s: f"{s[0]:.1f} [{s[1]:.1f}, {s[2]:.1f}]"
    spread = lambda key: " ".join(f"{v:.1f}" for v in per_seed[key])
    bands = f", bands {' '.join(map(str, flags.bands))}" if flags.bands else ""
    sample = config.repository_relative(flags.sample) or flags.sample  # the same heading on every clone
    lines = [
        f"# Pretraining checkpoints vs random init on {sample}{bands}",
        "",
        f"{tiles} tiles in {len(np.unique(tile_block))} location blocks, {FOLDS}-fold spatial cross-validation; "
        f"95 % intervals from {flags.bootstrap} hierarchical bootstrap resamples (blocks, then each model's seeds); "
        "features in float64.",
        "",
        "| model | seeds (schedule seen) | kNN top-1 (%) | linear probe top-1 (%) | multi-scale kNN, mean (%) | "
        "masked-patch MSE / baseline |",
        "|---|---|---|---|---|---|",
    ]
    for model in models:
        schedule = sorted(set(model.schedules)) if model.maes else []
        seen = f"{len(model.encoders)} ({', '.join(schedule)})" if schedule else f"{len(model.encoders)} init seeds"
        error = f"{recon[model.label][0] / recon[model.label][1]:.2f}" if model.label in recon else ""
        label = model.label + (" **PARTIAL**" if model.partial else "")
        lines.append(
            f"| {label} | {seen} | {fmt(stats[f'{model.label} | kNN'])} | "
            f"{fmt(stats[f'{model.label} | linear probe'])} | {fmt(stats[f'{model.label} | multi-scale kNN mean'])} "
            f"| {error} |"
        )
    lines.append(f"| majority class | | {fmt(stats['majority class'])} | | | |")
    lines += ["", "Per seed (kNN top-1 / linear probe, %):", ""]
    for model in models:
        lines.append(
            f"- {model.label}: kNN {spread(f'{model.label} | kNN')}; probe {spread(f'{model.label} | linear probe')}"
        )
    lines += [
        "",
        "Multi-scale kNN: held-out tiles down-sampled to each fraction of the side (%):",
        "",
        "| model | " + " | ".join(f"{s:g}" for s in scales) + " |",
        "|---|" + "---|" * len(scales),
    ]
    for model in models:
        lines.append(
            f"| {model.label} | " + " | ".join(fmt(stats[f"{model.label} | kNN | {s}"]) for s in scales) + " |"
        )
    lines += [
        "",
        "Gains (points; first minus second, paired over blocks; an interval that excludes 0 resolves it):",
        "",
        "| comparison | kNN | linear probe | multi-scale kNN mean |",
        "|---|---|---|---|",
    ]
    names = [m.label for m in models]
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            cells = [fmt(stats[f"{a} | {c} - {b} | {c}"]) for c in ("kNN", "linear probe", "multi-scale kNN mean")]
            lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    first_mae = next((m.maes[0] for m in models if m.maes), None)
    if first_mae is not None:
        guess = (
            "each patch's own mean (norm_pix_loss)"
            if first_mae.norm_pix_loss
            else "the mean colour of the visible patches"
        )
        lines += [
            "",
            f"Reconstruction: {len(held_out)} held-out tiles (val.csv), 5 masks each, mask ratio "
            f"{first_mae.mask_ratio}; baseline = {guess}; mean over seeds.",
        ]
    table = "\n".join(lines)
    print(table, flush=True)
    out = output_dir(flags)
    write_atomically(out / "sample_eval.md", lambda tmp: Path(tmp).write_text(table + "\n"))
    result = {
        "sample": str(flags.sample),
        "bands": flags.bands,
        "checkpoints": list(flags.checkpoints),
        "models": {m.label: {"seeds": len(m.encoders), "schedules": m.schedules, "partial": m.partial} for m in models},
        "accuracy": {k: list(v) for k, v in stats.items()},
        "per_seed_accuracy": per_seed,
        "reconstruction": {
            k: {"mse": float(e), "baseline": float(b), "ratio": float(e / b)} for k, (e, b) in recon.items()
        },
        "protocol": {
            "folds": FOLDS,
            "k": K,
            "temperature": TEMPERATURE,
            "probe_C": PROBE_C,
            "scales": scales,
            "bootstrap": flags.bootstrap,
            "feature_dtype": "float64",
        },
    }
    write_atomically(out / "sample_eval.json", lambda tmp: Path(tmp).write_text(json.dumps(result, indent=1)))
    print(
        f"\nwritten: {out / 'sample_eval.md'}, {out / 'sample_eval.json'}, {out / 'sample_eval_scales.png'}", flush=True
    )


if __name__ == "__main__":
    flags = config.parse_args(get_args_parser())  # --help and flag errors answer here, before torch loads
    from util.run.process import run_entry_point

    run_entry_point(main, flags)
