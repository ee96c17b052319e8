"""Cross-Scale MAE pretraining on one CPU, one GPU, or many GPUs under torchrun.

    python main_pretrain.py --model cross_scale_mae_vit_base --input_size 128 --train_path train_128.csv
"""
from __future__ import annotations

import argparse
import copy

import torch
from timm.optim import create_optimizer_v2

import models_cross_scale_mae as models_mae
from engine_pretrain import save_reconstruction, train_one_epoch
from util import checkpoint, config, datasets, engine, knn, misc


def parse_loss_weights(items: list[str]) -> dict[str, float]:
    weights = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            weights[name] = float(value)
        except ValueError:
            raise misc.UsageError(f"--loss_weights {item}: expected NAME=NUMBER, e.g. cross_cons=0.5") from None
        if name not in models_mae.LOSS_WEIGHT_KEYS:
            raise misc.UsageError(f"--loss_weights {item}: unknown term; known: {', '.join(models_mae.LOSS_WEIGHT_KEYS)}")
    return weights


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Cross-Scale MAE pretraining")
    config.add_optimisation_args(parser, batch_size=512, epochs=200, blr=5e-5, min_lr=0.0, warmup_epochs=40, weight_decay=0.05)
    config.add_data_args(parser, input_size=224, train_path=str(datasets.DEFAULT_TRAIN_CSV))
    config.add_runtime_args(parser, output_dir="./output_dir")

    group = parser.add_argument_group("model")
    group.add_argument("--model", default="cross_scale_mae_vit_base", metavar="NAME",
                       help="cross_scale_mae_vit_{tiny,small,base,large,huge} (paper), mae_vit_{size} (plain MAE), "
                            "or an upstream ablation name such as mae_vit_base_MsLdCd")
    group.add_argument("--mask_ratio", type=float, default=0.75, help="fraction of patches masked per view")
    group.add_argument("--norm_pix_loss", action="store_true", help="reconstruct per-patch standardised pixels")
    group.add_argument("--loss_weights", nargs="*", default=[], metavar="TERM=W",
                       help="override loss weights: rec, cross_pred, cross_cons, enc_pred, latent (0 disables)")
    group.add_argument("--scale_range", type=float, nargs=2, default=[0.25, 0.75], help="area range of the second scale's crop")
    group.add_argument("--crop_mode", default="batch", choices=("batch", "sample"),
                       help="batch: one crop box per batch (upstream); sample: one per image")
    group.add_argument("--contrastive", default="upstream", choices=("upstream", "ntxent"),
                       help="upstream: positive left out of the denominator; ntxent: SimCLR NT-Xent")
    group.add_argument("--temperature", type=float, default=0.5, help="contrastive temperature")
    group.add_argument("--encoder_norm", action="store_true", help="apply the encoder's final norm in pretraining (upstream does not)")
    group.add_argument("--norm_style", default="pre", choices=("pre", "post"), help="pre: timm blocks; post: upstream xFormers blocks")

    group = parser.add_argument_group("outputs")
    group.add_argument("--save_every", type=int, default=25, help="epochs between numbered checkpoints")
    group.add_argument("--plot_every", type=int, default=25, help="epochs between reconstruction figures")
    group.add_argument("--knn_eval_every", type=int, default=0, help="epochs between multi-scale kNN evaluations (0 = never)")
    group.add_argument("--knn_train_path", default=str(datasets.DEFAULT_TRAIN_CSV), help="labelled kNN memory set")
    group.add_argument("--knn_test_path", default=str(datasets.DEFAULT_VAL_CSV), help="labelled kNN evaluation set")

    group = parser.add_argument_group("upstream flags, accepted so old launchers keep working")
    group.add_argument("--use_xformers", action="store_true", help="ignored: attention always uses PyTorch SDPA")
    group.add_argument("--attn_name", default="scaled_dot_product", help="ignored: attention always uses PyTorch SDPA")
    group.add_argument("--loss", default="mse", choices=("mse",), help="reconstruction loss (only mse, the paper's)")
    group.add_argument("--wandb_project", default=None, help="ignored: logs go to TensorBoard")
    return parser


