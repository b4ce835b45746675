"""PMAD's tokenizers, masked image model, ProtoFlow, proposal masking, scoring and bad-input errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.nn import functional as F  # noqa: N812

from anomalib_mcad.models.components.validation import NotFittedError
from anomalib_mcad.models.image.pmad import DalleTokenizer, MaskedImageModel, Pmad, PmadModel, VqViTTokenizer
from anomalib_mcad.models.image.pmad.protoflow import aggregate_scales
from anomalib_mcad.models.image.pmad.torch_model import MVTEC_MASK_RATIOS

TINY_VIT = {"embed_dim": 32, "depth": 2, "num_heads": 2}
SMALL = {
    "arch": TINY_VIT,
    "img_size": 64,
    "patch_size": 8,
    "tokenizer": "small",
    "proto_backbone": "efficientnet_lite0",
    "proto_pretrained": False,
    "condition_dim": 16,
    "coreset_ratio": 0.2,
}


@pytest.fixture(scope="module")
def fitted() -> PmadModel:
    """A tiny PmadModel with prototypes from random 'training' images and a likelihood reference."""
    torch.manual_seed(0)
    model = PmadModel(**SMALL).eval()
    train = torch.randn(4, 3, 64, 64)
    emb = model.protoflow.embed(train)
    rows = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
    labels = torch.tensor([0, 0, 1, 1]).repeat_interleave(emb.shape[-2] * emb.shape[-1])
    model.protoflow.set_prototypes(*model.protoflow.fit_prototypes(rows, labels))
    with torch.no_grad():
        model.protoflow.reference_nll.fill_(float(model.protoflow(train).min()))
    return model


def test_small_tokenizer_grid_range_and_determinism() -> None:
    tok = VqViTTokenizer.small(img_size=64, patch_size=8, codebook_size=64)
    x = torch.randn(2, 3, 64, 64)
    ids = tok(x)
    assert ids.shape == (2, 64) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < 64
    assert len(torch.unique(ids)) > 8  # a random codebook still spreads patches over many codes
    torch.testing.assert_close(tok(x), ids)
    assert not any(p.requires_grad for p in tok.parameters())
    tok.train()
    assert not tok.training  # frozen target generator


def test_feature_code_tokenizer_is_kmeans_on_pooled_protoflow_features() -> None:
    """tokenizer="features": codes fitted on the training embedding pooled to the ViT grid; targets = nearest code."""
    torch.manual_seed(0)
    model = PmadModel(**{**SMALL, "img_size": 64, "patch_size": 16, "tokenizer": "features", "vocab_size": 6}).eval()
    assert model.uses_feature_codes and model.mim.lm_head.out_features == 6 and not model.tokenizer.is_fitted
    train = torch.cat([torch.randn(3, 3, 64, 64), torch.randn(3, 3, 64, 64) * 0.1 + 1.0])
    emb = model.protoflow.embed(train)  # (6, C, 8, 8) at stride 8; ViT grid 4 x 4
    rows = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
    state = torch.random.get_rng_state()
    model.fit_feature_codes(rows, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the training's random stream is untouched
    assert model.tokenizer.is_fitted
    first = model.tokenizer.codebook.clone()
    model.fit_feature_codes(rows, seed=3)
    torch.testing.assert_close(model.tokenizer.codebook, first)  # deterministic
    pooled = F.avg_pool2d(emb, 2)  # stride 8 -> the 16-px ViT grid
    ids = model.token_targets(train)
    assert ids.shape == (6, 16)
    nearest = torch.cdist(pooled.flatten(2).transpose(1, 2), first.unsqueeze(0)).argmin(-1)
    assert torch.equal(ids, nearest)
    assert torch.equal(model.token_targets(train, emb), ids)  # a computed embedding gives the same targets
    # a k-means fixed point: every used code is the mean of the pooled training features assigned to it
    flat = pooled.permute(0, 2, 3, 1).reshape(-1, pooled.shape[1])
    for code in torch.unique(ids).tolist():
        torch.testing.assert_close(first[code], flat[ids.flatten() == code].mean(0), atol=1e-4, rtol=1e-4)
    assert len(torch.unique(ids)) >= 3
    assert "tokenizer.codebook" in model.state_dict()
    with pytest.raises(ValueError, match="at least 2 codes"):
        PmadModel(**{**SMALL, "tokenizer": "features", "vocab_size": 1})
    with pytest.raises(ValueError, match="takes no tokenizer_weights"):
        PmadModel(**{**SMALL, "tokenizer": "features", "tokenizer_weights": "x.pth"})
    with pytest.raises(ValueError, match="patch features"):
        model.tokenizer.fit(torch.randn(10, 3))


def test_vq_tokenizer_loads_the_authors_checkpoint_layout(tmp_path: Path) -> None:
    """Authors' file: encoder.*, encode_task_layer.*, quantize.embedding.weight plus decoder keys (ignored)."""
    src = VqViTTokenizer.small(seed=3)
    state = {("quantize.embedding.weight" if k == "codebook" else k): v for k, v in src.state_dict().items()}
    state["decoder.blocks.0.norm1.weight"] = torch.ones(4)
    state["quantize.embedding.cluster_size"] = torch.zeros(64)
    torch.save({"model": state}, tmp_path / "vit_tokenizer.pth")
    loaded = VqViTTokenizer(64, 8, embed_dim=32, depth=1, num_heads=2, codebook_size=64, code_dim=8, weights=tmp_path / "vit_tokenizer.pth", seed=9)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(loaded(x), src(x))


