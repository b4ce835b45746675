"""anomalib_mcad: multi-class unsupervised anomaly detection models for anomalib 2.x.

Importing this package registers nothing in anomalib: ``anomalib.models.get_model`` keeps
returning anomalib's own models. Use the class paths (``anomalib_mcad.Dinomaly``) or
:func:`anomalib_mcad.get_model`.
"""

from anomalib_mcad.data import MultiClassDataModule, generate_synthetic_dataset
from anomalib_mcad.metrics import PerCategoryMetrics
from anomalib_mcad.models import Dinomaly, get_model, list_models

__version__ = "0.1.0"

__all__ = [
    "Dinomaly",
    "MultiClassDataModule",
    "PerCategoryMetrics",
    "__version__",
    "generate_synthetic_dataset",
    "get_model",
    "list_models",
]
