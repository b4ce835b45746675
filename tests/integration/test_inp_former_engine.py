"""INP-Former through anomalib's Engine: the four settings and a learning check (the contract: test_contract.py).

The multi-class, few-shot and zero-shot settings each write the per-category table; single-class is
the fit on one category with anomalib's own ``MVTecAD``, whose model the zero-shot test reuses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from anomalib.data import MVTecAD
from anomalib.engine import Engine
from lightning.pytorch import Callback, seed_everything

from anomalib_mcad.data import MultiClassDataModule
from anomalib_mcad.models.image.inp_former import InpFormer

pytestmark = pytest.mark.slow

TINY: dict[str, Any] = {
    "encoder_name": "vit_small_patch14_reg4_dinov2",
    "pretrained": False,
    "image_size": 64,
    "crop_size": 56,
    "warmup_iters": 2,
}
QUIET: dict[str, Any] = {"logger": False, "devices": 1, "accelerator": "cpu", "enable_progress_bar": False}


class LossRecorder(Callback):
    """Keeps the training loss of every step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:  # noqa: ANN401, ARG002
        self.losses.append(float(outputs["loss"]))


@pytest.fixture(scope="module")
def fitted(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Single-class setting: fit on one category with anomalib's MVTecAD datamodule."""
    seed_everything(0)
    project = tmp_path_factory.mktemp("inp_project")
    datamodule = MVTecAD(root=synthetic_root, category="brick", train_batch_size=2, eval_batch_size=4, num_workers=0)
    engine = Engine(default_root_dir=project, max_epochs=1, **QUIET)
    engine.fit(model=InpFormer(**TINY), datamodule=datamodule)
    ckpt = engine.trainer.checkpoint_callback.best_model_path or engine.trainer.checkpoint_callback.last_model_path
    assert Path(ckpt).is_file()
    return {"project": project, "ckpt": ckpt, "root": synthetic_root}


def test_multi_class_learns_and_writes_table(synthetic_root: Path, tmp_path: Path, latest_category_table: Any) -> None:  # noqa: ANN401
    """Learning check: 40 steps on all three categories; the loss falls and image AUROC beats the floor.

    Random-init ViT-S features at 56 px (4x4 patches) carry little meaning; measured on this
    dataset after 60 steps: mean image AUROC 0.71, pixel AUROC 0.83 (0.50 is chance). Floors:
    loss below 60 % of its start, mean pixel AUROC >= 0.65 and mean image AUROC >= 0.55.
    """
    seed_everything(0)
    datamodule = MultiClassDataModule(root=synthetic_root, train_batch_size=4, eval_batch_size=8, num_workers=0)
    recorder = LossRecorder()
    engine = Engine(default_root_dir=tmp_path, max_steps=40, callbacks=[recorder], limit_val_batches=1, **QUIET)
    model = InpFormer(**TINY)
    engine.fit(model=model, datamodule=datamodule)
    assert len(recorder.losses) == 40
    assert np.mean(recorder.losses[-5:]) < 0.6 * np.mean(recorder.losses[:3]), recorder.losses
    assert engine.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-4, rel=1e-2)
    engine.test(model=model, datamodule=datamodule)
    result = latest_category_table(tmp_path)
    assert set(result.index) == {"brick", "grass", "washer", "mean"}
    assert result.loc["mean", "pixel_AUROC"] >= 0.65, result
    assert result.loc["mean", "image_AUROC"] >= 0.55, result


def test_zero_shot_on_unseen_categories(fitted: dict[str, Any], tmp_path: Path, latest_category_table: Any) -> None:  # noqa: ANN401
    """Zero-shot (appendix K): the model fitted on brick alone scores grass and washer, never seen,
    by each image's own INPs; nothing is trained and the per-category table is written."""
    zero_shot = InpFormer.load_from_checkpoint(fitted["ckpt"], zero_shot=True, map_location="cpu", weights_only=True)
    assert zero_shot.model.zero_shot
    target = MultiClassDataModule(root=fitted["root"], categories=["grass", "washer"], eval_batch_size=8, num_workers=0)
    results = Engine(default_root_dir=tmp_path, **QUIET).test(model=zero_shot, datamodule=target)
    zs = latest_category_table(tmp_path)
    assert set(zs.index) == {"grass", "washer", "mean"}
    assert np.isfinite(zs.loc[["grass", "washer"], "image_AUROC"]).all()
    assert zs.loc["mean", "image_AUROC"] == pytest.approx(zs.loc[["grass", "washer"], "image_AUROC"].mean())
    assert results[0]["per_category_mean_image_AUROC"] == pytest.approx(zs.loc["mean", "image_AUROC"], abs=1e-6)


def test_few_shot_with_augmentation(synthetic_root: Path, tmp_path: Path, latest_category_table: Any) -> None:  # noqa: ANN401
    """Few-shot: 2 normal images per category, the authors' 22 views drawn during training."""
    seed_everything(0)
    datamodule = MultiClassDataModule(root=synthetic_root, k_shot=2, train_batch_size=4, eval_batch_size=8, num_workers=0)
    model = InpFormer(**TINY, few_shot_augmentation=True)
    engine = Engine(default_root_dir=tmp_path, max_steps=6, limit_val_batches=1, **QUIET)
    engine.fit(model=model, datamodule=datamodule)
    assert model.augmentation is not None
    engine.test(model=model, datamodule=datamodule)
    assert set(latest_category_table(tmp_path).index) == {"brick", "grass", "washer", "mean"}
