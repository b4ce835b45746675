"""``anomalib-mcad compare`` end to end: two tiny models (ours and anomalib's) and one that must fail.

Through the console entry (YAML in anomalib's CLI style, in-process): our Dinomaly (tiny random
ViT-S), anomalib's PaDiM (random ResNet-18 at 64 px) and anomalib's Dinomaly *without*
``random_weights``, which hard-codes a pretrained encoder: offline mode must make it fail at
once with the blocked download named, and the other two must still be reported.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from anomalib_mcad.cli import main
from anomalib_mcad.metrics.per_category import METRIC_COLUMNS

pytestmark = pytest.mark.slow

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _markdown_rows(text: str, section: str) -> dict[str, list[str]]:
    """``{first cell: other cells}`` of the Markdown table under ``## <section>``."""
    body = text.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in body.splitlines() if line.startswith("|")][2:]  # skip header and rule
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows]
    return {c[0]: c[1:] for c in cells}


@pytest.fixture(scope="module")
def report(synthetic_root: Path, tiny_dinomaly_kwargs: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("compare") / "report"
    import timm
    import torch

    weights = out.parent / "lite0_random.pth"  # a local backbone file for the per-category PaDiM
    torch.save(timm.create_model("efficientnet_lite0", pretrained=False).state_dict(), weights)
    config = {
        "seed": 0,
        "output_dir": str(out),
        "offline": True,
        "trainer": {"max_steps": 2, "accelerator": "cpu", "enable_model_summary": False, "enable_progress_bar": False},
        "eval_size": 64,
        "latency_warmup": 1,
        "latency_runs": 2,
        "figure_images": 2,
        "data": {
            "class_path": "anomalib_mcad.data.MultiClassDataModule",
            "init_args": {"root": str(synthetic_root), "train_batch_size": 8, "eval_batch_size": 16, "num_workers": 0},
        },
        "models": [
            {"class_path": "anomalib_mcad.Dinomaly", "name": "ours", "init_args": tiny_dinomaly_kwargs},
            {
                "class_path": "anomalib.models.Padim",
                "name": "padim",
                "init_args": {
                    "backbone": "resnet18",
                    "pre_trained": False,
                    "layers": ["layer1", "layer2"],
                    "pre_processor": {
                        "class_path": "anomalib.pre_processing.PreProcessor",
                        "init_args": {"transform": {"class_path": "torchvision.transforms.v2.Resize", "init_args": {"size": [64, 64]}}},
                    },
                },
            },
            {
                "class_path": "anomalib.models.Padim",
                "name": "padim per category",
                "init_args": {"backbone": "efficientnet_lite0", "pre_trained": False, "layers": ["blocks.1", "blocks.2"], "n_features": 32, "pre_processor": {
                    "class_path": "anomalib.pre_processing.PreProcessor",
                    "init_args": {"transform": {"class_path": "torchvision.transforms.v2.Resize", "init_args": {"size": [64, 64]}}},
                }},
                "backbone_weights": str(weights),
                "per_category": True,
            },
            {"class_path": "anomalib.models.Dinomaly", "name": "needs-download", "init_args": {"encoder_name": "vit_small_patch14_reg4_dinov2"}},
        ],
    }
    path = out.parent / "compare.yaml"
    path.write_text(yaml.safe_dump(config))
    status = main(["compare", "--config", str(path)])
    return {"out": out, "status": status}


def test_report_files_exist_and_figures_are_pngs(report: dict[str, Any]) -> None:
    out: Path = report["out"]
    assert report["status"] == 0  # the report was written and at least one model succeeded
    for name in ("report.md", "report.json", "mean_metrics.csv", "per_category_metrics.csv"):
        assert (out / name).is_file(), name
    for name in ("mean_metrics.png", "per_category_heatmap.png", "anomaly_maps.png"):
        data = (out / "figures" / name).read_bytes()
        assert data.startswith(PNG_MAGIC), name
        import matplotlib.image as mpimg

        image = mpimg.imread(out / "figures" / name)
        assert image.shape[0] > 100 and image.shape[1] > 100, (name, image.shape)
        assert float(image[..., :3].std()) > 0.01, f"{name} is blank"


def test_markdown_means_are_percentages_equal_to_the_csv(report: dict[str, Any]) -> None:
    out: Path = report["out"]
    text = (out / "report.md").read_text()
    per_category = pd.read_csv(out / "per_category_metrics.csv")
    table = _markdown_rows(text, "Mean over categories (%)")
    assert set(table) == {"ours", "padim", "padim per category"}
    for model, cells in table.items():
        rows = per_category[per_category["model"] == model]
        mean = rows[rows["category"] == "mean"].iloc[0]
        categories = rows[rows["category"] != "mean"]
        assert list(categories["category"]) == ["brick", "grass", "washer"]
        for column, cell in zip(METRIC_COLUMNS, cells, strict=True):
            value = float(cell)
            assert 0.0 <= value <= 100.0, (model, column, value)
            assert value == pytest.approx(float(mean[column]), abs=0.006), (model, column)
            # the mean row is the unweighted mean over categories
            assert float(mean[column]) == pytest.approx(categories[column].astype(float).mean(), abs=1e-9)
        if model == "padim per category":
            continue  # one table per category model: test_per_category_entry_trains_one_model_per_category
        # the report's percentages are the PerCategoryMetrics table (fractions) of that model
        model_dir = next((out / "models").glob(f"*_{model}"))
        raw = pd.read_csv(model_dir / "per_category_metrics.csv")
        for column in METRIC_COLUMNS:
            assert list(rows[column].astype(float)) == pytest.approx(list(raw[column].astype(float) * 100.0), nan_ok=True)
        predictions = pd.read_csv(model_dir / "per_image_predictions.csv")
        assert len(predictions) == int(mean["n_images"]) and set(predictions["category"]) == {"brick", "grass", "washer"}


def test_costs_are_measured_and_scores_are_raw(report: dict[str, Any]) -> None:
    means = pd.read_csv(report["out"] / "mean_metrics.csv").set_index("model")
    for model in ("ours", "padim"):
        row = means.loc[model]
        assert row["status"] == "ok"
        assert row["score_source"] == "raw"  # the Engine's PerCategoryMetrics ran before the post-processor
        assert row["params_total"] > 0 and 0 <= row["params_trainable"] <= row["params_total"]
        assert row["gflops"] > 0 and row["train_time_s"] > 0 and row["train_steps"] >= 1
        assert row["latency_torch_ms"] > 0 and row["latency_openvino_ms"] > 0, row["openvino_note"]
        assert row["peak_rss_train_mb"] > 100 and row["peak_rss_test_mb"] > 100
    # our Dinomaly trains a decoder on a frozen encoder; PaDiM has no optimizer (it only fits Gaussians)
    assert 0 < means.loc["ours", "params_trainable"] < means.loc["ours", "params_total"]
    assert means.loc["padim", "params_trainable"] == 0


def test_failed_model_is_listed_with_its_error(report: dict[str, Any]) -> None:
    out: Path = report["out"]
    means = pd.read_csv(out / "mean_metrics.csv").set_index("model")
    failed = means.loc["needs-download"]
    assert failed["status"] == "failed"
    assert "DownloadBlockedError" in failed["error"] and "random_weights" in failed["error"]
    assert all(math.isnan(float(failed[c])) for c in METRIC_COLUMNS)
    listed = _markdown_rows((out / "report.md").read_text(), "Failed models")
    assert "needs-download" in listed and "DownloadBlockedError" in listed["needs-download"][0]
    assert (next((out / "models").glob("*_needs-download")) / "error.txt").read_text().strip()


def test_per_category_entry_trains_one_model_per_category(report: dict[str, Any]) -> None:
    """One PaDiM per category (each fitted on its own category only), reported as one row under one mean."""
    out: Path = report["out"]
    per_category = pd.read_csv(out / "per_category_metrics.csv")
    rows = per_category[per_category["model"] == "padim per category"].set_index("category")
    folder = next((out / "models").glob("*_padim_per_category"))
    for category in ("brick", "grass", "washer"):
        own = pd.read_csv(folder / category / "per_category_metrics.csv")
        assert list(own["category"]) == [category, "mean"]  # that model saw only its category
        assert float(rows.loc[category, "image_AUROC"]) == pytest.approx(100.0 * float(own.iloc[0]["image_AUROC"]))
    assert float(rows.loc["mean", "image_AUROC"]) == pytest.approx(rows.drop("mean")["image_AUROC"].astype(float).mean())
    means = pd.read_csv(out / "mean_metrics.csv").set_index("model")
    assert means.loc["padim per category", "status"] == "ok" and means.loc["padim per category", "train_time_s"] > 0
