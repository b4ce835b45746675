"""Item and batch types that carry each image's category.

anomalib's :class:`~anomalib.data.ImageItem` has no category field. Multi-class models
(MINT-AD trains with class labels) and per-category metrics need one, so the multi-class
datamodule yields these subclasses. They add two fields and behave like their parents
everywhere else (collation, iteration, ``update``, visualisation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from anomalib.data.dataclasses.numpy.image import NumpyImageBatch, NumpyImageItem
from anomalib.data.dataclasses.torch.image import ImageBatch, ImageItem


@dataclass
class NumpyCategoryImageItem(NumpyImageItem):
    """Numpy image item with its category name and index."""

    category: str | None = None
    category_index: int | None = None


@dataclass
class NumpyCategoryImageBatch(NumpyImageBatch):
    """Numpy image batch with per-item category names and indices."""

    item_class = NumpyCategoryImageItem
    category: list[str] | None = None
    category_index: np.ndarray | None = None


@dataclass
class CategoryImageItem(ImageItem):
    """Image item with its category name (``"bottle"``) and index in the datamodule's category list."""

    numpy_class: ClassVar = NumpyCategoryImageItem
    category: str | None = None
    category_index: torch.Tensor | None = None


@dataclass
class CategoryImageBatch(ImageBatch):
    """Image batch whose ``category`` (list of names) and ``category_index`` (``(B,)`` long) follow the images."""

    item_class = CategoryImageItem
    numpy_class: ClassVar = NumpyCategoryImageBatch
    category: list[str] | None = None
    category_index: torch.Tensor | None = None
