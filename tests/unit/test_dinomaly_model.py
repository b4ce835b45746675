"""Dinomaly's torch model, loss and anomaly map."""

from __future__ import annotations

import pytest
import torch
from anomalib.data import InferenceBatch
from torch.nn import functional as F  # noqa: N812

from anomalib_mcad.models.components.anomaly_map import SmoothedTopKScorer, cosine_distance_map, top_k_mean
from anomalib_mcad.models.image.dinomaly.loss import GlobalCosineHardMiningLoss
from anomalib_mcad.models.image.dinomaly.torch_model import DinomalyModel

ENCODER = "vit_small_patch14_reg4_dinov2"


@pytest.fixture(scope="module")
def model() -> DinomalyModel:
    torch.manual_seed(0)
    return DinomalyModel(ENCODER, pretrained=False).eval()


def test_inference_outputs(model: DinomalyModel) -> None:
    x = torch.randn(2, 3, 56, 70)  # 4 x 5 patches
    with torch.no_grad():
        out = model(x)
    assert isinstance(out, InferenceBatch)
    assert out.pred_score.shape == (2,)
    assert out.anomaly_map.shape == (2, 1, 56, 70)
    assert torch.all(out.anomaly_map >= 0) and torch.all(out.anomaly_map <= 2)
    with torch.no_grad():
        again = model(x)
    torch.testing.assert_close(out.pred_score, again.pred_score)  # eval is deterministic


def test_groups_pair_shallow_encoder_with_deep_decoder(model: DinomalyModel) -> None:
    """Group 0 averages encoder taps 0-3 and the LAST four decoder blocks (decoder runs deep to shallow)."""
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        encoder, decoder = model.features(x)
        taps = model.encoder(x)
        expected_en = torch.stack(taps[:4], 1).mean(1)[:, model.encoder.num_prefix_tokens :]
        h = model.bottleneck(torch.stack(taps, 1).mean(1))
        outs = []
        for block in model.decoder:
            h = block(h)
            outs.append(h)
        expected_de = torch.stack(outs[4:], 1).mean(1)[:, model.encoder.num_prefix_tokens :]
    torch.testing.assert_close(encoder[0], expected_en.transpose(1, 2).reshape(1, -1, 4, 4))
    torch.testing.assert_close(decoder[0], expected_de.transpose(1, 2).reshape(1, -1, 4, 4))


def test_training_mode_returns_features_for_the_loss() -> None:
    torch.manual_seed(0)
    m = DinomalyModel(ENCODER, pretrained=False).train()
    encoder, decoder = m(torch.randn(2, 3, 56, 56))
    assert len(encoder) == len(decoder) == 2
    assert encoder[0].shape == decoder[0].shape == (2, 384, 4, 4)
    assert not encoder[0].requires_grad and decoder[0].requires_grad


def test_top_k_mean() -> None:
    amap = torch.arange(200.0).reshape(1, 1, 10, 20)
    assert top_k_mean(amap, 0.01).item() == pytest.approx(198.5)  # mean of the 2 largest of 200
    assert top_k_mean(amap, 0.0).item() == 199.0


def test_scorer_blurs_with_zero_padding_at_eval_size() -> None:
    torch.manual_seed(0)
    en = [torch.randn(1, 8, 4, 4)]
    de = [torch.randn(1, 8, 4, 4)]
    scorer = SmoothedTopKScorer(eval_size=32, output="raw")
    score, raw = scorer(cosine_distance_map(en, de, (56, 56)))
    # authors: map at input size (align_corners=True) -> 256-like eval size -> 5x5 Gaussian, zero padding
    expected_raw = F.interpolate((1 - F.cosine_similarity(en[0], de[0], dim=1)).unsqueeze(1), size=(56, 56), mode="bilinear", align_corners=True)
    torch.testing.assert_close(raw, expected_raw)
    coords = torch.arange(5.0) - 2
    g = torch.exp(-(coords**2) / (2 * 16.0))
    kernel = (g[:, None] * g[None, :]) / (g.sum() ** 2)
    small = F.interpolate(expected_raw, size=(32, 32), mode="bilinear", align_corners=False)
    blurred = F.conv2d(small, kernel[None, None], padding=2)
    assert score.item() == pytest.approx(top_k_mean(blurred, 0.01).item(), abs=1e-6)
    reflect = SmoothedTopKScorer(eval_size=32, padding="reflect", output="raw")(raw)[0]
    assert reflect.item() != pytest.approx(score.item(), abs=1e-7)


def test_loss_ramps_mining_and_damps_easy_points() -> None:
    loss_fn = GlobalCosineHardMiningLoss(final_p=0.9, warmup_iters=1000, factor=0.1)
    assert loss_fn.mining_rate(0) == 0.0
    assert loss_fn.mining_rate(500) == pytest.approx(0.45)
    assert loss_fn.mining_rate(5000) == pytest.approx(0.9)

    torch.manual_seed(0)
    en = [torch.randn(2, 16, 4, 4)]
    base = en[0] + 0.05 * torch.randn(2, 16, 4, 4)
    base[:, :, 0, 0] = torch.randn(2, 16)  # one hard point per image
    de0 = base.clone().requires_grad_(True)
    de1 = base.clone().requires_grad_(True)
    no_mining = loss_fn([en[0]], [de0], step=0)
    mining = loss_fn([en[0]], [de1], step=10_000)
    assert no_mining.item() == pytest.approx(mining.item())  # mining changes gradients, not the value
    expected = (1 - F.cosine_similarity(en[0].flatten(1), base.flatten(1), dim=1)).mean()
    assert no_mining.item() == pytest.approx(expected.item(), rel=1e-6)
    no_mining.backward()
    mining.backward()
    hard = (slice(None), slice(None), 0, 0)
    torch.testing.assert_close(de1.grad[hard], de0.grad[hard])  # hardest points keep their gradient
    easy_ratio = de1.grad[:, :, 3, 3].norm() / de0.grad[:, :, 3, 3].norm()
    assert easy_ratio.item() == pytest.approx(0.1, rel=1e-4)


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (torch.randn(1, 1, 56, 56), "3-channel RGB"),
        (torch.randn(1, 4, 56, 56), "3-channel RGB"),
        (torch.randn(1, 3, 20, 56), "at least 28x28"),
        (torch.randn(3, 56, 56), "shape"),
        (torch.randn(1, 3, 64, 56), "multiples of the patch size 14"),
    ],
)
def test_bad_input_is_a_clear_error(model: DinomalyModel, tensor: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        model(tensor)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_pixels_are_rejected(model: DinomalyModel, bad: float) -> None:
    x = torch.randn(1, 3, 56, 56)
    x[0, 1, 5, 5] = bad
    with pytest.raises(ValueError, match="NaN or Inf"):
        model(x)


def test_invalid_configuration() -> None:
    with pytest.raises(ValueError, match="groups"):
        DinomalyModel(ENCODER, pretrained=False, groups=[[0, 1], [8]])
    with pytest.raises(ValueError, match="padding"):
        SmoothedTopKScorer(padding="edge")