def test_dalle_tokenizer_architecture_and_weights(tmp_path: Path) -> None:
    tok = DalleTokenizer(n_hid=16, n_blk_per_group=1, vocab_size=32, input_size=64)
    x = torch.randn(1, 3, 128, 128)  # 2x the encoder's input: average-pooled
    assert tok.logits(x).shape == (1, 32, 8, 8)
    assert tok(x).shape == (1, 64)
    # DALL-E's own conv names its tensors w / b
    state = {k.replace(".weight", ".w").replace(".bias", ".b"): v for k, v in tok.state_dict().items()}
    torch.save(state, tmp_path / "encoder.pt")
    again = DalleTokenizer(n_hid=16, n_blk_per_group=1, vocab_size=32, input_size=64, weights=tmp_path / "encoder.pt")
    torch.testing.assert_close(again(x), tok(x))


def test_masked_image_model_mask_token_and_masked_only() -> None:
    torch.manual_seed(0)
    mim = MaskedImageModel(TINY_VIT, img_size=64, patch_size=8, vocab_size=16, drop_path=0.0).eval()
    assert mim.grid == (8, 8)
    x = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[0, :5] = True
    mask[1, 10:13] = True
    full = mim(x, mask)
    assert full.shape == (2, 64, 16)
    torch.testing.assert_close(mim(x, mask, masked_only=True), full[mask])
    # a masked patch's content does not reach the model: changing it changes nothing at masked positions' input
    y = x.clone()
    y[0, :, :8, :8] += 5.0  # patch 0 of image 0 is masked
    torch.testing.assert_close(mim(y, mask)[0], full[0])
    assert not torch.allclose(mim(x, torch.zeros_like(mask))[0], full[0])


