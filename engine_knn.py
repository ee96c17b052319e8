"""Multi-scale kNN evaluation of frozen encoders (``main_knn.py``): every checkpoint's features of the memory set at
full resolution and of the evaluation set at each scale, weighted and majority kNN (``util.eval.knn``), and the
results table, protocol and figure."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

import models_vit
from model_loading import build_knn_encoder, classifier_name
from util import config
from util.config import Bands, Flags
from util.data import datasets, loaders, transforms
from util.errors import CheckpointError, UsageError
from util.eval import knn
from util.eval.figures import save_knn_plot
from util.files import best_effort
from util.run import checkpoint, process
from util.run.distributed import main_print
from util.weights import layouts

CLASSIFIERS = ("weighted", "majority")


def evaluate(flags: Flags, bands: Bands) -> None:
    """Score every ``--checkpoints`` entry ('none': a random-init encoder of ``--model``, seeded by ``--seed``) with
    both kNN classifiers at every ``--scales``; rank 0 writes the table, protocol and figure.

    Raises:
        UsageError: an unknown ``--model``, no architecture for 'none', an input size the patch does not divide.
        CheckpointError, DataError: naming the file.
    """
    if flags.model is not None:
        try:
            models_vit.classifier_preset(flags.model)
        except ValueError as e:
            raise UsageError(f"--{e}") from None
    output_dir = Path(flags.output_dir)
    if any(output_dir.glob("checkpoint-*.pth")):  # a training run's folder: never write over its files
        output_dir = output_dir / "knn"
    run = process.setup_run(flags.device, flags.amp, flags.seed, output_dir, flags.dist_timeout)
    weights = {spec: layouts.read_encoder(spec) for spec in flags.checkpoints if spec != "none"}
    schedules = {spec: schedule_of(spec) for spec in weights}  # what each saw of its schedule, for every table
    reference = next(iter(weights.values()), None)
    model_name = flags.model or (classifier_name(reference) if reference else None)
    if model_name is None:
        raise UsageError("--checkpoints none needs --model (or another checkpoint to take the architecture from)")
    input_size = flags.input_size or (reference.shape.input_size if reference else config.DEFAULT_INPUT_SIZE)
    patch_size = (
        reference.shape.patch_size if reference else (flags.patch_size or models_vit.classifier_preset(model_name)[1])
    )
    if input_size % patch_size:
        raise UsageError(f"--input_size {input_size} is not divisible by --patch_size {patch_size}")
    encoders = {}
    # a random-init encoder treated as the checkpoint it takes its architecture from (no checkpoint: as pretraining)
    random_final_norm = reference.final_norm if reference else False
    for spec in flags.checkpoints:  # every checkpoint is built (and checked) before the first is scored
        torch.manual_seed(flags.seed)  # the random-init encoder is reproducible
        encoders[spec] = build_knn_encoder(
            spec,
            weights.get(spec),
            model_name,
            input_size=input_size,
            patch_size=patch_size,
            bands=bands,
            native=flags.scale_mode == "native",
            random_final_norm=random_final_norm,
        )
    train_set, val_set, origin = load_datasets(flags, bands, input_size)
    class_names = datasets.check_labels(train_set, [val_set], what="kNN classifier")
    num_classes = len(class_names)
    k, majority_k = knn.neighbours_used(flags.k, flags.majority_k, len(train_set))
    reading = config.loading(flags)
    train_loader = loaders.eval_loader(train_set, reading, run)
    val_loader = loaders.eval_loader(val_set, reading, run)

    rows, final_norms, features = [], {}, {}
    for spec in flags.checkpoints:
        encoder, label, final_norm = encoders.pop(spec)
        classifier_pool = weights[spec].classifier_pool if spec in weights else None
        pool = knn.CLASSIFIER_POOL if classifier_pool else flags.pool
        pooled = "mean of the patch tokens + fc_norm" if classifier_pool == "avg" else "cls token after the final norm"
        features[label] = (
            f"the features the classifier's head sees ({pooled}), L2-normalised; --pool ignored"
            if classifier_pool
            else None
        )
        if classifier_pool:
            main_print(f"{label}: a trained classifier: {features[label]}")
        encoder.to(run.device)
        final_norms[label] = final_norm
        accuracy = knn.multiscale_accuracies(
            encoder,
            final_norm,
            train_loader,
            val_loader,
            num_classes,
            run.device,
            flags.scales,
            pool,
            flags.scale_mode,
            k,
            flags.temperature,
            majority_k,
        )
        encoder.cpu()
        rows += [
            {"checkpoint": label, "classifier": c, "scale": s, "top1": accuracy[c, s]}
            for s in flags.scales
            for c in CLASSIFIERS
        ]
        main_print(
            f"{label}: "
            + ", ".join(f"{r['classifier']} {r['scale']:g} {r['top1']:.1f}%" for r in rows if r["checkpoint"] == label)
        )
    if not run.is_main:
        return
    protocol = describe_protocol(
        flags, bands, input_size, patch_size, train_set, val_set, num_classes, origin, final_norms, k, majority_k
    )
    protocol["class_names"] = class_names
    protocol["schedule_seen"] = {spec: schedules.get(spec, "random init") for spec in flags.checkpoints}
    protocol["features_per_checkpoint"] = {label: text for label, text in features.items() if text}
    write_outputs(rows, protocol, flags.scales, run.output_dir)


def schedule_of(path: str) -> str:
    """What a checkpoint saw of its schedule ("60/60 epochs", "3/60 epochs + 2 steps", ...:
    ``checkpoint.schedule_seen``); an encoder export or a file without a position says so."""
    if Path(path).is_dir():
        return "encoder export"
    try:
        return checkpoint.schedule_seen(checkpoint.read_checkpoint(path, mmap=True))[0]
    except CheckpointError:
        return "not recorded"


def load_datasets(
    flags: Flags, bands: Bands, input_size: int
) -> tuple[loaders.SampleDataset, loaders.SampleDataset, str]:
    """(memory set, evaluation set, where they come from): ``--test_path`` (default: ``config.evaluation_path``), or
    a seeded ``--val_fraction`` split of ``--train_path`` with ``--test_path split`` (``datasets.held_out``)."""
    transform = transforms.image_transform(bands, input_size, False)
    reading = dict(bands=bands, draft_size=transforms.draft_size_for(False, input_size), skip_bad=flags.skip_bad_images)
    train = datasets.build_dataset(flags.train_path, flags.dataset_type, transform, **reading)
    test_path = config.evaluation_path(flags.train_path, flags.test_path)
    return datasets.held_out(
        train, test_path, flags.val_fraction, flags.seed, transform, dataset_type=flags.dataset_type, **reading
    )


def describe_protocol(
    flags: Flags,
    bands: Bands,
    input_size: int,
    patch_size: int,
    train_set,
    val_set,
    num_classes: int,
    origin: str,
    final_norms: dict[str, bool],
    k: int,
    majority_k: int,
) -> dict:
    """The protocol of an evaluation, as ``protocol.json`` and ``knn_results.md`` record it (``k``, ``majority_k``:
    the neighbours used, ``knn.neighbours_used``)."""
    sizes = {s: knn.reduced_size(input_size, s, patch_size, flags.scale_mode) for s in flags.scales}
    return {
        "data": origin,
        "evaluation_set": (
            f"{flags.val_fraction:.0%} split of {Path(flags.train_path).name}"
            if flags.test_path == config.SPLIT
            else Path(config.evaluation_path(flags.train_path, flags.test_path)).name
        ),
        "memory_images": len(train_set),
        "evaluation_images": len(val_set),
        "classes": num_classes,
        "input_size": input_size,
        "preprocessing": f"resize shorter side to {transforms.eval_resize_size(input_size)} "
        f"({'bilinear' if bands.raster else 'bicubic'}, antialias), "
        f"centre crop {input_size}, normalise mean {bands.mean} std {bands.std}",
        "scales": {
            f"{s:g}": (
                f"area down-sampling to {sizes[s]} px, bicubic back to {input_size} px"
                if flags.scale_mode == "resize"
                else f"area down-sampling to {sizes[s]} px, fed natively, position embeddings interpolated (bicubic)"
            )
            for s in flags.scales
        },
        "memory_set": f"full resolution ({input_size} px)",
        "features": f"{'cls token' if flags.pool == 'cls' else 'mean of the patch tokens'} of the last block, "
        "L2-normalised",
        "final_layernorm": {
            label: final_norm_text(label, applied, final_norms) for label, applied in final_norms.items()
        },
        "k": k,
        "majority_k": majority_k,
        "weighted_knn": f"k = {k}{clipped(flags.k, k, len(train_set))}, cosine similarity, votes "
        f"exp(sim / {flags.temperature}) (InstDisc / Scale-MAE)",
        "majority_knn": f"k = {majority_k}{clipped(flags.majority_k, majority_k, len(train_set))}, cosine "
        "similarity, one vote each, ties to the lowest class index (torchgeo-bench)",
    }


def final_norm_text(label: str, applied: bool, final_norms: dict[str, bool]) -> str:
    """How ``protocol.json`` states whether the row ``label`` applied the encoder's final LayerNorm, and why."""
    compared = label.startswith("random init") and len(final_norms) > 1
    why = "as the checkpoints it is compared with" if compared else None if applied else "as in pretraining"
    return ("applied" if applied else "not applied") + (f" ({why})" if why else "")


