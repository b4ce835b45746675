"""INP-Former torch model, losses, few-shot views and bad input (random ViT-S, 56 px)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from unittest import mock

import pytest
import torch

from anomalib_mcad.models.image.inp_former import InpFormer, InpFormerModel
from anomalib_mcad.models.image.inp_former.augmentation import NUM_VIEWS, FewShotAugmentation, augmented_views, view_of
from anomalib_mcad.models.image.inp_former.loss import InpFormerLoss, SoftMiningCosineLoss, reweight_gradient
from anomalib_mcad.models.image.inp_former.torch_model import prototype_distance

SMALL = "vit_small_patch14_reg4_dinov2"


@pytest.fixture(autouse=True, scope="module")
def _fast_init() -> Iterator[None]:
    """timm's truncated-normal init dominates building a random ViT on CPU; a clamped normal will do."""
    import timm.models.vision_transformer as timm_vit  # noqa: PLC0415

    def clamped(t: torch.Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0, **_: object) -> torch.Tensor:
        with torch.no_grad():
            return t.normal_(mean, std).clamp_(a, b)

    with mock.patch.object(timm_vit, "trunc_normal_", clamped):
        yield


@pytest.fixture(scope="module")
def model() -> InpFormerModel:
    torch.manual_seed(0)
    return InpFormerModel(SMALL, pretrained=False).eval()


def test_training_outputs_and_eval_outputs(model: InpFormerModel) -> None:
    x = torch.randn(2, 3, 56, 56)
    model.train()
    try:
        feats = model(x)
    finally:
        model.eval()
    assert [e.shape for e in feats.encoder] == [(2, 384, 4, 4)] * 2
    assert [d.shape for d in feats.decoder] == [(2, 384, 4, 4)] * 2
    assert feats.inp_distance.shape == (2, 16)
    with torch.no_grad():
        out = model(x)
    assert out.pred_score.shape == (2,)
    assert out.anomaly_map.shape == (2, 1, 56, 56)


def test_default_layers_and_prototypes(model: InpFormerModel) -> None:
    from anomalib_mcad.models.components.vit import architecture  # noqa: PLC0415

    assert model.encoder.layers == list(range(2, 10))  # ViT-S/B: blocks 3-10 (1-based)
    assert len(model.encoder.blocks) == 10  # blocks 10, 11 are never run
    assert model.groups == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert architecture("vit_large_patch14_reg4_dinov2")["dinomaly_layers"] == tuple(range(4, 19, 2))  # ViT-L: 4, 6, ..., 18
    assert model.extractor.prototype_tokens.shape == (6, 384)
    assert len(model.decoder) == 8


def test_zero_shot_map_is_inp_distance(model: InpFormerModel) -> None:
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        feats = model.features(x)
        model.zero_shot = True
        try:
            raw = model.raw_anomaly_map(feats, (56, 56))
        finally:
            model.zero_shot = False
        recon = model.raw_anomaly_map(feats, (56, 56))
    # align_corners=True: the map's corners are the corner patches' distances
    grid = feats.inp_distance.reshape(1, 4, 4)
    assert raw[0, 0, 0, 0] == pytest.approx(float(grid[0, 0, 0]), abs=1e-6)
    assert raw[0, 0, -1, -1] == pytest.approx(float(grid[0, -1, -1]), abs=1e-6)
    assert not torch.allclose(raw, recon)


def test_prototype_distance_is_nearest_cosine() -> None:
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]]])
    protos = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
    torch.testing.assert_close(prototype_distance(tokens, protos), torch.tensor([[0.0, 0.0, 1.0]]))


def test_reweight_gradient_keeps_value_and_scales_gradient() -> None:
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    w = torch.rand(2, 1, 4, 4) * 5
    y = reweight_gradient(x, w)
    assert torch.equal(y, x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, w.expand_as(x))


def test_soft_mining_loss_value_and_weights() -> None:
    torch.manual_seed(0)
    en = [torch.randn(2, 8, 3, 3)]
    de = [torch.randn(2, 8, 3, 3, requires_grad=True)]
    loss = SoftMiningCosineLoss(3.0)(en, de)
    expected = (1 - torch.nn.functional.cosine_similarity(en[0].flatten(1), de[0].flatten(1))).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    plain = de[0].detach().clone().requires_grad_(True)
    (1 - torch.nn.functional.cosine_similarity(en[0].flatten(1), plain.flatten(1))).mean().backward()
    d = 1 - torch.nn.functional.cosine_similarity(en[0], de[0].detach(), dim=1).unsqueeze(1)
    torch.testing.assert_close(de[0].grad, plain.grad * (d / d.mean()) ** 3)


