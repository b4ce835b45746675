"""Dinomaly: reconstruction of frozen DINOv2 features with a noisy bottleneck and linear attention."""

from anomalib_mcad.models.image.dinomaly.lightning_model import Dinomaly
from anomalib_mcad.models.image.dinomaly.torch_model import DinomalyModel

__all__ = ["Dinomaly", "DinomalyModel"]
