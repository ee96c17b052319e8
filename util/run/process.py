"""Process set-up: where and how this process runs (device, autocast dtype, seed, output folder), and the
signals that stop a run cleanly."""

from __future__ import annotations

import datetime
import errno
import signal
import sys
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from util.errors import ReportableError, UsageError, first_line
from util.run import distributed
from util.run.rng import seed_everything
from util.run.threads import configure_threads

_STOP = threading.Event()
# What schedulers send before they kill a job: SIGTERM (SLURM, Kubernetes), SIGUSR1 (SLURM's early warning,
# ``#SBATCH --signal=B:USR1@120``). DataLoader workers ignore them (``ignore_stop_signals``).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """SIGTERM arrived: training stopped after the optimiser update that completed ``step`` steps of ``epoch``."""

    def __init__(self, epoch: int, step: int) -> None:
        super().__init__(f"stopped at epoch {epoch} step {step}")
        self.epoch, self.step = epoch, step


_STOP_REASON: list[str] = []  # the signal this process received, for the closing message
_STOP_SIGNAL: list[int] = []  # its number, for the exit status
_STOPPED = threading.Event()  # the run saved its checkpoint after a stop and ended early (``mark_stopped``)


def _request_stop(signum, frame) -> None:
    _STOP_REASON.append(signal.Signals(signum).name)
    _STOP_SIGNAL.append(signum)
    _STOP.set()


def stop_reason() -> str:
    """What stopped the run: the signal this process received, or another process's (under DDP)."""
    return _STOP_REASON[0] if _STOP_REASON else "a stop signal on another process"


def mark_stopped() -> None:
    """The run ended early after a stop (its checkpoint saved): ``run_entry_point`` then exits with
    ``stopped_exit_status()``, never 0, so that ``bash train.sh && bash finetune.sh`` does not go on with a partial
    run."""
    _STOPPED.set()


def stopped_exit_status() -> int:
    """128 + the number of the signal that stopped this process (the shell's convention: SIGTERM 143, SIGINT 130,
    SIGUSR1 138); 143 where another process received it (under DDP)."""
    return 128 + (_STOP_SIGNAL[0] if _STOP_SIGNAL else signal.SIGTERM)


def _interrupt(signum, frame) -> None:
    """First Ctrl-C: stop like SIGTERM (checkpoint at the next update); a second one aborts at once."""
    _STOP_REASON.append("Ctrl-C (SIGINT)")
    _STOP_SIGNAL.append(signum)
    _STOP.set()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    print("Ctrl-C: stopping after the current step with a checkpoint (Ctrl-C again aborts at once)", flush=True)


@dataclass
class Run:
    """Where and how this process trains."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    amp_dtype: torch.dtype | None
    output_dir: Path
    stop_group: object = None  # gloo group on which ranks agree to stop (host-side: no GPU synchronisation)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        """Autocast to ``amp_dtype`` on this run's device (a no-op for fp32 runs)."""
        return autocast(self.device, self.amp_dtype)


def setup_run(device: str, amp: str, seed: int, output_dir: str | Path, dist_timeout: float = 30.0) -> Run:
    """Join the process group (if any), choose device and autocast dtype, seed, create the output folder, and
    make SIGTERM / SIGUSR1 (what SLURM and Kubernetes send before pre-emption) stop training at the next update.
    The CPU thread count is chosen from the CPUs this process may use (``util.run.threads``); rank 0 prints it and
    the autocast dtype with the reason for it (``describe_amp``).

    Args:
        device: ``--device`` (``resolve_device``); amp: ``--amp`` (``resolve_amp``).
        seed: ``--seed``; rank r seeds every generator with seed + r.
        output_dir: Created and locked by rank 0 (``prepare_output_dir``).
        dist_timeout: Minutes before a stuck collective ends the job.

    Raises:
        UsageError: a device or autocast dtype this machine lacks; an explicit GPU index (``cuda:1``) under a
            launcher; an output folder that cannot be used.
    """
    rank, world_size, local_rank = distributed.init_distributed(dist_timeout)
    name, device = device, resolve_device(device, local_rank)
    if device.type == "cuda":
        if distributed.is_distributed() and name not in ("auto", "cuda"):
            raise UsageError(
                f"--device {name}: under torchrun / SLURM each process uses the GPU of its local rank; "
                "pass --device cuda (or auto), and choose the GPUs with CUDA_VISIBLE_DEVICES"
            )
        # the current device is where the pin-memory thread opens its context and whose generator rng_state saves
        torch.cuda.set_device(device)
    precision = set_fp32_precision(device)
    amp_dtype = resolve_amp(amp, device)
    seed_everything(seed + rank)
    output_dir = Path(output_dir)
    if rank == 0:
        prepare_output_dir(output_dir)
    if threading.current_thread() is threading.main_thread():
        for stop_signal in STOP_SIGNALS:
            signal.signal(stop_signal, _request_stop)
        signal.signal(signal.SIGINT, _interrupt)
    stop_group = None
    if distributed.is_distributed():  # host-side agreement, so checking it never waits for the GPU
        stop_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(minutes=dist_timeout))
    if rank == 0:
        print(configure_threads(), flush=True)
        print(describe_amp(amp, device, amp_dtype) + precision, flush=True)
    else:
        configure_threads()
    return Run(rank, world_size, local_rank, device, amp_dtype, output_dir, stop_group)


