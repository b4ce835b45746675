"""The plugin's models, and lookup by name that leaves anomalib's own registry untouched.

anomalib's ``get_model`` imports only from its own whitelisted modules; we do not widen it.
:func:`get_model` here resolves our names (``"dinomaly"``, ``"Dinomaly"``, or a class path
``"anomalib_mcad.Dinomaly"``) to our classes only.
"""

from __future__ import annotations

import re
from typing import Any

from anomalib.models import AnomalibModule

from anomalib_mcad.models.image.dinomaly import Dinomaly
from anomalib_mcad.models.image.inp_former import InpFormer
from anomalib_mcad.models.image.mask_ad import MaskAd
from anomalib_mcad.models.image.mint_ad import MintAd
from anomalib_mcad.models.image.pmad import Pmad

_MODELS: dict[str, type[AnomalibModule]] = {
    "dinomaly": Dinomaly,
    "inp_former": InpFormer,
    "mask_ad": MaskAd,
    "mint_ad": MintAd,
    "pmad": Pmad,
}

__all__ = ["Dinomaly", "InpFormer", "MaskAd", "MintAd", "Pmad", "get_model", "list_models"]


def _normalise(name: str) -> str:
    """``"anomalib_mcad.Dinomaly"``, ``"Dinomaly"``, ``"dinomaly"`` -> ``"dinomaly"``; ``"InpFormer"`` -> ``"inp_former"``."""
    name = name.rsplit(".", 1)[-1]
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower().replace("-", "_")


def list_models() -> list[str]:
    """Names of the plugin's models, as accepted by :func:`get_model`."""
    return sorted(_MODELS)


def get_model(name: str, **kwargs: Any) -> AnomalibModule:  # noqa: ANN401
    """Instantiate one of the plugin's models by name with ``kwargs`` as its init arguments."""
    key = _normalise(name)
    if key not in _MODELS:
        msg = f"Unknown anomalib_mcad model '{name}'. Available: {list_models()}"
        raise ValueError(msg)
    return _MODELS[key](**kwargs)
