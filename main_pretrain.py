"""Cross-Scale MAE pretraining on one CPU, one GPU, or many GPUs under torchrun.

    python main_pretrain.py --model cross_scale_mae_vit_base --input_size 128 --train_path train_128.csv
"""
from __future__ import annotations

import argparse

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


def get_args_parser() -> argparse.ArgumentParser:
    parser = config.new_parser("Cross-Scale MAE pretraining")
    config.add_optimisation_args(parser, batch_size=512, epochs=200, blr=5e-5, min_lr=0.0, warmup_epochs=40, weight_decay=0.05)
    config.add_data_args(parser, input_size=224, train_path=str(config.DEFAULT_TRAIN_CSV))
    config.add_runtime_args(parser, output_dir="./output_dir")

    group = parser.add_argument_group("model")
    group.add_argument("--model", default="cross_scale_mae_vit_base", metavar="NAME",
                       help="cross_scale_mae_vit_{tiny,small,base,large,huge} (paper), mae_vit_{size} (plain MAE), "
                            "or an upstream ablation name such as mae_vit_base_MsLdCd")
    group.add_argument("--mask_ratio", type=float, default=0.75, help="fraction of patches masked per view")
    group.add_argument("--norm_pix_loss", action="store_true", help="reconstruct per-patch standardised pixels")
    group.add_argument("--loss_weights", nargs="*", default=[], metavar="TERM=W",
                       help="override loss weights: rec, cross_pred, cross_cons, enc_pred, latent (0 disables)")
    group.add_argument("--scale_range", type=float, nargs=2, default=[0.25, 0.75], help="area of the second scale's crop, as a range of fractions of the image area")
    group.add_argument("--crop_mode", default="batch", choices=("batch", "sample"),
                       help="batch: one crop box per batch (upstream); sample: one per image")
    group.add_argument("--contrastive", default="upstream", choices=("upstream", "ntxent"),
                       help="upstream: positive left out of the denominator; ntxent: SimCLR NT-Xent")
    group.add_argument("--temperature", type=float, default=0.5, help="contrastive temperature")
    group.add_argument("--gather_negatives", action="store_true",
                       help="under DDP, contrast each anchor with every process's batch (the global batch's objective); "
                            "default: the local batch only, as upstream and the published weights")
    group.add_argument("--sync_bn", action="store_true",
                       help="under DDP, the cross-scale predictor's BatchNorm uses the statistics of every process's batch "
                            "(default: per device, as upstream)")
    group.add_argument("--encoder_norm", action="store_true", help="apply the encoder's final norm in pretraining (upstream does not)")
    group.add_argument("--norm_style", default="pre", choices=("pre", "post"), help="pre: timm blocks; post: upstream xFormers blocks")
    group.add_argument("--init", default="", metavar="PATH",
                       help="start from the weights of this pretraining checkpoint (ours or upstream's, e.g. the published "
                            "ViT-B / ViT-L) of --model's width and depth; RGB weights into --in_chans C are adapted by "
                            "--rgb_bands, multispectral ones into 3 bands by --checkpoint_rgb_bands. Only weights: optimiser, "
                            "epochs and LR schedule start afresh. A checkpoint that --resume finds wins (--init is then ignored)")

    group = parser.add_argument_group("outputs")
    group.add_argument("--save_every", type=int, default=25, help="epochs between numbered checkpoints")
    group.add_argument("--plot_every", type=int, default=25, help="epochs between reconstruction figures")
    group.add_argument("--knn_eval_every", type=int, default=0, help="epochs between multi-scale kNN evaluations (0 = never)")
    group.add_argument("--knn_train_path", default=str(config.DEFAULT_TRAIN_CSV), help="labelled kNN memory set")
    group.add_argument("--knn_test_path", default=str(config.DEFAULT_VAL_CSV), help="labelled kNN evaluation set")

    group = parser.add_argument_group("upstream flags, accepted so old launchers keep working")
    group.add_argument("--use_xformers", action="store_true", help="ignored: attention always uses PyTorch SDPA")
    group.add_argument("--attn_name", default="scaled_dot_product", help="ignored: attention always uses PyTorch SDPA")
    group.add_argument("--loss", default="mse", choices=("mse",), help="reconstruction loss (only mse, the paper's)")
    group.add_argument("--wandb_project", default=None, help="ignored: logs go to TensorBoard")
    return parser


if __name__ == "__main__":  # --help and flag errors answer here, before torch and timm load (~5 s)
    config.parse_args(get_args_parser())