# errno values of a refused non-blocking flock that mean another process holds the lock; any other (ENOSYS, ENOLCK,
# EOPNOTSUPP, EINVAL) means the file system cannot lock at all
HELD = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
_LOCKS: dict[Path, object] = {}  # open lock files of this process: the lock lives as long as the file is open


def prepare_output_dir(output_dir: Path) -> None:
    """Rank 0: create ``output_dir``, take its lock (one live run per folder), and remove the temporary files a
    killed run left there.

    The lock is ``fcntl.flock`` on ``output_dir/.lock`` (non-blocking), holding this run's pid, host and start
    time; the OS releases it when the process ends, however it ends (SIGKILL included).

    Raises:
        UsageError: the folder cannot be created or written (an existing file, read-only, a full disk), or another
            live run holds its lock. A file system that cannot lock files (Lustre without ``-o flock``, NFS without a
            lock daemon) gets a warning, and the run goes on unlocked.
    """
    import fcntl
    import os
    import socket

    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        lock_path = output_dir / ".lock"
        lock = open(lock_path, "a+")
    except OSError as e:
        raise UsageError(f"--output_dir {output_dir}: cannot create or write it ({e.strerror or e})") from None
    key = output_dir.resolve()
    if key in _LOCKS:  # this process holds it already (an in-process second entry point call)
        lock.close()
        return
    locked = True
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        locked = False
        if e.errno not in HELD:  # Lustre without -o flock (ENOSYS), NFS without a lock daemon (ENOLCK), ...
            print(
                f"warning: --output_dir {output_dir}: its file system cannot lock files ({e.strerror or e}): a second "
                "run started into this folder would not be stopped; continuing without the lock",
                file=sys.stderr,
                flush=True,
            )
        else:
            lock.seek(0)
            holder = lock.read().strip() or "unknown process"
            lock.close()
            raise UsageError(
                f"--output_dir {output_dir} is in use by another run ({holder}); wait for it to end, "
                "or choose another --output_dir"
            ) from None
    try:
        lock.seek(0)
        lock.truncate()
        lock.write(
            f"pid {os.getpid()} on {socket.gethostname()}, "
            f"started {datetime.datetime.now().isoformat(timespec='seconds')}"
        )
        lock.flush()
    except OSError as e:  # a disk with no free byte: the folder exists but nothing can be written into it
        lock.close()
        raise UsageError(f"--output_dir {output_dir}: cannot write into it ({e.strerror or e})") from None
    _LOCKS[key] = lock
    removed = remove_stale_temporaries(output_dir) if locked else None  # unlocked: they may be a live run's
    if removed:
        print(
            f"note: removed {removed[0]} temporary file(s) ({removed[1] / 2**20:.1f} MiB) left by a killed run in "
            f"{output_dir}",
            flush=True,
        )


def release_output_dir(output_dir: Path) -> None:
    """Release the lock ``prepare_output_dir`` took (the OS releases it anyway when the process ends)."""
    lock = _LOCKS.pop(Path(output_dir).resolve(), None)
    if lock is not None:
        lock.close()


def release_output_dirs() -> None:
    """Release every ``--output_dir`` lock this process holds (entry points, on every exit path)."""
    for key in list(_LOCKS):
        release_output_dir(key)