def clipped(asked: int, used: int, memory: int) -> str:
    """`` (20 asked: the memory set has 16 images)`` where k was clipped, else ""."""
    return f" ({asked} asked: the memory set has {memory} images)" if used != asked else ""


def write_outputs(rows: list[dict], protocol: dict, scales: list[float], out: Path) -> None:
    """``knn_results.csv`` / ``.md``, ``protocol.json`` and ``knn_accuracy_vs_scale.png`` into ``out``; the table is
    printed too (a full disk gives a warning per file, never a lost result)."""
    labels = list(dict.fromkeys(r["checkpoint"] for r in rows))
    table = {(r["checkpoint"], r["classifier"], r["scale"]): r["top1"] for r in rows}

    def write_csv():
        with open(out / "knn_results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["checkpoint", "classifier", "scale", "top1"])
            writer.writeheader()
            writer.writerows(rows)
            for label in labels:
                for c in CLASSIFIERS:
                    writer.writerow(
                        {
                            "checkpoint": label,
                            "classifier": c,
                            "scale": "mean",
                            "top1": sum(table[label, c, s] for s in scales) / len(scales),
                        }
                    )

    best_effort(out / "knn_results.csv", write_csv)  # a full disk: a warning, and the table still printed below
    seen = dict(zip(labels, protocol.get("schedule_seen", {}).values()))
    header = "| checkpoint | schedule seen | classifier | " + " | ".join(f"{s:g}" for s in scales) + " | mean |"
    lines = [header, "|" + "---|" * (len(scales) + 4)]
    for label in labels:
        for c in CLASSIFIERS:
            values = [table[label, c, s] for s in scales]
            cells = " | ".join(f"{v:.1f}" for v in values)
            lines.append(f"| {label} | {seen.get(label, '')} | {c} | {cells} | {sum(values) / len(values):.1f} |")
    markdown = "\n".join(lines)
    protocol_lines = [f"- **{k}**: {json.dumps(v) if isinstance(v, dict) else v}" for k, v in protocol.items()]
    best_effort(
        out / "knn_results.md",
        lambda: (out / "knn_results.md").write_text(
            "# Multi-scale kNN top-1 (%)\n\n" + markdown + "\n\n## Protocol\n\n" + "\n".join(protocol_lines) + "\n"
        ),
    )
    best_effort(out / "protocol.json", lambda: (out / "protocol.json").write_text(json.dumps(protocol, indent=2)))
    best_effort(
        out / "knn_accuracy_vs_scale.png",
        lambda: save_knn_plot(
            table,
            labels,
            scales,
            CLASSIFIERS,
            out / "knn_accuracy_vs_scale.png",
            evaluation=protocol.get("evaluation_set", ""),
            images=protocol.get("evaluation_images"),
        ),
    )
    print(
        markdown + f"\n\nresults: {out}/knn_results.md, knn_results.csv, protocol.json, knn_accuracy_vs_scale.png",
        flush=True,
    )
