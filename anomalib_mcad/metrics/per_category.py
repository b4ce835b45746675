"""Per-category evaluation with the seven metrics reported by multi-class anomaly detection papers.

One model is trained on every category of a dataset and tested on all of them; papers then
report, for each category and as an unweighted mean over categories:

* image level: AUROC, AP (average precision), F1-max;
* pixel level: AUROC, AP, F1-max, AUPRO (per-region overlap integrated up to FPR 0.3).

All seven are threshold-free, so they only depend on the ranking of the scores.

This module has three layers:

* pure metric functions (:func:`auroc`, :func:`average_precision`, :func:`f1_max`,
  :func:`binary_ranking_metrics`, :func:`aupro`), taking numpy arrays or torch tensors and
  returning floats;
* :func:`compute_per_category_metrics`, which groups images by category and returns a
  :class:`pandas.DataFrame` with one row per category and a ``mean`` row, and
  :func:`format_table`, which renders it as the papers do (percentages, 2 decimals);
* :class:`PerCategoryMetrics`, a Lightning callback that collects the test predictions and
  writes/prints that table at the end of ``engine.test``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F  # noqa: N812
from anomalib.metrics.aupro import _AUPRO
from lightning.pytorch import Callback, LightningModule, Trainer

__all__ = [
    "AUPRO_FPR_LIMIT",
    "COLUMNS",
    "LOGGED_MEAN_PREFIX",
    "METRIC_COLUMNS",
    "PerCategoryMetrics",
    "aupro",
    "auroc",
    "average_precision",
    "binary_ranking_metrics",
    "compute_per_category_metrics",
    "f1_max",
    "format_table",
    "with_mean_rows",
]

PREDICTIONS_FILENAME = "per_image_predictions.csv"
"""Per-image scores (raw), labels and categories written beside the table."""

AUPRO_FPR_LIMIT = 0.3
"""False-positive-rate limit up to which the PRO curve is integrated (MVTec AD convention)."""

METRIC_COLUMNS: tuple[str, ...] = (
    "image_AUROC",
    "image_AP",
    "image_F1max",
    "pixel_AUROC",
    "pixel_AP",
    "pixel_F1max",
    "pixel_AUPRO",
)
COLUMNS: tuple[str, ...] = ("category", "n_images", "n_anomalous", *METRIC_COLUMNS)
MEAN_ROW = "mean"
#: Prefix of the means logged into the results of ``engine.test`` (``per_category_mean_image_AUROC``, ...):
#: each metric per category on raw scores, then the unweighted mean over categories, as the papers
#: report. anomalib's Evaluator logs ``image_AUROC``, ``pixel_AUROC``, ... beside them: one value over
#: all categories' images pooled, on normalised scores, which is not the papers' number. Until
#: issue 17 the prefix was ``mean_`` (``mean_image_AUROC``), too easily read as anomalib's.
LOGGED_MEAN_PREFIX = "per_category_mean_"
#: Separates a dataset name from a category name in a union of datasets (``"visa/pcb1"``).
SOURCE_SEPARATOR = "/"

ArrayLike = np.ndarray | torch.Tensor | Sequence[Any]


# --------------------------------------------------------------------------------------
# Pure metric functions
# --------------------------------------------------------------------------------------
def _flat_scores(scores: ArrayLike) -> torch.Tensor:
    """Scores as a flat CPU tensor; keeps float32/float64 so pixel maps are not upcast."""
    t = torch.as_tensor(np.asarray(scores) if not isinstance(scores, torch.Tensor) else scores)
    t = t.detach().to("cpu").reshape(-1)
    if t.dtype == torch.bool or not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        t = t.to(torch.float64)
    elif t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    if t.is_floating_point() and bool(torch.isnan(t).any()):
        msg = "scores contain NaN"
        raise ValueError(msg)
    return t


def _flat_labels(labels: ArrayLike) -> torch.Tensor:
    """Binary ground truth (labels or masks, {0,1}, bool or 0/255) as a flat CPU bool tensor."""
    t = torch.as_tensor(np.asarray(labels) if not isinstance(labels, torch.Tensor) else labels)
    t = t.detach().to("cpu").reshape(-1)
    return t if t.dtype == torch.bool else t > 0.5


def _tie_group_counts(scores: ArrayLike, labels: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    """Cumulative (TP, FP) counts for the threshold at each distinct score, from the highest down.

    One descending sort serves AUROC, AP and F1-max. Equal scores form one group (a threshold
    cannot separate them), which is how sklearn and torchmetrics build their curves, so ties
    are handled identically.
    """
    s = _flat_scores(scores)
    y = _flat_labels(labels)
    if s.numel() != y.numel():
        msg = f"scores and labels differ in size: {s.numel()} vs {y.numel()}"
        raise ValueError(msg)
    if s.numel() == 0:
        msg = "empty input"
        raise ValueError(msg)
    sorted_scores, order = torch.sort(s, descending=True)
    sorted_labels = y[order]
    del order
    # last position of every group of equal scores
    group_ends = torch.nonzero(sorted_scores[1:] != sorted_scores[:-1]).squeeze(1)
    del sorted_scores
    group_ends = torch.cat([group_ends, torch.tensor([s.numel() - 1])])
    tps = torch.cumsum(sorted_labels, dim=0, dtype=torch.int64)[group_ends]
    fps = group_ends + 1 - tps
    return tps, fps


def binary_ranking_metrics(scores: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """AUROC, AP and F1-max of ``scores`` against binary ``labels``, from a single sort.

    Works on any shape (flattened): per-image scores for image-level metrics, stacks of anomaly
    maps and masks for pixel-level ones. Definitions (identical to sklearn's):

    * ``AUROC``: trapezoidal area under the ROC curve; NaN unless both classes are present;
    * ``AP``: step-wise average precision ``sum_k (R_k - R_{k-1}) P_k``; NaN without positives;
    * ``F1max``: maximum over thresholds of ``2PR / (P + R)``; NaN without positives.

    Sorting once instead of three times (sklearn, torchmetrics) matters for pixel metrics,
    where a category holds tens of millions of values.
    """
    tps, fps = _tie_group_counts(scores, labels)
    n_pos, n_neg = int(tps[-1]), int(fps[-1])
    out = {"AUROC": math.nan, "AP": math.nan, "F1max": math.nan}
    if n_pos == 0:
        return out
    tp = tps.to(torch.float64)
    fp = fps.to(torch.float64)
    del tps, fps
    # F1 = 2TP / (2TP + FP + FN) = 2TP / (TP + FP + n_pos)
    out["F1max"] = float((2 * tp / (tp + fp + n_pos)).max())
    recall = tp / n_pos
    precision = tp / (tp + fp)
    out["AP"] = float(torch.sum(torch.diff(recall, prepend=recall.new_zeros(1)) * precision))
    del precision
    if n_neg > 0:
        zero = recall.new_zeros(1)
        out["AUROC"] = float(torch.trapezoid(torch.cat([zero, recall]), torch.cat([zero, fp / n_neg])))
    return out


def auroc(scores: ArrayLike, labels: ArrayLike) -> float:
    """Area under the ROC curve (NaN if only one class is present). See :func:`binary_ranking_metrics`."""
    return binary_ranking_metrics(scores, labels)["AUROC"]


def average_precision(scores: ArrayLike, labels: ArrayLike) -> float:
    """Average precision, sklearn's step-wise definition (NaN without positives)."""
    return binary_ranking_metrics(scores, labels)["AP"]


def f1_max(scores: ArrayLike, labels: ArrayLike) -> float:
    """Best F1 score over all thresholds (NaN without positives)."""
    return binary_ranking_metrics(scores, labels)["F1max"]


def _as_image_stack(x: ArrayLike, name: str) -> torch.Tensor:
    """``(H, W)``, ``(N, H, W)`` or ``(N, 1, H, W)`` input as an ``(N, H, W)`` CPU tensor."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach().to("cpu")
    if t.ndim == 2:
        t = t[None]
    elif t.ndim == 4 and t.shape[1] == 1:
        t = t[:, 0]
    if t.ndim != 3:
        msg = f"{name} must have shape (H, W), (N, H, W) or (N, 1, H, W), got {tuple(t.shape)}"
        raise ValueError(msg)
    return t


def aupro(maps: ArrayLike, masks: ArrayLike, fpr_limit: float = AUPRO_FPR_LIMIT) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, normalised by ``fpr_limit``.

    The MVTec AD definition: ground-truth regions are the 8-connected components of each mask;
    for a threshold, PRO is the mean over all regions (of all images) of the fraction of the
    region above the threshold, and FPR is the fraction of all normal pixels above it. The PRO
    curve is integrated (trapezoids, linear interpolation at ``fpr_limit``) from 0 to
    ``fpr_limit`` and divided by ``fpr_limit``. Delegates to anomalib's exact (every distinct
    threshold) implementation, run on CPU. NaN if the masks have no anomalous or no normal pixel.

    Args:
        maps: anomaly maps, ``(N, H, W)`` (or ``(H, W)``, ``(N, 1, H, W)``); higher = more anomalous.
        masks: binary ground-truth masks of the same shape.
        fpr_limit: upper integration limit of the false positive rate.
    """
    score_maps = _as_image_stack(maps, "maps")
    gt = _as_image_stack(masks, "masks")
    if score_maps.shape != gt.shape:
        msg = f"maps {tuple(score_maps.shape)} and masks {tuple(gt.shape)} differ in shape"
        raise ValueError(msg)
    gt = gt if gt.dtype == torch.bool else gt > 0.5
    n_fg = int(gt.sum())
    if n_fg == 0 or n_fg == gt.numel():
        return math.nan
    if score_maps.dtype in (torch.float16, torch.bfloat16) or not score_maps.is_floating_point():
        score_maps = score_maps.float()
    if bool(torch.isnan(score_maps).any()):
        msg = "maps contain NaN"
        raise ValueError(msg)
    metric = _AUPRO(fpr_limit=fpr_limit)
    # the data is already complete here: a torchmetrics sync under DDP would wait for ranks
    # that never call this (the callback computes on rank 0 only)
    metric.sync_on_compute = False
    metric._to_sync = False  # noqa: SLF001  (set from sync_on_compute in Metric.__init__)
    metric.update(score_maps, gt.float())
    return float(metric.compute())


# --------------------------------------------------------------------------------------
# Per-category table
# --------------------------------------------------------------------------------------
def _per_image(x: ArrayLike | None, n: int, name: str) -> list[torch.Tensor | None]:
    """Split maps/masks given as a stack or as a per-image sequence (entries may be None)."""
    if x is None:
        return [None] * n
    if isinstance(x, (torch.Tensor, np.ndarray)):
        stack = torch.as_tensor(x)
        if stack.ndim == 4 and stack.shape[1] == 1:
            stack = stack[:, 0]
        if stack.ndim != 3 or stack.shape[0] != n:
            msg = f"{name} must be (N, H, W) with N={n}, got {tuple(stack.shape)}"
            raise ValueError(msg)
        return list(stack)
    items = list(x)
    if len(items) != n:
        msg = f"{name} has {len(items)} entries for {n} images"
        raise ValueError(msg)
    out: list[torch.Tensor | None] = []
    for item in items:
        if item is None:
            out.append(None)
            continue
        t = torch.as_tensor(np.asarray(item) if not isinstance(item, torch.Tensor) else item)
        out.append(t.reshape(t.shape[-2:]))
    return out


def _pixel_metrics(
    maps: list[torch.Tensor | None],
    masks: list[torch.Tensor | None],
    labels: torch.Tensor,
    fpr_limit: float,
) -> dict[str, float]:
    """Pixel metrics of one category; NaN when any map is missing or an anomalous image has no mask."""
    nan = dict.fromkeys(("pixel_AUROC", "pixel_AP", "pixel_F1max", "pixel_AUPRO"), math.nan)
    if not maps or any(m is None for m in maps):
        return nan
    gts: list[torch.Tensor] = []
    for amap, mask, label in zip(maps, masks, labels.tolist(), strict=True):
        if mask is None:
            if label:
                return nan  # anomalous image without ground truth: pixel metrics unknown
            mask = torch.zeros(amap.shape[-2:], dtype=torch.bool)  # noqa: PLW2901
        if tuple(mask.shape[-2:]) != tuple(amap.shape[-2:]):
            msg = f"mask {tuple(mask.shape)} and map {tuple(amap.shape)} differ in size; resize first"
            raise ValueError(msg)
        gts.append(mask if mask.dtype == torch.bool else mask > 0.5)
    if len({tuple(m.shape) for m in maps}) > 1:  # type: ignore[union-attr]
        msg = "all anomaly maps of a category must share one resolution; resize first"
        raise ValueError(msg)
    score_maps = torch.stack([m.float() for m in maps])  # type: ignore[union-attr]
    gt = torch.stack(gts)
    del gts
    n_fg = int(gt.sum())
    if n_fg == 0 or n_fg == gt.numel():
        return nan
    ranking = binary_ranking_metrics(score_maps, gt)
    return {
        "pixel_AUROC": ranking["AUROC"],
        "pixel_AP": ranking["AP"],
        "pixel_F1max": ranking["F1max"],
        "pixel_AUPRO": aupro(score_maps, gt, fpr_limit=fpr_limit),
    }


def compute_per_category_metrics(
    categories: Sequence[str],
    labels: ArrayLike,
    scores: ArrayLike,
    maps: ArrayLike | None = None,
    masks: ArrayLike | None = None,
    fpr_limit: float = AUPRO_FPR_LIMIT,
) -> pd.DataFrame:
    """Seven metrics per category plus an unweighted ``mean`` row, as in the papers.

    Args:
        categories: category name of each of the N images.
        labels: image labels ``(N,)``, 1 = anomalous.
        scores: image anomaly scores ``(N,)``.
        maps: anomaly maps, ``(N, H, W)`` stack or a length-N sequence of ``(H, W)`` maps or
            ``None``. A category with any missing map gets NaN pixel metrics.
        masks: ground-truth masks, same layout. A missing mask of a normal image counts as an
            all-normal mask; a missing mask of an anomalous image makes that category's pixel
            metrics NaN. Maps and masks of a category must share one resolution.
        fpr_limit: AUPRO integration limit.

    Returns:
        DataFrame with :data:`COLUMNS`; categories in order of first appearance, then ``mean``.
        Image metrics are NaN for a category whose images are all normal or all anomalous.
        The ``mean`` row is the NaN-skipping mean over categories of each metric (and the
        totals of ``n_images``/``n_anomalous``). Categories named ``<dataset>/<category>`` from
        two or more datasets (a union) also get a ``mean/<dataset>`` row per dataset.
    """
    names = [str(c) for c in categories]
    n = len(names)
    y = _flat_labels(labels)
    s = _flat_scores(scores)
    if y.numel() != n or s.numel() != n:
        msg = f"{n} categories, {y.numel()} labels and {s.numel()} scores: lengths must match"
        raise ValueError(msg)
    map_list = _per_image(maps, n, "maps")
    mask_list = _per_image(masks, n, "masks")

    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).append(i)

    rows: list[dict[str, Any]] = []
    for name, idx_list in groups.items():
        idx = torch.tensor(idx_list)
        cat_labels = y[idx]
        n_anomalous = int(cat_labels.sum())
        row: dict[str, Any] = {"category": name, "n_images": len(idx_list), "n_anomalous": n_anomalous}
        if 0 < n_anomalous < len(idx_list):
            ranking = binary_ranking_metrics(s[idx], cat_labels)
            row |= {"image_AUROC": ranking["AUROC"], "image_AP": ranking["AP"], "image_F1max": ranking["F1max"]}
        else:
            row |= {"image_AUROC": math.nan, "image_AP": math.nan, "image_F1max": math.nan}
        row |= _pixel_metrics([map_list[i] for i in idx_list], [mask_list[i] for i in idx_list], cat_labels, fpr_limit)
        rows.append(row)

    return with_mean_rows(pd.DataFrame(rows, columns=list(COLUMNS)))