def remove_stale_temporaries(output_dir: Path) -> tuple[int, int] | None:
    """Delete ``.NAME.XXXX.tmp`` files (``util.files.write_atomically``'s temporaries) of ``output_dir``;
    call only while holding its lock, so that no live writer's file is removed. Returns (count, bytes) or None."""
    count = size = 0
    for path in output_dir.glob(".*.tmp"):
        try:
            if path.is_file():
                size += path.stat().st_size
                path.unlink()
                count += 1
        except OSError:
            continue
    return (count, size) if count else None


def ignore_stop_signals(worker_id: int | None = None) -> None:
    """DataLoader ``worker_init_fn``: workers ignore the stop signals and Ctrl-C, which the main process handles
    (SLURM signals every process of the job step; a worker killed first would end the run without a checkpoint)."""
    for stop_signal in (*STOP_SIGNALS, signal.SIGINT):
        signal.signal(stop_signal, signal.SIG_IGN)


def stop_worker_processes() -> None:
    """Kill this process's remaining multiprocessing children: DataLoader workers of an iterator that an error left
    unfinished (its traceback keeps it alive). They ignore SIGTERM (``ignore_stop_signals``), and the interpreter's
    exit terminates, then joins them: it would wait forever. Called when an entry point ends, however it ends."""
    import multiprocessing

    children = multiprocessing.active_children()
    if not children:
        return
    if threading.current_thread() is threading.main_thread():  # PyTorch's SIGCHLD handler raises on a killed worker
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=5)


def stop_requested(run: Run) -> bool:
    """Whether any rank received SIGTERM; every rank gets the same answer (one tiny host-side collective)."""
    if run.stop_group is None:
        return _STOP.is_set()
    flag = torch.tensor([float(_STOP.is_set())])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=run.stop_group)
    return bool(flag.item())


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``: this process's GPU where CUDA exists, else the CPU; anything else is used as given.

    Raises:
        UsageError: not a device name, CUDA asked for where there is none, or a GPU index beyond the visible GPUs.
    """
    if name == "auto":
        return torch.device("cuda", cuda_index(local_rank)) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a device name (auto, cpu, cuda, cuda:1, ...)") from None
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: Apple MPS is not available on this machine (use --device cpu or auto)")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name}: not supported (auto, cpu, cuda, cuda:N, mps)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", cuda_index(local_rank))
    visible = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and device.index >= visible:  # else CUDA's "invalid device ordinal" traceback
        raise UsageError(
            f"--device {name}: this machine has {visible} visible GPU(s), cuda:0 to cuda:{visible - 1} "
            "(CUDA_VISIBLE_DEVICES renumbers them from 0)"
        )
    return device


def cuda_index(local_rank: int) -> int:
    """This process's GPU among the visible ones: ``local_rank % device_count()`` (one GPU bound per task, as
    SLURM's ``--gpus-per-task`` does, leaves each process a single visible device 0)."""
    return local_rank % torch.cuda.device_count()


def set_fp32_precision(device: torch.device) -> str:
    """On a GPU: float32 matmuls and cuDNN convolutions in IEEE fp32, never TF32 (PyTorch's defaults differ: matmuls
    IEEE, convolutions TF32, so ``--amp none`` would otherwise run the patch embedding with a 10-bit mantissa), so
    that ``--amp none`` is the full-precision run it says and fp32 code outside autocast computes alike everywhere.
    Returns the note for the start-up line (empty on other devices, where nothing is changed)."""
    if device.type != "cuda":
        return ""
    # the flags every PyTorch version has; torch >= 2.9's per-operator fp32_precision would make reading
    # torch.backends.cudnn.allow_tf32 raise (mixed APIs), and TorchInductor's convolution lowering reads it
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return "; fp32 matmuls and convolutions: IEEE fp32 (TF32 off)"


