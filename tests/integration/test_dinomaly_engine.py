"""Dinomaly through anomalib's Engine: the contract of anomalib's own model integration test.

anomalib's ``tests/integration/model/test_models.py`` fits each model, then tests, trains,
validates and predicts from the checkpoint and exports it (ONNX and OpenVINO parity for every model of ours:
``test_export_parity.py``). The same here, on
the offline synthetic dataset, read once with anomalib's own single-category ``MVTecAD`` and
once with our multi-class datamodule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from anomalib.data import MVTecAD
from anomalib.deploy import ExportType
from anomalib.engine import Engine
from lightning.pytorch import Callback, seed_everything

from anomalib_mcad import Dinomaly
from anomalib_mcad.data import MultiClassDataModule

pytestmark = pytest.mark.slow


class LossRecorder(Callback):
    """Keeps the training loss of every step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:  # noqa: ANN401, ARG002
        self.losses.append(float(outputs["loss"]))


@pytest.fixture(scope="module")
def fitted(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory, tiny_dinomaly_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Fit a tiny Dinomaly on one category with anomalib's MVTecAD datamodule, as anomalib's test does."""
    seed_everything(0)
    project = tmp_path_factory.mktemp("project")
    kwargs = dict(tiny_dinomaly_kwargs)
    datamodule = MVTecAD(root=synthetic_root, category="brick", train_batch_size=2, eval_batch_size=4, num_workers=0)
    model = Dinomaly(**kwargs)
    engine = Engine(logger=False, default_root_dir=project, max_epochs=1, devices=1, accelerator="cpu")
    engine.fit(model=model, datamodule=datamodule)
    ckpt = engine.trainer.checkpoint_callback.best_model_path or engine.trainer.checkpoint_callback.last_model_path
    assert Path(ckpt).is_file()
    return {"kwargs": kwargs, "datamodule": datamodule, "project": project, "ckpt": ckpt, "root": synthetic_root}


def fresh(fitted: dict[str, Any]) -> tuple[Dinomaly, MVTecAD, Engine]:
    datamodule = MVTecAD(root=fitted["root"], category="brick", train_batch_size=2, eval_batch_size=4, num_workers=0)
    engine = Engine(logger=False, default_root_dir=fitted["project"], max_epochs=1, devices=1, accelerator="cpu")
    return Dinomaly(**fitted["kwargs"]), datamodule, engine


def test_test_from_checkpoint(fitted: dict[str, Any]) -> None:
    model, datamodule, engine = fresh(fitted)
    results = engine.test(model=model, datamodule=datamodule, ckpt_path=fitted["ckpt"])
    assert 0.0 <= results[0]["image_AUROC"] <= 1.0


def test_train_validate_predict_from_checkpoint(fitted: dict[str, Any]) -> None:
    model, datamodule, engine = fresh(fitted)
    engine.train(model=model, datamodule=datamodule, ckpt_path=fitted["ckpt"])
    model, datamodule, engine = fresh(fitted)
    engine.validate(model=model, datamodule=datamodule, ckpt_path=fitted["ckpt"])
    model, datamodule, engine = fresh(fitted)
    predictions = engine.predict(model=model, datamodule=datamodule, ckpt_path=fitted["ckpt"])
    batch = predictions[0]
    assert batch.pred_score.shape[0] == batch.image.shape[0]
    assert batch.anomaly_map.shape[-2:] == (56, 56)


def test_export_torch_from_checkpoint(fitted: dict[str, Any], tmp_path: Path) -> None:
    """Torch export from the checkpoint (ONNX and OpenVINO, and their parity with torch: test_export_parity.py)."""
    model, _, engine = fresh(fitted)
    path = Path(engine.export(model=model, ckpt_path=fitted["ckpt"], export_type=ExportType.TORCH, export_root=tmp_path))
    assert path.is_file()
    written = sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file())
    assert written > 4 * 15_000_000  # the ~15 M trainable float32 weights are in it


def test_checkpoint_reloads_with_identical_scores(fitted: dict[str, Any]) -> None:
    loaded = Dinomaly.load_from_checkpoint(fitted["ckpt"], map_location="cpu").eval()
    model = Dinomaly(**fitted["kwargs"]).eval()
    state = torch.load(fitted["ckpt"], map_location="cpu", weights_only=False)["state_dict"]
    model.load_state_dict(state)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).pred_score, model(x).pred_score)
    assert loaded.hparams.encoder_name == "vit_small_patch14_reg4_dinov2"


def test_multiclass_training_reduces_loss_and_writes_per_category_table(
    synthetic_root: Path,
    tmp_path: Path,
    tiny_dinomaly_kwargs: dict[str, Any],
) -> None:
    seed_everything(0)
    datamodule = MultiClassDataModule(root=synthetic_root, train_batch_size=4, eval_batch_size=4, num_workers=0)
    model = Dinomaly(**{**tiny_dinomaly_kwargs, "hard_mining_p": 0.0})  # no mining: losses comparable across steps
    recorder = LossRecorder()
    engine = Engine(logger=False, default_root_dir=tmp_path, max_steps=30, devices=1, accelerator="cpu", callbacks=[recorder])
    engine.fit(model=model, datamodule=datamodule)
    assert len(recorder.losses) == 30
    assert np.mean(recorder.losses[-5:]) < 0.7 * np.mean(recorder.losses[:5]), recorder.losses
    lr = engine.trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(2e-4, rel=1e-2)  # schedule stepped per iteration reaches its final value
    engine.test(model=model, datamodule=datamodule)
    csvs = list(tmp_path.rglob("per_category_metrics.csv"))
    assert csvs, "per-category table not saved"
    import pandas as pd

    table = pd.read_csv(csvs[0])
    assert set(table["category"]) == {"brick", "grass", "washer", "mean"}
    predictions = pd.read_csv(csvs[0].with_name("per_image_predictions.csv"))
    assert len(predictions) == len(datamodule.test_data)
    for _, row in predictions.iterrows():  # each saved prediction carries its image's category
        assert row["category"] in Path(row["image_path"]).parts


def test_learning_check_beats_the_untrained_model(tmp_path: Path) -> None:
    """60 steps on three categories (random ViT-S, 64 -> 56 px) detect defects better than the untrained model.

    Floor 0.64 on the mean image AUROC. Measured with ``python benchmarks/learning_floors.py --model dinomaly``
    (24 normal + 25 defective test images per category; a random detector's mean has std 0.048):
    untrained (0 steps) 0.527 / 0.607 / 0.475 at seeds 0 / 1 / 2 (max 0.607); trained
    0.694 / 0.710 / 0.679 (min 0.679). The floor sits between them.
    """
    from learning import learning_dataset, run_recipe

    result = run_recipe("dinomaly", learning_dataset(tmp_path / "data"), tmp_path / "run", seed=0)
    assert len(result.losses) == 60
    assert set(result.table["category"]) == {"brick", "grass", "washer", "mean"}
    assert result.image_auroc >= 0.64, result.table
