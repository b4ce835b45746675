"""Property-based tests (hypothesis) for every patch-grid mask generator.

For any grid, ratio and seed: the mask has the grid's shape, masks exactly ``floor(ratio * H * W)``
patches, stays inside the region it is given, and is the same for the same seed. Requests that
cannot be met are ``ValueError``s, never a short or oversized mask.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from anomalib_mcad.models.components.masking import (
    BlockwiseMaskGenerator,
    CombinationalMaskGenerator,
    RandomMaskGenerator,
    masked_count,
)

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
grids = st.tuples(st.integers(2, 16), st.integers(2, 16))
ratios = st.floats(0.01, 0.95, allow_nan=False)
seeds = st.integers(0, 2**31 - 1)


def rng(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def expected(grid: tuple[int, int], ratio: float) -> int:
    return math.floor(ratio * grid[0] * grid[1] + 1e-9)


def blockwise_fits(grid: tuple[int, int], ratio: float, min_patches: int = 4) -> bool:
    """Algorithm 1 needs at least one block of ``min_patches`` that is smaller than the grid."""
    return expected(grid, ratio) >= min_patches and (grid[0] - 1) * (grid[1] - 1) >= min_patches


def region_of(grid: tuple[int, int], seed: int, keep: float) -> torch.Tensor:
    """A random region covering about ``keep`` of the grid."""
    return torch.rand(grid, generator=rng(seed + 1)) < keep


@pytest.mark.parametrize("cls", [RandomMaskGenerator, BlockwiseMaskGenerator, CombinationalMaskGenerator])
@FAST
@given(grid=grids, ratio=ratios, seed=seeds)
def test_count_shape_and_determinism(cls: type, grid: tuple[int, int], ratio: float, seed: int) -> None:
    assume(expected(grid, ratio) >= 1)
    if cls is not RandomMaskGenerator and not blockwise_fits(grid, ratio):
        with pytest.raises(ValueError, match="cannot fit"):
            cls(grid, ratio)
        return
    generator = cls(grid, ratio)
    mask = generator(rng(seed))
    assert mask.shape == grid and mask.dtype == torch.bool
    assert int(mask.sum()) == expected(grid, ratio) == generator.num_masked
    assert torch.equal(mask, generator(rng(seed)))


@pytest.mark.parametrize("cls", [RandomMaskGenerator, BlockwiseMaskGenerator])
@FAST
@given(grid=grids, ratio=st.floats(0.01, 0.5), seed=seeds, keep=st.floats(0.3, 1.0))
def test_masks_stay_inside_the_region(cls: type, grid: tuple[int, int], ratio: float, seed: int, keep: float) -> None:
    count = expected(grid, ratio)
    region = region_of(grid, seed, keep)
    assume(count >= 1 and int(region.sum()) >= count)
    assume(cls is RandomMaskGenerator or blockwise_fits(grid, ratio))
    mask = cls(grid, ratio)(rng(seed), region=region)
    assert int(mask.sum()) == count
    assert not (mask & ~region).any()


@FAST
@given(grid=grids, ratio=st.floats(0.05, 0.5), seed=seeds)
def test_weighted_random_masks_count_and_prefer_heavy_patches(grid: tuple[int, int], ratio: float, seed: int) -> None:
    count = expected(grid, ratio)
    assume(count >= 1)
    weights = torch.zeros(grid)
    weights.view(-1)[:count] = 1.0  # exactly `count` patches carry all the weight
    mask = RandomMaskGenerator(grid, ratio)(rng(seed), weights=weights)
    assert int(mask.sum()) == count
    assert int(mask.view(-1)[:count].sum()) >= count - 1  # the 1e-6 floor leaves a negligible chance elsewhere


@FAST
@given(grid=grids, ratio=ratios)
def test_a_region_too_small_is_an_error(grid: tuple[int, int], ratio: float) -> None:
    count = expected(grid, ratio)
    assume(count >= 1)
    region = torch.zeros(grid, dtype=torch.bool)
    region.view(-1)[: count - 1] = True
    for cls in (RandomMaskGenerator, BlockwiseMaskGenerator):
        with pytest.raises(ValueError, match="cannot fit"):  # at construction (no block fits) or at the call
            cls(grid, ratio)(rng(0), region=region)


@FAST
@given(ratio=st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0), st.just(float("nan"))), grid=grids)
def test_ratio_outside_the_open_interval_is_an_error(ratio: float, grid: tuple[int, int]) -> None:
    for cls in (RandomMaskGenerator, BlockwiseMaskGenerator, CombinationalMaskGenerator):
        with pytest.raises(ValueError, match=r"\(0, 1\)"):
            cls(grid, ratio)


@FAST
@given(grid=grids, seed=seeds)
def test_a_ratio_that_masks_nothing_is_an_error(grid: tuple[int, int], seed: int) -> None:
    del seed
    tiny = 0.5 / (grid[0] * grid[1])
    with pytest.raises(ValueError, match="masks no patch"):
        masked_count(grid, tiny)