import copy  # noqa: E402
import datetime  # noqa: E402

import torch  # noqa: E402
from timm.optim import create_optimizer_v2  # noqa: E402

import models_cross_scale_mae as models_mae  # noqa: E402
from engine_pretrain import knn_evaluate, save_reconstruction, train_one_epoch  # noqa: E402
from model_loading import export_encoder, init_mae  # noqa: E402
from util import config  # noqa: E402
from util.data import datasets, loaders, raster_options, transforms
from util.run import checkpoint, distributed, logger, loop, process, schedule
from util.weights import band_adaptation
from util.run.process import run_entry_point  # noqa: E402


def build_model(args: argparse.Namespace) -> models_mae.CrossScaleMAE:
    """The model ``--model`` names with the flags' options.

    Raises:
        UsageError: naming the flag whose value the model refuses (the model is where values are checked).
    """
    options = dict(
        input_size=args.input_size, patch_size=args.patch_size, in_chans=args.in_chans, mask_ratio=args.mask_ratio,
        norm_pix_loss=args.norm_pix_loss, scale_range=tuple(args.scale_range), crop_mode=args.crop_mode,
        contrastive=args.contrastive, temperature=args.temperature, gather_negatives=args.gather_negatives,
        encoder_norm=args.encoder_norm,
        norm_style=args.norm_style,
    )
    weights = parse_loss_weights(args.loss_weights)
    if weights:
        options["loss_weights"] = weights
    try:
        model = models_mae.create_model(args.model, **options)
    except ValueError as e:  # the model's messages start with the argument's name, which is the flag's
        raise UsageError(f"--{e}") from None
    patches = (args.input_size // args.patch_size) ** 2
    if int(patches * (1 - args.mask_ratio)) < 1:
        raise UsageError(f"--mask_ratio {args.mask_ratio} leaves no visible patch of the {patches} patches of a "
                         f"{args.input_size} px image (--patch_size {args.patch_size}): at most {1 - 1 / patches:.3f}")
    if args.batch_size < 2 and model.loss_weights["cross_cons"]:
        raise UsageError("--batch_size must be at least 2 per device: the contrastive loss needs negatives in the batch")
    return model


def main(args: argparse.Namespace) -> None:
    config.check_common_args(args)
    checkpoint.check_output_dir(args)
    run = process.setup_run(args)
    model = build_model(args).to(run.device)
    if args.use_xformers or args.attn_name != "scaled_dot_product":
        path = "scaled_dot_product_attention" if loop.use_sdpa(args.attention, run.device) else "explicit matmul + softmax"
        distributed.main_print(f"note: --use_xformers/--attn_name are ignored: xFormers is not used, attention runs through {path} (--attention)")

    dataset = datasets.build_dataset(
        args.train_path, args.dataset_type, transforms.image_transform(args, True, valid_channel=True),
        transforms.draft_size_for(True, args.input_size), args.skip_bad_images, raster=raster_options.raster_options(args, valid_channel=True),
    )
    device_transform = None
    if getattr(dataset, "predecoded", False):  # packed array or shards, decoded already: augment whole batches on the device
        dataset.transform = None
        device_transform = transforms.BatchAugment(args.input_size, args.mean, args.std, value_scale=1.0 if args.raster else 255.0,
                                                   nodata=dataset.nodata).to(run.device)
        distributed.main_print(f"pre-decoded dataset {dataset.source}: crops, flips and normalisation run on {run.device}")
    if hasattr(dataset, "digest"):  # shards: a resume must read the same shards in the same order (checkpoint.changed_flags)
        args.shard_manifest = dataset.digest
    loader, sampler = loaders.train_loader(dataset, args, run)
    steps_per_epoch = len(loader)

    optimizer = create_optimizer_v2(
        model, "adamw", lr=schedule.resolve_lr(args, run.world_size), weight_decay=args.weight_decay, betas=(0.9, 0.95),
        fused=True,
    )
    scheduler = schedule.lr_scheduler(optimizer, args, steps_per_epoch)
    scaler = loop.grad_scaler(run)
    start_epoch, start_step, resumed = checkpoint.resume(args, run, model, optimizer, scaler)
    if args.init and resumed:  # a relaunched run (--resume auto) continues its own weights, not --init's again
        distributed.main_print(f"note: --init {args.init} ignored: resumed from {resumed['path']}")
    elif args.init:
        distributed.main_print(init_mae(model, args.init, band_adaptation.BandAdaptation.from_args(args), args.model))
    logger.append_log(run, {"run_start": datetime.datetime.now().isoformat(timespec="seconds"),
                            "resumed_from": resumed.get("path"), "initialised_from": None if resumed else args.init or None,
                            "start_epoch": start_epoch})

    distributed.main_print(
        f"{args.model}: {sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters, "
        f"losses {' + '.join(model.loss_names)}\n"
        f"{len(dataset)} images, {steps_per_epoch} steps/epoch, effective batch "
        f"{args.batch_size * args.accum_iter * run.world_size}, lr {args.lr:.3e}, device {run.device}, "
        f"autocast {run.amp_dtype or 'off (fp32)'}, {run.world_size} process(es)"
    )
    writer = logger.summary_writer(run, args)
    plot_images = plot_batch(dataset, args, run.device) if run.is_main else None
    if args.sync_bn:
        distributed.convert_sync_batchnorm(model)  # works on gloo too, unlike nn.SyncBatchNorm; same state-dict keys
    train_model = loop.distribute(model, run, args, unused=model.unused_parameters)
    knn_sets = knn_data(args, run) if args.knn_eval_every else None

    try:
        for epoch, first_step in loop.epochs(args, sampler, start_epoch, start_step, run, steps_per_epoch):
            stats = train_one_epoch(train_model, model.loss_names, loader, optimizer, scheduler, scaler, run, epoch,
                                    steps_per_epoch, args, writer, first_step, device_transform)
            knn_stats = knn_evaluate(model, *knn_sets, run, epoch, writer) if knn_sets and (epoch + 1) % args.knn_eval_every == 0 else {}
            last = epoch + 1 == args.epochs
            checkpoint.save_epoch(run, "checkpoint-last.pth", model, optimizer, scaler, epoch, args)
            if (args.save_every and (epoch + 1) % args.save_every == 0) or last:  # 0: only the last epoch's
                checkpoint.save_epoch(run, f"checkpoint-{epoch}.pth", model, optimizer, scaler, epoch, args)
            logger.append_log(run, {"epoch": epoch, **{f"train_{k}": v for k, v in stats.items()}, **knn_stats})
            if run.is_main and ((args.plot_every and (epoch + 1) % args.plot_every == 0) or last):
                save_reconstruction(model, plot_images, args, run, epoch, writer)
    except process.Preempted as stop:
        checkpoint.save_preempted(run, stop, model, optimizer, scaler, args)
        return

    if distributed.is_distributed():
        distributed.main_print(distributed.check_replicas_in_sync(model))
    if writer is not None:
        writer.close()
        if args.norm_style == "pre":
            exported = export_encoder(model, run.output_dir / "encoder", vars(args), checkpoint="checkpoint-last.pth",
                                      epoch=args.epochs - 1)
            distributed.main_print(f"encoder: {exported.pth}; timm: create_model('local-dir:{exported.directory}', "
                                   "pretrained=True) (docs/weights_elsewhere.md)")
        distributed.main_print(f"checkpoints: {run.output_dir}/checkpoint-last.pth\nfigures: {run.output_dir / 'plots'}\n"
                               f"logs: tensorboard --logdir {args.log_dir or run.output_dir}")


def knn_data(args: argparse.Namespace, run: process.Run):
    """Memory and evaluation loaders of the labelled kNN sets, and their class count (labels checked by
    ``datasets.check_labels``, ImageFolder trees matched by class name)."""
    transform, raster = transforms.image_transform(args, False), raster_options.raster_options(args)
    memory = datasets.build_dataset(args.knn_train_path, "auto", transform, skip_bad=args.skip_bad_images, raster=raster)
    queries = datasets.build_dataset(args.knn_test_path, "auto", transform, skip_bad=args.skip_bad_images,
                                     classes=memory.classes or None, raster=raster)
    num_classes = len(datasets.check_labels(memory, [queries], what="kNN classifier"))
    return loaders.eval_loader(memory, args, run), loaders.eval_loader(queries, args, run), num_classes


def plot_batch(dataset, args: argparse.Namespace, device: torch.device) -> torch.Tensor:
    """The first (up to) four training images, centre-cropped: the same images in every figure."""
    centre_crops = copy.copy(dataset)  # the same samples, without scanning the dataset again
    centre_crops.transform = transforms.image_transform(args, False, valid_channel=True)
    images = torch.stack([centre_crops[i][0] for i in range(min(4, len(dataset)))])
    return raster_options.split_valid(images, args.in_chans)[0].to(device)


if __name__ == "__main__":
    run_entry_point(main, config.parse_args(get_args_parser()))