def test_masked_image_model_loads_beit_layout(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = MaskedImageModel(TINY_VIT, img_size=64, patch_size=8, vocab_size=16)
    state = {k.removeprefix("encoder."): v for k, v in src.state_dict().items() if not k.endswith("relative_position_index")}
    torch.save({"model": state}, tmp_path / "beit.pth")
    loaded = MaskedImageModel(TINY_VIT, img_size=64, patch_size=8, vocab_size=16, pretrained=tmp_path / "beit.pth")
    for key, value in src.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    with pytest.raises(ValueError, match="local file"):
        MaskedImageModel(TINY_VIT, img_size=64, patch_size=8, vocab_size=16, pretrained=True)


def test_paper_sizes() -> None:
    """Table 5: ViT-B 12 x 768 (12 heads), ViT-L 24 x 1024 (16 heads), head size 64, patch 16; 8192 codes."""
    from anomalib_mcad.models.image.pmad.torch_model import ARCHITECTURES

    assert ARCHITECTURES["base"] == {"embed_dim": 768, "depth": 12, "num_heads": 12}
    assert ARCHITECTURES["large"] == {"embed_dim": 1024, "depth": 24, "num_heads": 16}
    with torch.device("meta"):  # structure only: no weight initialisation
        mim = MaskedImageModel("base", vocab_size=8192, drop_path=0.0)
    assert mim.grid == (14, 14) and mim.lm_head.out_features == 8192
    assert mim.encoder.blocks[0].mlp.fc1.out_features == 3072
    assert mim.encoder.pos_embed is None and mim.encoder.rel_pos_bias is not None  # shared relative position bias
    assert sorted(MVTEC_MASK_RATIOS.values())[0] == 0.04 and len(MVTEC_MASK_RATIOS) == 15


def test_aggregate_scales_repeats_the_coarse_map() -> None:
    fine, coarse = torch.randn(1, 3, 8, 8), torch.randn(1, 5, 4, 4)
    out = aggregate_scales([fine, coarse])
    assert out.shape == (1, 8, 8, 8)
    pooled = F.avg_pool2d(coarse, 3, 1, 1)
    torch.testing.assert_close(out[:, 3:, 2:4, 6:8], pooled[:, :, 1:2, 3:4].expand(-1, -1, 2, 2))


def test_prototypes_residual_and_abnormality(fitted: PmadModel) -> None:
    pf = fitted.protoflow
    memory = pf.bank.memory
    assert memory.shape[1] == pf.channels and set(pf.bank.labels.tolist()) == {0, 1}
    # a prototype's own residual is zero
    residual = pf.residual(memory[:4].reshape(1, 2, 2, -1).permute(0, 3, 1, 2))
    assert float(residual.abs().max()) == 0.0
    nll = torch.tensor([[[float(pf.reference_nll) - 1.0, float(pf.reference_nll), float(pf.reference_nll) + 2.0]]])
    weight = pf.abnormality(nll)
    torch.testing.assert_close(weight, torch.tensor([[[0.0, 0.0, 1.0 - torch.exp(torch.tensor(-2.0)).item()]]]))


def test_proposal_mask_takes_exactly_k_highest(fitted: PmadModel) -> None:
    nll = torch.arange(64.0).reshape(1, 8, 8).repeat(2, 1, 1)
    mask = fitted.proposal_mask(nll, torch.tensor([3, 10]))
    assert mask.shape == (2, 64)
    assert mask.sum(1).tolist() == [3, 10]
    assert mask[0, -3:].all() and mask[1, -10:].all()  # the highest NLL patches


def test_scores_image_alone_equal_scores_in_a_batch(fitted: PmadModel) -> None:
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        batch = fitted(x)
        alone = [fitted(x[i : i + 1]) for i in range(3)]
    assert batch.anomaly_map.shape == (3, 1, 64, 64)
    for i in range(3):
        torch.testing.assert_close(alone[i].pred_score, batch.pred_score[i : i + 1])
        torch.testing.assert_close(alone[i].anomaly_map, batch.anomaly_map[i : i + 1])
    torch.testing.assert_close(batch.pred_score, batch.anomaly_map.flatten(1).amax(1))


def test_map_is_token_error_at_masked_patches_times_abnormality(fitted: PmadModel) -> None:
    x = torch.randn(1, 3, 64, 64)
    counts = torch.tensor([5])
    with torch.no_grad():
        nll = fitted.proposal_nll(x)
        mask = fitted.proposal_mask(nll, counts)
        errors = fitted.token_errors(x, mask) * mask
        token_map = F.interpolate(errors.reshape(1, 1, 8, 8), size=(64, 64), mode="bilinear", align_corners=True)
        weight = F.interpolate(fitted.protoflow.abnormality(nll).unsqueeze(1), size=(64, 64), mode="bilinear", align_corners=True)
        expected = fitted.blur(token_map * weight)
        out = fitted(x, mask_counts=counts)
    torch.testing.assert_close(out.anomaly_map, expected)
    assert int((errors > 0).sum()) <= 5
    # more masked patches: more of the map is non-zero before smoothing
    with torch.no_grad():
        wide = fitted(x, mask_counts=torch.tensor([40]))
    assert float((wide.anomaly_map > 1e-6).float().mean()) >= float((out.anomaly_map > 1e-6).float().mean())


def test_bad_inputs_are_clear_errors(fitted: PmadModel) -> None:
    with pytest.raises(ValueError, match="3-channel"):
        fitted(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="NaN"):
        fitted(torch.full((1, 3, 64, 64), float("nan")))
    with pytest.raises(ValueError, match="at least 64x64"):
        fitted(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="built for 64x64"):
        fitted(torch.randn(1, 3, 72, 72))
    with pytest.raises(NotFittedError, match=r"no prototypes or likelihood reference yet: train the model \(Engine.fit\)"):
        PmadModel(**SMALL)(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="open interval"):
        PmadModel(**SMALL, default_mask_ratio=1.0)
    with pytest.raises(ValueError, match="tokenizer must be"):
        PmadModel(**{**SMALL, "tokenizer": "bpe"})


def test_lightning_ratios_and_errors() -> None:
    kwargs = {
        "arch": TINY_VIT,
        "image_size": 64,
        "patch_size": 8,
        "tokenizer": "small",
        "proto_backbone": "efficientnet_lite0",
        "proto_pretrained": False,
        "condition_dim": 16,
    }
    model = Pmad(**kwargs)
    assert model.mask_ratio("screw") == 0.04 and model.mask_ratio("mvtec/wood") == 0.46
    assert model.mask_ratio("brick") == 0.3 and model.mask_ratio(None) == 0.3
    with pytest.raises(ValueError, match="open interval"):
        Pmad(**kwargs, mask_ratios={"bottle": 0.0})
    with pytest.raises(ValueError, match="open interval"):
        Pmad(**kwargs, default_mask_ratio=1.2)
    with pytest.raises(ValueError, match="cannot fit"):
        Pmad(**kwargs, default_mask_ratio=0.05)  # 3 patches of an 8x8 grid: less than one block of 4
    with pytest.raises(ValueError, match="prototype_search"):
        Pmad(**kwargs, prototype_search="nearest")


def test_image_only_counts_follow_the_category_of_the_nearest_prototypes(fitted: PmadModel) -> None:
    """Without a known category, each image uses the ratio of the category most of its patches' nearest prototypes belong to."""
    labels = torch.tensor([[[1, 1], [0, 1]], [[0, 0], [1, 0]], [[0, 1], [1, 0]]])  # majority 1, majority 0, tie
    fitted.set_category_mask_ratios([0.1, 0.3])
    try:
        assert fitted.category_mask_counts.tolist() == [6, 19]
        assert fitted.inferred_mask_counts(labels).tolist() == [19, 6, 6]  # a tie goes to the lower index
        x = torch.randn(3, 3, 64, 64)
        with torch.no_grad():
            nll, nearest = fitted.protoflow.propose(x)
            counts = fitted.inferred_mask_counts(nearest)
            out = fitted(x)
            torch.testing.assert_close(out.anomaly_map, fitted(x, mask_counts=counts).anomaly_map)
            torch.testing.assert_close(nll, fitted.proposal_nll(x))
            # one image alone gets the same inferred ratio and score as in the batch
            torch.testing.assert_close(fitted(x[1:2]).pred_score, out.pred_score[1:2])
            fitted.infer_category = False  # one fixed ratio instead
            torch.testing.assert_close(fitted(x).anomaly_map, fitted(x, mask_counts=fitted.default_mask_count.expand(3)).anomaly_map)
    finally:
        fitted.infer_category = True
        fitted.category_mask_counts = torch.empty(0, dtype=torch.long)
    assert "default_mask_count" not in fitted.state_dict() and "category_mask_counts" in fitted.state_dict()


def test_deploy_category_fixes_the_exported_ratio_and_survives_checkpoint_loading() -> None:
    kwargs = {"arch": TINY_VIT, "image_size": 64, "patch_size": 8, "tokenizer": "small", "proto_backbone": "efficientnet_lite0",
              "proto_pretrained": False, "condition_dim": 16}  # fmt: skip
    deployed = Pmad(**kwargs, mask_ratios={"washer": 0.45, "brick": 0.2}, deploy_category="mvtec_layout/washer")
    assert not deployed.model.infer_category and int(deployed.model.default_mask_count) == 28  # floor(0.45 * 64)
    # a checkpoint written with other arguments (and the older layout holding the count) keeps the deployment ratio
    trained = Pmad(**kwargs, mask_ratios={"washer": 0.45, "brick": 0.2})
    trained.model.set_category_mask_ratios([0.2, 0.45])
    state = dict(trained.state_dict())
    state["model.default_mask_count"] = torch.tensor(19)
    checkpoint = {"state_dict": state}
    deployed.on_load_checkpoint(checkpoint)
    deployed.load_state_dict(checkpoint["state_dict"])
    assert int(deployed.model.default_mask_count) == 28
    assert deployed.model.category_mask_counts.tolist() == [12, 28]
    deployed.set_deploy_category(None)
    assert deployed.model.infer_category and int(deployed.model.default_mask_count) == 19
    with pytest.raises(ValueError, match="deploy_category 'wahser' has no mask ratio"):
        Pmad(**kwargs, deploy_category="wahser")
    with pytest.raises(ValueError, match="open interval"):
        Pmad(**kwargs, mask_ratios={"washer": 1.0}, deploy_category="washer")


def test_table5_optimisers_and_schedules() -> None:
    """Defaults and the two optimisers a fit builds: MIM AdamW 1.5e-3 -> 1e-5 cosine, 10 warm-up epochs,
    wd 0.05 (not on biases/norms/tokens), clip 3.0, 300 epochs; flow Adam 2e-4, 16 warm-up epochs from lr/10 (the
    authors' 2 meta-epochs of 8 sub-epochs), cosine to lr x 0.1^3 over 200 epochs; 4 couplings, clamp 1.9, 128-d
    condition, 1 % coreset."""
    import inspect
    from types import SimpleNamespace

    defaults = {k: v.default for k, v in inspect.signature(Pmad.__init__).parameters.items()}
    table5 = {"lr": 1.5e-3, "min_lr": 1e-5, "warmup_epochs": 10, "weight_decay": 0.05, "betas": (0.9, 0.999),
              "gradient_clip_val": 3.0, "flow_lr": 2e-4, "flow_epochs": 200, "flow_warmup_epochs": 16, "flow_lr_decay": 0.1,
              "n_coupling": 4, "clamp": 1.9, "condition_dim": 128, "coreset_ratio": 0.01, "proto_backbone": "tf_efficientnet_b6",
              "sigma": 4.0, "image_size": 224, "patch_size": 16, "min_mask_patches": 4, "min_aspect": 0.3,
              "dynamic_start_epoch": 100, "init_values": 0.1, "drop_path": 0.1}  # fmt: skip
    assert {k: defaults[k] for k in table5} == table5
    model = Pmad(arch=TINY_VIT, image_size=64, patch_size=8, tokenizer="small", proto_backbone="efficientnet_lite0",
                 proto_pretrained=False, condition_dim=16, n_coupling=4)  # fmt: skip
    blocks = model.model.protoflow.flow.flow.module_list
    assert len(blocks) == 4 and all(b.clamp == 1.9 for b in blocks)
    per_epoch, epochs = 2, 300
    model._trainer = SimpleNamespace(estimated_stepping_batches=per_epoch * epochs, num_training_batches=per_epoch)  # noqa: SLF001
    (mim_opt, flow_opt), (mim_sched, flow_sched) = model.configure_optimizers()
    assert isinstance(mim_opt, torch.optim.AdamW) and isinstance(flow_opt, torch.optim.Adam)
    assert mim_opt.defaults["betas"] == (0.9, 0.999)
    decay, no_decay = mim_opt.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and any(p.ndim == 1 for p in no_decay["params"])
    assert any(p is model.model.mim.encoder.cls_token for p in no_decay["params"])
    steps = range(per_epoch * epochs)
    mim_lr = [mim_sched.lr_at(i, 1.5e-3) for i in steps]
    flow_lr = [2e-4 * flow_sched.lr_lambdas[0](i) for i in steps]
    assert max(mim_lr) == pytest.approx(1.5e-3) and mim_lr.index(max(mim_lr)) == 10 * per_epoch - 1  # peak after 10 epochs
    assert mim_lr[-1] == pytest.approx(1e-5, rel=1e-2) and mim_lr[0] < 1e-5
    assert all(a >= b for a, b in zip(mim_lr[10 * per_epoch :], mim_lr[10 * per_epoch + 1 :], strict=False))  # cosine decay
    assert flow_lr[0] == pytest.approx(2e-5)  # warm-up from lr / 10
    assert max(flow_lr) <= 2e-4 and flow_lr[16 * per_epoch] == pytest.approx(max(flow_lr), rel=1e-3)
    assert flow_lr[16 * per_epoch - 1] < flow_lr[16 * per_epoch]  # still warming up at the end of epoch 15
    assert flow_lr[200 * per_epoch] == pytest.approx(2e-4 * 1e-3) and flow_lr[-1] == pytest.approx(2e-4 * 1e-3)


def test_heldout_residual_skips_the_images_own_prototypes(monkeypatch: pytest.MonkeyPatch) -> None:
    """With every patch a prototype, plain training residuals are all exactly zero; held-out ones are the
    residual to the nearest patch of ANOTHER image (of the same category when given), never zero."""
    from anomalib_mcad.models.image.pmad.protoflow import ProtoFlow

    torch.manual_seed(0)
    pf = ProtoFlow("efficientnet_lite0", (2, 3), False, n_coupling=2, condition_dim=16, coreset_ratio=1.0)
    images = torch.rand(4, 3, 64, 64)
    emb = pf.embed(images)
    per = emb.shape[-2] * emb.shape[-1]
    rows = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
    category = torch.tensor([0, 0, 0, 1])
    sources = torch.arange(4).repeat_interleave(per)
    prototypes, labels, kept = pf.fit_prototypes(rows, category.repeat_interleave(per), sources=sources)
    pf.set_prototypes(prototypes, labels, kept)
    assert pf.residual(emb).abs().max() == 0
    held = pf.heldout_residual(emb, None, torch.arange(4))
    dist = torch.cdist(rows, rows) + torch.where(sources[:, None] == sources[None, :], float("inf"), 0.0)
    expected = (rows - rows[dist.argmin(dim=1)]).reshape(4, *emb.shape[-2:], -1).permute(0, 3, 1, 2)
    torch.testing.assert_close(held, expected, rtol=1e-4, atol=1e-4)
    assert (held.norm(dim=1) > 0).all()
    # own category: images 0-2 search each other; image 3 is alone in its category, so it keeps its own patches
    held_cat = pf.heldout_residual(emb, category, torch.arange(4))
    same = (category.repeat_interleave(per)[:, None] == category.repeat_interleave(per)[None, :])
    dist_cat = torch.cdist(rows, rows).masked_fill(~same, float("inf")) + torch.where(sources[:, None] == sources[None, :], float("inf"), 0.0)
    nearest = dist_cat[: 3 * per].argmin(dim=1)
    torch.testing.assert_close(held_cat[:3], (rows[: 3 * per] - rows[nearest]).reshape(3, *emb.shape[-2:], -1).permute(0, 3, 1, 2), rtol=1e-4, atol=1e-4)
    assert held_cat[3].abs().max() == 0
    # unknown sources exclude nothing: the plain residual
    torch.testing.assert_close(pf.heldout_residual(emb, category, None), pf.residual(emb, category))
    # a pool too big for one distance block is searched in blocks of fewer queries: the same residuals, bit for bit
    from anomalib_mcad.models.components import coreset

    monkeypatch.setattr(coreset, "DISTANCE_BLOCK_ELEMENTS", prototypes.shape[0] * 5)
    assert torch.equal(pf.heldout_residual(emb, None, torch.arange(4)), held)
    assert torch.equal(pf.heldout_residual(emb, category, torch.arange(4)), held_cat)


def test_flow_training_views_are_random_resized_crops_and_flips() -> None:
    """The authors' ProtoFlow training transform: each image a different crop of area 0.2-1 resized back, flipped half the time."""
    from anomalib_mcad.models.image.pmad.protoflow import augmented_views

    torch.manual_seed(0)
    ramp = torch.linspace(0, 1, 64).expand(3, 64, 64)  # brightness grows to the right
    images = ramp.unsqueeze(0).repeat(32, 1, 1, 1)
    views = augmented_views(images)
    assert views.shape == images.shape
    assert not torch.allclose(views[0], views[1])
    flipped = (views[..., 0] > views[..., -1]).all(dim=(1, 2))  # brighter on the left: flipped
    assert 5 <= int(flipped.sum()) <= 27
    torch.manual_seed(0)
    torch.testing.assert_close(augmented_views(images), views)  # torch's RNG makes it reproducible