def check_args(args: argparse.Namespace) -> None:
    config.check_common_args(args)
    if not 0.0 < args.mask_ratio < 1.0:
        raise misc.UsageError(f"--mask_ratio must be in (0, 1), got {args.mask_ratio}")
    if args.model not in models_mae.MODEL_NAMES:
        raise misc.UsageError(f"--model {args.model}: unknown; e.g. cross_scale_mae_vit_base, mae_vit_base, mae_vit_base_MsLdCeCd")
    if args.batch_size < 2 and models_mae.MODEL_VARIANTS[args.model][2].get("cross_cons"):
        raise misc.UsageError("--batch_size must be at least 2 per device: the contrastive loss needs negatives in the batch")


def build_model(args: argparse.Namespace) -> models_mae.CrossScaleMAE:
    options = dict(
        input_size=args.input_size, patch_size=args.patch_size, in_chans=args.in_chans, mask_ratio=args.mask_ratio,
        norm_pix_loss=args.norm_pix_loss, scale_range=tuple(args.scale_range), crop_mode=args.crop_mode,
        contrastive=args.contrastive, temperature=args.temperature, encoder_norm=args.encoder_norm,
        norm_style=args.norm_style,
    )
    weights = parse_loss_weights(args.loss_weights)
    if weights:
        options["loss_weights"] = weights
    return models_mae.create_model(args.model, **options)


def main(args: argparse.Namespace) -> None:
    check_args(args)
    run = engine.setup_run(args)
    if args.use_xformers or args.attn_name != "scaled_dot_product":
        path = "scaled_dot_product_attention" if engine.use_sdpa(args.attention, run.device) else "explicit matmul + softmax"
        misc.main_print(f"note: --use_xformers/--attn_name are ignored: xFormers is not used, attention runs through {path} (--attention)")

    dataset = datasets.build_dataset(
        args.train_path, args.dataset_type,
        datasets.build_transform(True, args.input_size, args.mean, args.std),
        datasets.draft_size_for(True, args.input_size), args.skip_bad_images,
    )
    device_transform = None
    if isinstance(dataset, datasets.PackedDataset):  # decoded already: augment whole batches on the device
        dataset.transform = None
        device_transform = datasets.BatchAugment(args.input_size, args.mean, args.std).to(run.device)
        misc.main_print(f"packed dataset {dataset.array_path}: crops, flips and normalisation run on {run.device}")
    loader, sampler = engine.train_loader(dataset, args, run)
    steps_per_epoch = len(loader)

    model = build_model(args).to(run.device)
    optimizer = create_optimizer_v2(
        model, "adamw", lr=engine.resolve_lr(args, run), weight_decay=args.weight_decay, betas=(0.9, 0.95), fused=True,
    )
    scheduler = engine.lr_scheduler(optimizer, args, steps_per_epoch)
    scaler = engine.grad_scaler(run)
    start_epoch, start_step, _ = engine.resume(args, run, model, optimizer, scaler)

    misc.main_print(
        f"{args.model}: {sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters, "
        f"losses {' + '.join(model.loss_names)}\n"
        f"{len(dataset)} images, {steps_per_epoch} steps/epoch, effective batch "
        f"{args.batch_size * args.accum_iter * run.world_size}, lr {args.lr:.3e}, device {run.device}, "
        f"autocast {run.amp_dtype or 'off (fp32)'}, {run.world_size} process(es)"
    )
    writer = engine.summary_writer(run, args)
    plot_images = plot_batch(dataset, args, run.device) if run.is_main else None
    train_model = engine.distribute(model, run, args, find_unused=model.has_unused_parameters)

    knn_loaders = knn_data(args, run) if args.knn_eval_every else None
    for epoch in range(start_epoch, args.epochs):
        first_step = start_step if epoch == start_epoch else 0
        sampler.set_epoch(epoch)
        sampler.set_start(first_step * args.batch_size)
        try:
            stats = train_one_epoch(train_model, model, loader, optimizer, scheduler, scaler, run, epoch, steps_per_epoch,
                                    args, writer, first_step, device_transform)
        except engine.Preempted as stop:
            engine.save_preempted(run, stop, model, optimizer, scaler, args)
            return
        knn_stats = knn_eval(model, *knn_loaders, run, epoch, writer) if knn_loaders and (epoch + 1) % args.knn_eval_every == 0 else {}
        last = epoch + 1 == args.epochs
        engine.save_epoch(run, "checkpoint-last.pth", model, optimizer, scaler, epoch, args)
        if (epoch + 1) % args.save_every == 0 or last:
            engine.save_epoch(run, f"checkpoint-{epoch}.pth", model, optimizer, scaler, epoch, args)
        engine.append_log(run, {"epoch": epoch, **{f"train_{k}": v for k, v in stats.items()}, **knn_stats})
        if run.is_main and ((epoch + 1) % args.plot_every == 0 or last):
            save_reconstruction(model, plot_images, args, run, epoch, writer)

    if misc.is_distributed():
        misc.main_print(misc.check_replicas_in_sync(model))
    if writer is not None:
        writer.close()
        if args.norm_style == "pre":
            exported, _ = checkpoint.export_encoder(model, run.output_dir / "encoder")
            misc.main_print(f"timm encoder: {exported} (+ .safetensors)")
        misc.main_print(f"checkpoints: {run.output_dir}/checkpoint-last.pth\nfigures: {run.output_dir / 'plots'}\n"
                        f"logs: tensorboard --logdir {args.log_dir or run.output_dir}")


