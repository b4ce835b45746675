"""Train ONE model on the normal images of ALL categories, test it on each, save the checkpoint.

The Python API of anomalib_mcad in a few lines: a multi-class datamodule, one of our five models,
anomalib's Engine. The per-category table (the papers' seven metrics) is printed by the model's
own ``PerCategoryMetrics`` callback at the end of ``engine.test``.

    python examples/train_one_model_all_categories.py                      # --fast: tiny, offline, CPU
    python examples/train_one_model_all_categories.py --model mint_ad      # any of the five
    python examples/train_one_model_all_categories.py --full --root ./datasets/MVTecAD --dataset mvtec_ad \
        --pretrained /path/to/dinov2_vitb14_reg4_pretrain.pth --steps 10000  # the paper's setting (GPU)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from anomalib_mcad import get_model, list_models
from anomalib_mcad.data import MultiClassDataModule
from anomalib_mcad.data.synthetic import generate_synthetic_dataset

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def tiny_model_arguments(model: str) -> dict[str, Any]:
    """The model's small CPU settings: ``configs/<model>/tiny_cpu.yaml``'s ``init_args``."""
    config = yaml.safe_load((CONFIGS / model / "tiny_cpu.yaml").read_text())
    return dict(config["model"]["init_args"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="dinomaly", choices=list_models(), help="which of our models")
    parser.add_argument("--full", action="store_true", help="paper defaults on --root/--dataset (default: --fast, tiny and synthetic)")
    parser.add_argument("--root", type=Path, default=None, help="--full: dataset root (MVTec-AD layout: one folder per category)")
    parser.add_argument("--dataset", default="mvtec_ad", help="--full: mvtec_ad, visa, real_iad, mvtec_layout, elpv, ...")
    parser.add_argument("--pretrained", default="true", help="--full: 'true' (download), 'false' or a local weights file")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: 3 fast, 10000 full)")
    parser.add_argument("--output-dir", type=Path, default=Path("example_output/train_all_categories"), help="where everything goes")
    args = parser.parse_args()
    seed_everything(0)

    if args.full:
        datamodule = MultiClassDataModule(root=args.root, dataset=args.dataset)  # all categories of the dataset
        pretrained = {"true": True, "false": False}.get(args.pretrained.lower(), args.pretrained)
        # paper defaults; Pmad calls its CNN's weights proto_pretrained
        model = get_model(args.model, **({"proto_pretrained": pretrained} if args.model == "pmad" else {"pretrained": pretrained}))
        steps = args.steps or 10_000
    else:
        # --fast: a small synthetic MVTec-layout dataset (2 textures + 1 object, 64 px), written offline
        root = generate_synthetic_dataset(args.output_dir / "data", categories=["brick", "grass", "washer"], image_size=64, n_train=8, n_test_good=2, n_test_per_defect=1)
        datamodule = MultiClassDataModule(root=root, dataset="mvtec_layout", train_batch_size=8, eval_batch_size=16, num_workers=0)
        model = get_model(args.model, **tiny_model_arguments(args.model))  # random or locally shipped weights only
        steps = args.steps or 3

    engine = Engine(max_steps=steps, default_root_dir=args.output_dir / "runs", logger=False, devices=1)
    engine.fit(model, datamodule=datamodule)
    results = engine.test(model, datamodule=datamodule)[0]  # prints the per-category table

    checkpoint = args.output_dir / f"{args.model}.ckpt"
    engine.trainer.save_checkpoint(checkpoint)  # reload: type(model).load_from_checkpoint(checkpoint)
    # The papers' number: AUROC per category, then the mean. anomalib's "image_AUROC" pools all categories.
    print(f"per_category_mean_image_AUROC {results['per_category_mean_image_AUROC']:.4f}")
    print(f"Checkpoint: {checkpoint}")


if __name__ == "__main__":
    main()
