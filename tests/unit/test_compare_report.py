"""The comparison report from given results (no training): tables, percentages, failures, figures."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from anomalib_mcad.compare.report import write_report
from anomalib_mcad.compare.runner import ModelResult, ProbeImages
from anomalib_mcad.metrics.per_category import METRIC_COLUMNS, compute_per_category_metrics


def _result(label: str, seed: int) -> ModelResult:
    rng = np.random.default_rng(seed)
    categories = ["a"] * 6 + ["b"] * 6
    labels = np.array([0, 0, 0, 1, 1, 1] * 2)
    masks = np.zeros((12, 16, 16), dtype=bool)
    masks[labels == 1, 4:9, 4:9] = True
    maps = rng.random((12, 16, 16)).astype(np.float32) + masks * rng.random()
    scores = maps.reshape(12, -1).max(axis=1)
    table = compute_per_category_metrics(categories, labels, scores, maps, masks)
    return ModelResult(
        label=label, class_path=f"pkg.{label}", status="ok", stage="done", metrics=table, score_source="raw",
        params_total=1000, params_trainable=10, flops=2_000_000_000, train_time_s=1.5, train_steps=3,
        latency_torch_ms=5.0, latency_torch_min_ms=4.0, latency_openvino_ms=None, openvino_note="export failed: X",
        peak_rss_train_mb=500.0, peak_rss_test_mb=600.0, input_size=(16, 16), device="cpu",
        grid_maps=rng.random((2, 16, 16)), grid_scores=[0.2, 0.9],
    )  # fmt: skip


def test_report_tables_match_the_models_tables_and_list_failures(tmp_path: Path) -> None:
    ok = [_result("m1", 0), _result("m2", 1)]
    failed = ModelResult(label="bad | model", class_path="pkg.Bad", error="build: DownloadBlockedError: no network")
    probe = ProbeImages(image=torch.rand(3, 16, 16), grid_images=torch.rand(2, 3, 16, 16), grid_masks=torch.rand(2, 16, 16) > 0.5, grid_titles=["x", "y"])
    paths = write_report(tmp_path, {"seed": 0, "device": "cpu"}, [*ok, failed], probe)

    per_category = pd.read_csv(paths["per_category_csv"])
    for result in ok:
        rows = per_category[per_category["model"] == result.label].reset_index(drop=True)
        expected = result.metrics[list(METRIC_COLUMNS)].astype(float).to_numpy() * 100
        np.testing.assert_allclose(rows[list(METRIC_COLUMNS)].to_numpy(), expected)
        assert list(rows["category"]) == ["a", "b", "mean"]
    means = pd.read_csv(paths["mean_csv"]).set_index("model")
    assert means.loc["bad | model", "status"] == "failed"
    assert means.loc["m1", "image_AUROC"] == pytest.approx(100 * ok[0].mean("image_AUROC"))
    assert means.loc["m1", "gflops"] == pytest.approx(2.0)

    text = paths["markdown"].read_text()
    mean_line = next(line for line in text.splitlines() if line.startswith("| m1 |"))
    assert f"{100 * ok[0].mean('image_AUROC'):.2f}" in mean_line
    assert "bad \\| model" in text and "DownloadBlockedError: no network" in text  # failed, with its error, pipe escaped
    assert "5.0 (4.0)" in text and "n/a (export failed: X)" in text  # latency median (min); OpenVINO reason
    assert "- **seed**: 0" in text
    assert "per_category_mean_<metric>" in text and "pools the normalised scores of all categories" in text
    payload = json.loads(paths["json"].read_text())
    assert {m["model"] for m in payload["models"]} == {"m1", "m2", "bad | model"}
    for name in ("mean_metrics", "per_category_heatmap", "anomaly_maps"):
        assert paths[name].read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_report_with_only_failures_has_no_figures(tmp_path: Path) -> None:
    failed = ModelResult(label="bad", class_path="pkg.Bad", error="fit: RuntimeError: boom")
    paths = write_report(tmp_path, {}, [failed], None)
    assert "fit: RuntimeError: boom" in paths["markdown"].read_text()
    assert not list((tmp_path / "figures").glob("*.png"))