def knn_data(args: argparse.Namespace, run: engine.Run):
    """Memory and evaluation loaders of the labelled kNN sets, and their class count."""
    transform = datasets.build_transform(False, args.input_size, args.mean, args.std)
    memory = datasets.build_dataset(args.knn_train_path, "auto", transform, skip_bad=args.skip_bad_images)
    queries = datasets.build_dataset(args.knn_test_path, "auto", transform, skip_bad=args.skip_bad_images)
    num_classes = max(max(memory.targets), max(queries.targets)) + 1
    return engine.eval_loader(memory, args, run), engine.eval_loader(queries, args, run), num_classes


def knn_eval(model: models_mae.CrossScaleMAE, memory, queries, num_classes: int, run: engine.Run, epoch: int, writer) -> dict[str, float]:
    """Multi-scale kNN top-1 of the encoder as it is now (resize mode, cls token); logged and returned."""
    results = knn.multiscale_accuracies(model.encoder, model.encoder_norm, memory, queries, num_classes, run.device, run.amp_dtype)
    model.train()
    stats = {f"knn_{classifier}_{scale:g}": value for (classifier, scale), value in results.items()}
    misc.main_print(f"epoch {epoch} kNN top-1: " + ", ".join(f"{k[4:]} {v:.1f}%" for k, v in stats.items()))
    if writer is not None:
        for name, value in stats.items():
            writer.add_scalar(f"knn/{name}", value, epoch)
    return stats


def plot_batch(dataset, args: argparse.Namespace, device: torch.device) -> torch.Tensor:
    """The first (up to) four training images, centre-cropped: the same images in every figure."""
    centre_crops = copy.copy(dataset)  # the same samples, without scanning the dataset again
    centre_crops.transform = datasets.build_transform(False, args.input_size, args.mean, args.std)
    return torch.stack([centre_crops[i][0] for i in range(min(4, len(dataset)))]).to(device)


if __name__ == "__main__":
    misc.run_entry_point(main, config.parse_args(get_args_parser()))
