"""Multi-class data: the datamodule, category-carrying batches, and the offline synthetic dataset."""

from anomalib_mcad.data.dataclasses import CategoryImageBatch, CategoryImageItem
from anomalib_mcad.data.multiclass import DATASETS, DataSource, MultiClassDataModule, MultiClassDataset


def generate_synthetic_dataset(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    """Write the offline synthetic MVTec-layout dataset (see :mod:`anomalib_mcad.data.synthetic`)."""
    from anomalib_mcad.data.synthetic import generate_synthetic_dataset as generate  # noqa: PLC0415

    return generate(*args, **kwargs)


__all__ = [
    "DATASETS",
    "CategoryImageBatch",
    "CategoryImageItem",
    "DataSource",
    "MultiClassDataModule",
    "MultiClassDataset",
    "generate_synthetic_dataset",
]
