"""One command per row of the paper's evaluation: run it, and print our number beside the published ones.

    bash benchmarks/paper.sh knn-resisc45 weights/cross_scale_mae_large_pretrain.pth
    bash benchmarks/paper.sh finetune-fmow weights/cross_scale_mae_base_pretrain.pth --epochs 50   # flags win
    bash benchmarks/paper.sh segment-potsdam none --model vit_base_patch16                      # random init
    bash benchmarks/paper.sh pretrain-vitb                                                       # no WEIGHTS
    python benchmarks/paper.py --list | --table | ROW [WEIGHTS] --dry_run

The rows live in ``benchmarks/paper_rows.yaml`` (the protocol of each: entry script, data set and split, size,
epochs, flags, which number is ours, published numbers and their sources). Data come from ``$BENCHMARK_ROOT/<data
set>`` (default ``data/benchmarks``; ``--benchmark_root`` wins), prepared by ``tools/prepare_benchmark.py``; the data
set's ``summary.json`` says whether its counts match the published ones, and when they do not, the result is printed
as NOT comparable. Options of this script: ``--benchmark_root DIR``, ``--splits NAME`` (another split set of the
data set), ``--output_dir DIR`` (default ``output/paper/ROW/WEIGHTS-NAME``; passed on), ``--dry_run`` (print the
command and the budget only). Every other flag goes to the entry script after the row's own, so it wins.

The budget is the GPU-hours on one H100 at 45 % of its 989 TFLOP/s dense bf16 peak: FLOPs counted by
``torch.utils.flop_counter`` on the meta device (no memory, no time) for the row's model at its size (the same
count ``benchmarks/bench_pretrain.py`` uses: 38.9 GFLOP per 128-px image for a ViT-B pretraining step, as
docs/reproducing.md says; the benchmark measured 38.4 at batch 16), times the images each epoch sees and the
epochs, evaluation passes included (see ``budget``). Data loading is not counted: fMoW's JPEGs at thousands of
images per second need ``tools/preprocess.py --pack`` first.

The row's run writes ``paper_result.json`` (command, budget, data check, ours, published) into its output folder.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import os
import runpy
import shlex
import signal
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from util.data.benchmarks import BENCHMARKS, SUMMARY, manifest_name, published_count_problems  # noqa: E402
from util.errors import ReportableError, UsageError, first_line  # noqa: E402

ROWS_FILE = REPO / "benchmarks" / "paper_rows.yaml"
H100_BF16_FLOPS = 989e12  # dense bf16 peak of an H100 SXM (NVIDIA's data sheet)
MFU = 0.45  # the share of it a well-fed run is assumed to reach
SCRIPTS = {
    "knn": "main_knn.py",
    "linprobe": "main_linprobe.py",
    "finetune": "main_finetune.py",
    "segment": "main_segment.py",
    "pretrain": "main_pretrain.py",
}
OWN_OPTIONS = {"--benchmark_root": True, "--splits": True, "--output_dir": True, "--dry_run": False}
DEFAULT_ROOT = "data/benchmarks"
APPROX_TOLERANCE = 0.02  # data sets without an exact published count: within 2 % of the approximate one


def load_rows(path: Path = ROWS_FILE) -> dict:
    """The row table: ``{"paper_tables": str, "rows": {name: row}}``."""
    return yaml.safe_load(path.read_text())


def split_argv(argv: list[str]) -> tuple[dict, list[str], list[str]]:
    """(this script's options, positionals before the first flag, flags for the entry script)."""
    own, positional, rest = {}, [], []
    i = 0
    while i < len(argv) and not argv[i].startswith("-"):
        positional.append(argv[i])
        i += 1
    while i < len(argv):
        flag, _, inline = argv[i].partition("=")
        if flag in OWN_OPTIONS:
            if OWN_OPTIONS[flag]:
                if not inline and i + 1 >= len(argv):
                    raise UsageError(f"{flag} needs a value")
                own[flag[2:]] = inline or argv[i + 1]
                i += 1 if inline else 2
            else:
                own[flag[2:]] = True
                i += 1
            continue
        rest.append(argv[i])
        i += 1
    return own, positional, rest


def flag_value(flags: list[str], name: str, count: int = 1) -> list[str] | None:
    """The values of the last ``name`` in ``flags`` (``--x v`` or ``--x=v``; ``count`` < 0: every value up to the next
    flag), or None."""
    found = None
    for i, item in enumerate(flags):
        if item == name:
            values = []
            for value in flags[i + 1 :]:
                if value.startswith("--") or (count > 0 and len(values) == count):
                    break
                values.append(value)
            found = values
        elif item.startswith(name + "="):
            found = [item.split("=", 1)[1]]
    return found


# --- data --------------------------------------------------------------------------------------------------------


def benchmark_data(row: dict, root: Path, split_set_name: str) -> dict:
    """Manifests and summary of the row's data set; the published counts when it is not prepared (budget only)."""
    bench = BENCHMARKS[row["benchmark"]]
    split_set = bench.split_set(split_set_name)
    folder = root / bench.name
    summary_path = folder / SUMMARY
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    if summary and split_set.name in summary["split_sets"]:
        counts = {s: c["images"] for s, c in summary["split_sets"][split_set.name]["counts"].items()}
    else:
        counts = dict(split_set.approx_counts or split_set.counts or {})
    return {
        "bench": bench,
        "split_set": split_set,
        "folder": folder,
        "summary": summary,
        "counts": counts,
        "train": folder / manifest_name(split_set.name, split_set.splits[0]),
        "eval": folder / manifest_name(split_set.name, split_set.evaluation),
    }


def data_check(data: dict) -> tuple[bool, str]:
    """(comparable with published numbers, what the check found)."""
    summary, split_set = data["summary"], data["split_set"]
    if summary is None:
        return (
            False,
            f"{data['folder']} is not prepared (tools/prepare_benchmark.py {data['bench'].name} --archive ...)",
        )
    entry = summary["split_sets"].get(split_set.name)
    if entry is None:
        return False, f"{data['folder']}: split set {split_set.name} was not written (summary.json notes say why)"
    problems = published_count_problems(summary)
    if problems:
        return False, "counts differ from the published ones: " + "; ".join(problems)
    found = {split: counts[entry["count_unit"]] for split, counts in entry["counts"].items()}
    approx = split_set.approx_counts
    if (
        entry["matches_published"] is None
        and approx
        and any(abs(found.get(split, 0) - n) > APPROX_TOLERANCE * n for split, n in approx.items())
    ):
        return False, (
            f"{split_set.name} split: {entry['count_unit']} {found}, about {dict(approx)} expected "
            f"(within {APPROX_TOLERANCE:.0%}; no exact count is published)"
        )
    if entry["matches_published"] is None:
        return True, f"{split_set.name} split: {entry['count_unit']} {found} (no published count to check them against)"
    return True, f"{split_set.name} split: {entry['count_unit']} {found} as published"


# --- budget ------------------------------------------------------------------------------------------------------


def count_flops(build, step) -> float:
    """FLOPs of ``step(*build())`` (matmuls and convolutions, forward and any backward inside); ``build`` makes the
    model and inputs on the meta device, so nothing is allocated or computed."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        built = build()
    with FlopCounterMode(display=False) as counter:
        step(*built)
    return float(counter.get_total_flops())


@functools.cache
def model_flops(task: str, model: str, size: int, patch: int | None, num_classes: int, train: bool) -> float:
    """FLOPs per image of one training step (``train``: forward and backward) or one forward pass at ``size`` px.

    pretrain: the Cross-Scale MAE model (both views, masking, decoder, losses); linprobe training: the frozen
    encoder's forward and the head; finetune: the classifier; segment: the UperNet segmenter on a ``size`` crop.
    Batch 2, halved (BatchNorm needs 2).
    """
    import torch

    import models_vit

    def images() -> torch.Tensor:
        return torch.empty(2, 3, size, size)

    def backward(output: torch.Tensor) -> None:
        if train:
            output.sum().backward()

    if task == "pretrain":
        import models_cross_scale_mae

        def build_mae():
            return models_cross_scale_mae.create_model(
                model, input_size=size, **({"patch_size": patch} if patch else {})
            ), images()

        return (
            count_flops(build_mae, lambda mae, x: mae(x, crop_params=(0, 0, size // 2, size // 2))["loss"].backward())
            / 2
        )
    preset, default_patch = models_vit.classifier_preset(model)
    patch = patch or default_patch
    if task == "segment":
        import models_segmentation

        def build_segmenter():
            encoder = models_vit.vision_transformer(
                **models_vit.PRESETS[preset].encoder(), img_size=size, patch_size=patch, num_classes=0
            )
            return models_segmentation.Segmenter(encoder, num_classes), images()

        return count_flops(build_segmenter, lambda segmenter, x: backward(segmenter(x))) / 2

    def build_classifier():
        classifier = models_vit.create_classifier(model, num_classes, img_size=size, patch_size=patch)
        if task == "linprobe" or not train:  # a frozen encoder: only the head (if anything) gets gradients
            classifier.requires_grad_(False)
            classifier.head.requires_grad_(train)
        return classifier, images()

    return count_flops(build_classifier, lambda classifier, x: backward(classifier(x))) / 2


def windows(size: tuple[int, int], crop: int, overlap: float) -> int:
    """Sliding windows over an image of ``size`` (height, width), placed as ``util.eval.inference.sliding_window``
    places them."""
    from util.eval.inference import window_starts

    stride = max(int(crop * (1 - overlap)), 1)
    return len(window_starts(size[0], crop, stride)) * len(window_starts(size[1], crop, stride))


def budget(
    row: dict, task: str, model: str, size: int, patch: int | None, epochs: int, data: dict, flags: list[str]
) -> dict:
    """GPU-hours of the row on one H100 at ``MFU`` of the bf16 peak.

    - pretrain: epochs x training images x (forward + backward of both views);
    - knn: memory images x one forward + evaluation images x one forward per scale (``resize`` mode: each scale is
      fed at full size);
    - linprobe: epochs x (training images x (encoder forward + head step) + evaluation images x forward); with
      ``--no_aug`` the encoder runs once per image;
    - finetune: epochs x (training images x forward + backward + evaluation images x forward);
    - segment: epochs x training crops x forward + backward, plus (epochs + scales of the final evaluation) x the
      sliding windows over every evaluation image x forward.
    """
    counts, bench = data["counts"], data["bench"]
    train_images = counts.get(data["split_set"].splits[0], 0)
    eval_images = counts.get(data["split_set"].evaluation, 0)
    num_classes = len(bench.classes)
    scales = [float(s) for s in (flag_value(flags, "--scales", -1) or row_flag(row, "--scales") or ["1.0"])]
    parts: dict[str, float] = {}
    if task == "pretrain":
        per = model_flops(task, model, size, patch, num_classes, True)
        parts["training"] = epochs * train_images * per
        what = f"{per / 1e9:.3g} GFLOP per training image x {train_images:,} images x {epochs} epochs"
    elif task == "knn":
        per = model_flops(task, model, size, patch, num_classes, False)
        parts["features"] = (train_images + eval_images * len(scales)) * per
        what = f"{per / 1e9:.3g} GFLOP per forward x ({train_images:,} memory + {eval_images:,} x {len(scales)} scales)"
    elif task in ("linprobe", "finetune"):
        forward = model_flops(task, model, size, patch, num_classes, False)
        step = model_flops(task, model, size, patch, num_classes, True)
        cached = task == "linprobe" and "--no_aug" in flags
        parts["training"] = (
            (train_images * forward + epochs * train_images * (step - forward))
            if cached
            else epochs * train_images * step
        )
        parts["evaluation"] = (1 if cached else epochs) * eval_images * forward
        what = (
            f"{step / 1e9:.3g} GFLOP per training step image x {train_images:,} x {epochs} epochs + "
            f"{forward / 1e9:.3g} "
            f"per forward x {eval_images:,} evaluation images{' once' if cached else ' each epoch'}"
        )
    else:
        step = model_flops(task, model, size, patch, num_classes, True)
        forward = model_flops(task, model, size, patch, num_classes, False)
        overlap = float((flag_value(flags, "--overlap") or ["0.3333333333"])[0])
        sizes = (data["summary"] or {}).get("tile_sizes", {}).get(data["split_set"].evaluation)
        eval_windows = (
            sum(windows(tuple(s), size, overlap) for s in sizes.values())
            if sizes
            else eval_images * windows(bench.approx_eval_size, size, overlap)
        )
        parts["training"] = epochs * train_images * step
        parts["evaluation"] = (epochs + len(scales)) * eval_windows * forward
        what = (
            f"{step / 1e9:.3g} GFLOP per training crop x {train_images:,} x {epochs} epochs + {forward / 1e9:.3g} per "
            f"window x {eval_windows:,} windows x ({epochs} epochs + {len(scales)} scales)"
        )
    total = sum(parts.values())
    return {
        "flops": total,
        "parts": parts,
        "gpu_hours": total / (MFU * H100_BF16_FLOPS) / 3600,
        "model": model,
        "input_size": size,
        "epochs": epochs,
        "what": what,
        "counts_from": "summary.json" if data["summary"] else "published / approximate counts (data not prepared)",
    }


def row_flag(row: dict, name: str) -> list[str] | None:
    return flag_value([str(f) for f in row.get("flags", [])], name, -1)


# --- command -------------------------------------------------------------------------------------------------------


def protocol_flags(bench) -> list[str]:
    """The data set's own flags (``Benchmark.protocol``): palette, excluded classes, class names, band count."""
    out = []
    for key, value in bench.protocol.items():
        if value is True:
            out.append(f"--{key}")
        elif isinstance(value, list):
            out += [f"--{key}", *map(str, value)]
        else:
            out += [f"--{key}", str(value)]
    return out


def command(row: dict, task: str, weights: str | None, data: dict, output_dir: Path, extra: list[str]) -> list[str]:
    """The entry script's arguments: the row's protocol, the data, the weights, then the user's flags (they win)."""
    args = ["--input_size", str(row["input_size"]), "--batch_size", str(row["batch_size"])]
    if task != "knn":
        args += ["--epochs", str(row["epochs"]), "--train_path", str(data["train"]), "--resume", "auto"]
    if task == "knn":
        args += [
            "--train_path",
            str(data["train"]),
            "--test_path",
            str(data["eval"]),
            "--checkpoints",
            weights or "none",
        ]
        if weights in (None, "none"):
            args += ["--model", row["model"]]
    elif task == "pretrain":
        args += ["--model", row["model"]]
    else:
        args += ["--test_path", str(data["eval"])]
        # random init: no --finetune (its default, ""), so that the printed command can be pasted as it is
        args += ["--model", row["model"]] if weights in (None, "none") else ["--finetune", weights]
    return [
        *args,
        *protocol_flags(data["bench"]),
        *map(str, row.get("flags", [])),
        "--output_dir",
        str(output_dir),
        *extra,
    ]


@contextlib.contextmanager
def script_process(script: Path, argv: list[str]):
    """Run an entry script in this process as ``python script argv`` would (its signal handlers restored after)."""
    saved_argv, saved_handlers = (
        sys.argv,
        {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)},
    )
    sys.argv = [str(script), *argv]
    try:
        yield
    finally:
        sys.argv = saved_argv
        for number, handler in saved_handlers.items():
            signal.signal(number, handler)


