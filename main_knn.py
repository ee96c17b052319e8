"""Multi-scale kNN evaluation of frozen encoders: top-1 at 12.5 / 25 / 50 / 100 % of the ground resolution.

    python main_knn.py --checkpoints none output/pretrain_tiny/checkpoint-last.pth weights/cross_scale_mae_base_pretrain.pth

Writes ``knn_results.csv``, ``knn_results.md`` (table + protocol), ``protocol.json`` and
``knn_accuracy_vs_scale.png`` to ``--output_dir``.
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import models_vit  # noqa: E402
from util import checkpoint, config, datasets, engine, knn, misc  # noqa: E402

CLASSIFIERS = ("weighted", "majority")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Multi-scale kNN evaluation")
    parser.add_argument("--checkpoints", nargs="+", required=True, metavar="PATH",
                        help="checkpoints (any kind --finetune accepts), or 'none' for a random-init encoder of --model")
    parser.add_argument("--model", default=None, help="architecture of 'none' (default: that of the other checkpoints)")
    config.add_data_args(parser, input_size=None, train_path=str(datasets.DEFAULT_TRAIN_CSV), patch_size=None)
    config.add_runtime_args(parser, output_dir="output/knn", training=False)
    parser.add_argument("--test_path", default=str(datasets.DEFAULT_VAL_CSV),
                        help="evaluation images; 'split' takes --val_fraction of --train_path instead")
    parser.add_argument("--val_fraction", type=float, default=0.2, help="share of --train_path evaluated with --test_path split")
    parser.add_argument("--batch_size", type=int, default=64)
    group = parser.add_argument_group("protocol")
    group.add_argument("--scales", type=float, nargs="+", default=[0.125, 0.25, 0.5, 1.0], help="ratios of the input size")
    group.add_argument("--scale_mode", default="resize", choices=knn.SCALE_MODES,
                       help="resize: down-sample then resize back; native: feed the small image, interpolating position embeddings")
    group.add_argument("--pool", default="cls", choices=knn.POOLS, help="cls token or mean of the patch tokens")
    group.add_argument("--k", type=int, default=20, help="neighbours of the weighted classifier")
    group.add_argument("--temperature", type=float, default=0.07, help="temperature of the weighted classifier")
    group.add_argument("--majority_k", type=int, default=5, help="neighbours of the majority classifier")
    return parser


def check_args(args: argparse.Namespace) -> None:
    if any(not 0 < s <= 1 for s in args.scales):
        raise misc.UsageError(f"--scales must lie in (0, 1], got {args.scales}")
    if min(args.k, args.majority_k, args.batch_size) < 1:
        raise misc.UsageError("--k, --majority_k and --batch_size must be at least 1")
    if args.model is not None and args.model not in models_vit.CLASSIFIER_PRESETS:
        raise misc.UsageError(f"--model {args.model}: unknown; choose one of {', '.join(models_vit.CLASSIFIER_PRESETS)}")


def load_datasets(args: argparse.Namespace) -> tuple[datasets.ImageDataset, datasets.ImageDataset, str]:
    transform = datasets.build_transform(False, args.input_size, args.mean, args.std)
    draft = datasets.draft_size_for(False, args.input_size)
    train = datasets.build_dataset(args.train_path, args.dataset_type, transform, draft, args.skip_bad_images)
    if args.test_path == "split":
        train, val = datasets.split_dataset(train, args.val_fraction, args.seed)
        origin = f"seeded split (seed {args.seed}) of {args.train_path}: {args.val_fraction:.0%} evaluated"
    else:
        val = datasets.build_dataset(args.test_path, args.dataset_type, transform, draft, args.skip_bad_images)
        origin = f"train {args.train_path}, evaluation {args.test_path}"
    for name, dataset in (("training", train), ("evaluation", val)):
        if min(dataset.targets) < 0:
            raise datasets.DataError(f"the {name} images are unlabelled: kNN needs a labelled CSV or ImageFolder")
    return train, val, origin


def build_encoder(spec: str, weights: checkpoint.EncoderWeights | None, model_name: str, args) -> tuple[torch.nn.Module, str, bool]:
    """(encoder, label, whether its final norm is applied) for a checkpoint or 'none'."""
    preset = models_vit.CLASSIFIER_PRESETS[model_name][0]
    patch_size = weights.patch_size if weights else args.patch_size
    encoder = models_vit.vision_transformer(
        **models_vit.ENCODER_PRESETS[preset], img_size=args.input_size, patch_size=patch_size, in_chans=args.in_chans,
        num_classes=0, norm_style=weights.norm_style if weights else "pre", dynamic_img_size=args.scale_mode == "native",
    )
    if weights is None:
        return encoder, f"random init ({model_name})", True
    misc.main_print(checkpoint.load_encoder(encoder, weights))
    return encoder, spec, weights.final_norm


def main(args: argparse.Namespace) -> None:
    check_args(args)
    run = engine.setup_run(args)
    weights = {spec: checkpoint.read_encoder(spec) for spec in args.checkpoints if spec != "none"}
    reference = next(iter(weights.values()), None)
    model_name = args.model or (reference.classifier_name if reference else None)
    if model_name is None:
        raise misc.UsageError("--checkpoints none needs --model (or another checkpoint to take the architecture from)")
    if args.input_size is None:
        args.input_size = reference.grid[0] * reference.patch_size if reference else 224
    args.patch_size = reference.patch_size if reference else (args.patch_size or models_vit.CLASSIFIER_PRESETS[model_name][1])
    train_set, val_set, origin = load_datasets(args)
    num_classes = max(max(train_set.targets), max(val_set.targets)) + 1
    train_loader = engine.eval_loader(train_set, args, run)
    val_loader = engine.eval_loader(val_set, args, run)

    rows, final_norms = [], {}
    for spec in args.checkpoints:
        torch.manual_seed(args.seed)  # the random-init encoder is reproducible
        encoder, label, final_norm = build_encoder(spec, weights.get(spec), model_name, args)
        encoder.to(run.device)
        final_norms[label] = final_norm
        accuracy = knn.multiscale_accuracies(
            encoder, final_norm, train_loader, val_loader, num_classes, run.device, run.amp_dtype, args.scales,
            args.pool, args.scale_mode, args.k, args.temperature, args.majority_k,
        )
        rows += [{"checkpoint": label, "classifier": c, "scale": s, "top1": accuracy[c, s]} for s in args.scales for c in CLASSIFIERS]
        misc.main_print(f"{label}: " + ", ".join(
            f"{r['classifier']} {r['scale']:g} {r['top1']:.1f}%" for r in rows if r["checkpoint"] == label))
    if not run.is_main:
        return
    protocol = describe_protocol(args, train_set, val_set, num_classes, origin, final_norms)
    write_outputs(rows, protocol, args)


def describe_protocol(args, train_set, val_set, num_classes: int, origin: str, final_norms: dict[str, bool]) -> dict:
    sizes = {s: knn.reduced_size(args.input_size, s, args.patch_size, args.scale_mode) for s in args.scales}
    return {
        "data": origin,
        "memory_images": len(train_set), "evaluation_images": len(val_set), "classes": num_classes,
        "input_size": args.input_size,
        "preprocessing": f"resize shorter side to {datasets.eval_resize_size(args.input_size)} (bicubic, antialias), "
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
    with open(out / "knn_results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["checkpoint", "classifier", "scale", "top1"])
        writer.writeheader()
        writer.writerows(rows)
        for label in labels:
            for c in CLASSIFIERS:
                writer.writerow({"checkpoint": label, "classifier": c, "scale": "mean",
                                 "top1": sum(table[label, c, s] for s in args.scales) / len(args.scales)})
    header = "| checkpoint | classifier | " + " | ".join(f"{s:g}" for s in args.scales) + " | mean |"
    lines = [header, "|" + "---|" * (len(args.scales) + 3)]
    for label in labels:
        for c in CLASSIFIERS:
            values = [table[label, c, s] for s in args.scales]
            lines.append(f"| {label} | {c} | " + " | ".join(f"{v:.1f}" for v in values) + f" | {sum(values) / len(values):.1f} |")
    markdown = "\n".join(lines)
    protocol_lines = [f"- **{k}**: {json.dumps(v) if isinstance(v, dict) else v}" for k, v in protocol.items()]
    (out / "knn_results.md").write_text("# Multi-scale kNN top-1 (%)\n\n" + markdown + "\n\n## Protocol\n\n" + "\n".join(protocol_lines) + "\n")
    (out / "protocol.json").write_text(json.dumps(protocol, indent=2))
    plot(table, labels, args.scales, out / "knn_accuracy_vs_scale.png")
    print(markdown + f"\n\nresults: {out}/knn_results.md, knn_results.csv, protocol.json, knn_accuracy_vs_scale.png", flush=True)


def plot(table: dict, labels: list[str], scales: list[float], path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4 + 0.25 * len(labels)), sharey=True)
    for ax, classifier in zip(axes, CLASSIFIERS):
        for label in labels:
            ax.plot(scales, [table[label, classifier, s] for s in scales], marker="o", label=label)
        ax.set(xscale="log", xlabel="scale (fraction of the input size)", title=f"{classifier} kNN")
        ax.minorticks_off()
        ax.set_xticks(scales, [f"{s:g}" for s in scales])
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 (%)")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.06 * len(labels), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    misc.run_entry_point(main, config.parse_args(get_args_parser()))
