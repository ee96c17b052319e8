"""Checks that the fast CUDA paths are really taken (no silent fallback), and the on-device data path's speed.

    python benchmarks/cuda_paths.py --device cuda --batch_size 512 --input_size 128

Fails (exit 1, one line per failure) when: bf16 is only emulated, SDPA cannot run the ViT's attention with the
flash kernel (at the encoder's and at the decoder's attention shape), fused AdamW is unavailable, pinned host memory
cannot be allocated, or a ``BatchAugment`` batch leaves the device. Prints the images/s of the packed-array path
(uint8 batch copied from pinned memory, then crop / flip / normalise on the device). With ``--device cpu`` (the dry
run) it runs the same code on the CPU and skips the checks that only CUDA can pass.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# before any third-party import: one error line where this Python lacks the requirements (util/__init__.py)
import util  # noqa: F401

# isort: split

import torch
import torch.nn.functional as F

from util.data.transforms import FMOW_RGB_MEAN, FMOW_RGB_STD, BatchAugment


def check_flash_attention(device: torch.device, heads: int, head_dim: int, tokens: int, batch: int) -> str:
    """Forward + backward of SDPA restricted to the flash kernel, in bf16, at the ViT's attention shape."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (
        torch.randn(batch, heads, tokens, head_dim, device=device, dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    return f"flash SDPA ran (bf16, {heads} heads x {head_dim}, {tokens} tokens)"


def check_fused_adamw(device: torch.device) -> str:
    param = torch.nn.Parameter(torch.randn(8, device=device))
    param.grad = torch.randn(8, device=device)
    torch.optim.AdamW([param], lr=1e-3, fused=True).step()
    return "fused AdamW stepped"


def data_rate(device: torch.device, batch: int, size: int, stored: int, repeats: int) -> float:
    """Images/s of the packed-array path on the device: pinned uint8 batch -> device -> BatchAugment."""
    augment = BatchAugment(size, FMOW_RGB_MEAN, FMOW_RGB_STD).to(device)
    host = torch.randint(0, 256, (batch, 3, stored, stored), dtype=torch.uint8)
    if device.type == "cuda":
        host = host.pin_memory()
    out = augment(host.to(device, non_blocking=True))  # warm-up
    if out.device != device or out.shape != (batch, 3, size, size):
        raise RuntimeError(f"BatchAugment returned {tuple(out.shape)} on {out.device}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        out = augment(host.to(device, non_blocking=True))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batch * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch_size", type=int, default=512)
    parser.add_argument("--input_size", type=int, default=128, help="side of the augmented crops (pixels)")
    parser.add_argument("--stored_size", type=int, default=None, help="side of the packed images (default: input_size)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--heads", type=int, default=12, help="ViT-B: 12 heads of 64")
    parser.add_argument("--head_dim", type=int, default=64)
    parser.add_argument("--decoder_heads", type=int, default=16, help="the MAE decoder: 16 heads of 32")
    parser.add_argument("--decoder_head_dim", type=int, default=32)
    parser.add_argument("--patch_size", type=int, default=16)
    args = parser.parse_args()
    device = torch.device(args.device)
    failures = []
    if device.type == "cuda":
        patches = (args.input_size // args.patch_size) ** 2
        tokens = patches // 4 + 1  # the encoder sees the visible patches at mask ratio 0.75, + cls
        checks = [
            (
                "native bf16",
                lambda: (
                    "native bf16"
                    if torch.cuda.is_bf16_supported(including_emulation=False)
                    else (_ for _ in ()).throw(RuntimeError("bf16 is only emulated on this GPU: --amp auto uses fp16"))
                ),
            ),
            ("flash attention, encoder", lambda: check_flash_attention(device, args.heads, args.head_dim, tokens, 8)),
            (
                "flash attention, decoder",  # every patch (mask tokens included), + cls
                lambda: check_flash_attention(device, args.decoder_heads, args.decoder_head_dim, patches + 1, 8),
            ),
            ("fused AdamW", lambda: check_fused_adamw(device)),
            (
                "pinned memory",
                lambda: (
                    "pinned"
                    if torch.empty(1).pin_memory().is_pinned()
                    else (_ for _ in ()).throw(RuntimeError("not pinned"))
                ),
            ),
        ]
        for name, check in checks:
            try:
                print(f"{name}: {check()}", flush=True)
            except Exception as e:  # any failure here is a silent fallback in training
                failures.append(f"{name}: {str(e).splitlines()[0]}")
        print(f"device {device} ({torch.cuda.get_device_name(device)})", flush=True)
    else:
        print(f"device {device}: CUDA-only checks skipped", flush=True)
    rate = data_rate(device, args.batch_size, args.input_size, args.stored_size or args.input_size, args.repeats)
    print(f"packed-array path on {device}: {rate:.0f} img/s (pinned uint8 copy + BatchAugment)", flush=True)
    for failure in failures:
        print(f"FAILED {failure}", flush=True)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