def run_script(script: str, argv: list[str]) -> None:
    """``python script argv`` in this process (torch is already imported for the budget); SystemExit passes through."""
    path = REPO / script
    with script_process(path, argv):
        runpy.run_path(str(path), run_name="__main__")


# --- results -----------------------------------------------------------------------------------------------------


def read_result(task: str, output_dir: Path) -> dict:
    """Our number from the run's outputs: {"value", "what", "details"}.

    Raises:
        ReportableError: the outputs are missing (the run stopped early).
    """
    if task == "knn":
        path = output_dir / "knn_results.csv"
        rows = read_csv(path)
        if not rows:
            raise ReportableError(f"{path}: no kNN results (the run did not finish)")
        return {"rows": rows}
    if task in ("linprobe", "finetune"):
        path = output_dir / "log.txt"
        epochs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
        epochs = [e for e in epochs if "test_acc1" in e]
        if not epochs:
            raise ReportableError(f"{path}: no evaluated epoch (the run did not finish one)")
        last = max(epochs, key=lambda e: e["epoch"])
        return {
            "value": last["test_acc1"],
            "what": f"top-1 % after epoch {last['epoch'] + 1} (the last)",
            "best": max(e["test_acc1"] for e in epochs),
            "epoch": last["epoch"],
        }
    if task == "segment":
        path = output_dir / "seg_results.csv"
        rows = read_csv(path)
        full = [r for r in rows if float(r["scale"]) == 1.0]
        if not full:
            raise ReportableError(f"{path}: no final evaluation at scale 1 (the run did not finish)")
        return {
            "value": float(full[0]["mIoU"]),
            "what": "mIoU % at scale 1.0 (final evaluation)",
            "per_scale": {r["scale"]: float(r["mIoU"]) for r in rows},
            "mF1": float(full[0]["mF1"]),
            "OA": float(full[0]["OA"]),
        }
    path = output_dir / "log.txt"
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    records = [r for r in records if "epoch" in r]
    if not records:
        raise ReportableError(f"{path}: no finished epoch (the run did not finish one)")
    last = records[-1]
    return {
        "value": None,
        "what": f"pretraining: epoch {last['epoch'] + 1} done; evaluate {output_dir}/checkpoint-last.pth "
        "with the knn-, linprobe-, finetune- and segment- rows",
        "last_epoch": last,
    }


