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


# ----------------------------------------------------------------------------- MaskAD's other generators
def planted_features(grid: tuple[int, int], seed: int, blob: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature maps (1, 4, H, W): a flat background with noise and a bright square ``blob`` patches wide."""
    g = rng(seed)
    features = 0.01 * torch.randn(1, 4, *grid, generator=g)
    top = int(torch.randint(1, grid[0] - blob, (), generator=g))
    left = int(torch.randint(1, grid[1] - blob, (), generator=g))
    features[..., top : top + blob, left : left + blob] += 5.0
    region = torch.zeros(grid, dtype=torch.bool)
    region[top : top + blob, left : left + blob] = True
    return features, region


@FAST
@given(side=st.integers(5, 16), blob=st.integers(1, 3), ratio=st.floats(0.05, 0.9), seed=seeds)
def test_foreground_masks_stay_in_the_foreground(side: int, blob: int, ratio: float, seed: int) -> None:
    from anomalib_mcad.models.components.foreground import ForegroundMaskGenerator  # noqa: PLC0415

    grid = (side, side)
    assume(expected(grid, ratio) >= 1)
    features, blob_region = planted_features(grid, seed, blob)
    generator = ForegroundMaskGenerator(grid, ratio)
    mask = generator(features, rng(seed))[0]
    assert mask.shape == grid and mask.dtype == torch.bool
    assert int(mask.sum()) == min(blob * blob, expected(grid, ratio))  # the whole blob, or the cap
    assert not (mask & ~blob_region).any()
    assert torch.equal(mask, generator(features, rng(seed))[0])


@FAST
@given(grid=grids, ratio=st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0)))
def test_foreground_ratio_outside_the_open_interval_is_an_error(grid: tuple[int, int], ratio: float) -> None:
    from anomalib_mcad.models.components.foreground import ForegroundMaskGenerator  # noqa: PLC0415

    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        ForegroundMaskGenerator(grid, ratio)
    with pytest.raises(ValueError, match="masks no patch"):
        ForegroundMaskGenerator(grid, 0.5 / (grid[0] * grid[1]))


@FAST
@given(grid=grids, counts=st.lists(st.integers(1, 255), min_size=1, max_size=5), seed=seeds)
def test_prototype_oriented_masks_cover_the_top_ranked_patches(grid: tuple[int, int], counts: list[int], seed: int) -> None:
    from anomalib_mcad.models.image.mask_ad.torch_model import prototype_oriented_masks  # noqa: PLC0415

    n_patches = grid[0] * grid[1]
    ranking = torch.rand(2, *grid, generator=rng(seed))
    if max(counts) >= n_patches:
        with pytest.raises(ValueError, match="prototype mask counts"):
            prototype_oriented_masks(ranking, counts)
        return
    masks = prototype_oriented_masks(ranking, counts)
    assert masks.shape == (2, len(counts), *grid) and masks.dtype == torch.bool
    for b in range(2):
        for i, k in enumerate(counts):
            mask = masks[b, i]
            assert int(mask.sum()) == k
            assert float(ranking[b][mask].min()) >= float(ranking[b][~mask].max())  # the k most abnormal
            for j, other in enumerate(counts):
                if other <= k:
                    assert not (masks[b, j] & ~mask).any()  # nested: a smaller count is inside


@FAST
@given(low=st.floats(0.0, 1.0), high=st.floats(0.0, 1.0))
def test_maskad_prototype_ratio_range_must_fit_the_grid(low: float, high: float) -> None:
    from anomalib_mcad.models.image.mask_ad.torch_model import prototype_ratios  # noqa: PLC0415

    if 0.0 < low <= high < 1.0:
        ratios = prototype_ratios(low, high, 4)
        assert ratios[0] == pytest.approx(low) and ratios[-1] == pytest.approx(high)
        assert ratios == sorted(ratios)
    else:
        with pytest.raises(ValueError, match="prototype mask ratios"):
            prototype_ratios(low, high, 4)