def with_mean_rows(df: pd.DataFrame) -> pd.DataFrame:
    """``df``'s category rows followed by the ``mean`` row (and one mean per dataset of a union).

    Also merges tables of separately trained models (one per category) into one.
    """
    df = df[~df["category"].astype(str).str.startswith(MEAN_ROW)].reset_index(drop=True)
    means = [_mean_row(df, MEAN_ROW)]
    names = list(df["category"].astype(str))
    sources = list(dict.fromkeys(name.split(SOURCE_SEPARATOR, 1)[0] for name in names if SOURCE_SEPARATOR in name))
    if len(sources) > 1:  # a union of datasets: also the mean of each dataset, as the papers report them
        means = [_mean_row(df[df["category"].str.startswith(f"{src}{SOURCE_SEPARATOR}")], f"{MEAN_ROW}{SOURCE_SEPARATOR}{src}") for src in sources] + means
    df = pd.concat([df, pd.DataFrame(means, columns=list(COLUMNS))], ignore_index=True)
    return df.astype({"n_images": int, "n_anomalous": int})


def _mean_row(df: pd.DataFrame, name: str) -> dict[str, Any]:
    """NaN-skipping unweighted mean of each metric over the rows of ``df``; image counts summed."""
    row: dict[str, Any] = {"category": name, "n_images": int(df["n_images"].sum()), "n_anomalous": int(df["n_anomalous"].sum())}
    for column in METRIC_COLUMNS:
        values = df[column].astype(float)
        row[column] = float(values.mean(skipna=True)) if values.notna().any() else math.nan
    return row


