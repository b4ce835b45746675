"""INP-Former: reconstruction of frozen DINOv2 features from intrinsic normal prototypes."""

from anomalib_mcad.models.image.inp_former.lightning_model import InpFormer
from anomalib_mcad.models.image.inp_former.torch_model import InpFormerModel

__all__ = ["InpFormer", "InpFormerModel"]
