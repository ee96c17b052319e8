"""Pretraining: the run (``pretrain``), one epoch of Cross-Scale MAE, the reconstruction figure, and kNN evaluation
during training."""

from __future__ import annotations

import copy
import datetime

import torch
from timm.optim import create_optimizer_v2
from torch.utils.tensorboard import SummaryWriter

import models_cross_scale_mae as models_mae
from model_loading import export_encoder, init_mae
from util import config
from util.config import Bands, Flags, Schedule
from util.data import datasets, loaders, transforms
from util.errors import UsageError
from util.eval import knn
from util.eval.figures import grid_image, reconstruction_columns, save_reconstruction_png
from util.files import best_effort
from util.run import checkpoint, distributed, logger, loop, process, schedule
from util.run.distributed import main_print
from util.run.loop import StepLoop
from util.run.process import Run
from util.weights.band_adaptation import BandAdaptation


def pretrain(flags: Flags, bands: Bands, loss_weights: dict[str, float]) -> None:
    """The pretraining run of ``main_pretrain.py``'s flags: data, model, optimiser and LR schedule, resume, the
    epochs (each: train, optional kNN, checkpoints, figures), and the timm export of the encoder at the end.

    Args:
        bands: How files become inputs (``config.resolve_bands``).
        loss_weights: ``--loss_weights`` overrides (``main_pretrain.parse_loss_weights``).

    Raises:
        UsageError, DataError, CheckpointError: one line naming the flag or file.
    """
    checkpoint.check_output_dir(flags.output_dir, flags.resume, flags.overwrite)
    run = process.setup_run(flags.device, flags.amp, flags.seed, flags.output_dir, flags.dist_timeout)
    model = build_model(flags, loss_weights).to(run.device)
    if flags.use_xformers or flags.attn_name != "scaled_dot_product":
        path = (
            "scaled_dot_product_attention"
            if loop.use_sdpa(flags.attention, run.device)
            else "explicit matmul + softmax"
        )
        main_print(
            f"note: --use_xformers/--attn_name are ignored: xFormers is not used, attention runs through {path} "
            "(--attention)"
        )

    dataset = datasets.build_dataset(
        flags.train_path,
        flags.dataset_type,
        transforms.image_transform(bands, flags.input_size, True, valid_channel=True),
        bands=bands,
        valid_channel=True,
        draft_size=transforms.draft_size_for(True, flags.input_size),
        skip_bad=flags.skip_bad_images,
    )
    device_transform = None
    if dataset.predecoded:  # packed array or shards, decoded already: augment whole batches on the device
        dataset.transform = None
        device_transform = transforms.BatchAugment(
            flags.input_size, bands.mean, bands.std, value_scale=1.0 if bands.raster else 255.0, nodata=dataset.nodata
        ).to(run.device)
        main_print(f"pre-decoded dataset {dataset.source}: crops, flips and normalisation run on {run.device}")
    loader, sampler = loaders.train_loader(dataset, config.loading(flags), run)
    steps_per_epoch = len(loader)

    plan = config.training_schedule(flags, run.world_size)
    # shard_manifest: a resume must read the same shards in the same order (checkpoint.changed_flags)
    record = config.run_record(
        flags, **bands.record(), lr=plan.lr, lr_given=flags.lr, world_size=run.world_size, shard_manifest=dataset.digest
    )
    optimizer = create_optimizer_v2(
        model, "adamw", lr=plan.lr, weight_decay=flags.weight_decay, betas=(0.9, 0.95), fused=True
    )
    scheduler = schedule.lr_scheduler(optimizer, plan, steps_per_epoch)
    scaler = loop.grad_scaler(run)
    start_epoch, start_step, resumed = checkpoint.resume(
        flags.resume, record, run, model, optimizer, scaler, flags.start_epoch, flags.allow_changed_flags
    )
    if flags.init and resumed:  # a relaunched run (--resume auto) continues its own weights, not --init's again
        main_print(f"note: --init {flags.init} ignored: resumed from {resumed['path']}")
    elif flags.init:
        main_print(init_mae(model, flags.init, BandAdaptation.of(bands), flags.model))
    logger.append_log(
        run,
        {
            "run_start": datetime.datetime.now().isoformat(timespec="seconds"),
            "resumed_from": resumed.get("path"),
            "initialised_from": None if resumed else flags.init or None,
            "start_epoch": start_epoch,
        },
    )

    main_print(
        f"{flags.model}: {sum(p.numel() for p in model.parameters() if p.requires_grad):,} trainable parameters, "
        f"losses {' + '.join(model.loss_names)}\n"
        f"{len(dataset)} images, {steps_per_epoch} steps/epoch, effective batch "
        f"{flags.batch_size * flags.accum_iter * run.world_size}, lr {plan.lr:.3e}, device {run.device}, "
        f"autocast {run.amp_dtype or 'off (fp32)'}, {run.world_size} process(es)"
    )
    writer = logger.start_logs(run, flags, flags.log_dir)
    plot_images = plot_batch(dataset, bands, flags.input_size, run.device) if run.is_main else None
    if flags.sync_bn:
        distributed.convert_sync_batchnorm(model)  # works on gloo too, unlike nn.SyncBatchNorm; same state-dict keys
    train_model = loop.distribute(model, run, flags.attention, flags.compile, unused=model.unused_parameters)
    knn_sets = knn_data(flags, bands, run) if flags.knn_eval_every else None

    try:
        for epoch, first_step in loop.epochs(plan, sampler, start_epoch, start_step, run, steps_per_epoch):
            stats = train_one_epoch(
                train_model,
                model.loss_names,
                loader,
                optimizer,
                scheduler,
                scaler,
                run,
                plan,
                epoch,
                steps_per_epoch,
                flags.in_chans,
                flags.mask_ratio,
                writer,
                first_step,
                device_transform,
            )
            knn_due = knn_sets and (epoch + 1) % flags.knn_eval_every == 0
            knn_stats = knn_evaluate(model, *knn_sets, run, epoch, writer) if knn_due else {}
            last = epoch + 1 == plan.epochs
            # save_every 0: only the last epoch's numbered checkpoint
            loop.end_epoch(
                run,
                epoch,
                model,
                optimizer,
                scaler,
                record,
                {**{f"train_{k}": v for k, v in stats.items()}, **knn_stats},
                writer=writer,
                save_every=flags.save_every or plan.epochs,
                last=last,
            )
            if run.is_main and ((flags.plot_every and (epoch + 1) % flags.plot_every == 0) or last):
                save_reconstruction(model, plot_images, flags, bands, run, epoch, writer)
    except process.Preempted as stop:
        checkpoint.save_preempted(run, stop, model, optimizer, scaler, record)
        return

    if distributed.is_distributed():
        main_print(distributed.check_replicas_in_sync(model))
    if writer is not None:
        writer.close()
        if flags.norm_style == "pre":
            exported = export_encoder(
                model, run.output_dir / "encoder", record, checkpoint="checkpoint-last.pth", epoch=plan.epochs - 1
            )
            main_print(
                f"encoder: {exported.pth}; timm: create_model('local-dir:{exported.directory}', pretrained=True) "
                "(docs/weights_elsewhere.md)"
            )
        main_print(
            f"checkpoints: {run.output_dir}/checkpoint-last.pth\nfigures: {run.output_dir / 'plots'}\n"
            f"logs: tensorboard --logdir {flags.log_dir or run.output_dir}"
        )


