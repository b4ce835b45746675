"""MINT-AD: class-aware unified feature reconstruction with an implicit-neural-representation query."""

from anomalib_mcad.models.image.mint_ad.lightning_model import MintAd
from anomalib_mcad.models.image.mint_ad.torch_model import MintAdModel

__all__ = ["MintAd", "MintAdModel"]
