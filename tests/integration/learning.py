"""The learning checks' recipes, shared by the tests and by ``benchmarks/learning_floors.py``.

A learning check trains a model briefly and asserts an image AUROC floor. The floor must sit above
what the same recipe reaches untrained (``steps=0``) over several seeds, measured with
``python benchmarks/learning_floors.py --model <name>``, and the test set must be large enough
that chance cannot reach it: with 24 normal and 25 defective test images per category and 3
categories, a random detector's mean image AUROC has a standard deviation of
``sqrt((24 + 25 + 1) / (12 * 24 * 25)) / sqrt(3) = 0.048``.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from lightning.pytorch import Callback, seed_everything

LEARNING_CATEGORIES = ("brick", "grass", "washer")


def learning_dataset(root: Path) -> Path:
    """3 categories at 64 px: 16 normal training images, 24 normal and 25 defective test images each."""
    from anomalib_mcad.data.synthetic import generate_synthetic_dataset

    return generate_synthetic_dataset(root, categories=LEARNING_CATEGORIES, image_size=64, n_train=16, n_test_good=24, n_test_per_defect=5, seed=0)


@dataclass(frozen=True)
class Recipe:
    """A model, its constructor arguments and the training steps of its learning check."""

    class_path: str
    kwargs: dict[str, Any]
    steps: int
    batch: int = 8


LEARNING_RECIPES: dict[str, Recipe] = {
    # random ViT-S/14 (no DINOv2 weights offline) at 64 -> 56 px: a 4 x 4 patch grid
    "dinomaly": Recipe(
        "anomalib_mcad.Dinomaly",
        {"encoder_name": "vit_small_patch14_reg4_dinov2", "pretrained": False, "image_size": 64, "crop_size": 56, "warmup_iters": 5, "hard_mining_warmup_iters": 20},
        steps=60,
    ),
    "inp_former": Recipe(
        "anomalib_mcad.InpFormer",
        {"encoder_name": "vit_small_patch14_reg4_dinov2", "pretrained": False, "image_size": 64, "crop_size": 56, "warmup_iters": 5},
        steps=60,
    ),
}


class LossRecorder(Callback):
    """Keeps the training loss of every step."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:  # noqa: ANN401, ARG002
        self.losses.append(float(outputs["loss"]))


@dataclass
class LearningResult:
    """Mean per-category AUROCs of one run, its per-category table and its training losses."""

    image_auroc: float
    pixel_auroc: float
    table: pd.DataFrame
    losses: list[float] = field(default_factory=list)


def run_recipe(name: str, root: Path, workdir: Path | None = None, seed: int = 0, steps: int | None = None) -> LearningResult:
    """Train ``name``'s recipe for ``steps`` (default: the recipe's; 0 = untrained), test, return the AUROCs."""
    from anomalib.engine import Engine

    from anomalib_mcad.compare.config import import_class
    from anomalib_mcad.data import MultiClassDataModule
    from anomalib_mcad.metrics import PerCategoryMetrics
    from anomalib_mcad.models.components.base import McadModule

    recipe = LEARNING_RECIPES[name]
    steps = recipe.steps if steps is None else steps
    workdir = Path(workdir or tempfile.mkdtemp(prefix="learning_"))
    seed_everything(seed)
    datamodule = MultiClassDataModule(root=root, train_batch_size=recipe.batch, eval_batch_size=32, num_workers=0, seed=seed)
    model = import_class(recipe.class_path, McadModule)(**recipe.kwargs)
    model.per_category_metrics = False  # the table comes from the callback below
    metrics = PerCategoryMetrics(print_table=False)
    recorder = LossRecorder()
    quiet = {"logger": False, "devices": 1, "accelerator": "cpu", "enable_progress_bar": False, "enable_model_summary": False}
    engine = Engine(default_root_dir=workdir, max_steps=steps, callbacks=[metrics, recorder], num_sanity_val_steps=0, limit_val_batches=1, **quiet)
    if steps > 0:
        engine.fit(model=model, datamodule=datamodule)
    engine.test(model=model, datamodule=datamodule, verbose=False)
    table = metrics.results
    mean = table[table["category"] == "mean"].iloc[0]
    return LearningResult(float(mean["image_AUROC"]), float(mean["pixel_AUROC"]), table, recorder.losses)


def loss_fell(losses: list[float], fraction: float) -> bool:
    """Whether the last 5 losses average below ``fraction`` of the first 3."""
    return bool(np.mean(losses[-5:]) < fraction * np.mean(losses[:3]))
