"""``pretrained=True`` downloads on first use, never when a checkpoint supplies the weights (issue 17, item 3).

timm's hub is replaced by a fake: ``create_model(pretrained=True)`` either returns a model whose
every tensor is a known constant ("the hub weights") or fails as offline.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning
import pytest
import timm
import torch

from anomalib_mcad import Dinomaly, PretrainedWeightsError
from anomalib_mcad.models.components.cnn import CNNFeatureTap
from anomalib_mcad.models.components.vit import ViTFeatureTap
from anomalib_mcad.models.components.weights import fetch_hub_weights

VIT = "vit_small_patch14_reg4_dinov2"
HUB_VALUE = 0.25


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Callable[[bool], list[str]]:
    """Install a fake hub; ``fake_hub(online)`` returns the list of names it was asked to download."""

    def install(online: bool) -> list[str]:
        downloads: list[str] = []
        real_create = timm.create_model

        def create(name: str, pretrained: bool = False, **kwargs: object) -> torch.nn.Module:
            model = real_create(name, pretrained=False, **kwargs)
            if not pretrained:
                return model
            downloads.append(name)
            if not online:
                raise OSError("no network")
            with torch.no_grad():
                for tensor in model.state_dict().values():
                    if tensor.is_floating_point():
                        tensor.fill_(HUB_VALUE)
            return model

        monkeypatch.setattr(timm, "create_model", create)
        return downloads

    return install


def test_vit_tap_downloads_on_first_forward_once(fake_hub: Callable[[bool], list[str]]) -> None:
    downloads = fake_hub(True)
    tap = ViTFeatureTap(VIT, layers=[0, 1], pretrained=True)
    assert downloads == [] and tap.hub_weights_pending
    assert not torch.all(tap.cls_token == HUB_VALUE)  # random until first use
    tap(torch.randn(1, 3, 28, 28))
    assert downloads == [VIT] and not tap.hub_weights_pending
    assert all(torch.all(t == HUB_VALUE) for t in tap.state_dict().values() if t.is_floating_point())
    tap(torch.randn(1, 3, 28, 28))
    assert downloads == [VIT]


def test_loaded_state_dict_replaces_the_download(fake_hub: Callable[[bool], list[str]]) -> None:
    """A checkpoint's weights settle the tap: no download, offline or not, and the checkpoint's weights stay."""
    downloads = fake_hub(False)
    saved = CNNFeatureTap("efficientnet_lite0", (0, 1), pretrained=False).state_dict()
    tap = CNNFeatureTap("efficientnet_lite0", (0, 1), pretrained=True)
    assert tap.hub_weights_pending
    tap.load_state_dict(saved)
    assert not tap.hub_weights_pending
    tap(torch.randn(1, 3, 32, 32))
    assert downloads == []
    torch.testing.assert_close(tap.conv_stem.weight, saved["conv_stem.weight"])


def test_offline_first_use_names_the_fix(fake_hub: Callable[[bool], list[str]]) -> None:
    fake_hub(False)
    tap = ViTFeatureTap(VIT, layers=[0], pretrained=True)  # building needs no network
    with pytest.raises(PretrainedWeightsError, match="pretrained='/path/to/weights.pth'"):
        tap(torch.randn(1, 3, 28, 28))
    with pytest.raises(PretrainedWeightsError):
        fetch_hub_weights(torch.nn.Sequential(tap))


def test_dinomaly_checkpoint_loads_and_scores_offline(
    fake_hub: Callable[[bool], list[str]],
    tiny_dinomaly_kwargs: dict,
    tmp_path: Path,
) -> None:
    """``load_from_checkpoint`` of a model trained with ``pretrained=True`` (what ``anomalib export`` does)."""
    trained = Dinomaly(**tiny_dinomaly_kwargs)
    trained.hparams["pretrained"] = True  # as if trained from the hub weights
    path = tmp_path / "model.ckpt"
    checkpoint = {"state_dict": trained.state_dict(), "hyper_parameters": dict(trained.hparams), "pytorch-lightning_version": lightning.__version__}
    torch.save(checkpoint, path)
    downloads = fake_hub(False)
    loaded = Dinomaly.load_from_checkpoint(path, weights_only=False).eval()
    assert loaded.hparams.pretrained is True
    with torch.no_grad():
        scores = loaded.model(torch.randn(2, 3, 56, 56)).pred_score
    assert downloads == [] and torch.isfinite(scores).all()
    torch.testing.assert_close(loaded.model.encoder.cls_token, trained.model.encoder.cls_token)
