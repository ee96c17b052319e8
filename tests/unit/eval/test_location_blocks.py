"""util/eval/location_blocks.py: which location block an image is in, and the seeded block resamples."""

from __future__ import annotations

import numpy as np
import pytest

from util.errors import UsageError
from util.eval import location_blocks


def test_tiles_group_into_3_by_3_blocks_and_unmatched_names_stand_alone():
    names = ["images/r00_c00.jpg", "r02_c02.png", "r03_c00.png", "r00_c03.tif", "r14_c14.jpg", "scene.png", "other.png"]
    assert location_blocks.block_ids(names).tolist() == [0, 0, 1, 2, 3, 4, 5]
    assert location_blocks.block_ids(names, location_blocks.TILE_PATTERN, size=1).tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert location_blocks.block_ids(["a", "b", "a"], "").tolist() == [
        0,
        1,
        0,
    ]  # empty pattern: every image alone (by name)


def test_a_pattern_without_row_and_col_names_the_block_by_its_groups():
    crops = ["2_10_0_0_512_512.png", "2_10_256_0_768_512.png", "3_11_0_0_512_512.png"]  # mmsegmentation's Potsdam crops
    assert location_blocks.block_ids(crops, r"^(\d+_\d+)_").tolist() == [0, 0, 1]
    with pytest.raises(UsageError, match="not a regular expression"):
        location_blocks.block_ids(crops, "(")
    with pytest.raises(UsageError, match="name both groups"):
        location_blocks.block_ids(crops, r"(?P<row>\d+)")
    with pytest.raises(UsageError, match="--block_size"):
        location_blocks.block_ids(crops, size=0)


def test_resamples_draw_whole_blocks_with_replacement_and_are_seeded():
    image_block = np.array([0, 0, 0, 1, 2, 2])
    draws = list(location_blocks.resample_blocks(image_block, 50, seed=3))
    for chosen in draws:
        counts = np.bincount(chosen, minlength=6)
        assert counts[0] == counts[1] == counts[2] and counts[4] == counts[5]  # a block's images come together
        assert counts[[0, 3, 4]].sum() == 3  # three blocks drawn
    assert all((a == b).all() for a, b in zip(draws, location_blocks.resample_blocks(image_block, 50, seed=3)))
    assert [np.bincount(c, minlength=6).tolist() for c in draws] == [
        c.tolist() for c in location_blocks.block_counts(image_block, 50, seed=3)
    ]


@pytest.mark.parametrize("pattern", [r"(?P<row>\w+)_(?P<col>\w+)", r"(?P<row>\d+)?x?(?P<col>\d+)?"])
def test_row_col_groups_matching_no_integer_are_a_one_line_usage_error(pattern):
    with pytest.raises(UsageError, match=r"in 'r00_c01' the groups row and col match"):
        location_blocks.block_ids(["a/r00_c01.png"], pattern)


def test_a_tile_off_the_grid_is_a_one_line_data_error():
    """tools/sample_eval.py --sample with tiles not named rRR_cCC ended in "ValueError: not enough values to unpack"."""
    from util.errors import DataError

    assert location_blocks.grid_block("r04_c07.png") == (1, 2)
    with pytest.raises(DataError, match=r"tile_0007.png: not named as a tile of the grid \(expected .*r03_c07.png\)"):
        location_blocks.grid_block("tile_0007.png")
