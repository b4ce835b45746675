"""PMAD: proposal-masked anomaly detection (BEiT-style token prediction at ProtoFlow-proposed patches)."""

from anomalib_mcad.models.image.pmad.lightning_model import Pmad
from anomalib_mcad.models.image.pmad.torch_model import MaskedImageModel, PmadModel
from anomalib_mcad.models.image.pmad.tokenizer import DalleTokenizer, VqViTTokenizer

__all__ = ["DalleTokenizer", "MaskedImageModel", "Pmad", "PmadModel", "VqViTTokenizer"]