def read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def knn_value(rows: list[dict], checkpoint: str, result: dict) -> float:
    scale = str(result["scale"])
    for r in rows:
        if (
            r["checkpoint"] == checkpoint
            and r["classifier"] == result["classifier"]
            and (
                r["scale"] == scale or (scale != "mean" and r["scale"] != "mean" and float(r["scale"]) == float(scale))
            )
        ):
            return float(r["top1"])
    raise ReportableError(f"knn_results.csv: no {result['classifier']} result at scale {scale} for {checkpoint}")


def describe_knn(result: dict) -> str:
    scale = "mean of the scales" if result["scale"] == "mean" else f"scale {float(result['scale']):g}"
    return f"{result['classifier']} kNN top-1 %, {scale}"


# --- reporting -----------------------------------------------------------------------------------------------------


def print_table(rows: dict) -> str:
    """Markdown table of every row: command, data, budget for ViT-B and ViT-L (docs/reproducing.md)."""
    root = Path(DEFAULT_ROOT)
    lines = [
        "| row | what | data (split: train / evaluation) | size, epochs | ViT-B GPU-h | ViT-L GPU-h | published |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows["rows"].items():
        task = row["task"]
        data = benchmark_data(row, root, row["splits"])
        data["summary"] = None  # the table uses the published / approximate counts, whatever is prepared here
        data["counts"] = dict(data["split_set"].approx_counts or data["split_set"].counts or {})
        hours = []
        for model in model_pair(task, row["model"]):
            hours.append(
                budget(
                    row,
                    task,
                    model,
                    row["input_size"],
                    None,
                    row.get("epochs", 1),
                    data,
                    [str(f) for f in row.get("flags", [])],
                )["gpu_hours"]
            )
        split_set = data["split_set"]
        published = "; ".join(f"{p['value']} ({p['confidence']})" for p in row.get("published", [])) or "-"
        if row.get("published_weights"):
            published += "; published weights: " + "; ".join(
                f"{p['value']} ({p['weights']})" for p in row["published_weights"]
            )
        epochs = f", {row['epochs']} ep" if "epochs" in row else ""
        lines.append(
            f"| `{name}` | {row['title']} | {data['bench'].name} ({split_set.name}: {split_set.splits[0]} / "
            f"{split_set.evaluation}) | {row['input_size']} px{epochs} | {hours[0]:.2g} | {hours[1]:.2g} "
            f"| {published} |"
        )
    return "\n".join(lines)


def model_pair(task: str, model: str) -> tuple[str, str]:
    if task == "pretrain":
        return "cross_scale_mae_vit_base", "cross_scale_mae_vit_large"
    return "vit_base_patch16", "vit_large_patch16"


def weights_model(weights: str | None, row: dict, flags: list[str]) -> tuple[str, int | None]:
    """(architecture, patch size) the run uses: --model, else the weights', else the row's."""
    chosen = flag_value(flags, "--model")
    patch = flag_value(flags, "--patch_size")
    if chosen:
        return chosen[0], int(patch[0]) if patch else None
    if weights not in (None, "none") and row["task"] != "pretrain":
        from model_loading import classifier_name
        from util.weights import layouts

        encoder = layouts.read_encoder(weights)
        return classifier_name(encoder), int(patch[0]) if patch else encoder.shape.patch_size
    return row["model"], int(patch[0]) if patch else None


def published_weights_name(weights: str | None) -> str | None:
    from util.run.checkpoint import PUBLISHED_FILENAMES

    return Path(weights).name if weights and Path(weights).name in PUBLISHED_FILENAMES else None


def report(name: str, row: dict, weights: str | None, outcome: dict, comparable: bool, check: str) -> list[str]:
    """Lines: ours, the published numbers, the published weights' number and whether this run reproduces it."""
    lines = [f"{name}: {outcome['what']}: ours {format_value(outcome['value'])}"]
    if not comparable:
        lines.append(f"  NOT comparable with the numbers below: {check}")
    for extra in outcome.get("extra", []):
        lines.append(f"  {extra}")
    if row["task"] != "pretrain":
        lines.append("  the paper's own number: not available to this project (its result tables were not found)")
    for entry in row.get("published", []):
        lines.append(
            f"  published {entry['value']} — {entry['what']}; source: {entry['source']}; "
            f"confidence: {entry['confidence']}"
        )
    used = published_weights_name(weights)
    for entry in row.get("published_weights", []):
        lines.append(
            f"  with the published {entry['weights']}: {entry['value']} ({describe_knn(entry['result'])}); "
            f"source: {entry['source']}"
        )
        if used != entry["weights"]:
            lines.append(f"    this run used other weights; run this row with weights/{entry['weights']} to compare")
            continue
        mine = outcome["published_weights"][entry["weights"]]
        verdict = "reproduces it" if abs(mine - entry["value"]) <= entry["tolerance"] else "does NOT reproduce it"
        note = "" if comparable else " (but the data are not the official ones: see above)"
        lines.append(
            f"    this run: {mine:.2f}, {mine - entry['value']:+.2f} points: {verdict} "
            f"(tolerance {entry['tolerance']} points){note}"
        )
    return lines


def format_value(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    table = load_rows()
    rows = table["rows"]
    if argv[:1] == ["--list"]:
        for name, row in rows.items():
            print(f"{name}: {row['title']}")
        return
    if argv[:1] == ["--table"]:
        print(print_table(table))
        return
    own, positional, extra = split_argv(argv)
    if not positional or positional[0] not in rows:
        raise UsageError(f"the first argument must be a row: {', '.join(rows)} (or --list, --table)")
    name, *rest = positional
    if len(rest) > 1:
        raise UsageError(f"expected ROW [WEIGHTS], got {' '.join(positional)}")
    row = rows[name]
    task = row["task"]
    weights = rest[0] if rest else None
    if task == "pretrain" and weights:
        raise UsageError(f"{name} pretrains from scratch: it takes no WEIGHTS (--init PATH starts from a checkpoint)")
    if task != "pretrain" and weights is None:
        raise UsageError(f"{name} needs WEIGHTS: a checkpoint (weights/README.md), or 'none' for random initialisation")
    if weights not in (None, "none") and not Path(weights).is_file():
        raise UsageError(f"WEIGHTS {weights}: no such file (the published ones: weights/README.md)")
    root = Path(own.get("benchmark_root") or os.environ.get("BENCHMARK_ROOT") or DEFAULT_ROOT)
    data = benchmark_data(row, root, own.get("splits") or row["splits"])
    label = "random-init" if weights in (None, "none") else Path(weights).stem
    output_dir = Path(own.get("output_dir") or Path("output") / "paper" / name / (label if task != "pretrain" else ""))
    args = command(row, task, weights, data, output_dir, extra)
    flags = [*map(str, row.get("flags", [])), *extra]
    size = int((flag_value(extra, "--input_size") or [row["input_size"]])[0])
    epochs = int((flag_value(extra, "--epochs") or [row.get("epochs", 1)])[0])
    model, patch = weights_model(weights, row, extra)
    cost = budget(row, task, model, size, patch, epochs, data, flags)
    comparable, check = data_check(data)
    print(f"{name}: {row['title']}")
    print(f"  data: {data['bench'].name}, split set {data['split_set'].name} ({data['split_set'].source}); {check}")
    print(
        f"  budget: {cost['gpu_hours']:.2g} GPU-hours on one H100 at {MFU:.0%} of {H100_BF16_FLOPS / 1e12:.0f} "
        "TFLOP/s bf16 "
        f"({model}, {size} px: {cost['what']}; {cost['flops'] / 1e15:.3g} PFLOP; counts from {cost['counts_from']})"
    )
    print(f"  command: {shlex.join(['python', str(SCRIPTS[task]), *args])}", flush=True)
    if own.get("dry_run"):
        return
    if data["summary"] is None:
        raise UsageError(
            f"{data['folder']}: not prepared; run tools/prepare_benchmark.py {data['bench'].name} --archive ... "
            f"(--output {data['folder']}) first"
        )
    for path in (data["train"], data["eval"]):
        if not path.is_file():
            raise UsageError(f"{path}: no such manifest ({check})")
    run_script(SCRIPTS[task], args)
    outcome = read_result(task, output_dir)
    if task == "knn":
        checkpoint = weights if weights not in (None, "none") else f"random init ({model})"
        rows_csv = outcome.pop("rows")
        outcome = {
            "value": knn_value(rows_csv, checkpoint, row["result"]),
            "what": describe_knn(row["result"]),
            "per_scale": {
                r["scale"]: float(r["top1"])
                for r in rows_csv
                if r["checkpoint"] == checkpoint and r["classifier"] == row["result"]["classifier"]
            },
            "published_weights": {
                e["weights"]: knn_value(rows_csv, checkpoint, e["result"])
                for e in row.get("published_weights", [])
                if published_weights_name(weights) == e["weights"]
            },
        }
        outcome["extra"] = ["per scale: " + ", ".join(f"{s} {v:.2f}" for s, v in outcome["per_scale"].items())]
    elif task in ("linprobe", "finetune"):
        outcome["extra"] = [
            f"best epoch's top-1 {outcome['best']:.2f} (selected on the evaluation split: not a result)"
        ]
    elif task == "segment":
        outcome["extra"] = [
            "per scale: "
            + ", ".join(f"{s} {v:.2f}" for s, v in outcome["per_scale"].items())
            + f"; mF1 {outcome['mF1']:.2f}, OA {outcome['OA']:.2f}"
        ]
    lines = report(name, row, weights, outcome, comparable, check)
    print("\n".join(lines), flush=True)
    record = {
        "row": name,
        "title": row["title"],
        "weights": weights,
        "command": ["python", SCRIPTS[task], *args],
        "budget": cost,
        "data": {
            "benchmark": data["bench"].name,
            "split_set": data["split_set"].name,
            "comparable": comparable,
            "check": check,
        },
        "ours": outcome,
        "published": row.get("published", []),
        "published_weights": row.get("published_weights", []),
        "report": lines,
    }
    (output_dir / "paper_result.json").write_text(json.dumps(record, indent=1, default=str) + "\n")


if __name__ == "__main__":
    try:
        main()
    except ReportableError as e:
        raise SystemExit(f"error: {first_line(e, last=True)}") from None
