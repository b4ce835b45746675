"""The models' shared pre-processing: resize, optional centre crop, ImageNet normalisation.

All five papers feed ImageNet-normalised images to ImageNet-pretrained encoders; Dinomaly and
INP-Former also centre-crop (448 -> 392). One builder keeps the transform, and the statistics,
in one place; the statistics are timm's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from anomalib.pre_processing import PreProcessor
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms.v2 import CenterCrop, Compose, Normalize, Resize

IMAGENET_MEAN: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
IMAGENET_STD: tuple[float, float, float] = IMAGENET_DEFAULT_STD


def resize_crop_normalize(image_size: int | Sequence[int], crop_size: int | None = None) -> PreProcessor:
    """Resize to ``image_size`` (an int: square), centre-crop to ``crop_size`` if given, ImageNet-normalise.

    Raises:
        ValueError: if the crop is larger than the resized image.
    """
    size = (image_size, image_size) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
    if crop_size is not None and crop_size > min(size):
        msg = f"crop_size ({crop_size}) cannot exceed image_size ({min(size)})"
        raise ValueError(msg)
    steps: list[Any] = [Resize(size, antialias=True)]
    if crop_size is not None and (crop_size, crop_size) != size:
        steps.append(CenterCrop(crop_size))
    steps.append(Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD))
    return PreProcessor(transform=Compose(steps))
