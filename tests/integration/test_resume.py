"""Resumable runs: a run stopped after its first epoch and resumed from the checkpoint ends exactly where
the uninterrupted run ends (same seed, deterministic mode).

Tiny Dinomaly: its noisy bottleneck draws dropout from the global RNG, so the check covers all three
things a resume must restore besides weights and optimizer: the batch order (``EpochSeededSampler``),
the random streams (stored in the checkpoint by ``McadModule``) and the learning-rate schedule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from anomalib.engine import Engine
from lightning.pytorch import Callback, Trainer, seed_everything

from anomalib_mcad import Dinomaly
from anomalib_mcad.data import MultiClassDataModule

pytestmark = pytest.mark.slow


class StopAfterFirstEpoch(Callback):
    """Stops the run at the end of epoch 0, as an interrupted job would (the checkpoint is still written)."""

    def on_train_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:  # noqa: ANN401, ARG002
        trainer.should_stop = True


def run(root: Path, out: Path, kwargs: dict[str, Any], ckpt: str | None = None, stop: bool = False) -> tuple[Dinomaly, Engine]:
    seed_everything(0, workers=True)
    dm = MultiClassDataModule(root=root, categories=["brick"], train_batch_size=3, eval_batch_size=8, num_workers=0)
    model = Dinomaly(**kwargs)
    engine = Engine(logger=False, default_root_dir=out, max_epochs=2, accelerator="cpu", devices=1, deterministic=True,
                    enable_progress_bar=False, callbacks=[StopAfterFirstEpoch()] if stop else None)  # fmt: skip
    engine.fit(model=model, datamodule=dm, ckpt_path=ckpt)
    return model, engine


def test_resumed_run_equals_uninterrupted_run(synthetic_root: Path, tmp_path: Path, tiny_dinomaly_kwargs: dict[str, Any]) -> None:
    whole, engine = run(synthetic_root, tmp_path / "whole", tiny_dinomaly_kwargs)
    assert engine.trainer.global_step == 6  # 8 training images (too few for a 10 % validation split) in batches of 3: 3 steps per epoch
    _, stopped = run(synthetic_root, tmp_path / "part", tiny_dinomaly_kwargs, stop=True)
    assert stopped.trainer.global_step == 3
    ckpt = stopped.trainer.checkpoint_callback.best_model_path or stopped.trainer.checkpoint_callback.last_model_path
    resumed, engine = run(synthetic_root, tmp_path / "part", tiny_dinomaly_kwargs, ckpt=ckpt)
    assert engine.trainer.global_step == 6
    for (name, a), (_, b) in zip(whole.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=name)
    images = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    whole.model.eval(), resumed.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(resumed.model(images).pred_score, whole.model(images).pred_score, rtol=0, atol=0)
