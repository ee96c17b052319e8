"""Multi-scale kNN evaluation of frozen encoders: top-1 at 12.5 / 25 / 50 / 100 % of the ground resolution.

    python main_knn.py --checkpoints none output/pretrain_tiny/checkpoint-last.pth weights/cross_scale_mae_base_pretrain.pth

Writes ``knn_results.csv``, ``knn_results.md`` (table + protocol), ``protocol.json`` and
``knn_accuracy_vs_scale.png`` to ``--output_dir``.
"""
from __future__ import annotations

import argparse

from util import config

CLASSIFIERS = ("weighted", "majority")


def get_args_parser() -> argparse.ArgumentParser:
    parser = config.new_parser("Multi-scale kNN evaluation")
    group = parser.add_argument_group("encoders")
    group.add_argument("--checkpoints", nargs="+", required=True, metavar="PATH",
                       help="checkpoints (any kind --finetune accepts), or 'none' for a random-init encoder of --model")
    group.add_argument("--model", default=None, help="architecture of 'none' (default: that of the other checkpoints)")
    config.add_data_args(parser, input_size=None, train_path=str(config.DEFAULT_TRAIN_CSV), patch_size=None)
    parser._option_string_actions["--train_path"].help = "memory (labelled reference) set: CSV, ImageFolder tree or packed .json"
    parser._option_string_actions["--input_size"].help = "image side in pixels (default: that of the first checkpoint, else 224)"
    group = parser._option_string_actions["--train_path"].container  # the data group
    group.add_argument("--test_path", default=str(config.DEFAULT_VAL_CSV),
                       help="evaluation images; 'split' takes --val_fraction of --train_path instead")
    group.add_argument("--val_fraction", type=float, default=0.2, help="share of --train_path evaluated with --test_path split")
    group.add_argument("--batch_size", type=int, default=64, help="images per device per inference batch")
    config.add_runtime_args(
        parser, output_dir="output/knn", training=False,
        output_help="folder of knn_results.csv/.md, protocol.json and knn_accuracy_vs_scale.png; a training run's folder "
                    "(one holding checkpoint-*.pth) gets them in its knn/ subfolder, never over its files")
    group = parser.add_argument_group("protocol")
    group.add_argument("--scales", type=float, nargs="+", default=[0.125, 0.25, 0.5, 1.0], help="fractions of the input side the evaluation images are down-sampled to")
    group.add_argument("--scale_mode", default="resize", choices=config.KNN_SCALE_MODES,
                       help="resize: down-sample then resize back; native: feed the small image, interpolating position embeddings")
    group.add_argument("--pool", default="cls", choices=config.KNN_POOLS, help="cls token or mean of the patch tokens")
    group.add_argument("--k", type=int, default=20, help="neighbours (k) of the weighted classifier")
    group.add_argument("--temperature", type=float, default=0.07, help="temperature of the weighted classifier")
    group.add_argument("--majority_k", type=int, default=5, help="neighbours (k) of the majority classifier")
    return parser


if __name__ == "__main__":  # --help and flag errors answer here, before torch and timm load (~5 s)
    config.parse_args(get_args_parser())

import csv  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import models_vit  # noqa: E402
from model_loading import build_knn_encoder, classifier_name  # noqa: E402
from util import config  # noqa: E402
from util.data import datasets, loaders, raster_options, transforms
from util.eval import knn
from util.run import distributed, process
from util.weights import layouts
from util.errors import UsageError  # noqa: E402
from util.files import best_effort
from util.run.process import run_entry_point
from util.eval.figures import save_knn_plot  # noqa: E402


def check_args(args: argparse.Namespace) -> None:
    config.check_data_args(args)
    if any(not 0 < s <= 1 for s in args.scales):
        raise UsageError(f"--scales must lie in (0, 1], got {args.scales}")
    if min(args.k, args.majority_k, args.batch_size) < 1:
        raise UsageError("--k, --majority_k and --batch_size must be at least 1")
    if not args.temperature > 0:
        raise UsageError(f"--temperature must be > 0, got {args.temperature}")
    if args.model is not None:
        try:
            models_vit.classifier_preset(args.model)
        except ValueError as e:
            raise UsageError(f"--{e}") from None


