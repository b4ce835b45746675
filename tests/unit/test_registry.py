"""Model lookup: ours by name, anomalib's registry untouched."""

from __future__ import annotations

import pytest
from anomalib.models.components.feature_extractors import TimmFeatureExtractor

import anomalib_mcad
from anomalib_mcad import Dinomaly, get_model, list_models


def test_list_and_get() -> None:
    assert "dinomaly" in list_models()
    for name in ("dinomaly", "Dinomaly", "anomalib_mcad.Dinomaly"):
        model = get_model(name, encoder_name="vit_small_patch14_reg4_dinov2", pretrained=False)
        assert type(model) is Dinomaly
    with pytest.raises(ValueError, match=r"Available: \['dinomaly'"):
        get_model("patchcore")


def test_importing_the_plugin_leaves_anomalibs_get_model_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    import anomalib.models
    from anomalib.models.image.dinomaly import torch_model as builtin_torch_model

    def random_encoder(*args: object, **kwargs: object) -> TimmFeatureExtractor:
        kwargs["pre_trained"] = False  # anomalib's Dinomaly downloads its encoder; build it with random weights
        return TimmFeatureExtractor(*args, **kwargs)

    monkeypatch.setattr(builtin_torch_model, "TimmFeatureExtractor", random_encoder)
    assert anomalib_mcad.Dinomaly is Dinomaly
    builtin = anomalib.models.get_model("dinomaly", encoder_name="vit_small_patch14_reg4_dinov2")
    assert type(builtin) is anomalib.models.Dinomaly
    assert type(builtin) is not Dinomaly


def test_unknown_public_name() -> None:
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        anomalib_mcad.Nope  # noqa: B018


def test_errors_users_catch_are_importable_from_the_package() -> None:
    from anomalib_mcad import CheckpointMismatchError, DownloadBlockedError, ImageReadError, PretrainedWeightsError
    from anomalib_mcad.models.components.base import CheckpointMismatchError as defined_in_base

    assert CheckpointMismatchError is defined_in_base
    assert issubclass(CheckpointMismatchError, ValueError) and issubclass(PretrainedWeightsError, RuntimeError)
    assert issubclass(ImageReadError, OSError) and issubclass(DownloadBlockedError, RuntimeError)
    assert set(anomalib_mcad.__all__) >= {"CheckpointMismatchError", "PretrainedWeightsError", "ImageReadError", "DownloadBlockedError"}
