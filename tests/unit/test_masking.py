"""Patch-grid mask generators (PMAD appendix A-B): counts, regions, weights, determinism, errors."""

from __future__ import annotations

import pytest
import torch

from anomalib_mcad.models.components.masking import (
    BlockwiseMaskGenerator,
    CombinationalMaskGenerator,
    PatchErrorRecorder,
    RandomMaskGenerator,
    masked_count,
    patch_frequency_weights,
    rank_loss_weights,
)


def _rng(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("ratio", [0.04, 0.2, 0.48, 0.9])
def test_random_mask_count_and_shape(ratio: float) -> None:
    gen = RandomMaskGenerator((14, 14), ratio)
    mask = gen(_rng())
    assert mask.shape == (14, 14)
    assert mask.dtype == torch.bool
    assert int(mask.sum()) == int(196 * ratio) == gen.num_masked


@pytest.mark.parametrize("ratio", [0.04, 0.16, 0.3, 0.48])
def test_blockwise_count_matches_algorithm_1(ratio: float) -> None:
    gen = BlockwiseMaskGenerator((14, 14), ratio)
    rng = _rng(1)
    for _ in range(20):
        assert int(gen(rng).sum()) == gen.num_masked


def test_blockwise_without_top_up_never_overshoots_and_is_blocky() -> None:
    gen = BlockwiseMaskGenerator((14, 14), 0.4, top_up=False)
    rng = _rng(2)
    masks = torch.stack([gen(rng) for _ in range(30)]).float()
    assert (masks.flatten(1).sum(1) <= gen.num_masked).all()
    assert masks.flatten(1).sum(1).mean() > 0.9 * gen.num_masked
    # blocks: a masked patch has far more masked 4-neighbours than under random masking
    def neighbour_rate(m: torch.Tensor) -> float:
        right = (m[:, :, 1:] * m[:, :, :-1]).sum() / m[:, :, 1:].sum()
        return float(right)

    random_masks = torch.stack([RandomMaskGenerator((14, 14), 0.4)(rng) for _ in range(30)]).float()
    assert neighbour_rate(masks) > neighbour_rate(random_masks) + 0.2


def test_one_block_step_is_a_rectangle_within_bounds() -> None:
    gen = BlockwiseMaskGenerator((14, 14), 0.3)
    rng = _rng(3)
    region = torch.ones(14, 14, dtype=torch.bool)
    for _ in range(40):
        mask = torch.zeros(14, 14, dtype=torch.bool)
        added = gen._place_block(mask, 12, region, None, rng)
        rows, cols = torch.nonzero(mask, as_tuple=True)
        height = int(rows.max() - rows.min() + 1)
        width = int(cols.max() - cols.min() + 1)
        assert height * width == added == int(mask.sum())  # a single rectangle
        assert 3 <= added <= 12  # area ~ U(4, 12), rounded; never more than the remaining budget
        # aspect in [0.3, 1/0.3]: rounding gives at most 4 rows x 1 column for areas <= 12 ... 6x2
        assert 1 / 6 <= height / width <= 6


@pytest.mark.parametrize("cls", [RandomMaskGenerator, BlockwiseMaskGenerator])
def test_same_seed_same_mask_and_different_seed_differs(cls: type) -> None:
    gen = cls((14, 14), 0.3)
    assert torch.equal(gen(_rng(7)), gen(_rng(7)))
    assert not torch.equal(gen(_rng(7)), gen(_rng(8)))


@pytest.mark.parametrize("cls", [RandomMaskGenerator, BlockwiseMaskGenerator])
def test_region_limits_masks(cls: type) -> None:
    region = torch.zeros(14, 14, dtype=torch.bool)
    region[2:12, 4:12] = True  # 80 patches
    gen = cls((14, 14), 0.3)
    rng = _rng(4)
    for _ in range(10):
        mask = gen(rng, region=region)
        assert not (mask & ~region).any()
        assert int(mask.sum()) == gen.num_masked


def test_weights_bias_sampling() -> None:
    weights = torch.zeros(14, 14)
    weights[:, 7:] = 1.0
    rng = _rng(5)
    for cls in (RandomMaskGenerator, BlockwiseMaskGenerator):
        gen = cls((14, 14), 0.2)
        masks = torch.stack([gen(rng, weights=weights) for _ in range(20)]).float()
        assert masks[:, :, 7:].sum() > 3 * masks[:, :, :7].sum(), cls.__name__


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_ratio_outside_open_interval_is_an_error(ratio: float) -> None:
    for cls in (RandomMaskGenerator, BlockwiseMaskGenerator, CombinationalMaskGenerator):
        with pytest.raises(ValueError, match="open interval"):
            cls((14, 14), ratio)


def test_requests_that_cannot_fit_are_errors() -> None:
    with pytest.raises(ValueError, match="cannot fit"):
        BlockwiseMaskGenerator((14, 14), 0.01)  # 1 patch < one block of 4
    with pytest.raises(ValueError, match="cannot fit"):
        BlockwiseMaskGenerator((2, 2), 0.99)  # no block of 4 is smaller than the grid
    with pytest.raises(ValueError, match="masks no patch"):
        RandomMaskGenerator((2, 2), 0.1)
    region = torch.zeros(14, 14, dtype=torch.bool)
    region[0, :5] = True
    with pytest.raises(ValueError, match="cannot fit"):
        RandomMaskGenerator((14, 14), 0.2)(region=region)
    with pytest.raises(ValueError, match="patch-grid shape"):
        RandomMaskGenerator((14, 14), 0.2)(region=torch.ones(7, 7, dtype=torch.bool))
    assert masked_count((14, 14), 0.29) == 56


def test_frequency_weights_favour_textured_patches() -> None:
    image = torch.zeros(3, 64, 64)
    image[:, :32, :32] = torch.rand(3, 32, 32, generator=_rng(6))
    weights = patch_frequency_weights(image, (4, 4))
    assert weights.shape == (4, 4)
    assert weights[:2, :2].min() > weights[2:, 2:].max()
    assert float(weights.max()) == 1.0 and float(weights.min()) == 0.0


def test_error_recorder_running_mean_and_weights() -> None:
    rec = PatchErrorRecorder(2, (2, 2))
    assert rec.weights(0) is None
    mask = torch.tensor([[[True, False], [True, False]]])
    rec.update(torch.tensor([0]), mask, torch.tensor([[2.0, 9.0, 4.0, 9.0]]))
    rec.update(torch.tensor([0]), mask, torch.tensor([[4.0, 9.0, 4.0, 9.0]]))
    assert torch.allclose(rec.errors[0], torch.tensor([3.0, 0.0, 4.0, 0.0]))
    assert torch.equal(rec.counts[0], torch.tensor([2.0, 0.0, 2.0, 0.0]))
    weights = rec.weights(0)
    assert weights is not None and weights.shape == (2, 2)
    assert float(weights[0, 0]) == 0.0 and float(weights[1, 0]) == 1.0 and float(weights[0, 1]) == 1.0
    assert rec.weights(1) is None


def test_rank_loss_weights_range() -> None:
    weights = torch.arange(16.0).reshape(4, 4)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[0, :3] = True
    out = rank_loss_weights(weights, mask)
    assert torch.allclose(out, torch.tensor([1.0, 2.25, 4.0]))


def test_combinational_covers_all_branches_and_falls_back() -> None:
    gen = CombinationalMaskGenerator((14, 14), 0.2)
    region = torch.zeros(14, 14, dtype=torch.bool)
    region[2:12, 2:12] = True
    rng = _rng(9)
    choices = set()
    for _ in range(120):
        mask, choice = gen.sample(rng, region=region, image=torch.rand(3, 56, 56), dynamic_weights=torch.rand(14, 14))
        assert int(mask.sum()) == gen.num_masked
        if choice.region_limited:
            assert not (mask & ~region).any()
        choices.add(choice)
    assert len(choices) == 12  # 2 region x 3 weightings x 2 samplings
    # without a region, image or recorded errors every mask is unrestricted and uniform
    for _ in range(20):
        _, choice = gen.sample(rng)
        assert not choice.region_limited and choice.weighting == "uniform"
    assert torch.equal(gen(_rng(3), region=region), gen(_rng(3), region=region))
