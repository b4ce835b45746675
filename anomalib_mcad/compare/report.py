"""Write the comparison's report folder: CSV tables, a Markdown report, PNG figures, JSON.

Layout::

    report.md                  header, mean table, costs, per-category tables, failures, figures
    mean_metrics.csv           one row per model: status, error, 7 mean metrics (%), costs
    per_category_metrics.csv   one row per (model, category) incl. the "mean" row, metrics in %
    report.json                header and everything above, machine-readable
    figures/mean_metrics.png          grouped bars: the 7 mean metrics of every model
    figures/per_category_heatmap.png  model x category heatmaps of image AUROC, pixel AUROC, AUPRO
    figures/anomaly_maps.png          the same test images with every model's anomaly map
    models/<nn>_<model>/       that model's raw table and per-image predictions, export, run, errors

Metrics are percentages (as the papers report them); the Markdown shows them with two
decimals, the CSVs at full precision.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from anomalib_mcad.compare.runner import ModelResult, ProbeImages
from anomalib_mcad.metrics.per_category import LOGGED_MEAN_PREFIX, METRIC_COLUMNS

__all__ = ["mean_table", "per_category_table", "write_report"]

MEAN_CSV = "mean_metrics.csv"
PER_CATEGORY_CSV = "per_category_metrics.csv"
REPORT_MD = "report.md"
REPORT_JSON = "report.json"
FIGURES = ("mean_metrics.png", "per_category_heatmap.png", "anomaly_maps.png")
HEATMAP_METRICS = ("image_AUROC", "pixel_AUROC", "pixel_AUPRO")
#: What the mean table holds, said in the report because ``engine.test`` also returns anomalib's pooled AUROC.
MEAN_DEFINITION = (
    f"Each metric per category on raw scores, then the unweighted mean over categories: what the papers report "
    f"(`{LOGGED_MEAN_PREFIX}<metric>` in the results of `engine.test`). Not anomalib's `image_AUROC` of "
    "`engine.test`, which pools the normalised scores of all categories into one AUROC."
)


def per_category_table(results: Sequence[ModelResult]) -> pd.DataFrame:
    """Long table: model, category, n_images, n_anomalous and the seven metrics in percent."""
    frames = []
    for result in results:
        if result.metrics is None:
            continue
        frame = result.metrics.copy()
        frame[list(METRIC_COLUMNS)] = frame[list(METRIC_COLUMNS)].astype(float) * 100.0
        frame.insert(0, "model", result.label)
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=["model", "category", "n_images", "n_anomalous", *METRIC_COLUMNS])
    return pd.concat(frames, ignore_index=True)


def mean_table(results: Sequence[ModelResult]) -> pd.DataFrame:
    """One row per model: status, error, the seven mean metrics (%) and the cost measurements."""
    rows = []
    for r in results:
        row: dict[str, Any] = {"model": r.label, "class_path": r.class_path, "status": r.status, "error": r.error or ""}
        row |= {c: r.mean(c) * 100.0 for c in METRIC_COLUMNS}
        row |= {
            "params_total": r.params_total,
            "params_trainable": r.params_trainable,
            "gflops": r.flops / 1e9 if r.flops is not None else None,
            "flops_note": r.flops_note or "",
            "train_time_s": r.train_time_s,
            "train_steps": r.train_steps,
            "test_time_s": r.test_time_s,
            "input_size": "x".join(map(str, r.input_size)) if r.input_size else "",
            "device": r.device or "",
            "latency_torch_ms": r.latency_torch_ms,
            "latency_torch_min_ms": r.latency_torch_min_ms,
            "latency_openvino_ms": r.latency_openvino_ms,
            "latency_openvino_min_ms": r.latency_openvino_min_ms,
            "openvino_note": r.openvino_note or "",
            "peak_rss_train_mb": r.peak_rss_train_mb,
            "peak_rss_test_mb": r.peak_rss_test_mb,
            "peak_cuda_mb": r.peak_cuda_mb,
            "score_source": r.score_source or "",
        }
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------
def _pct(value: Any) -> str:  # noqa: ANN401
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{float(value):.2f}"


def _num(value: Any, fmt: str, note: str = "") -> str:  # noqa: ANN401
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"n/a ({note})" if note else "n/a"
    return format(float(value), fmt)


def _latency(median: float | None, minimum: float | None, note: str) -> str:
    if median is None:
        return f"n/a ({note})" if note else "n/a"
    return f"{median:.1f} ({minimum:.1f})" if minimum is not None else f"{median:.1f}"


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def _markdown(header: dict[str, Any], means: pd.DataFrame, per_category: pd.DataFrame, results: Sequence[ModelResult], figures: dict[str, Path]) -> str:
    parts = ["# Model comparison", ""]
    parts += [f"- **{key}**: {value}" for key, value in header.items()]
    parts += ["", "## Mean over categories (%)", "", MEAN_DEFINITION, ""]
    parts.append(_md_table(["model", *METRIC_COLUMNS], [[r["model"], *(_pct(r[c]) for c in METRIC_COLUMNS)] for _, r in means[means["status"] == "ok"].iterrows()]))
    failed = means[means["status"] != "ok"]
    if len(failed):
        parts += ["", "## Failed models", ""]
        parts.append(_md_table(["model", "error"], [[r["model"], r["error"]] for _, r in failed.iterrows()]))
    parts += ["", "## Size, speed and memory", ""]
    cost_rows = []
    for r in results:
        if not r.ok:
            continue
        cost_rows.append([
            r.label,
            _num(r.params_total / 1e6 if r.params_total is not None else None, ".3f"),
            _num(r.params_trainable / 1e6 if r.params_trainable is not None else None, ".3f"),
            _num(r.flops / 1e9 if r.flops is not None else None, ".3f", r.flops_note or ""),
            _num(r.train_time_s, ".1f"),
            _num(r.train_steps, ".0f"),
            _latency(r.latency_torch_ms, r.latency_torch_min_ms, ""),
            _latency(r.latency_openvino_ms, r.latency_openvino_min_ms, r.openvino_note or ""),
            _num(r.peak_rss_train_mb, ".0f"),
            _num(r.peak_rss_test_mb, ".0f"),
        ])
    parts.append(_md_table(
        ["model", "params (M)", "trainable (M)", "GFLOPs", "train time (s)", "train steps", "torch latency (ms), median (min)", "OpenVINO latency (ms), median (min)", "peak RSS train (MiB)", "peak RSS test (MiB)"],
        cost_rows,
    ))
    parts += [
        "",
        "How measured: parameters = `numel` of `model.parameters()` (buffers such as a memory bank excluded), "
        "trainable = those the trainer's optimizers update; "
        "GFLOPs = `torch.utils.flop_counter.FlopCounterMode` over one batch-1 forward of the anomalib module "
        "(pre-processing + network + post-processing) at the dataset's image size (matmul, conv and attention, "
        "2 FLOPs per multiply-add; element-wise ops count 0); train time = wall time of `engine.fit` (includes validation); "
        "latency = median (and minimum) of batch-1 forwards after warm-up, torch module in eval mode on the training device, "
        "OpenVINO model exported by `engine.export` and compiled on CPU with `INFERENCE_PRECISION_HINT=f32`; "
        "peak RSS = the process's resident memory sampled every 50 ms by a thread during `engine.fit` and during "
        "`engine.test` + latency (whole process: includes the Python runtime, libraries and earlier models' caches).",
    ]
    sources = sorted({r.score_source for r in results if r.score_source})
    parts += ["", f"Metrics computed by `PerCategoryMetrics` on {', '.join(sources) or 'raw'} scores (before the models' own normalisation)."]
    if len(per_category):
        parts += ["", "## Per category (%)", ""]
        categories = list(dict.fromkeys(per_category["category"]))
        models = list(dict.fromkeys(per_category["model"]))
        for column in METRIC_COLUMNS:
            parts += [f"### {column}", ""]
            rows = []
            for category in categories:
                row = [category]
                for model in models:
                    value = per_category[(per_category["model"] == model) & (per_category["category"] == category)][column]
                    row.append(_pct(value.iloc[0]) if len(value) else "n/a")
                rows.append(row)
            parts += [_md_table(["category", *models], rows), ""]
    if figures:
        parts += ["## Figures", ""]
        captions = {
            "mean_metrics.png": "Mean of each metric over categories, per model.",
            "per_category_heatmap.png": "Per-category image AUROC, pixel AUROC and pixel AUPRO of every model.",
            "anomaly_maps.png": "The same test images (top), their ground truth, and each model's normalised anomaly map "
            "(its own post-processor: 0.5 = its threshold); the number is the model's normalised image score.",
        }
        for name, path in figures.items():
            parts += [f"![{name}](figures/{path.name})", "", captions.get(name, ""), ""]
    return "\n".join(parts).rstrip() + "\n"


# --------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------
def _pyplot() -> Any:  # noqa: ANN401
    import matplotlib as mpl  # noqa: PLC0415

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def _model_colors(n: int) -> list[Any]:
    """One distinct colour per model, the same in every panel."""
    plt = _pyplot()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def plot_mean_metrics(means: pd.DataFrame, path: Path) -> Path:
    """One panel per metric, one labelled horizontal bar per model (readable for any number of models)."""
    plt = _pyplot()
    ok = means[means["status"] == "ok"].reset_index(drop=True)
    models = list(ok["model"])
    n_cols = 4
    n_rows = math.ceil(len(METRIC_COLUMNS) / n_cols)
    label_width = 0.07 * max((len(m) for m in models), default=10)
    panel_height = 0.6 + 0.32 * max(1, len(models))
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(label_width + 3.0 * n_cols, panel_height * n_rows + 0.6), sharey=True, squeeze=False)
    colors = _model_colors(len(models))
    y = np.arange(len(models))
    for k, ax in enumerate(axes.ravel()):
        if k >= len(METRIC_COLUMNS):
            ax.set_visible(False)
            continue
        column = METRIC_COLUMNS[k]
        values = ok[column].astype(float).to_numpy()
        ax.barh(y, np.nan_to_num(values), color=colors, height=0.75)
        for i, value in enumerate(values):
            text = "n/a" if math.isnan(value) else f"{value:.1f}"
            inside = not math.isnan(value) and value > 30
            ax.text(value - 2 if inside else max(0.0, np.nan_to_num(value)) + 2, i, text, va="center", ha="right" if inside else "left",
                    fontsize=8, color="white" if inside else "black")  # fmt: skip
        ax.set_xlim(0, 100)
        ax.axvline(50, color="grey", lw=0.6, ls="--")
        ax.set_title(f"{column} (%)", fontsize=10)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_yticks(y, models, fontsize=9)
        if k == 0:  # shared y axis: inverting it once puts the first model on top in every panel
            ax.invert_yaxis()
    fig.suptitle("Mean over categories, per model (dashed line: 50 %, chance level for the AUROCs)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_heatmap(per_category: pd.DataFrame, path: Path) -> Path:
    """Model x category heatmaps (one panel per metric in :data:`HEATMAP_METRICS`), the mean last, values written in."""
    plt = _pyplot()
    models = list(dict.fromkeys(per_category["model"]))
    categories = [c for c in dict.fromkeys(per_category["category"]) if c != "mean"]
    columns = [*categories, "mean"]
    label_width = 0.07 * max((len(m) for m in models), default=10)
    fig, axes = plt.subplots(
        len(HEATMAP_METRICS), 1,
        figsize=(label_width + max(4.0, 0.9 * len(columns)) + 1.0, 0.6 + len(HEATMAP_METRICS) * (0.8 + 0.4 * len(models))),
        squeeze=False,
    )  # fmt: skip
    fig.subplots_adjust(hspace=0.45)  # room for each panel's title under the one above
    cmap = plt.get_cmap("RdYlGn")
    image = None
    for k, (ax, column) in enumerate(zip(axes[:, 0], HEATMAP_METRICS, strict=True)):
        grid = np.full((len(models), len(columns)), np.nan)
        for i, model in enumerate(models):
            for j, category in enumerate(columns):
                value = per_category[(per_category["model"] == model) & (per_category["category"] == category)][column]
                if len(value):
                    grid[i, j] = float(value.iloc[0])
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=100, aspect="auto")
        for i in range(len(models)):
            for j in range(len(columns)):
                value = grid[i, j]
                dark = not np.isnan(value) and (value > 85 or value < 15)  # ends of RdYlGn: white text reads better
                ax.text(j, i, "n/a" if np.isnan(value) else f"{value:.0f}", ha="center", va="center", fontsize=8,
                        color="white" if dark else "black", fontweight="bold" if columns[j] == "mean" else "normal")  # fmt: skip
        ax.axvline(len(categories) - 0.5, color="black", lw=1.5)  # the mean column apart from the categories
        last = k == len(HEATMAP_METRICS) - 1  # same columns in every panel: label the bottom one
        ax.set_xticks(range(len(columns)), columns if last else [], rotation=30, ha="right", fontsize=9)
        ax.set_yticks(range(len(models)), models, fontsize=9)
        ax.set_title(f"{column} (%) per category", fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=axes[:, 0].tolist(), fraction=0.03, label="%")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_anomaly_maps(results: Sequence[ModelResult], probe: ProbeImages, path: Path) -> Path:
    """Rows: the test images, their ground truth, then each model's anomaly map over the image.

    The ground-truth outline is drawn on every model's map, so whether the hot region is the
    defect can be seen without looking up and down; the title is the model's normalised image
    score, red when it flags the image (>= 0.5, its threshold).
    """
    plt = _pyplot()
    ok = [r for r in results if r.ok and r.grid_maps is not None]
    n = probe.grid_images.shape[0]
    rows = 1 + (probe.grid_masks is not None) + len(ok)
    fig, axes = plt.subplots(rows, n, figsize=(1.9 * n + 2.4, 1.95 * rows), squeeze=False)
    images = probe.grid_images.permute(0, 2, 3, 1).float().clamp(0, 1).cpu().numpy()
    masks = probe.grid_masks.cpu().numpy() if probe.grid_masks is not None else None
    labels = ["image"] + (["ground truth"] if masks is not None else []) + [r.label for r in ok]
    overlay = None
    for j in range(n):
        axes[0, j].imshow(images[j])
        axes[0, j].set_title(probe.grid_titles[j], fontsize=7)
        row = 1
        if masks is not None:
            axes[row, j].imshow(masks[j], cmap="gray", vmin=0, vmax=1)
            row += 1
        for r in ok:
            ax = axes[row, j]
            ax.imshow(images[j])
            overlay = ax.imshow(r.grid_maps[j], cmap="jet", alpha=0.55, vmin=0.0, vmax=1.0)
            if masks is not None and masks[j].any():
                ax.contour(masks[j].astype(float), levels=[0.5], colors="white", linewidths=0.8)
            if j < len(r.grid_scores):
                score = r.grid_scores[j]
                ax.set_title(f"score {score:.2f}", fontsize=7, pad=2, color="red" if score >= 0.5 else "black")
            row += 1
    for i, label in enumerate(labels):
        axes[i, 0].set_ylabel(label, fontsize=8, rotation=0, ha="right", va="center")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if overlay is not None:
        fig.colorbar(overlay, ax=axes.ravel().tolist(), fraction=0.02, label="normalised anomaly map (0.5 = model's threshold)")
    fig.suptitle("Same test images, each model's anomaly map (white outline: ground truth)", fontsize=10)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------
# Folder
# --------------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:  # noqa: ANN401
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (np.floating, np.integer)):
        return _jsonable(value.item())
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def write_report(output_dir: Path, header: dict[str, Any], results: Sequence[ModelResult], probe: ProbeImages | None) -> dict[str, Path]:
    """Write every file of the report folder; returns ``{name: path}``."""
    output_dir.mkdir(parents=True, exist_ok=True)
    figures_dir = output_dir / "figures"
    figures_dir.mkdir(exist_ok=True)
    means = mean_table(results)
    per_category = per_category_table(results)
    paths = {"mean_csv": output_dir / MEAN_CSV, "per_category_csv": output_dir / PER_CATEGORY_CSV}
    means.to_csv(paths["mean_csv"], index=False)
    per_category.to_csv(paths["per_category_csv"], index=False)

    figures: dict[str, Path] = {}
    if any(r.ok for r in results):
        figures["mean_metrics.png"] = plot_mean_metrics(means, figures_dir / "mean_metrics.png")
        figures["per_category_heatmap.png"] = plot_heatmap(per_category, figures_dir / "per_category_heatmap.png")
        if probe is not None and any(r.grid_maps is not None for r in results):
            figures["anomaly_maps.png"] = plot_anomaly_maps(results, probe, figures_dir / "anomaly_maps.png")
    paths |= {name.removesuffix(".png"): path for name, path in figures.items()}

    paths["markdown"] = output_dir / REPORT_MD
    paths["markdown"].write_text(_markdown(header, means, per_category, results, figures))
    paths["json"] = output_dir / REPORT_JSON
    payload = {
        "header": header,
        "models": means.to_dict(orient="records"),
        "per_category": per_category.to_dict(orient="records"),
    }
    paths["json"].write_text(json.dumps(_jsonable(payload), indent=2))
    return paths
