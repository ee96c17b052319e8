"""Time the full pretraining step (forward, backward, optimiser) against the hardware's matmul rate.

    python benchmarks/bench_pretrain.py --model cross_scale_mae_vit_base --input_size 128 --batch_size 16

Prints median img/s, peak memory, model FLOPs per image (torch.utils.flop_counter), achieved FLOP/s and MFU
twice: against the datasheet peak of the named GPU for the dtype (``DATASHEET_TFLOPS``; the figure a target is
judged by) and against a dense matmul of the same dtype measured here in this run (at least 20 matmuls, timed with
CUDA events on a GPU); with ``--compile`` the same model compiled as well; then the same model in "upstream
execution" (one pass per scale; fp32 on CPU, fp16 autocast on CUDA; timm's SDPA attention; unfused AdamW) and our
speed-up over it.
"""

from __future__ import annotations

import argparse
import re
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# before any third-party import: one error line where this Python lacks the requirements (util/__init__.py)
import util  # noqa: F401

# isort: split

import torch
from timm.optim import create_optimizer_v2
from torch.utils.flop_counter import FlopCounterMode

import models_cross_scale_mae as models_mae
from util.run.loop import optimizer_step, set_fused_attention, use_sdpa
from util.run.process import autocast, resolve_amp, resolve_device, set_fp32_precision


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# Dense (no sparsity) tensor-core TFLOP/s from NVIDIA's datasheets, by a pattern of torch.cuda.get_device_name; bf16
# and fp16 are equal on these parts; fp32 is the non-tensor-core rate (what --amp none computes: no TF32). First match
# wins, so the specific names come first. Sources: H100 / H200 product briefs (the "with sparsity" figures halved),
# A100 datasheet.
DATASHEET_TFLOPS = (
    (r"GH200", "GH200", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    (r"H200 NVL", "H200 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    (r"H200", "H200 SXM", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    (r"H100 NVL", "H100 NVL", {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    (r"H100.*PCIe", "H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    (r"H100", "H100 SXM", {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    (r"A100", "A100", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
)


def datasheet_peak(device_name: str, dtype: torch.dtype) -> tuple[str, float] | None:
    """(part, FLOP/s) of the datasheet's dense peak for ``dtype`` on the GPU called ``device_name``; None for a
    device the table does not list (a CPU, another GPU)."""
    key = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]
    for pattern, part, peaks in DATASHEET_TFLOPS:
        if re.search(pattern, device_name):
            return part, peaks[key] * 1e12
    return None


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 20) -> float:
    """Dense square matmul FLOP/s in ``dtype``: ``repeats`` back-to-back matmuls after 3 untimed ones, timed with
    CUDA events on a GPU (what the GPU did, not when the host saw it), with the wall clock elsewhere."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty_like(a)
    for _ in range(3):
        torch.matmul(a, b, out=out)
    synchronize(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            torch.matmul(a, b, out=out)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1000
    else:
        begin = time.perf_counter()
        for _ in range(repeats):
            torch.matmul(a, b, out=out)
        seconds = time.perf_counter() - begin
    return 2 * size**3 * repeats / seconds


def train_step(model, optimizer, images, device, amp_dtype, scaler):
    with autocast(device, amp_dtype):
        loss = model(images)["loss"]
    (scaler.scale(loss) if scaler else loss).backward()
    optimizer_step(optimizer, scaler)
    return loss


def measure(
    model, images, device, amp_dtype, steps: int, warmup: int, compile_model: bool, fused_adamw: bool
) -> dict[str, float]:
    """Median seconds per step (after warm-up), FLOPs per step and peak memory of one execution mode."""
    optimizer = create_optimizer_v2(model, "adamw", lr=1e-4, weight_decay=0.05, betas=(0.9, 0.95), fused=fused_adamw)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    step_model = torch.compile(model) if compile_model else model
    fused = [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")]
    set_fused_attention(model, True)  # count model FLOPs the same way whichever attention path runs
    with FlopCounterMode(display=False) as counter:
        train_step(model, optimizer, images, device, amp_dtype, scaler)
    set_fused_attention(model, all(fused))
    for _ in range(warmup):
        train_step(step_model, optimizer, images, device, amp_dtype, scaler)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        train_step(step_model, optimizer, images, device, amp_dtype, scaler)
        synchronize(device)
        times.append(time.perf_counter() - start)
    peak = (
        torch.cuda.max_memory_allocated(device)
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return {"seconds": statistics.median(times), "flops": counter.get_total_flops(), "peak_bytes": peak}


def report(
    name: str, result: dict[str, float], batch: int, measured: float, datasheet: float | None, dtype_name: str
) -> float:
    """Print one execution's figures; MFU against the datasheet peak (when known) and the measured matmul rate."""
    images_per_s = batch / result["seconds"]
    achieved = result["flops"] / result["seconds"]
    against_datasheet = (
        f"{100 * achieved / datasheet:.1f} % of the datasheet {dtype_name} peak ({datasheet / 1e12:.0f} TFLOP/s), "
        if datasheet
        else "(no datasheet peak for this device) "
    )
    print(
        f"{name}:\n"
        f"  median step        {result['seconds'] * 1000:.1f} ms ({images_per_s:.2f} img/s)\n"
        f"  peak memory        {result['peak_bytes'] / 2**30:.2f} GiB\n"
        f"  FLOPs per image    {result['flops'] / batch / 1e9:.2f} GFLOP (step {result['flops'] / 1e9:.1f} GFLOP)\n"
        f"  achieved           {achieved / 1e9:.1f} GFLOP/s\n"
        f"  MFU                {against_datasheet}{100 * achieved / measured:.1f} % of the measured {dtype_name} "
        "matmul rate",
        flush=True,
    )
    return images_per_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cross_scale_mae_vit_base")
    parser.add_argument("--input_size", type=int, default=128)
    parser.add_argument("--patch_size", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "none"))
    parser.add_argument("--compile", action="store_true", help="also measure our execution compiled")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument(
        "--matmul_size",
        type=int,
        default=None,
        help="side of the matmul that measures the peak (default: 2048 CPU, 8192 GPU)",
    )
    parser.add_argument("--no_upstream", action="store_true", help="skip the upstream-execution comparison")
    parser.add_argument(
        "--datasheet_device",
        default=None,
        help="look the datasheet peak up for this device name (default: the GPU's own; none on a CPU); "
        "gpu_check.sh's dry run names an H100 to exercise the GPU run's path",
    )
    args = parser.parse_args()

    device = resolve_device(args.device)
    amp_dtype = resolve_amp(args.amp, device)
    precision = set_fp32_precision(device)  # as training sets it: --amp none is IEEE fp32, no TF32
    matmul_size = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(
        f"{args.model}, {args.input_size} px, patch {args.patch_size}, batch {args.batch_size}, device {device} "
        f"({where}), "
        f"torch {torch.__version__}{precision}",
        flush=True,
    )

    def build(ours: bool):
        """Ours: both views in one pass, attention as main_pretrain.py --attention auto picks it.
        Upstream: one pass per view, timm's default attention (SDPA)."""
        torch.manual_seed(0)
        model = models_mae.create_model(args.model, input_size=args.input_size, patch_size=args.patch_size).to(device)
        model.batched_views = ours
        if ours:
            set_fused_attention(model, use_sdpa("auto", device))
        return model

    datasheet = {}
    rates = {}

    def peaks(dtype: torch.dtype) -> tuple[float, float | None]:
        """(measured matmul rate, datasheet peak or None) of ``dtype``, each measured once."""
        if dtype not in rates:
            rates[dtype] = matmul_rate(device, dtype, matmul_size)
            print(
                f"dense {matmul_size}^3 matmul, {dtype}: {rates[dtype] / 1e9:.1f} GFLOP/s "
                f"(20 timed{' with CUDA events' if device.type == 'cuda' else ''})",
                flush=True,
            )
            name = args.datasheet_device or (torch.cuda.get_device_name(device) if device.type == "cuda" else None)
            known = datasheet_peak(name, dtype) if name else None
            datasheet[dtype] = known[1] if known else None
            if known:
                print(f"datasheet peak, {known[0]}, {dtype}: {known[1] / 1e12:.0f} TFLOP/s dense", flush=True)
        return rates[dtype], datasheet[dtype]

    ours_dtype = amp_dtype or torch.float32
    dtype_name = str(ours_dtype).removeprefix("torch.")
    peaks(ours_dtype)
    autocast_name = amp_dtype or "off"
    ours = measure(build(True), images, device, amp_dtype, args.steps, args.warmup, False, fused_adamw=True)
    ours_rate = report(
        f"this repository (batched views, autocast {autocast_name})",
        ours,
        args.batch_size,
        *peaks(ours_dtype),
        dtype_name,
    )
    if args.compile:
        compiled = measure(build(True), images, device, amp_dtype, args.steps, args.warmup, True, fused_adamw=True)
        report(
            f"this repository (batched views, autocast {autocast_name}, compiled)",
            compiled,
            args.batch_size,
            *peaks(ours_dtype),
            dtype_name,
        )
    if args.no_upstream:
        return
    upstream_dtype = torch.float16 if device.type == "cuda" else None
    upstream = measure(build(False), images, device, upstream_dtype, args.steps, args.warmup, False, fused_adamw=False)
    upstream_rate = report(
        f"upstream execution (one pass per scale, autocast {upstream_dtype or 'off'})",
        upstream,
        args.batch_size,
        *peaks(upstream_dtype or torch.float32),
        str(upstream_dtype or torch.float32).removeprefix("torch."),
    )
    print(f"speed-up over upstream execution: {ours_rate / upstream_rate:.2f}x", flush=True)


if __name__ == "__main__":
    main()