def load_datasets(args: argparse.Namespace) -> tuple[datasets.ImageDataset, datasets.ImageDataset, str]:
    transform, raster = transforms.image_transform(args, False), raster_options.raster_options(args)
    draft = transforms.draft_size_for(False, args.input_size)
    train = datasets.build_dataset(args.train_path, args.dataset_type, transform, draft, args.skip_bad_images, raster=raster)
    if args.test_path == "split":
        train, val = datasets.split_dataset(train, args.val_fraction, args.seed)
        origin = f"seeded split (seed {args.seed}) of {args.train_path}: {args.val_fraction:.0%} evaluated"
    else:
        val = datasets.build_dataset(args.test_path, args.dataset_type, transform, draft, args.skip_bad_images,
                                     classes=train.classes or None, raster=raster)
        origin = f"train {args.train_path}, evaluation {args.test_path}"
    return train, val, origin


def main(args: argparse.Namespace) -> None:
    check_args(args)
    if any(Path(args.output_dir).glob("checkpoint-*.pth")):  # a training run's folder: never write over its files
        args.output_dir = str(Path(args.output_dir) / "knn")
    run = process.setup_run(args)
    weights = {spec: layouts.read_encoder(spec) for spec in args.checkpoints if spec != "none"}
    reference = next(iter(weights.values()), None)
    model_name = args.model or (classifier_name(reference) if reference else None)
    if model_name is None:
        raise UsageError("--checkpoints none needs --model (or another checkpoint to take the architecture from)")
    if args.input_size is None:
        args.input_size = reference.shape.input_size if reference else 224
    args.patch_size = reference.shape.patch_size if reference else (args.patch_size or models_vit.classifier_preset(model_name)[1])
    config.check_ranges(args)
    if args.input_size % args.patch_size:
        raise UsageError(f"--input_size {args.input_size} is not divisible by --patch_size {args.patch_size}")
    encoders = {}
    for spec in args.checkpoints:  # every checkpoint is built (and checked) before the first is scored
        torch.manual_seed(args.seed)  # the random-init encoder is reproducible
        encoders[spec] = build_knn_encoder(spec, weights.get(spec), model_name, args)
    train_set, val_set, origin = load_datasets(args)
    class_names = datasets.check_labels(train_set, [val_set], what="kNN classifier")
    num_classes = len(class_names)
    train_loader = loaders.eval_loader(train_set, args, run)
    val_loader = loaders.eval_loader(val_set, args, run)

    rows, final_norms, features = [], {}, {}
    for spec in args.checkpoints:
        encoder, label, final_norm = encoders.pop(spec)
        classifier_pool = weights[spec].classifier_pool if spec in weights else None
        pool = knn.CLASSIFIER_POOL if classifier_pool else args.pool
        features[label] = (f"the features the classifier's head sees ({'mean of the patch tokens + fc_norm' if classifier_pool == 'avg' else 'cls token after the final norm'}), L2-normalised; --pool ignored"
                           if classifier_pool else None)
        if classifier_pool:
            distributed.main_print(f"{label}: a trained classifier: {features[label]}")
        encoder.to(run.device)
        final_norms[label] = final_norm
        accuracy = knn.multiscale_accuracies(
            encoder, final_norm, train_loader, val_loader, num_classes, run.device, run.amp_dtype, args.scales,
            pool, args.scale_mode, args.k, args.temperature, args.majority_k,
        )
        encoder.cpu()
        rows += [{"checkpoint": label, "classifier": c, "scale": s, "top1": accuracy[c, s]} for s in args.scales for c in CLASSIFIERS]
        distributed.main_print(f"{label}: " + ", ".join(
            f"{r['classifier']} {r['scale']:g} {r['top1']:.1f}%" for r in rows if r["checkpoint"] == label))
    if not run.is_main:
        return
    protocol = describe_protocol(args, train_set, val_set, num_classes, origin, final_norms)
    protocol["class_names"] = class_names
    protocol["features_per_checkpoint"] = {label: text for label, text in features.items() if text}
    write_outputs(rows, protocol, args)


