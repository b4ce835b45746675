"""anomalib_mcad: multi-class unsupervised anomaly detection models for anomalib 2.x.

Importing this package registers nothing in anomalib: ``anomalib.models.get_model`` keeps
returning anomalib's own models. Use the class paths (``anomalib_mcad.Dinomaly``) or
:func:`anomalib_mcad.get_model`. Public names are imported lazily so that
``import anomalib_mcad`` stays cheap and sub-packages can be used on their own.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "Dinomaly": "anomalib_mcad.models",
    "InpFormer": "anomalib_mcad.models",
    "MaskAd": "anomalib_mcad.models",
    "MintAd": "anomalib_mcad.models",
    "Pmad": "anomalib_mcad.models",
    "get_model": "anomalib_mcad.models",
    "list_models": "anomalib_mcad.models",
    "MultiClassDataModule": "anomalib_mcad.data",
    "generate_synthetic_dataset": "anomalib_mcad.data",
    "PerCategoryMetrics": "anomalib_mcad.metrics",
    # the errors a user is told to catch
    "CheckpointMismatchError": "anomalib_mcad.models.components.base",
    "PretrainedWeightsError": "anomalib_mcad.models.components.weights",
    "ImageReadError": "anomalib_mcad.data.multiclass",
    "DownloadBlockedError": "anomalib_mcad.compare.offline",
}

__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str) -> Any:  # noqa: ANN401
    """Import a public name on first use."""
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    msg = f"module 'anomalib_mcad' has no attribute {name!r}"
    raise AttributeError(msg)
