"""Checkpoint files: safe reading, atomic writing, md5 checks of published weights, and what a resumable
training checkpoint holds (saving it, finding it, resuming from it).

Every file is read with ``torch.load(weights_only=True)``; the only class allowed besides tensors and
plain Python types is ``argparse.Namespace``, which upstream pickles into its checkpoints. Files are
written atomically (temporary file, fsync, ``os.replace``), so a crash never leaves a half-written file
under the final name. Key layouts (ours, upstream's, timm's) are ``util.weights.layouts``' business.
"""

from __future__ import annotations

import argparse
import os
import pickle
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file as load_safetensors

from util.config import Bands, same_value
from util.errors import CheckpointError, UsageError, first_line
from util.files import file_md5, file_problem, write_atomically
from util.run import distributed
from util.run.process import Preempted, Run, mark_stopped, stop_reason, stopped_exit_status
from util.run.rng import rng_state, set_rng_state

PUBLISHED_MD5 = {
    "0c33995da85c112d9602f89d5b186bbc": "published Cross-Scale MAE ViT-Base (400 epochs)",
    "e6e4f58c07bbbc4c4dd63fa26c644dd4": "published Cross-Scale MAE ViT-Large (400 epochs)",
}
PUBLISHED_FILENAMES = {
    "cross_scale_mae_base_pretrain.pth": "0c33995da85c112d9602f89d5b186bbc",
    "cross_scale_mae_large_pretrain.pth": "e6e4f58c07bbbc4c4dd63fa26c644dd4",
}


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` with ``torch.save`` atomically.

    Raises:
        CheckpointError: the write failed (``util.files.write_atomically``).
    """

    def write(tmp: str) -> None:
        with open(
            tmp, "wb"
        ) as f:  # a file object: a full disk raises OSError(ENOSPC), not an inline_container.cc error
            torch.save(state, f)

    write_atomically(Path(path), write)


def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> dict[str, Any]:
    """Load a checkpoint dict safely. ``.safetensors`` files come back as ``{"model": state_dict}``.

    Raises:
        CheckpointError: missing, truncated/corrupt, or containing objects other than tensors and plain types.
    """
    path = Path(path)
    problem = file_problem(path)
    if problem:
        raise CheckpointError(
            f"{path}: no such checkpoint file" if problem.startswith("does not exist") else f"{path}: {problem}"
        )
    if path.suffix == ".safetensors":
        try:
            return {"model": load_safetensors(str(path))}
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(e)})") from e
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "GLOBAL" in str(e):  # the unpickler met a class or function it may not load: it could run code
            raise CheckpointError(
                f"{path}: refused to load: it holds Python objects other than tensors and plain types, "
                f"which could run code ({first_line(e, last=True)})"
            ) from e
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint, truncated or corrupt (bad pickle data)"
        ) from e
    except Exception as e:
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint, truncated or corrupt ({first_line(e)})"
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(state).__name__}")
    if isinstance(state.get("args"), argparse.Namespace):
        state["args"] = vars(state["args"])
    for key in ("args", "model_config"):
        if key in state and not isinstance(state[key], dict):
            raise CheckpointError(f"{path}: field {key!r} must be a mapping, found {type(state[key]).__name__}")
    return state


def check_md5(path: str | os.PathLike) -> str | None:
    """Verify a published file's md5. Returns a one-line status, or None for files that are not published ones.

    Raises:
        CheckpointError: the file carries a published name but not the published md5.
    """
    path = Path(path)
    expected = PUBLISHED_FILENAMES.get(path.name)
    if expected is None or not path.is_file():  # a missing file: read_checkpoint names it in one line
        return None
    actual = file_md5(path)
    if actual != expected:
        raise CheckpointError(
            f"{path}: md5 {actual} does not match the published {expected}; the download is incomplete or corrupt"
        )
    return f"md5 {actual} verified: {PUBLISHED_MD5[actual]}"


def model_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint dict (``model``/``state_dict`` entry, or the dict itself), without the
    ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefixes of wrapped models."""
    state = next((checkpoint[k] for k in ("model", "state_dict") if isinstance(checkpoint.get(k), dict)), checkpoint)
    for prefix in ("module.", "_orig_mod."):
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix) :]: value for key, value in state.items()}
    return state


def non_finite_keys(weights: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``weights`` that hold NaN or inf."""
    return [
        k
        for k, v in weights.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not v.isfinite().all()
    ]


def state_misfit(model: torch.nn.Module, weights: dict[str, Any]) -> str:
    """What keeps ``weights`` from loading into ``model``, naming the tensors (``not in the file: …; not in the
    model: …; other shape: KEY [file] (model [model])``), or "" when they fit."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    shapes = [
        f"{k} {list(v.shape)} (model {list(expected[k].shape)})"
        for k, v in weights.items()
        if k in expected and isinstance(v, torch.Tensor) and v.shape != expected[k].shape
    ]
    shown = lambda keys: ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    parts = [
        f"{what}: {shown(keys)}"
        for what, keys in (("not in the file", missing), ("not in the model", unexpected), ("other shape", shapes))
        if keys
    ]
    return "; ".join(parts)


def training_state(
    model: torch.nn.Module, optimizer, scaler, epoch: int, record: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    """What a resumable checkpoint holds: weights, optimiser and scaler state, epoch, the run's record (flags and
    derived values, ``util.config.run_record``) under ``args`` as upstream names it, the model's constructor
    arguments and every RNG state. Tensors and plain types only."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "args": dict(record),
        "rng": rng_state(),
        **extra,
    }
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    if hasattr(model, "model_config"):
        state["model_config"] = model.model_config
    return state


def training_position(state: dict[str, Any]) -> tuple[int, int] | None:
    """(epoch, step) where training continues from a checkpoint: after epoch ``epoch``, or inside the next one
    at ``next_step`` (pre-emption); None when the file holds no valid position."""
    epoch, step = state.get("epoch"), state.get("next_step", 0)  # epoch -1: pre-empted inside epoch 0
    if type(epoch) is not int or type(step) is not int or epoch < -1 or step < 0 or (epoch == -1 and step == 0):
        return None
    return (epoch + 1, step)


def schedule_seen(state: dict[str, Any]) -> tuple[str, bool]:
    """(what a checkpoint saw of its schedule, whether it finished it): "60/60 epochs", "3/60 epochs + 2 steps" (a run
    stopped mid-epoch), or "epoch 400, schedule not recorded" (files without their run's --epochs: accepted)."""
    epoch, step = state.get("epoch"), state.get("next_step", 0)
    planned = (state.get("args") or {}).get("epochs")
    if not isinstance(epoch, int):
        return "epoch not recorded", True
    done = epoch + 1
    if not isinstance(planned, int):
        return f"epoch {done}" + (f" + {step} steps" if step else "") + ", schedule not recorded", not step
    return f"{done}/{planned} epochs" + (f" + {step} steps" if step else ""), done >= planned and not step


def find_resume_checkpoint(resume: str, output_dir: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from and its contents.

    ``auto`` reads every ``checkpoint-*.pth`` of ``output_dir`` (memory-mapped: only what a resume uses is
    read) and takes the one furthest into training by what it holds (epoch, then step inside the next epoch;
    ``checkpoint-last.pth`` on a tie), never by file times, which copying or restoring a run reorders. Unreadable
    files and files without a valid position are skipped with a message. None when no file qualifies. Any
    other value is a path that must load.
    """
    if resume != "auto":
        return Path(resume), read_checkpoint(resume)
    best = None
    for path in sorted(Path(output_dir).glob("checkpoint-*.pth")):
        try:
            state = read_checkpoint(path, mmap=True)
        except CheckpointError as e:
            print(f"resume: skipping {e}", flush=True)
            continue
        position = training_position(state)
        if position is None:
            print(f"resume: skipping {path}: no valid epoch / next_step in it", flush=True)
            continue
        key = (position, path.name == "checkpoint-last.pth")
        if best is None or key > best[0]:
            best = (key, path, state)
    return None if best is None else best[1:]


def check_output_dir(output_dir: str | os.PathLike, resume: str, overwrite: bool) -> None:
    """Refuse a fresh run (no ``--resume``) into a folder that holds another run's checkpoints, unless ``--overwrite``.

    Raises:
        UsageError: checkpoints found and neither ``--resume`` nor ``--overwrite`` given.
    """
    if resume or overwrite:
        return
    found = sorted(p.name for p in Path(output_dir).glob("checkpoint-*.pth"))
    if found:
        raise UsageError(
            f"--output_dir {output_dir} holds another run's checkpoints ({', '.join(found[:3])}"
            f"{', ...' if len(found) > 3 else ''}): continue it with --resume auto, replace it with --overwrite, "
            "or choose another --output_dir"
        )


# Flags a resumed run must share with the checkpoint's: they define the schedule and the step numbering.
# ``shard_manifest``: the sha256 of a shard manifest (util.data.shards), which with the world size decides the sample
# order.
# The band flags too: resuming with other bands or statistics would train on differently normalised inputs.
RUN_DEFINING_FLAGS = (
    "epochs",
    "batch_size",
    "accum_iter",
    "world_size",
    "lr",
    "blr",
    "min_lr",
    "warmup_epochs",
    "shard_manifest",
    "in_chans",
    "bands",
    "mean",
    "std",
    "nodata",
)
# What turns a file's pixels into a model's input: evaluating a checkpoint needs those it was trained with.
BAND_FLAGS = ("in_chans", "bands", "mean", "std", "nodata")


def same_flag_value(flag: str, then: Any, now: Any, in_chans: int | None = None) -> bool:
    """Whether a flag's value equals the checkpoint's: NaN equals NaN (--nodata nan), and --bands left out equals
    --bands 0 1 .. C-1."""
    if flag == "bands" and in_chans:
        then, now = then or list(range(in_chans)), now or list(range(in_chans))
    if isinstance(then, (list, tuple)) and isinstance(now, (list, tuple)):
        return len(then) == len(now) and all(same_flag_value(flag, a, b) for a, b in zip(then, now))
    return same_value(then, now)


def check_band_flags(saved: dict[str, Any], bands: Bands, path: str | os.PathLike) -> None:
    """Refuse to evaluate a checkpoint with other --in_chans / --bands / statistics / --nodata than it was trained
    with (the numbers would be silently wrong); flags the checkpoint does not record are not compared.

    Raises:
        UsageError: naming each differing flag, its value and the checkpoint's.
    """
    now = bands.record()
    in_chans = saved.get("in_chans", bands.in_chans)
    changes = [
        f"--{flag} {_shown(now[flag])} (checkpoint: {_shown(saved[flag])})"
        for flag in BAND_FLAGS
        if flag in saved and not same_flag_value(flag, saved[flag], now[flag], in_chans)
    ]
    if changes:
        raise UsageError(
            f"{path}: was trained with other band flags: {'; '.join(changes)}; give the ones it was trained "
            "with (the --band_stats of its training data)"
        )


def _shown(value: Any) -> str:
    return (
        " ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        if isinstance(value, (list, tuple))
        else str(value)
    )


FLAG_NAMES = {"world_size": "world size", "shard_manifest": "shard manifest sha256"}


def changed_flags(saved: dict[str, Any], record: dict[str, Any]) -> list[str]:
    """``--flag now (checkpoint: then)`` for each run-defining flag of this run's ``record``
    (``util.config.run_record``) that differs from the checkpoint's ``args``.

    ``lr`` is compared as the user gave it (None: derived from ``blr``); flags the checkpoint does not record are
    not compared.
    """
    current = {**record, "lr": record.get("lr_given", record.get("lr"))}
    saved = {**saved, "lr": saved.get("lr_given", saved.get("lr"))}
    if "lr_given" not in saved and current["lr"] is None:
        saved.pop("lr", None)  # an older checkpoint stored only the resolved lr: blr, batch and world size decide it
    changes = []
    for flag in RUN_DEFINING_FLAGS:
        if (
            flag in saved
            and flag in current
            and not same_flag_value(flag, saved[flag], current[flag], current.get("in_chans"))
        ):
            name = FLAG_NAMES.get(flag, f"--{flag}")
            changes.append(f"{name} {current[flag]} (checkpoint: {saved[flag]})")
    return changes


def checkpoint_to_evaluate(
    resume: str, finetune: str, output_dir: str | os.PathLike, what: str
) -> tuple[Path, dict[str, Any]]:
    """``--eval``'s checkpoint and its contents: ``--resume PATH``, ``--resume auto`` (the furthest-trained in
    ``--output_dir``) or ``--finetune PATH``.

    Raises:
        UsageError: none given, or ``auto`` found none (never evaluate random weights).
        CheckpointError: unreadable file.
    """
    if resume == "auto":
        found = find_resume_checkpoint("auto", output_dir)
        if found is None:
            raise UsageError(
                f"--eval --resume auto: no checkpoint in {output_dir}; refusing to evaluate random weights"
            )
        return found
    if resume or finetune:
        path = Path(resume or finetune)
        return path, read_checkpoint(path)
    raise UsageError(f"--eval needs the {what} to evaluate: --resume PATH (or auto), or --finetune PATH")


def resume(
    path: str,
    record: dict[str, Any],
    run: Run,
    model: torch.nn.Module,
    optimizer,
    scaler,
    start_epoch: int = 0,
    allow_changed_flags: bool = False,
) -> tuple[int, int, dict]:
    """Restore model, optimiser, scaler and RNG states from ``path`` (``--resume``: a file, ``auto`` for the
    furthest-trained checkpoint of the output folder, or "" for none).

    Args:
        record: This run's record (``util.config.run_record``), compared with the checkpoint's run-defining flags.
        start_epoch: ``--start_epoch``, the first epoch when nothing is resumed.
        allow_changed_flags: Resume although run-defining flags differ (with a note) instead of refusing.

    Returns:
        (first epoch, steps of it already done, the checkpoint); a pre-empted run continues mid-epoch.

    Raises:
        UsageError: run-defining flags differ from the checkpoint's (without ``allow_changed_flags``).
        CheckpointError: the checkpoint belongs to another model or size.
    """
    if not path:
        return start_epoch, 0, {}
    found = find_resume_checkpoint(path, run.output_dir) if run.is_main or path != "auto" else None
    if path == "auto" and distributed.is_distributed():  # rank 0 chooses: node-local folders may differ
        chosen = [str(found[0]) if found else None]
        dist.broadcast_object_list(chosen, src=0)
        if not run.is_main and chosen[0] is not None:
            found = Path(chosen[0]), read_checkpoint(chosen[0])
    if found is None:
        distributed.main_print(f"resume auto: no checkpoint in {run.output_dir}, starting from scratch")
        return start_epoch, 0, {}
    path, state = found
    changes = changed_flags(state.get("args") or {}, record)
    if changes and not allow_changed_flags:
        raise UsageError(
            f"{path}: this run's flags differ from the checkpoint's: {'; '.join(changes)}; "
            "resume with the same flags, or give --allow_changed_flags"
        )
    if changes:
        distributed.main_print(
            f"note: --allow_changed_flags: resuming {path} with {'; '.join(changes)} "
            "(the LR schedule and step positions follow the new values)"
        )
    weights = model_state(state)
    misfit = state_misfit(model, weights)
    if misfit:
        raise CheckpointError(f"{path}: cannot resume this run from it (another model or size?): {misfit}")
    non_finite = non_finite_keys(weights)
    if non_finite:
        raise CheckpointError(
            f"{path}: non-finite values (NaN/inf) in {', '.join(non_finite[:3])}"
            + (f" and {len(non_finite) - 3} more" if len(non_finite) > 3 else "")
            + ": training diverged before it was saved; resume from an earlier checkpoint (checkpoint-N.pth, "
            "--save_every) with a lower --blr or --clip_grad"
        )
    try:
        model.load_state_dict(weights)
        if "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"{path}: cannot resume this run from it (another model, size or optimiser?): {first_line(e, last=True)}"
        ) from None
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    rng_states = state.get("rng_per_rank", [])
    if not isinstance(rng_states, list):
        raise CheckpointError(f"{path}: field 'rng_per_rank' must be a list, found {type(rng_states).__name__}")
    if len(rng_states) == run.world_size:
        try:
            set_rng_state(rng_states[run.rank])
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise CheckpointError(
                f"{path}: field 'rng_per_rank' holds no valid RNG state ({type(e).__name__}: {first_line(e)})"
            ) from None
    else:
        distributed.main_print(
            f"note: {path} was written by {len(rng_states)} process(es), this run has {run.world_size}: "
            "random streams start afresh"
        )
    position = training_position(state)
    if position is None:
        raise CheckpointError(
            f"{path}: no valid training position (epoch {state.get('epoch')!r}, next_step {state.get('next_step')!r})"
        )
    epoch, step = position
    epochs = record.get("epochs")
    if isinstance(epochs, int) and (epoch > epochs or epoch == epochs and step):
        trained_to = (state.get("args") or {}).get("epochs")
        where = f"epoch {epoch}{f' step {step}' if step else ''}"
        raise CheckpointError(
            f"{path}: its position ({where}) lies beyond the end of this run (--epochs {epochs}): "
            + (
                f"its run had --epochs {trained_to}; give --epochs above {epoch - 1} to continue it"
                if isinstance(trained_to, int) and epoch <= trained_to
                else "a damaged or foreign checkpoint; resume from another one"
            )
        )
    if epoch == epochs:
        distributed.main_print(
            f"resumed from {path}, continuing at epoch {epoch}: its run is complete (--epochs {epochs}), nothing left "
            "to train"
        )
    else:
        distributed.main_print(f"resumed from {path}, continuing at epoch {epoch}" + (f" step {step}" if step else ""))
    return epoch, step, {**state, "path": str(path)}


def save_epoch(
    run: Run, name: str, model: torch.nn.Module, optimizer, scaler, epoch: int, record: dict[str, Any], **extra: Any
) -> bool:
    """Write ``output_dir/name`` atomically with everything a resume needs (collective: call on every rank);
    ``record``: the run's flags and derived values (``util.config.run_record``).

    A failed write (disk full, permissions) is reported with the path and the reason and training goes on;
    the previous file stays intact. Returns whether the file was written.
    """
    rng_states = distributed.gather_rng_states()
    if not run.is_main:
        return True
    state = training_state(
        model, optimizer, scaler, epoch, {**record, "world_size": run.world_size}, rng_per_rank=rng_states, **extra
    )
    try:
        save_checkpoint(state, run.output_dir / name)
    except CheckpointError as e:
        print(f"warning: {e}", flush=True)
        return False
    return True


def save_preempted(
    run: Run, stop: Preempted, model: torch.nn.Module, optimizer, scaler, record: dict[str, Any], **extra: Any
) -> None:
    """Checkpoint a run stopped by SIGTERM, SIGUSR1 or Ctrl-C so that ``--resume auto`` continues at the very next
    step; the entry point then exits with 128 + the signal's number (``process.stopped_exit_status``)."""
    saved = save_epoch(
        run, "checkpoint-last.pth", model, optimizer, scaler, stop.epoch - 1, record, next_step=stop.step, **extra
    )
    if run.is_main and not saved:
        raise CheckpointError(
            f"{stop_reason()} at epoch {stop.epoch} step {stop.step}, and the checkpoint could not be written"
        )
    distributed.main_print(
        f"{stop_reason()}: stopped at epoch {stop.epoch} step {stop.step}, saved "
        f"{run.output_dir / 'checkpoint-last.pth'}; continue with --resume auto (exit status {stopped_exit_status()})"
    )
    mark_stopped()