def describe_protocol(args, train_set, val_set, num_classes: int, origin: str, final_norms: dict[str, bool]) -> dict:
    sizes = {s: knn.reduced_size(args.input_size, s, args.patch_size, args.scale_mode) for s in args.scales}
    return {
        "data": origin,
        "evaluation_set": (f"{args.val_fraction:.0%} split of {Path(args.train_path).name}" if args.test_path == "split"
                           else Path(args.test_path).name),
        "memory_images": len(train_set), "evaluation_images": len(val_set), "classes": num_classes,
        "input_size": args.input_size,
        "preprocessing": f"resize shorter side to {transforms.eval_resize_size(args.input_size)} "
                         f"({'bilinear' if args.raster else 'bicubic'}, antialias), "
                         f"centre crop {args.input_size}, normalise mean {args.mean} std {args.std}",
        "scales": {f"{s:g}": (f"area down-sampling to {sizes[s]} px, bicubic back to {args.input_size} px" if args.scale_mode == "resize"
                              else f"area down-sampling to {sizes[s]} px, fed natively, position embeddings interpolated (bicubic)")
                   for s in args.scales},
        "memory_set": f"full resolution ({args.input_size} px)",
        "features": f"{'cls token' if args.pool == 'cls' else 'mean of the patch tokens'} of the last block, L2-normalised",
        "final_layernorm": {label: ("applied" if applied else "not applied (as in pretraining)") for label, applied in final_norms.items()},
        "weighted_knn": f"k = {args.k}, cosine similarity, votes exp(sim / {args.temperature}) (InstDisc / Scale-MAE)",
        "majority_knn": f"k = {args.majority_k}, cosine similarity, one vote each, ties to the lowest class index (torchgeo-bench)",
    }


def write_outputs(rows: list[dict], protocol: dict, args: argparse.Namespace) -> None:
    out = Path(args.output_dir)
    labels = list(dict.fromkeys(r["checkpoint"] for r in rows))
    table = {(r["checkpoint"], r["classifier"], r["scale"]): r["top1"] for r in rows}
    def write_csv():
        with open(out / "knn_results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["checkpoint", "classifier", "scale", "top1"])
            writer.writeheader()
            writer.writerows(rows)
            for label in labels:
                for c in CLASSIFIERS:
                    writer.writerow({"checkpoint": label, "classifier": c, "scale": "mean",
                                     "top1": sum(table[label, c, s] for s in args.scales) / len(args.scales)})

    best_effort(out / "knn_results.csv", write_csv)  # a full disk: a warning, and the table still printed below
    header = "| checkpoint | classifier | " + " | ".join(f"{s:g}" for s in args.scales) + " | mean |"
    lines = [header, "|" + "---|" * (len(args.scales) + 3)]
    for label in labels:
        for c in CLASSIFIERS:
            values = [table[label, c, s] for s in args.scales]
            lines.append(f"| {label} | {c} | " + " | ".join(f"{v:.1f}" for v in values) + f" | {sum(values) / len(values):.1f} |")
    markdown = "\n".join(lines)
    protocol_lines = [f"- **{k}**: {json.dumps(v) if isinstance(v, dict) else v}" for k, v in protocol.items()]
    best_effort(out / "knn_results.md", lambda: (out / "knn_results.md").write_text(
        "# Multi-scale kNN top-1 (%)\n\n" + markdown + "\n\n## Protocol\n\n" + "\n".join(protocol_lines) + "\n"))
    best_effort(out / "protocol.json", lambda: (out / "protocol.json").write_text(json.dumps(protocol, indent=2)))
    best_effort(out / "knn_accuracy_vs_scale.png", lambda: save_knn_plot(
        table, labels, args.scales, CLASSIFIERS, out / "knn_accuracy_vs_scale.png",
        evaluation=protocol.get("evaluation_set", ""), images=protocol.get("evaluation_images")))
    print(markdown + f"\n\nresults: {out}/knn_results.md, knn_results.csv, protocol.json, knn_accuracy_vs_scale.png", flush=True)


if __name__ == "__main__":
    run_entry_point(main, config.parse_args(get_args_parser()))
