"""Fixed 2-D sin-cos position embeddings, laid out exactly as MAE's ``get_2d_sincos_pos_embed``."""

from __future__ import annotations

import torch


def _sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """positions: [M] -> [M, embed_dim] as [sin(pos * w), cos(pos * w)], w_i = 1 / 10000^(i / (D/2))."""
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.double().reshape(-1)[:, None] * omega[None, :]  # [M, D/2]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int | tuple[int, int], cls_token: bool = True) -> torch.Tensor:
    """2-D sin-cos table with an all-zero row for the cls token.

    MAE builds the grid with ``meshgrid(w, h)``, so the first half of the channels encodes the
    column index and the second half the row index; published weights were trained with that order.

    Args:
        embed_dim: Channels, divisible by 4.
        grid_size: Patches per side, or (rows, cols).
        cls_token: Prepend a zero row for the cls token.

    Returns:
        [1, (1 +) rows * cols, embed_dim] float32 tensor.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {embed_dim}")
    rows, cols = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    col_index, row_index = torch.meshgrid(
        torch.arange(cols, dtype=torch.float32), torch.arange(rows, dtype=torch.float32), indexing="xy"
    )  # each [rows, cols]
    emb = torch.cat([_sincos_1d(embed_dim // 2, col_index), _sincos_1d(embed_dim // 2, row_index)], dim=1)
    if cls_token:
        emb = torch.cat([torch.zeros(1, embed_dim, dtype=emb.dtype), emb], dim=0)
    return emb.float().unsqueeze(0)
