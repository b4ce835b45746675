"""MaskAD: parallel masked feature reconstruction with an optimal-transport association discrepancy."""

from anomalib_mcad.models.image.mask_ad.lightning_model import MaskAd
from anomalib_mcad.models.image.mask_ad.torch_model import MaskAdModel

__all__ = ["MaskAd", "MaskAdModel"]