def build_model(flags: Flags, loss_weights: dict[str, float]) -> models_mae.CrossScaleMAE:
    """The model ``--model`` names with the flags' options.

    Raises:
        UsageError: naming the flag whose value the model refuses (the model is where values are checked).
    """
    options = dict(
        input_size=flags.input_size,
        patch_size=flags.patch_size,
        in_chans=flags.in_chans,
        mask_ratio=flags.mask_ratio,
        norm_pix_loss=flags.norm_pix_loss,
        scale_range=tuple(flags.scale_range),
        crop_mode=flags.crop_mode,
        contrastive=flags.contrastive,
        temperature=flags.temperature,
        gather_negatives=flags.gather_negatives,
        encoder_norm=flags.encoder_norm,
        norm_style=flags.norm_style,
    )
    if loss_weights:
        options["loss_weights"] = loss_weights
    try:
        model = models_mae.create_model(flags.model, **options)
    except ValueError as e:  # the model's messages start with the argument's name, which is the flag's
        raise UsageError(f"--{e}") from None
    patches = (flags.input_size // flags.patch_size) ** 2
    if int(patches * (1 - flags.mask_ratio)) < 1:
        raise UsageError(
            f"--mask_ratio {flags.mask_ratio} leaves no visible patch of the {patches} patches of a "
            f"{flags.input_size} px image (--patch_size {flags.patch_size}): at most {1 - 1 / patches:.3f}"
        )
    if flags.batch_size < 2 and model.loss_weights["cross_cons"]:
        raise UsageError(
            "--batch_size must be at least 2 per device: the contrastive loss needs negatives in the batch"
        )
    return model


def knn_data(flags: Flags, bands: Bands, run: Run):
    """Memory and evaluation loaders of the labelled kNN sets (``--knn_train_path``, ``--knn_test_path``), and their
    class count (labels checked by ``datasets.check_labels``, ImageFolder trees matched by class name)."""
    transform = transforms.image_transform(bands, flags.input_size, False)
    memory = datasets.build_dataset(
        flags.knn_train_path, "auto", transform, bands=bands, skip_bad=flags.skip_bad_images
    )
    queries = datasets.build_dataset(
        flags.knn_test_path,
        "auto",
        transform,
        bands=bands,
        skip_bad=flags.skip_bad_images,
        classes=memory.classes or None,
    )
    num_classes = len(datasets.check_labels(memory, [queries], what="kNN classifier"))
    knn.neighbours_used(knn.WEIGHTED_K, knn.MAJORITY_K, len(memory))  # says so where the memory set clips them
    reading = config.loading(flags)
    return loaders.eval_loader(memory, reading, run), loaders.eval_loader(queries, reading, run), num_classes


def plot_batch(dataset: loaders.SampleDataset, bands: Bands, input_size: int, device: torch.device) -> torch.Tensor:
    """The first (up to) four training images, centre-cropped: the same images in every figure. [B, C, H, W]"""
    centre_crops = copy.copy(dataset)  # the same samples, without scanning the dataset again
    centre_crops.transform = transforms.image_transform(bands, input_size, False, valid_channel=True)
    images = torch.stack([centre_crops[i][0] for i in range(min(4, len(dataset)))])
    return split_valid(images, bands.in_chans)[0].to(device)


def split_valid(images: torch.Tensor, in_chans: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[B, C (+1), H, W] -> (images [B, C, H, W], validity [B, 1, H, W] or None): the band
    ``RasterOptions(valid_channel=
    True)`` or ``BatchAugment`` (packed arrays with a no-data value) appended, if any."""
    if images.shape[1] == in_chans + 1:
        return images[:, :in_chans], images[:, in_chans:]
    return images, None


def train_one_epoch(
    model: torch.nn.Module,
    loss_names: tuple[str, ...],
    loader,
    optimizer: torch.optim.Optimizer,
    scheduler,
    scaler: torch.amp.GradScaler | None,
    run: Run,
    plan: Schedule,
    epoch: int,
    steps_per_epoch: int,
    in_chans: int,
    mask_ratio: float,
    writer: SummaryWriter | None = None,
    start_step: int = 0,
    device_transform: torch.nn.Module | None = None,
) -> dict[str, float]:
    """One epoch of Cross-Scale MAE pretraining; returns the mean of each loss term.

    Args:
        model: What trains: the ``CrossScaleMAE``, possibly DDP-wrapped or compiled.
        loss_names: The terms the model reports besides ``loss`` (``CrossScaleMAE.loss_names``).
        loader: Yields (images [B, C, H, W], labels); labels are ignored. Rasters carry a validity band last
            ([B, C + 1, H, W], ``split_valid``): no-data pixels are left out of the reconstruction loss.
        plan: Accumulation, clipping, logging and the run's length (``util.config.Schedule``).
        steps_per_epoch: Steps of a whole epoch (a resumed one starts at ``start_step``).
        in_chans: Bands of the images (a validity band may follow them).
        mask_ratio: Fraction of the patches of each view that is masked.
        device_transform: Augmentation of each batch on the device (packed uint8 datasets), or None.

    Raises:
        Preempted: SIGTERM arrived; the update of the current step is done.
        NonFiniteLossError: a loss term became NaN or infinite.
    """
    model.train()
    steps = StepLoop(
        model,
        optimizer,
        scheduler,
        scaler,
        run,
        plan,
        epoch,
        steps_per_epoch,
        ("loss", *loss_names),
        writer,
        start_step,
    )
    for step, (samples, _labels) in enumerate(loader, start=start_step):
        samples = samples.to(run.device, non_blocking=True)  # [B, C, H, W]
        if device_transform is not None:
            samples = device_transform(samples)
        samples, valid = split_valid(samples, in_chans)  # valid [B, 1, H, W]: rasters' no-data weights, or None
        with steps.accumulate(step):
            with run.autocast():
                out = model(samples, mask_ratio=mask_ratio, valid=valid)  # loss, terms, pred [B, L, p*p*C], mask [B, L]
            steps.backward(out["loss"])
        steps.end_step(step, out, samples.shape[0], samples)
    return steps.epoch_means()


def save_reconstruction(
    mae: models_mae.CrossScaleMAE,
    images: torch.Tensor,
    flags: Flags,
    bands: Bands,
    run: Run,
    epoch: int,
    writer: SummaryWriter | None = None,
) -> None:
    """Write ``plots/reconstruction_epochNNNN.png`` (a titled matplotlib figure: a column per original / masked /
    reconstruction of each scale, model and epoch above) and the plain grid to TensorBoard, for ``images`` [B, C, H, W].
    Multispectral / 16-bit bands are shown at +-2 std, ``--rgb_bands`` as R G B."""
    columns, names = reconstruction_columns(
        mae,
        images,
        None if bands.raster else bands.mean,
        None if bands.raster else bands.std,
        rgb_bands=bands.rgb_bands,
    )
    title = f"{flags.model} ({flags.input_size} px, patch {flags.patch_size}): epoch {epoch}"
    path = run.output_dir / "plots" / f"reconstruction_epoch{epoch:04d}.png"
    best_effort(path, lambda: save_reconstruction_png(columns, names, path, title))
    if writer is not None:
        writer.add_image("reconstruction", grid_image(columns), epoch)


def knn_evaluate(
    mae: models_mae.CrossScaleMAE, memory, queries, num_classes: int, run: Run, epoch: int, writer: SummaryWriter | None
) -> dict[str, float]:
    """Multi-scale kNN top-1 (%) of the encoder as it is now (resize mode, cls token); logged and returned."""
    results = knn.multiscale_accuracies(mae.encoder, mae.encoder_norm, memory, queries, num_classes, run.device)
    mae.train()
    stats = {f"knn_{classifier}_{scale:g}": value for (classifier, scale), value in results.items()}
    main_print(f"epoch {epoch} kNN top-1: " + ", ".join(f"{k[4:]} {v:.1f}%" for k, v in stats.items()))
    if writer is not None:
        for name, value in stats.items():
            writer.add_scalar(f"knn/{name}", value, epoch)
    return stats