def resolve_amp(mode: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``--amp``: ``auto`` = bf16 where the device computes it natively, else fp32 (None).

    Raises:
        UsageError: fp16 on a CPU (about 100x slower there than fp32).
    """
    if mode == "none":
        return None
    if mode == "auto":
        if device.type == "cuda":  # emulated bf16 (e.g. V100, sm70) is several times slower than fp16 + scaler
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        native_bf16 = device.type == "cpu" and torch.cpu._is_avx512_bf16_supported()
        return torch.bfloat16 if native_bf16 else None
    if mode == "fp16" and device.type == "cpu":
        raise UsageError("--amp fp16: fp16 is emulated and very slow on CPUs; use --amp bf16 or none")
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def describe_amp(mode: str, device: torch.device, dtype: torch.dtype | None) -> str:
    """The start-up line of the autocast dtype ``resolve_amp`` chose for ``--amp mode``, with the reason, and on a
    CPU the kernel set ATen dispatches to (``torch.backends.cpu.get_cpu_capability``: AVX2, AVX512, ...)."""
    if device.type != "cpu":
        return amp_reason(
            mode, device.type, dtype, native_bf16=device.type == "cuda" and torch.cuda.is_bf16_supported()
        )
    return amp_reason(
        mode, "cpu", dtype, torch.cpu._is_avx512_bf16_supported(), torch.backends.cpu.get_cpu_capability()
    )


def amp_reason(
    mode: str, device_type: str, dtype: torch.dtype | None, native_bf16: bool, kernels: str | None = None
) -> str:
    """``describe_amp``'s line from its facts (``native_bf16``: the CPU has AVX512-BF16; tested without the
    hardware), e.g. ``autocast: off (fp32): this CPU
    has no native bf16 (AVX512-BF16 absent; --amp bf16 would emulate it, slower); CPU kernels: AVX2``."""
    name = {None: "off (fp32)", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))
    if mode != "auto":
        why = f"--amp {mode}"
        if device_type == "cpu" and dtype == torch.bfloat16 and not native_bf16:
            why += " (emulated on this CPU: AVX512-BF16 absent, usually slower than fp32)"
    elif device_type == "cpu":
        why = (
            "this CPU computes bf16 natively (AVX512-BF16)"
            if native_bf16
            else "this CPU has no native bf16 (AVX512-BF16 absent; --amp bf16 would emulate it, slower)"
        )
    elif device_type == "cuda":
        why = (
            "this GPU computes bf16 natively"
            if dtype == torch.bfloat16
            else "this GPU has no native bf16: fp16 with loss scaling"
        )
    else:
        why = f"no autocast on {device_type} (--amp auto)"
    return f"autocast: {name}: {why}" + (f"; CPU kernels: {kernels}" if kernels else "")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype``, or a no-op context for fp32 (``dtype`` None)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def worker_pool(workers: int, tasks: int):
    """A pool of ``workers`` processes for ``tasks`` tasks, started by spawn, not fork: a fork of a process whose
    PyTorch / OpenMP threads hold locks can hang in its workers (and a forked worker inherits the stop-signal handlers,
    so the pool's SIGTERM cannot end it). None where one process does the work (one worker or one task).
    """
    import multiprocessing

    return multiprocessing.get_context("spawn").Pool(workers) if workers > 1 and tasks > 1 else None


WORKER_DIED = "DataLoader worker"  # how torch's DataLoader begins the RuntimeError of a worker that died


def worker_death_message(error: RuntimeError) -> str:
    """One line for a DataLoader worker killed by a signal or exited without a word (torch raises a RuntimeError in
    the training process: SIGKILL by the out-of-memory killer, SIGBUS from a full ``/dev/shm``), saying what to do."""
    said = first_line(error).strip().removesuffix(".")  # "... is killed by signal: Killed." / "... exited unexpectedly"
    return (
        f"{said}. A data-loading worker process died: out of memory (the kernel's OOM killer) "
        "or shared memory (/dev/shm, docs/pretraining.md#data-workers-and-shared-memory); fewer --num_workers or a "
        "smaller --batch_size need less, and --resume auto continues from the last checkpoint"
    )


def run_entry_point(main, args) -> None:
    """Call ``main(args)``; a ``ReportableError`` (also one re-raised from a DataLoader worker) exits with
    ``error: <message>`` on one line and exit status 1; a run that a stop signal ended early (checkpoint saved,
    ``mark_stopped``) exits with ``stopped_exit_status()``."""
    _STOPPED.clear()  # an earlier call in this process (tests, notebooks) stopped early: this one has not yet
    try:
        main(args)
        if _STOPPED.is_set():
            raise SystemExit(stopped_exit_status())
    except ReportableError as e:
        message = first_line(e, last=True)  # a worker's error arrives with its traceback in front
        message = message.removeprefix(f"{type(e).__module__}.{type(e).__name__}: ")
        raise SystemExit(f"error: {message}") from None
    except RuntimeError as e:
        if not str(e).startswith(WORKER_DIED):
            raise
        raise SystemExit(f"error: {worker_death_message(e)}") from None
    finally:
        stop_worker_processes()
        release_output_dirs()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
