"""Location blocks and the block bootstrap: uncertainty for evaluations whose samples are spatially correlated.

Neighbouring tiles (and the pixels in them) are not independent samples, so intervals resample whole location
blocks with replacement, not tiles or pixels (the moving/fixed-block bootstrap; Kunsch 1989, Lahiri 2003). The
embedded sample's tiles are named ``r{row}_c{col}`` and its blocks are 3 x 3 tiles (``tools/make_sample_data.py``
splits train / val by them, ``tools/sample_eval.py`` cross-validates over them).

A ``--block_pattern`` is a regular expression searched in each file's stem:

- with named groups ``row`` and ``col`` (the default ``r(?P<row>\\d+)_c(?P<col>\\d+)``): the tile at (row, col) is
  in block (row // size, col // size), ``size`` tiles per block side;
- otherwise the text of its groups (or of the whole match) names the block, e.g. ``^(\\d+_\\d+)_`` for
  mmsegmentation's Potsdam crops ``{tile}_{x0}_{y0}_{x1}_{y1}.png``: every crop of one ISPRS tile in one block;
- an image whose stem does not match is a block of its own (an empty pattern: every image is).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from util.config import BLOCK_TILES, BOOTSTRAP, TILE_PATTERN
from util.errors import DataError, UsageError

INTERVAL = (2.5, 97.5)  # percentiles: a 95 % percentile interval


def compile_pattern(pattern: str) -> re.Pattern | None:
    """``--block_pattern`` compiled (None for the empty pattern).

    Raises:
        UsageError: not a regular expression, or only one of the groups ``row`` / ``col``.
    """
    if not pattern:
        return None
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise UsageError(f"--block_pattern {pattern!r}: not a regular expression ({e})") from None
    if len({"row", "col"} & set(compiled.groupindex)) == 1:
        raise UsageError(f"--block_pattern {pattern!r}: name both groups (?P<row>...) and (?P<col>...), or neither")
    return compiled


def block_of(name: str, pattern: re.Pattern | None, size: int = BLOCK_TILES) -> tuple:
    """The block (a hashable key) of the file ``name`` (a path or a stem); see the module docstring."""
    stem = Path(name).stem
    found = pattern.search(stem) if pattern is not None else None
    if found is None:
        return ("image", stem)
    if "row" in pattern.groupindex:
        try:
            return ("grid", int(found["row"]) // size, int(found["col"]) // size)
        except (TypeError, ValueError):
            raise UsageError(
                f"--block_pattern {pattern.pattern!r}: in {stem!r} the groups row and col match "
                f"{found['row']!r} and {found['col']!r}, not integers"
            ) from None
    return ("group", found.groups() or (found.group(0),))


def grid_block(name: str, size: int = BLOCK_TILES, pattern: str = TILE_PATTERN) -> tuple[int, int]:
    """The (row, col) block of a tile on the grid (``pattern``'s groups ``row`` and ``col``, the embedded sample's
    ``r{row}_c{col}`` by default), for tools that need every tile on it (``tools/sample_eval.py``'s folds).

    Raises:
        DataError: a file name the pattern does not place on the grid, naming it and the form expected.
    """
    block = block_of(name, compile_pattern(pattern), size)
    if block[0] != "grid":
        raise DataError(
            f"{name}: not named as a tile of the grid (expected {pattern!r}, e.g. r03_c07.png): its location block is "
            "unknown"
        )
    return block[1], block[2]


def block_ids(names: Sequence[str], pattern: str = TILE_PATTERN, size: int = BLOCK_TILES) -> np.ndarray:
    """[N] int64 block index (0..B-1, in order of first appearance) of each file name.

    Raises:
        UsageError: a bad ``pattern`` or ``size`` < 1.
    """
    if size < 1:
        raise UsageError(f"--block_size must be at least 1, got {size}")
    compiled = compile_pattern(pattern)
    index: dict[tuple, int] = {}
    return np.array([index.setdefault(block_of(n, compiled, size), len(index)) for n in names], dtype=np.int64)


def resample_blocks(blocks: np.ndarray, resamples: int = BOOTSTRAP, seed: int = 0) -> Iterator[np.ndarray]:
    """For each bootstrap resample, the drawn blocks' members: [M] indices into ``blocks`` (B blocks drawn with
    replacement out of the B there are; a block drawn twice contributes its members twice). Seeded: the same
    ``blocks`` give the same resamples, so two statistics bootstrapped with one seed are paired."""
    ids = np.unique(blocks)
    members = [np.flatnonzero(blocks == b) for b in ids]
    rng = np.random.default_rng(seed)
    for _ in range(resamples):
        yield np.concatenate([members[i] for i in rng.integers(0, len(ids), len(ids))])


def block_counts(blocks: np.ndarray, resamples: int = BOOTSTRAP, seed: int = 0) -> Iterator[np.ndarray]:
    """``resample_blocks`` as per-item multiplicities: [N] int64, how often each item is in the resample (the same
    draws: weights for statistics that are sums, such as confusion matrices)."""
    for chosen in resample_blocks(blocks, resamples, seed):
        yield np.bincount(chosen, minlength=len(blocks))


def percentile_interval(samples: Sequence[float]) -> tuple[float, float]:
    """The 95 % percentile interval (2.5th, 97.5th percentile) of bootstrap statistics."""
    low, high = np.percentile(np.asarray(samples, dtype=np.float64), INTERVAL)
    return float(low), float(high)
