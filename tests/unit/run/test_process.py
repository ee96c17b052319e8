"""util/run/process.py: device and autocast choice, and the signals that stop a run."""

import os
import signal

import pytest
import torch
from conftest import HANG_GUARD_S, REPO

from util.errors import UsageError
from util.run import process


def test_auto_amp_takes_bf16_on_gpus_only_where_it_is_native(monkeypatch):
    asked = {}

    def bf16_supported(including_emulation=True):
        asked["including_emulation"] = including_emulation
        return including_emulation  # a V100: bf16 only emulated

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16_supported)
    assert process.resolve_amp("auto", torch.device("cuda", 0)) == torch.float16
    assert asked == {"including_emulation": False}


@pytest.mark.parametrize(
    "mode, device, dtype, native, kernels, expected",
    [
        (
            "auto",
            "cpu",
            None,
            False,
            "AVX2",
            "autocast: off (fp32): this CPU has no native bf16 (AVX512-BF16 absent; --amp bf16 would emulate it, "
            "slower); CPU kernels: AVX2",
        ),
        (
            "auto",
            "cpu",
            torch.bfloat16,
            True,
            "AVX512",
            "autocast: bf16: this CPU computes bf16 natively (AVX512-BF16); CPU kernels: AVX512",
        ),
        ("none", "cpu", None, True, "AVX512", "autocast: off (fp32): --amp none; CPU kernels: AVX512"),
        (
            "bf16",
            "cpu",
            torch.bfloat16,
            False,
            "AVX2",
            "autocast: bf16: --amp bf16 (emulated on this CPU: AVX512-BF16 absent, usually slower than fp32); "
            "CPU kernels: AVX2",
        ),
        ("auto", "cuda", torch.bfloat16, False, None, "autocast: bf16: this GPU computes bf16 natively"),
        (
            "auto",
            "cuda",
            torch.float16,
            False,
            None,
            "autocast: fp16: this GPU has no native bf16: fp16 with loss scaling",
        ),
    ],
)
def test_the_start_up_line_says_which_autocast_and_kernels_and_why(mode, device, dtype, native, kernels, expected):
    assert process.amp_reason(mode, device, dtype, native, kernels) == expected


def test_this_machines_start_up_line_agrees_with_the_dtype_chosen():
    cpu = torch.device("cpu")
    dtype = process.resolve_amp("auto", cpu)
    line = process.describe_amp("auto", cpu, dtype)
    assert line.startswith("autocast: bf16: " if dtype == torch.bfloat16 else "autocast: off (fp32): ")
    assert line.endswith(f"; CPU kernels: {torch.backends.cpu.get_cpu_capability()}")


def test_fp16_on_the_cpu_is_refused():
    with pytest.raises(UsageError, match="--amp fp16: fp16 is emulated and very slow on CPUs"):
        process.resolve_amp("fp16", torch.device("cpu"))


