"""Export the encoder of any checkpoint in timm's layout, with its remote-sensing metadata, for timm, torchgeo,
TerraTorch and PANGAEA (docs/weights_elsewhere.md).

    python tools/export_weights.py output/pretrain_tiny/checkpoint-last.pth --output export/tiny_rgb
    python tools/export_weights.py weights/cross_scale_mae_base_pretrain.pth --output export/vit_base_fmow \\
        --hashed_pth cross_scale_mae_vit_base_patch16_128_fmow_rgb
    python tools/export_weights.py old_run/checkpoint-399.pth --output export/s2 --band_stats stats.json --gsd 10

Reads what ``util.weights.layouts.read_encoder`` reads: this project's checkpoints, upstream's (the published ViT-B /
ViT-L, md5-verified under their published names), timm exports and fine-tuned classifiers (head left out). Writes
``OUTPUT/config.json`` + ``OUTPUT/model.safetensors`` (``timm.create_model("local-dir:OUTPUT", pretrained=True)``);
the metadata comes from the checkpoint's recorded flags and the flags below (``util/weights/metadata.py``: schema).
``--hashed_pth STEM`` also writes ``OUTPUT/STEM-<sha256[:8]>.pth``, the name torch.hub's and torchgeo's hash check
needs (``util/weights/published.py``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from util.config import HelpFormatter, summary
from util.errors import UsageError
from util.files import file_sha256
from util.weights import metadata


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=summary(__doc__), formatter_class=HelpFormatter)
    parser.add_argument("checkpoint", help="pretraining checkpoint (ours or upstream's), timm export or classifier")
    parser.add_argument("--output", required=True, type=Path, help="export folder (config.json + model.safetensors)")
    parser.add_argument(
        "--band_names",
        nargs="+",
        default=None,
        metavar="NAME",
        help="the encoder's bands in channel order, in any tool's spelling (B04 / B4 / RED, B8A / B8a /"
        " NIR_NARROW); default: the band statistics file's band_names, or what the data is known"
        " to hold (fMoW-RGB, the embedded samples, the 8-bit RGB path)",
    )
    parser.add_argument(
        "--sensor",
        choices=metadata.SENSORS,
        default=None,
        help="the catalogue the band names are in (default: the first that knows them all, in the "
        "order rgb, sentinel-2, landsat)",
    )
    parser.add_argument(
        "--band_stats",
        default=None,
        help="the run's tools/band_stats.py file (default: the checkpoint's --band_stats): band names "
        "and, for checkpoints that record none, normalisation",
    )
    parser.add_argument(
        "--gsd", type=float, default=None, help="ground sample distance of the pretraining data, metres"
    )
    parser.add_argument("--dataset", default=None, help="name of the pretraining data set, where not known")
    parser.add_argument(
        "--hashed_pth",
        default=None,
        metavar="STEM",
        help="also write OUTPUT/STEM-<sha256[:8]>.pth (torch.hub / torchgeo weight file name)",
    )
    return parser


def main(args: argparse.Namespace) -> None:
    from model_loading import export_checkpoint  # here: --help and flag errors answer before torch loads

    if args.hashed_pth is not None and (not args.hashed_pth or "/" in args.hashed_pth or "-" in args.hashed_pth):
        raise UsageError(f"--hashed_pth {args.hashed_pth}: a file name stem without '/' or '-' (the hash follows '-')")
    pth = args.output / f"{args.hashed_pth}.pth" if args.hashed_pth else None
    exported = export_checkpoint(
        args.checkpoint,
        args.output,
        pth=pth,
        band_names=args.band_names,
        sensor=args.sensor,
        gsd_m=args.gsd,
        dataset=args.dataset,
        band_stats=args.band_stats,
    )
    block = metadata.read(exported.directory)
    print(
        f"{exported.directory}: config.json + model.safetensors; "
        f"timm.create_model('local-dir:{exported.directory}', pretrained=True)"
    )
    bands = block["bands"]
    print(
        f"bands: {' '.join(b['name'] for b in bands) if bands else 'unknown (give --band_names)'}; "
        f"GSD: {block['gsd_m'] if block['gsd_m'] is not None else 'none'} m ({block['gsd_note']}); "
        f"final norm: {block['final_norm']['exported_as']}; "
        f"position embedding: {block['position_embedding']['kind']}"
    )
    if exported.pth is not None:
        digest = file_sha256(exported.pth)
        hashed = exported.pth.with_name(f"{args.hashed_pth}-{digest[:8]}.pth")
        exported.pth.replace(hashed)
        print(f"{hashed} (sha256 {digest})")


if __name__ == "__main__":
    parsed = get_args_parser().parse_args()  # --help and flag errors answer before torch loads
    from util.run.process import run_entry_point

    run_entry_point(main, parsed)