def test_total_loss_uses_lambda() -> None:
    en = [torch.randn(1, 4, 2, 2)]
    de = [torch.randn(1, 4, 2, 2)]
    dist = torch.rand(1, 4)
    out = InpFormerLoss(0.2)(en, de, dist)
    torch.testing.assert_close(out["loss"], out["reconstruction"] + 0.2 * dist.mean())
    with pytest.raises(ValueError, match="coherence_weight"):
        InpFormerLoss(-1.0)


def test_few_shot_views() -> None:
    x = torch.rand(2, 3, 28, 28)
    views = augmented_views(x)
    assert len(views) == NUM_VIEWS == 22
    assert all(v.shape == x.shape for v in views)
    for i, v in enumerate(views):
        torch.testing.assert_close(view_of(x, i), v)
    torch.testing.assert_close(views[-2], torch.rot90(x, 2, dims=(-2, -1)))
    grey = views[18]
    assert torch.equal(grey[:, 0], grey[:, 1])
    # a pi/4 rotation moves pixels; translations shift by 0.1 of the half-width
    assert not torch.allclose(views[1], x)
    with pytest.raises(ValueError, match="view index"):
        view_of(x, NUM_VIEWS)
    aug = FewShotAugmentation()
    assert aug.eval()(x) is x
    out = aug.train()(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.randn(1, 1, 56, 56), "3-channel"),
        (torch.randn(1, 4, 56, 56), "3-channel"),
        (torch.randn(1, 3, 20, 56), "at least 28x28"),
        (torch.full((1, 3, 56, 56), math.nan), "NaN"),
        (torch.randn(3, 56, 56), r"shape \(B, 3, H, W\)"),
    ],
)
def test_bad_input_is_named(model: InpFormerModel, images: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        model(images)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="groups"):
        InpFormerModel(SMALL, pretrained=False, groups=[[0, 8]])
    with pytest.raises(ValueError, match="num_prototypes"):
        InpFormerModel(SMALL, pretrained=False, num_prototypes=0)
    with pytest.raises(ValueError, match="Unknown encoder"):
        InpFormerModel("resnet18", pretrained=False)
    with pytest.raises(ValueError, match="crop_size"):
        InpFormer(encoder_name=SMALL, pretrained=False, image_size=64, crop_size=72)
    with pytest.raises(ValueError, match="padding"):
        InpFormerModel(SMALL, pretrained=False, blur_padding="wrap")  # type: ignore[arg-type]


def test_defaults_are_the_papers() -> None:
    m = InpFormer(encoder_name=SMALL, pretrained=False)
    hp = m.hparams
    assert (hp.lr, hp.final_lr, hp.warmup_iters, hp.weight_decay, hp.eps, hp.amsgrad) == (1e-3, 1e-4, 100, 1e-4, 1e-10, True)
    assert (hp.coherence_weight, hp.soft_mining_power, hp.num_prototypes, hp.gradient_clip_val) == (0.2, 3.0, 6, 0.1)
    assert (hp.image_size, hp.crop_size, hp.top_k_ratio, hp.eval_size) == (448, 392, 0.01, 256)
    assert m.trainer_arguments["gradient_clip_val"] == 0.1


def test_anomalib_get_model_still_returns_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """Importing ours does not change what ``anomalib.models.get_model("inp_former")`` builds."""
    import anomalib.models  # noqa: PLC0415
    from anomalib.models.components.feature_extractors import TimmFeatureExtractor  # noqa: PLC0415
    from anomalib.models.image.inp_former import torch_model as builtin_torch_model  # noqa: PLC0415

    def random_encoder(*args: object, **kwargs: object) -> TimmFeatureExtractor:
        kwargs["pre_trained"] = False  # the built-in downloads its encoder otherwise
        return TimmFeatureExtractor(*args, **kwargs)

    monkeypatch.setattr(builtin_torch_model, "TimmFeatureExtractor", random_encoder)
    builtin = anomalib.models.get_model("inp_former", encoder_name=SMALL)
    assert type(builtin) is anomalib.models.InpFormer
    assert type(builtin) is not InpFormer