def test_each_process_takes_its_gpu_modulo_the_visible_ones(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU bound per SLURM task
    assert [process.cuda_index(local_rank) for local_rank in range(4)] == [0, 0, 0, 0]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [process.cuda_index(local_rank) for local_rank in range(6)] == [0, 1, 2, 3, 0, 1]


@pytest.fixture
def fake_cuda(monkeypatch):
    """Two visible GPUs that exist only as far as setup_run asks: the devices made current are recorded."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(torch.device(device)))
    monkeypatch.setattr(process, "seed_everything", lambda seed: None)  # would queue a seed for the fake GPUs
    for owner in (torch.backends.cuda.matmul, torch.backends.cudnn):  # set_fp32_precision changes these: restored
        monkeypatch.setattr(owner, "allow_tf32", owner.allow_tf32)
    return current


def test_one_process_on_cuda_n_makes_that_gpu_current(fake_cuda, tmp_path, capsys):
    run = process.setup_run("cuda:1", "none", 0, tmp_path / "out")
    # the pin-memory thread and rng_state's generator follow the current device: GPU 1, not GPU 0
    assert run.device == torch.device("cuda", 1) and fake_cuda == [torch.device("cuda", 1)]
    assert "fp32 matmuls and convolutions: IEEE fp32 (TF32 off)" in capsys.readouterr().out
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert torch.get_float32_matmul_precision() == "highest"
    process.release_output_dirs()


def test_a_gpu_index_beyond_the_visible_gpus_is_one_line(fake_cuda, tmp_path):
    with pytest.raises(UsageError, match=r"--device cuda:2: this machine has 2 visible GPU\(s\), cuda:0 to cuda:1"):
        process.setup_run("cuda:2", "none", 0, tmp_path / "out")  # was CUDA's "invalid device ordinal" traceback
    assert fake_cuda == []


def test_an_explicit_gpu_index_under_a_launcher_is_refused(fake_cuda, monkeypatch, tmp_path):
    monkeypatch.setattr(process.distributed, "init_distributed", lambda timeout: (1, 2, 1))
    monkeypatch.setattr(process.distributed, "is_distributed", lambda: True)
    with pytest.raises(UsageError, match="--device cuda:0: under torchrun / SLURM each process uses the GPU of its"):
        process.setup_run("cuda:0", "none", 0, tmp_path / "out")
    assert fake_cuda == []


def test_fp32_precision_is_left_alone_on_the_cpu():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    assert process.set_fp32_precision(torch.device("cpu")) == ""
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


def test_workers_ignore_what_the_main_process_handles():
    watched = (*process.STOP_SIGNALS, signal.SIGINT)
    before = {s: signal.getsignal(s) for s in watched}
    try:
        process.ignore_stop_signals(0)
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in watched)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    assert signal.SIGUSR1 in process.STOP_SIGNALS and signal.SIGTERM in process.STOP_SIGNALS


LEFT_BEHIND = """
import sys
import torch
from torch.utils.data import DataLoader
from util.run.process import run_entry_point
from util.run.process import ignore_stop_signals

def main(_):
    batches = iter(DataLoader(list(range(64)), batch_size=2, num_workers=2, worker_init_fn=ignore_stop_signals))
    next(batches)
    raise RuntimeError("a bug, mid-iteration")  # unhandled: sys.last_traceback keeps the iterator and its workers alive

run_entry_point(main, None)
"""


def test_a_crash_mid_iteration_exits_instead_of_waiting_for_workers_that_ignore_sigterm(tmp_path):
    """The interpreter's exit terminates (SIGTERM) and joins DataLoader workers; ours ignore SIGTERM, and an
    unhandled exception keeps the iterator alive, so without ``stop_worker_processes`` the process hangs after
    printing its traceback."""
    import subprocess
    import sys

    script = tmp_path / "left_behind.py"
    script.write_text(LEFT_BEHIND)
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TMPDIR": os.environ["TMPDIR"]},
    )
    assert result.returncode == 1 and result.stderr.strip().endswith("RuntimeError: a bug, mid-iteration")


def test_worker_pools_are_spawned_not_forked_and_one_worker_is_this_process():
    """tools/preprocess.py forked its pool: in a process whose PyTorch threads held a lock (the test suite after a
    training test) a worker hung in a futex, with the parent's SIGTERM handler, so the pool could not end it."""
    assert process.worker_pool(1, 100) is None and process.worker_pool(4, 1) is None
    with process.worker_pool(2, 4) as pool:
        assert pool._ctx.get_start_method() == "spawn"
        assert pool.map(abs, [-1, -2, 3]) == [1, 2, 3]


class _WorkerKiller(torch.utils.data.Dataset):
    """Each item kills the worker process reading it, as the kernel's OOM killer does."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_data_worker_is_one_line_that_says_what_to_do():
    def main(_):
        for _batch in torch.utils.data.DataLoader(_WorkerKiller(), num_workers=1):
            pass

    with pytest.raises(SystemExit) as exit_:
        process.run_entry_point(main, None)
    message = str(exit_.value)
    assert message.startswith("error: DataLoader worker (pid"), message
    assert "killed by signal" in message or "exited unexpectedly. A data-loading" in message, message
    assert "\n" not in message and "/dev/shm" in message and "--resume auto" in message

    def other(_):
        raise RuntimeError("not a worker's death")

    with pytest.raises(RuntimeError, match="not a worker's death"):  # other errors keep their traceback
        process.run_entry_point(other, None)
