"""Evaluation of multi-class anomaly detection: the seven per-category metrics of the papers.

Image AUROC / AP / F1-max and pixel AUROC / AP / F1-max / AUPRO (FPR limit 0.3), per category
and as an unweighted mean over categories. See :mod:`anomalib_mcad.metrics.per_category`.
"""

from .per_category import (
    AUPRO_FPR_LIMIT,
    COLUMNS,
    METRIC_COLUMNS,
    PerCategoryMetrics,
    aupro,
    auroc,
    average_precision,
    binary_ranking_metrics,
    compute_per_category_metrics,
    f1_max,
    format_table,
)

__all__ = [
    "AUPRO_FPR_LIMIT",
    "COLUMNS",
    "METRIC_COLUMNS",
    "PerCategoryMetrics",
    "aupro",
    "auroc",
    "average_precision",
    "binary_ranking_metrics",
    "compute_per_category_metrics",
    "f1_max",
    "format_table",
]
