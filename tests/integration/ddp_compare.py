"""Train every model for a few steps in one process and under 2-process DDP; save what the test compares.

Run by ``tests/integration/test_ddp.py`` as a script (not collected by pytest)::

    python tests/integration/ddp_compare.py --root <synthetic dataset> --out <dir> [--models a,b] [--steps 2] [--batch 2]

The main process first runs each model in one process with training batch ``2 b``, then each model
under ``Engine(strategy="ddp", devices=2, accelerator="cpu")`` (gloo) with per-rank batch ``b``.
Lightning's ``ddp`` strategy starts the second rank by re-running this script with ``LOCAL_RANK=1``
when the first DDP fit begins; that rank skips the single-process part and runs the same DDP fits.
Every later fit of the script reuses the process group, so all models share one launch.

For each (mode, model, rank) ``<out>/<mode>_<model>_rank<r>.pt`` holds the trained state dict, the
parameters at the first step, the image paths of every training batch and (rank 0) the per-image
test scores of ``engine.test`` (gathered over ranks by ``PerCategoryMetrics``), or the error.
"""

from __future__ import annotations

import argparse
import os
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything

REPO = Path(__file__).resolve().parents[2]
SEED = 3

#: Per model, stochastic regularisers switched off and schedules shortened for a 2-step run.
#: Dropout, drop-path and feature jitter draw from each rank's RNG stream, which cannot reproduce
#: the single process's draws for the same images; with them off, one DDP step is the same
#: computation as one single-process step on the global batch. Training masks (MaskAD, PMAD) have
#: no such switch: their comparison carries the mask difference (see test_ddp.py).
OVERRIDES: dict[str, dict[str, Any]] = {
    "dinomaly": {"bottleneck_dropout": 0.0, "warmup_iters": 1},
    "inp_former": {"bottleneck_dropout": 0.0, "warmup_iters": 1},
    "mint_ad": {"dropout": 0.0, "jitter_prob": 0.0},
    # ProtoFlow's augmented training views (random crops and flips) are drawn per rank too
    "pmad": {"drop_path": 0.0, "warmup_epochs": 0, "flow_warmup_epochs": 0, "flow_augment": False},
    "mask_ad": {},
}


def model_kwargs(name: str) -> dict[str, Any]:
    """``configs/<name>/tiny_cpu.yaml``'s model arguments, random weights, plus :data:`OVERRIDES`."""
    config = yaml.safe_load((REPO / "configs" / name / "tiny_cpu.yaml").read_text())
    kwargs: dict[str, Any] = dict(config["model"].get("init_args", {}))
    for key in list(kwargs):
        if key.endswith("pretrained"):
            kwargs[key] = False
    kwargs.update(OVERRIDES.get(name, {}))
    kwargs["visualizer"] = False
    return kwargs


class Recorder(Callback):
    """Parameters when training starts (after DDP's broadcast) and the image paths of every batch."""

    def __init__(self) -> None:
        self.initial: dict[str, torch.Tensor] = {}
        self.batches: list[list[str]] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:  # noqa: ARG002
        self.initial = {k: v.detach().cpu().clone() for k, v in pl_module.named_parameters()}

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:  # noqa: ANN401, ARG002
        self.batches.append([str(p) for p in batch.image_path])


def run(name: str, mode: str, root: Path, out: Path, steps: int, batch: int) -> dict[str, Any]:
    """One fit + test of model ``name`` in ``mode`` ("single" or "ddp"); what the test compares."""
    from anomalib.engine import Engine  # noqa: PLC0415

    from anomalib_mcad import get_model  # noqa: PLC0415
    from anomalib_mcad.data import MultiClassDataModule  # noqa: PLC0415
    from anomalib_mcad.metrics import PerCategoryMetrics  # noqa: PLC0415

    ddp = mode == "ddp"
    if not ddp:
        torch.set_num_threads(1)  # as Lightning sets each DDP rank on 2 cores: the same kernels, the same rounding
    seed_everything(SEED)
    datamodule = MultiClassDataModule(
        root=root, train_batch_size=batch if ddp else 2 * batch, eval_batch_size=8, num_workers=0, seed=SEED
    )
    model = get_model(name, **model_kwargs(name))
    recorder = Recorder()
    # one folder per rank: anomalib's Engine.fit creates the next versioned folder (v0, v1, ...) on every rank, and
    # two ranks doing so at the same moment collide (FileExistsError on one rank, which then left the DDP launch)
    folder = out / f"{mode}_{name}" / f"rank{os.environ.get('LOCAL_RANK', '0')}" if ddp else out / f"{mode}_{name}"
    engine = Engine(
        logger=False, default_root_dir=folder, max_steps=steps, accelerator="cpu",
        devices=2 if ddp else 1, strategy="ddp" if ddp else "auto", enable_progress_bar=False,
        enable_model_summary=False, callbacks=[recorder],
    )  # fmt: skip
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    engine.test(model=model, datamodule=datamodule, verbose=False)
    result: dict[str, Any] = {
        "state": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "parameters": sorted(k for k, _ in model.named_parameters()),
        "initial": recorder.initial,
        "batches": recorder.batches,
        "global_step": engine.trainer.global_step,
        "seconds": time.perf_counter() - start,
        "scores": None,
    }
    metrics = next((c for c in engine.trainer.callbacks if isinstance(c, PerCategoryMetrics)), None)
    if metrics is not None and metrics.predictions_path is not None:
        import pandas as pd  # noqa: PLC0415

        frame = pd.read_csv(metrics.predictions_path)
        result["scores"] = dict(zip(frame["image_path"].astype(str), frame["pred_score"].astype(float), strict=True))
    return result


def main() -> None:
    """Single-process runs (main process only), then the DDP runs (both ranks)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", default="")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    from anomalib_mcad import list_models  # noqa: PLC0415

    names = [n for n in args.models.split(",") if n] or list_models()
    child = "LOCAL_RANK" in os.environ  # started by Lightning's DDP launcher
    args.out.mkdir(parents=True, exist_ok=True)
    for mode in ("ddp",) if child else ("single", "ddp"):
        for name in names:
            try:
                result = run(name, mode, args.root, args.out, args.steps, args.batch)
            except Exception as err:  # noqa: BLE001 - recorded for the test, the other models still run
                result = {"error": f"{type(err).__name__}: {err}\n{traceback.format_exc()}"}
            rank = int(os.environ.get("LOCAL_RANK", "0")) if mode == "ddp" else 0
            torch.save(result, args.out / f"{mode}_{name}_rank{rank}.pt")
            print(f"[ddp_compare] {mode} {name} rank {rank}: {'error' if 'error' in result else 'ok'}", flush=True)  # noqa: T201


if __name__ == "__main__":
    main()
