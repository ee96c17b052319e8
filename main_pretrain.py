"""Cross-Scale MAE pretraining on one CPU, one GPU, or many GPUs under torchrun.

    python main_pretrain.py --model cross_scale_mae_vit_base --input_size 128 --train_path train_128.csv

The flags become a run here; the run itself is ``engine_pretrain.pretrain``.
"""

from __future__ import annotations

from util import config
from util.errors import UsageError


def parse_loss_weights(items: list[str]) -> dict[str, float]:
    """``--loss_weights rec=1 cross_cons=0.5`` -> {"rec": 1.0, "cross_cons": 0.5} (the model checks the names)."""
    weights = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            weights[name] = float(value)
        except ValueError:
            raise UsageError(f"--loss_weights {item}: expected NAME=NUMBER, e.g. cross_cons=0.5") from None
    return weights


# upstream's main_pretrain.py defaults (its paper run on fMoW-RGB); train.sh sets the quick start's
UPSTREAM_DEFAULTS = {"input_size": 224, "batch_size": 512, "epochs": 200, "blr": 5e-5}


def get_args_parser() -> config.Parser:
    parser = config.new_parser(
        "Cross-Scale MAE pretraining. The defaults are upstream's (its paper run on fMoW-RGB: 224 px, batch 512, "
        "200 epochs, --blr 5e-5); `bash train.sh` runs the embedded sample with the quick start's (64 px, patch 8, "
        "batch 32, 60 epochs, --blr 1e-2)."
    )
    config.add_optimisation_args(parser, min_lr=0.0, warmup_epochs=40, weight_decay=0.05, **UPSTREAM_DEFAULTS)
    config.add_data_args(parser, input_size=UPSTREAM_DEFAULTS["input_size"], train_path=str(config.DEFAULT_TRAIN_CSV))
    config.add_runtime_args(parser, output_dir="./output_dir")

    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        default="cross_scale_mae_vit_base",
        metavar="NAME",
        help="cross_scale_mae_vit_{tiny,small,base,large,huge} (paper), mae_vit_{size} (plain MAE), "
        "or an upstream ablation name such as mae_vit_base_MsLdCd",
    )
    group.add_argument("--mask_ratio", type=float, default=0.75, help="fraction of patches masked per view")
    group.add_argument("--norm_pix_loss", action="store_true", help="reconstruct per-patch standardised pixels")
    group.add_argument(
        "--loss_weights",
        nargs="*",
        default=[],
        metavar="TERM=W",
        help="override loss weights: rec, cross_pred, cross_cons, enc_pred, latent (0 disables)",
    )
    group.add_argument(
        "--scale_range",
        type=float,
        nargs=2,
        default=[0.25, 0.75],
        help="area of the second scale's crop, as a range of fractions of the image area",
    )
    group.add_argument(
        "--crop_mode",
        default="batch",
        choices=("batch", "sample"),
        help="batch: one crop box per batch (upstream); sample: one per image",
    )
    group.add_argument(
        "--contrastive",
        default="upstream",
        choices=("upstream", "ntxent"),
        help="upstream: positive left out of the denominator; ntxent: SimCLR NT-Xent",
    )
    group.add_argument("--temperature", type=float, default=0.5, help="contrastive temperature")
    group.add_argument(
        "--gather_negatives",
        action="store_true",
        help="under DDP, contrast each anchor with every process's batch (the global batch's objective); "
        "default: the local batch only, as upstream and the published weights",
    )
    group.add_argument(
        "--sync_bn",
        action="store_true",
        help="under DDP, the cross-scale predictor's BatchNorm uses the statistics of every process's batch "
        "(default: per device, as upstream)",
    )
    group.add_argument(
        "--encoder_norm", action="store_true", help="apply the encoder's final norm in pretraining (upstream does not)"
    )
    group.add_argument(
        "--norm_style", default="pre", choices=("pre", "post"), help="pre: timm blocks; post: upstream xFormers blocks"
    )
    group.add_argument(
        "--init",
        default="",
        metavar="PATH",
        help="start from the weights of this pretraining checkpoint (ours or upstream's, e.g. the published "
        "ViT-B / ViT-L) of --model's width and depth; RGB weights into --in_chans C are adapted by "
        "--rgb_bands, multispectral ones into 3 bands by --checkpoint_rgb_bands. Only weights: optimiser, "
        "epochs and LR schedule start afresh. A checkpoint that --resume finds wins (--init is then ignored)",
    )

    group = parser.add_argument_group("outputs")
    group.add_argument("--save_every", type=int, default=25, help="epochs between numbered checkpoints")
    group.add_argument("--plot_every", type=int, default=25, help="epochs between reconstruction figures")
    group.add_argument(
        "--knn_eval_every", type=int, default=0, help="epochs between multi-scale kNN evaluations (0 = never)"
    )
    group.add_argument("--knn_train_path", default=str(config.DEFAULT_TRAIN_CSV), help="labelled kNN memory set")
    group.add_argument("--knn_test_path", default=str(config.DEFAULT_VAL_CSV), help="labelled kNN evaluation set")

    group = parser.add_argument_group("upstream flags, accepted so old launchers keep working")
    group.add_argument("--use_xformers", action="store_true", help="ignored: attention always uses PyTorch SDPA")
    group.add_argument("--attn_name", default="scaled_dot_product", help="ignored: attention always uses PyTorch SDPA")
    group.add_argument("--loss", default="mse", choices=("mse",), help="reconstruction loss (only mse, the paper's)")
    group.add_argument("--wandb_project", default=None, help="ignored: logs go to TensorBoard")
    return parser


def check(flags: config.Flags) -> tuple[config.Bands, dict[str, float]]:
    """The flags' checks, torch-free (the command line runs them before torch loads); returns (bands, loss weights).

    Raises:
        UsageError: one line naming the flag (a path: absolute).
    """
    config.check_training_flags(flags)
    knn_paths = ("knn_train_path", "knn_test_path") if flags.knn_eval_every else ()
    config.check_paths(flags, "train_path", "band_stats", "init", "resume", *knn_paths)
    return config.resolve_bands(flags), parse_loss_weights(flags.loss_weights)


def main(flags: config.Flags) -> None:
    """Check the flags (``check``), then pretrain."""
    bands, loss_weights = check(flags)
    config.note_upstream_defaults(flags, UPSTREAM_DEFAULTS, "bash train.sh")
    import engine_pretrain  # torch, timm and the model load here, after the flags are known to work

    engine_pretrain.pretrain(flags, bands, loss_weights)


if __name__ == "__main__":
    flags = config.parse_args(get_args_parser())  # --help and flag errors answer here, before torch loads
    config.check_or_exit(check, flags)  # so do bad values and missing paths
    from util.run.process import run_entry_point

    run_entry_point(main, flags)
