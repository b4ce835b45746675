"""Resumable runs: a run stopped after its first epoch and resumed from the checkpoint ends exactly where
the uninterrupted run ends (same seed, deterministic mode).

Every model: Dinomaly and INP-Former (noisy bottlenecks draw dropout from the global RNG), MINT-AD (class
labels from the datamodule) and the two that carry memory banks, PMAD (prototype pool, flow, dynamic mask
weights, its own mask sampler) and MaskAD (coreset, flow, feature statistics, its own mask sampler).
Together they cover what a resume must restore besides
weights and optimizer: the batch order (``EpochSeededSampler``), the global random streams and the
module's own generators (both stored in the checkpoint by ``McadModule``), the learning-rate schedule and
the memory built from training data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from anomalib.engine import Engine
from anomalib.models import AnomalibModule
from lightning.pytorch import Callback, Trainer, seed_everything

from anomalib_mcad import get_model, list_models
from anomalib_mcad.data import MultiClassDataModule

pytestmark = pytest.mark.slow

#: Every registered model.
RESUMED = list_models()


class StopAfterFirstEpoch(Callback):
    """Stops the run at the end of epoch 0, as an interrupted job would (the checkpoint is still written)."""

    def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:  # noqa: ANN401, ARG002
        trainer.should_stop = True


def run(root: Path, out: Path, name: str, kwargs: dict[str, Any], ckpt: str | None = None, stop: bool = False) -> tuple[AnomalibModule, Engine]:
    seed_everything(0, workers=True)
    dm = MultiClassDataModule(root=root, categories=["brick", "grass"], train_batch_size=6, eval_batch_size=8, num_workers=0)
    model = get_model(name, **kwargs)
    engine = Engine(logger=False, default_root_dir=out, max_epochs=2, accelerator="cpu", devices=1, deterministic=True,
                    enable_progress_bar=False, callbacks=[StopAfterFirstEpoch()] if stop else None)  # fmt: skip
    engine.fit(model=model, datamodule=dm, ckpt_path=ckpt)
    return model, engine


def model_kwargs(name: str, tiny_kwargs: Any, tiny_dinomaly_kwargs: dict[str, Any]) -> dict[str, Any]:  # noqa: ANN401
    """Tiny settings; PMAD's schedules shortened to the two epochs run here (flow and dynamic masks in epoch 1)."""
    if name == "dinomaly":
        return dict(tiny_dinomaly_kwargs)
    kwargs = tiny_kwargs(name)
    if name == "pmad":
        kwargs.update(flow_epochs=2, flow_warmup_epochs=1, warmup_epochs=1, dynamic_start_epoch=1)
    return kwargs


@pytest.mark.parametrize("name", RESUMED)
def test_resumed_run_equals_uninterrupted_run(
    name: str, synthetic_root: Path, tmp_path: Path, tiny_kwargs: Any, tiny_dinomaly_kwargs: dict[str, Any]  # noqa: ANN401
) -> None:
    kwargs = model_kwargs(name, tiny_kwargs, tiny_dinomaly_kwargs)
    whole, engine = run(synthetic_root, tmp_path / "whole", name, kwargs)
    steps = engine.trainer.global_step
    assert steps >= 4  # 16 training images (too few for a 10 % validation split) in batches of 6: 3 per epoch
    _, stopped = run(synthetic_root, tmp_path / "part", name, kwargs, stop=True)
    assert 0 < stopped.trainer.global_step < steps
    ckpt = stopped.trainer.checkpoint_callback.best_model_path or stopped.trainer.checkpoint_callback.last_model_path
    resumed, engine = run(synthetic_root, tmp_path / "part", name, kwargs, ckpt=ckpt)
    assert engine.trainer.global_step == steps
    for (key, a), (_, b) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=key)
    size = int(kwargs.get("crop_size", kwargs.get("image_size", 64)))
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    whole.model.eval(), resumed.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(resumed.model(images).pred_score, whole.model(images).pred_score, rtol=0, atol=0)
