"""The main job: train, test, export and deploy a small Dinomaly on the offline synthetic data.

Runs end to end on a CPU without network: writes the synthetic multi-class dataset, trains
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
