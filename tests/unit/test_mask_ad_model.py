"""MaskAD torch model and its components: masks, Sinkhorn, foreground, ablations, bad input."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from anomalib_mcad.models.components.validation import NotFittedError
from anomalib_mcad.models.components.foreground import foreground_mask, otsu_threshold
from anomalib_mcad.models.components.sinkhorn import sinkhorn
from anomalib_mcad.models.image.mask_ad import MaskAd, MaskAdModel

TINY: dict[str, Any] = {
    "backbone": "efficientnet_lite0",
    "pretrained": False,
    "feature_size": 8,
    "embed_dim": 32,
    "num_heads": 2,
    "num_encoder_layers": 1,
    "num_decoder_layers": 1,
    "flow_coupling": 2,
    "flow_condition_dim": 8,
}


def fitted_model(**overrides: Any) -> MaskAdModel:  # noqa: ANN401
    """A tiny model whose bank holds the features of a few random images in two categories."""
    torch.manual_seed(0)
    model = MaskAdModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        features = model.features(torch.rand(4, 3, 64, 64))
    tokens = features.permute(0, 2, 3, 1).reshape(-1, features.shape[1])
    model.bank.fit(tokens, torch.tensor([0, 0, 1, 1]).repeat_interleave(64))
    return model


def test_paper_backbone_gives_272_channels_and_lite0_192() -> None:
    from anomalib_mcad.models.components.cnn import CNNFeatureTap  # noqa: PLC0415

    assert CNNFeatureTap("efficientnet_b4", (0, 1, 2, 3), pretrained=False).channels == [24, 32, 56, 160]
    model = MaskAdModel(**TINY)
    assert model.backbone.out_channels == 192  # 16 + 24 + 40 + 112
    assert model.features(torch.rand(1, 3, 64, 64)).shape == (1, 192, 8, 8)


def test_test_masks_are_seeded_buffers_with_the_paper_ratios() -> None:
    model = MaskAdModel(**TINY)
    fixed = model.fixed_masks
    assert fixed.shape == (8, 9, 8, 8)  # 8 sets of: 4 random, 4 block-wise, 1 empty
    for bank in fixed:
        counts = bank.flatten(1).sum(1).tolist()
        assert counts == [12] * 4 + [9] * 4 + [0]  # floor(0.2 * 64), floor(0.15 * 64)
    assert not torch.equal(fixed[0], fixed[1])  # the sets differ
    assert "fixed_masks" in model.state_dict()
    assert torch.equal(MaskAdModel(**TINY).fixed_masks, fixed)
    assert not torch.equal(MaskAdModel(**TINY, mask_seed=1).fixed_masks, fixed)
    assert model.prototype_counts == [1, 1, 3, 4]  # floor(r * 64) for r in 0.01, 0.03, 0.05, 0.07, at least one
    paper_grid = MaskAdModel(**{**TINY, "feature_size": 14}, mask_banks=1, empty_mask=False)
    assert paper_grid.prototype_counts == [1, 5, 9, 13]  # the authors' int(196 * r)
    assert paper_grid.fixed_masks.shape == (1, 8, 14, 14)  # N = 3n without the zero-mask


def test_each_image_keeps_its_own_mask_set() -> None:
    model = MaskAdModel(**TINY)
    features = torch.randn(6, 192, 8, 8) + torch.arange(6.0).view(6, 1, 1, 1) * 0.01
    index = model.bank_index(features)
    assert index.shape == (6,) and ((index >= 0) & (index < 8)).all()
    assert len(set(index.tolist())) > 1  # different images, different sets
    torch.testing.assert_close(model.bank_index(features[2:3]), index[2:3])  # batch-independent
    masks = model.test_masks(torch.rand(6, 8, 8), features)
    assert masks.shape == (6, 13, 8, 8)
    for b in range(6):
        assert torch.equal(masks[b, 4:], model.fixed_masks[index[b]])
    single = MaskAdModel(**TINY, mask_banks=1).test_masks(torch.rand(6, 8, 8), features)
    assert all(torch.equal(single[b, 4:], single[0, 4:]) for b in range(6))


def test_gaussian_blur_keeps_constants_and_mass() -> None:
    from anomalib_mcad.models.image.mask_ad.torch_model import gaussian_blur  # noqa: PLC0415

    flat = torch.full((2, 1, 32, 32), 3.0)
    torch.testing.assert_close(gaussian_blur(flat, 2.0), flat)
    spike = torch.zeros(1, 1, 64, 64)
    spike[0, 0, 32, 32] = 1.0
    blurred = gaussian_blur(spike, 3.0)
    assert blurred.shape == spike.shape
    torch.testing.assert_close(blurred.sum(), torch.tensor(1.0), atol=1e-5, rtol=0)
    assert float(blurred.max()) < 0.05 and int(blurred.argmax()) == 32 * 64 + 32
    assert torch.equal(gaussian_blur(spike, 0.0), spike)


def test_prototype_masks_cover_the_top_ranked_patches() -> None:
    model = MaskAdModel(**TINY)
    ranking = torch.rand(2, 8, 8)
    masks = model.prototype_masks(ranking)
    assert masks.shape == (2, 4, 8, 8)
    for b in range(2):
        order = ranking[b].flatten().argsort(descending=True)
        for i, k in enumerate(model.prototype_counts):
            expected = torch.zeros(64, dtype=torch.bool)
            expected[order[:k]] = True
            assert torch.equal(masks[b, i].flatten(), expected)
    assert model.test_masks(ranking).shape == (2, 13, 8, 8)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"block_ratio": 0.04}, "blockwise masking cannot fit"),
        ({"random_ratio": 0.0}, "open interval"),
        ({"random_ratio": 0.01}, "masks no patch"),
        ({"prototype_ratio_range": (0.2, 0.1)}, "prototype mask ratios"),
        ({"mask_banks": 0}, "mask_banks"),
        ({"ot_weight": 1.5}, "ot_weight"),
        ({"use_rec": False, "use_assdis": False, "use_reference": False}, "at least one"),
        ({"po_ratio": 1.0}, "po_ratio"),
    ],
)
def test_impossible_settings_are_clear_errors(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        MaskAdModel(**{**TINY, **overrides})


def test_sinkhorn_marginals_and_one_dimensional_optimum() -> None:
    """For equal-size 1-D empirical measures the optimal plan matches sorted values."""
    generator = torch.Generator().manual_seed(0)  # the global RNG state depends on which tests ran before
    x, y = torch.rand(5, generator=generator), torch.rand(5, generator=generator)
    cost = (x[:, None] - y[None, :]).abs()
    plan = sinkhorn(cost, epsilon=1e-3, iterations=2000)
    assert torch.allclose(plan.sum(-1), torch.full((5,), 0.2), atol=1e-4)
    assert torch.allclose(plan.sum(-2), torch.full((5,), 0.2), atol=1e-4)
    optimum = (x.sort().values - y.sort().values).abs().mean()
    assert torch.isclose((plan * cost).sum(), optimum, atol=2e-3)
    # large entropy weight -> nearly independent coupling
    flat = sinkhorn(cost, epsilon=1e3, iterations=10)
    assert torch.allclose(flat, torch.full((5, 5), 0.04), atol=1e-3)
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn(cost, epsilon=0.0)


def test_foreground_mask_finds_a_centred_object() -> None:
    features = 0.01 * torch.randn(2, 4, 8, 8)
    features[:, :, 2:6, 3:7] += 1.0
    mask = foreground_mask(features)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:6, 3:7] = True
    assert torch.equal(mask[0], expected)
    assert torch.equal(mask[1], expected)
    assert torch.allclose(otsu_threshold(torch.tensor([[0.0, 0.1, 0.9, 1.0]])), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="border"):
        foreground_mask(torch.rand(1, 3, 2, 2))


@pytest.fixture(scope="module")
def shared() -> MaskAdModel:
    """One fitted tiny model for the tests that only read it."""
    return fitted_model()


def test_scores_are_deterministic_and_independent_of_the_batch(shared: MaskAdModel) -> None:
    model = shared
    images = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        batch = model(images)
        single = model(images[1:2])
        again = model(images[1:2])
    assert batch.anomaly_map.shape == (3, 1, 64, 64)
    assert torch.equal(single.pred_score, again.pred_score)
    torch.testing.assert_close(batch.pred_score[1:2], single.pred_score, rtol=1e-4, atol=1e-5)
    assert torch.isclose(batch.pred_score, batch.anomaly_map.flatten(1).amax(1)).all()


def switched(model: MaskAdModel, features: torch.Tensor, **switches: bool) -> Any:  # noqa: ANN401
    """Patch scores with some ablation switches flipped (restored afterwards)."""
    saved = {name: getattr(model, name) for name in switches}
    for name, value in switches.items():
        setattr(model, name, value)
    try:
        with torch.no_grad():
            return model.patch_scores(features)
    finally:
        for name, value in saved.items():
            setattr(model, name, value)


def test_ablation_switches_change_the_score_terms(shared: MaskAdModel) -> None:
    features = shared.features(torch.rand(2, 3, 64, 64))
    full = switched(shared, features)
    no_assdis = switched(shared, features, use_assdis=False)
    no_po = switched(shared, features, use_po=False)
    no_ref = switched(shared, features, use_reference=False, use_assdis=False)
    single = fitted_model(parallel=False)
    uniform = switched(shared, features, use_reference=False)
    assert (full.assdis > 0).all()
    assert ((full.po >= 0) & (full.po <= 1)).all()
    torch.testing.assert_close(full.patch_score, (0.4 * full.rec + 0.6 * full.assdis) * full.po)
    assert (no_assdis.assdis == 0).all() and (no_assdis.refdis >= 0).all() and (no_assdis.refdis > 0).any()
    assert (no_po.po == 1).all()
    assert (no_ref.refdis == 0).all() and (no_ref.assdis == 0).all()
    torch.testing.assert_close(no_ref.patch_score, 0.4 * no_ref.rec * no_ref.po)
    assert (uniform.assdis > 0).all() and not torch.allclose(uniform.assdis, full.assdis)  # against the uniform profile
    assert single.test_masks(torch.rand(2, 8, 8)).shape == (2, 1, 8, 8)


def test_reference_map_is_made_of_coreset_tokens_and_respects_the_category() -> None:
    model = fitted_model(restrict_to_category=True)
    features = model.features(torch.rand(2, 3, 64, 64))
    reference = model.reference(features, torch.tensor([1, 0]))
    tokens = reference.permute(0, 2, 3, 1)
    memory = model.bank.memory
    index = (tokens[..., None, :] - memory).abs().sum(-1).argmin(-1)
    assert (model.bank.labels[index[0]] == 1).all()
    assert (model.bank.labels[index[1]] == 0).all()
    with pytest.raises(ValueError, match="no coreset"):
        model.reference(features, torch.tensor([5, 0]))


def test_state_dict_round_trip_restores_bank_flow_and_masks() -> None:
    model = fitted_model()
    model.po_scale.fill_(3.0)
    torch.nn.init.normal_(model.flow.flow.module_list[0].global_offset, std=0.5)
    restored = MaskAdModel(**TINY, mask_seed=7).eval()
    restored.load_state_dict(model.state_dict())
    assert torch.equal(restored.bank.memory, model.bank.memory)
    assert torch.equal(restored.fixed_masks, model.fixed_masks)
    assert float(restored.po_scale) == 3.0
    assert torch.equal(restored.flow.flow.module_list[0].global_offset, model.flow.flow.module_list[0].global_offset)
    images = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(restored(images).pred_score, model(images).pred_score)


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.rand(1, 1, 64, 64), "3-channel"),
        (torch.rand(1, 3, 16, 16), "at least"),
        (torch.full((1, 3, 64, 64), float("nan")), "NaN"),
        (torch.rand(3, 64, 64), "shape"),
    ],
)
def test_bad_images_are_clear_errors(shared: MaskAdModel, images: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        shared(images)


def test_empty_bank_is_a_clear_error() -> None:
    with pytest.raises(NotFittedError, match="bank is empty: fit the model"):
        MaskAdModel(**TINY).eval()(torch.rand(1, 3, 64, 64))


def test_lightning_training_masks_and_memory() -> None:
    module = MaskAd(**TINY, image_size=64)
    features = torch.randn(3, 192, 8, 8)
    features[:, :, 2:6, 2:6] += 5.0  # a foreground of 16 patches
    seen = set()
    for _ in range(12):
        strategy, mask = module.training_masks(features)
        seen.add(strategy)
        assert mask.shape == (3, 8, 8) and mask.dtype == torch.bool
        count = {"random": 49, "block": 22, "foreground": 16}[strategy]  # floor(0.766 * 64), floor(0.358 * 64)
        assert (mask.flatten(1).sum(1) == count).all(), strategy
    assert seen == {"random", "block", "foreground"}
    module.fit_memory(features, torch.tensor([0, 1, 2]))
    assert torch.equal(torch.unique(module.model.bank.labels), torch.tensor([0, 1, 2]))
    assert module.model.bank.memory.shape[0] == 3 * 6  # 10 % of 64 patches per category
    scale = float(module.model.po_scale)
    assert scale != 0.0 and math.isfinite(scale)  # calibrated: the training patches' best log-likelihood
    with torch.no_grad():
        logp = module.model.log_likelihood(features - module.model.reference(features))
        po = module.model.po_map(logp)
    assert float(logp.max()) == pytest.approx(scale, abs=1e-4)  # po_ratio 0: the maximum
    assert float(po.min()) == pytest.approx(0.0, abs=1e-4) and ((po >= 0) & (po <= 1)).all()
    with pytest.raises(ValueError, match="train_strategies"):
        MaskAd(**TINY, train_strategies=("pixels",))


def test_feature_standardisation_uses_training_statistics() -> None:
    model = MaskAdModel(**TINY)
    images = torch.rand(3, 3, 64, 64)
    raw = model.raw_features(images)
    torch.testing.assert_close(model.features(images), raw)  # identity until fitted
    model.fit_feature_statistics(raw)
    standardised = model.features(images)
    torch.testing.assert_close(standardised.mean(dim=(0, 2, 3)), torch.zeros(192), atol=1e-4, rtol=0)
    torch.testing.assert_close(standardised.std(dim=(0, 2, 3)), torch.ones(192), atol=1e-3, rtol=0)
    assert bool(model.statistics_fitted)
    assert {"feature_mean", "feature_std", "statistics_fitted"} <= set(model.state_dict())
    with pytest.raises(ValueError, match="raw training features"):
        model.fit_feature_statistics(torch.empty(0, 192, 8, 8))


def test_area_feature_resize_averages_each_cell_of_the_finer_stages() -> None:
    """feature_resize="area": every grid cell is the mean of its block of each tapped map (no aliasing)."""
    torch.manual_seed(0)
    model = MaskAdModel(**{**TINY, "feature_resize": "area"}).eval()
    x = torch.rand(2, 3, 128, 128)  # stages 64, 32, 16, 8 px: each shrinks by a whole factor to the 8 x 8 grid
    with torch.no_grad():
        maps = model.backbone(x)
        raw = model.raw_features(x)
        bilinear = MaskAdModel(**TINY).eval()
        bilinear.backbone.load_state_dict(model.backbone.state_dict())
        aliased = bilinear.raw_features(x)
    assert raw.shape == (2, 192, 8, 8)
    expected = torch.cat([torch.nn.functional.avg_pool2d(m, m.shape[-1] // 8) for m in maps], dim=1)
    torch.testing.assert_close(raw, expected)
    assert not torch.allclose(raw, aliased)  # the finer stages differ from the one-sample-per-cell bilinear
    with pytest.raises(ValueError, match="feature_resize must be"):
        MaskAdModel(**{**TINY, "feature_resize": "nearest"})