def format_table(df: pd.DataFrame) -> str:
    """Markdown table of a :func:`compute_per_category_metrics` result, metrics in % with 2 decimals.

    NaN is shown as ``-``.
    """
    header = list(COLUMNS)
    body: list[list[str]] = []
    for _, row in df.iterrows():
        cells = [str(row["category"]), str(int(row["n_images"])), str(int(row["n_anomalous"]))]
        cells += ["-" if pd.isna(row[c]) else f"{100 * float(row[c]):.2f}" for c in METRIC_COLUMNS]
        body.append(cells)
    widths = [max(len(header[j]), *(len(r[j]) for r in body)) if body else len(header[j]) for j in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "| " + " | ".join(padded) + " |"

    separator = "| " + " | ".join([":" + "-" * (widths[0] - 1)] + ["-" * (w - 1) + ":" for w in widths[1:]]) + " |"
    return "\n".join([line(header), separator, *(line(r) for r in body)])


# --------------------------------------------------------------------------------------
# Callback
# --------------------------------------------------------------------------------------
def _field(obj: Any, name: str) -> Any:  # noqa: ANN401
    """``obj.name`` for batches, ``obj[name]`` for dict step outputs, else None."""
    if obj is None:
        return None
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


class PerCategoryMetrics(Callback):
    """Collect test predictions and report the seven paper metrics per category and on average.

    Pass it to the engine: ``Engine(callbacks=[PerCategoryMetrics()])``; after ``engine.test``
    the table is printed, saved as CSV (raw fractions, full precision) and kept in
    :attr:`results`. The means are also logged as ``per_category_mean_<metric>``
    (:data:`LOGGED_MEAN_PREFIX`), so they appear in the dict returned by ``engine.test`` beside
    anomalib's pooled ``image_AUROC``. Only the test loop is collected, not validation.

    Category of an image: the batch's ``category`` field (``CategoryImageBatch`` from the
    multi-class datamodule); for batches without it (anomalib's own datamodules)
    ``trainer.datamodule.category`` if it is a string, else ``"all"``.

    Raw vs. normalised scores: Lightning runs the callbacks given to the trainer/engine before
    the model's own ones (``AnomalibModule.configure_callbacks``: PreProcessor, PostProcessor,
    Evaluator, Visualizer are appended after them), and anomalib's ``test_step`` calls the
    torch model directly. So in this callback's ``on_test_batch_end`` the batch holds the RAW
    ``pred_score`` and ``anomaly_map`` (not yet min-max normalised and clipped to [0, 1] by the
    PostProcessor) and ``gt_mask`` already resized by the PreProcessor to the model's input
    size. :attr:`score_source` records what was seen (``"raw"`` or ``"normalized"``, the latter
    if the post-processor somehow runs first). A missing ``pred_score`` is replaced by the
    maximum of the anomaly map.

    Evaluation resolution: anomaly maps are resized to ``eval_size`` (bilinear,
    ``align_corners=False``) and masks with nearest neighbour, then kept on CPU as float32/bool
    (``256`` => 256 KiB + 64 KiB per image). ``eval_size=None`` keeps the map resolution.

    Multi-GPU: with ``trainer.world_size > 1`` the collected predictions are gathered on all
    ranks (``torch.distributed.all_gather_object``), duplicates added by the distributed
    sampler are dropped by image path, and only rank 0 computes, prints, saves and logs
    (:attr:`results` stays ``None`` on the other ranks).

    Args:
        eval_size: resolution of the pixel metrics, int (square) or ``(H, W)``; None = as predicted.
        output_dir: CSV directory; default ``trainer.log_dir`` (the logger's directory, or
            ``trainer.default_root_dir`` without logger).
        filename: CSV file name.
        print_table: print the table (percentages) at the end of the test epoch.
    """

    def __init__(
        self,
        eval_size: int | tuple[int, int] | None = 256,
        output_dir: str | Path | None = None,
        filename: str = "per_category_metrics.csv",
        print_table: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(eval_size, int):
            eval_size = (eval_size, eval_size)
        self.eval_size: tuple[int, int] | None = (int(eval_size[0]), int(eval_size[1])) if eval_size else None
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.filename = filename
        self.print_table = print_table
        self.results: pd.DataFrame | None = None
        self.csv_path: Path | None = None
        self.predictions_path: Path | None = None
        self.score_source: str | None = None
        self._default_category = "all"
        self._records: list[dict[str, Any]] = []

    # -- collection --------------------------------------------------------------------
    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Reset the collected state so that repeated ``engine.test`` calls do not mix."""
        self._records = []
        self.results = None
        self.csv_path = None
        category = getattr(getattr(trainer, "datamodule", None), "category", None)
        self._default_category = category if isinstance(category, str) and category else "all"
        self.score_source = self._detect_score_source(trainer, pl_module)

    def _detect_score_source(self, trainer: Trainer, pl_module: LightningModule) -> str:
        """``"normalized"`` if the model's post-processor callback runs before this one, else ``"raw"``."""
        post_processor = getattr(pl_module, "post_processor", None)
        callbacks = list(getattr(trainer, "callbacks", []) or [])
        own = next((i for i, c in enumerate(callbacks) if c is self), None)
        post = next((i for i, c in enumerate(callbacks) if post_processor is not None and c is post_processor), None)
        return "normalized" if own is not None and post is not None and post < own else "raw"

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,  # noqa: ANN401
        batch: Any,  # noqa: ANN401
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        """Store category, label, score, resized map and mask of every image of the batch (on CPU)."""
        del trainer, pl_module, batch_idx, dataloader_idx
        has_predictions = _field(outputs, "pred_score") is not None or _field(outputs, "anomaly_map") is not None
        src = outputs if has_predictions else batch
        self._records.append(self._extract(src))

    def _extract(self, src: Any) -> dict[str, Any]:  # noqa: ANN401
        """One batch's per-image data, maps and masks resized to the evaluation size, on CPU."""
        score = _field(src, "pred_score")
        amap = _field(src, "anomaly_map")
        label = _field(src, "gt_label")
        mask = _field(src, "gt_mask")
        if score is None and amap is None:
            msg = "PerCategoryMetrics: the test batch has neither pred_score nor anomaly_map"
            raise ValueError(msg)
        if amap is not None:
            amap = torch.as_tensor(amap).detach()
            amap = amap.reshape(-1, *amap.shape[-2:])
        if score is None:
            score = torch.amax(amap, dim=(-2, -1))
        score = torch.as_tensor(score).detach().to("cpu", torch.float32).reshape(-1)
        if label is None:
            if mask is None:
                msg = "PerCategoryMetrics: the test batch has neither gt_label nor gt_mask"
                raise ValueError(msg)
            label = torch.as_tensor(mask).reshape(score.numel(), -1).any(dim=1)
        label = torch.as_tensor(label).detach().to("cpu").reshape(-1).to(torch.int64)
        n = label.numel()
        if score.numel() != n:
            msg = f"PerCategoryMetrics: {score.numel()} scores for {n} labels"
            raise ValueError(msg)

        categories = _field(src, "category")
        if categories is None:
            categories = [self._default_category] * n
        elif isinstance(categories, str):
            categories = [categories] * n
        else:
            categories = [str(c) for c in categories]
        if len(categories) != n:
            msg = f"PerCategoryMetrics: {len(categories)} categories for {n} images"
            raise ValueError(msg)

        size = self.eval_size
        if size is None:  # keep the prediction's resolution
            reference = amap if amap is not None else mask
            size = tuple(reference.shape[-2:]) if reference is not None else None
        if amap is not None:
            amap = amap.reshape(n, *amap.shape[-2:]).float()
            if tuple(amap.shape[-2:]) != size:
                amap = F.interpolate(amap[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
            amap = amap.to("cpu", torch.float32, copy=True)
        if mask is not None:
            mask = torch.as_tensor(mask).detach()
            mask = mask.reshape(n, *mask.shape[-2:])
            if tuple(mask.shape[-2:]) != size:
                mask = F.interpolate(mask[:, None].float(), size=size, mode="nearest")[:, 0]
            mask = (mask > 0.5 if mask.dtype != torch.bool else mask).to("cpu", copy=True)

        paths = _field(src, "image_path")
        paths = [str(p) for p in paths] if isinstance(paths, (list, tuple)) and len(paths) == n else None
        return {"category": categories, "label": label, "score": score, "map": amap, "mask": mask, "path": paths}

    # -- reporting ---------------------------------------------------------------------
    def _gather(self, trainer: Trainer) -> list[dict[str, Any]]:
        """All ranks' records (and duplicates from the distributed sampler removed)."""
        if trainer.world_size <= 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return self._records
        gathered: list[list[dict[str, Any]] | None] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, self._records)
        return [record for rank_records in gathered for record in (rank_records or [])]

    @staticmethod
    def _flatten(records: list[dict[str, Any]], deduplicate: bool) -> dict[str, Any]:
        """Per-image lists from per-batch records, optionally dropping repeated image paths."""
        categories: list[str] = []
        labels: list[int] = []
        scores: list[float] = []
        maps: list[torch.Tensor | None] = []
        masks: list[torch.Tensor | None] = []
        paths: list[str | None] = []
        seen: set[str] = set()
        for record in records:
            for i in range(record["label"].numel()):
                path = record["path"][i] if record["path"] is not None else None
                if deduplicate and path is not None:
                    if path in seen:
                        continue
                    seen.add(path)
                categories.append(record["category"][i])
                labels.append(int(record["label"][i]))
                scores.append(float(record["score"][i]))
                maps.append(record["map"][i] if record["map"] is not None else None)
                masks.append(record["mask"][i] if record["mask"] is not None else None)
                paths.append(path)
        return {"categories": categories, "labels": labels, "scores": scores, "maps": maps, "masks": masks, "paths": paths}

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Compute the table; on rank 0 print it, save the CSV and log the means."""
        records = self._gather(trainer)
        # trainer.log_dir broadcasts in DDP, so every rank must evaluate it
        output_dir = self.output_dir or Path(trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero:
            return
        if not records:
            return
        data = self._flatten(records, deduplicate=trainer.world_size > 1)
        df = compute_per_category_metrics(
            data["categories"],
            data["labels"],
            np.asarray(data["scores"], dtype=np.float32),
            data["maps"],
            data["masks"],
        )
        self.results = df

        output_dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = output_dir / self.filename
        df.to_csv(self.csv_path, index=False)
        # the per-image predictions behind the table, with each image's category
        self.predictions_path = output_dir / PREDICTIONS_FILENAME
        pd.DataFrame(
            {
                "image_path": data["paths"],
                "category": data["categories"],
                "gt_label": data["labels"],
                "pred_score": data["scores"],
            },
        ).to_csv(self.predictions_path, index=False)

        if self.print_table:
            size = "x".join(map(str, self.eval_size)) if self.eval_size else "prediction resolution"
            print(  # noqa: T201
                f"\nPer-category metrics (%), {self.score_source or 'raw'} scores, pixel metrics at {size}, "
                f"AUPRO up to FPR {AUPRO_FPR_LIMIT}:\n{format_table(df)}\nSaved to {self.csv_path}\n"
                f"The mean row is logged as {LOGGED_MEAN_PREFIX}<metric> (the papers' number); anomalib's "
                "image_AUROC/pixel_AUROC, if also logged, pool all categories on normalised scores.\n",
            )

        if isinstance(pl_module, LightningModule) and getattr(pl_module, "_trainer", None) is not None:
            mean = df[df["category"] == MEAN_ROW].iloc[0]
            for column in METRIC_COLUMNS:
                value = float(mean[column])
                if not math.isnan(value):
                    pl_module.log(f"{LOGGED_MEAN_PREFIX}{column}", value, rank_zero_only=True)
