"""Time the full pretraining step (forward, backward, optimiser) against the hardware's matmul rate.

    python benchmarks/bench_pretrain.py --model cross_scale_mae_vit_base --input_size 128 --batch_size 16

Prints median img/s, peak memory, model FLOPs per image (torch.utils.flop_counter), achieved FLOP/s and
MFU = achieved / dense matmul rate of the same dtype measured here in this run; then the same model in
"upstream execution" (one pass per scale; fp32 on CPU, fp16 autocast on CUDA; timm's SDPA attention;
unfused AdamW) and our speed-up over it.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from timm.optim import create_optimizer_v2
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models_cross_scale_mae as models_mae
from util.run.loop import optimizer_step, set_fused_attention, use_sdpa
from util.run.process import autocast, resolve_amp, resolve_device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """Dense square matmul FLOP/s in ``dtype`` (median of ``repeats``)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    (a @ b).sum().item()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


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


def report(name: str, result: dict[str, float], batch: int, peak_rate: float, dtype_name: str) -> float:
    images_per_s = batch / result["seconds"]
    achieved = result["flops"] / result["seconds"]
    print(
        f"{name}:\n"
        f"  median step        {result['seconds'] * 1000:.1f} ms ({images_per_s:.2f} img/s)\n"
        f"  peak memory        {result['peak_bytes'] / 2**30:.2f} GiB\n"
        f"  FLOPs per image    {result['flops'] / batch / 1e9:.2f} GFLOP (step {result['flops'] / 1e9:.1f} GFLOP)\n"
        f"  achieved           {achieved / 1e9:.1f} GFLOP/s\n"
        f"  MFU                {100 * achieved / peak_rate:.1f} % of the {dtype_name} matmul rate",
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
    parser.add_argument("--compile", action="store_true")
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
    args = parser.parse_args()

    device = resolve_device(args.device)
    amp_dtype = resolve_amp(args.amp, device)
    matmul_size = args.matmul_size or (8192 if device.type == "cuda" else 2048)
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(
        f"{args.model}, {args.input_size} px, patch {args.patch_size}, batch {args.batch_size}, device {device} "
        f"({where}), "
        f"torch {torch.__version__}",
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

    rates = {}
    for dtype in {amp_dtype or torch.float32, torch.float32}:
        rates[dtype] = matmul_rate(device, dtype, matmul_size)
        print(f"dense {matmul_size}^3 matmul, {dtype}: {rates[dtype] / 1e9:.1f} GFLOP/s", flush=True)

    ours_dtype = amp_dtype or torch.float32
    ours = measure(build(True), images, device, amp_dtype, args.steps, args.warmup, args.compile, fused_adamw=True)
    ours_rate = report(
        f"this repository (batched views, autocast {amp_dtype or 'off'}{', compiled' if args.compile else ''})",
        ours,
        args.batch_size,
        rates[ours_dtype],
        str(ours_dtype).removeprefix("torch."),
    )
    if args.no_upstream:
        return
    upstream_dtype = torch.float16 if device.type == "cuda" else None
    if upstream_dtype is not None and upstream_dtype not in rates:
        rates[upstream_dtype] = matmul_rate(device, upstream_dtype, matmul_size)
    upstream = measure(build(False), images, device, upstream_dtype, args.steps, args.warmup, False, fused_adamw=False)
    upstream_rate = report(
        f"upstream execution (one pass per scale, autocast {upstream_dtype or 'off'})",
        upstream,
        args.batch_size,
        rates[upstream_dtype or torch.float32],
        str(upstream_dtype or torch.float32).removeprefix("torch."),
    )
    print(f"speed-up over upstream execution: {ours_rate / upstream_rate:.2f}x", flush=True)


if __name__ == "__main__":
    main()
