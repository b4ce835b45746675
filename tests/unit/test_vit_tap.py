"""The frozen DINOv2 feature tap: truncation, position embeddings, and weight loading."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
from torch.nn import functional as F  # noqa: N812

from anomalib_mcad.models.components import weights as weights_module
from anomalib_mcad.models.components.vit import ViTFeatureTap
from anomalib_mcad.models.components.weights import PretrainedWeightsError

NAME = "vit_small_patch14_reg4_dinov2"


@pytest.fixture(scope="module")
def timm_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(NAME, pretrained=False, img_size=518, dynamic_img_size=True, num_classes=0).eval()


def dinov2_format_state_dict(vit: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict as DINOv2's own code saves it (cls position inside pos_embed, register_tokens, mask_token)."""
    state = {k: v.clone() for k, v in vit.state_dict().items()}
    cls_pos = torch.randn(1, 1, state["pos_embed"].shape[-1]) * 0.02
    state["pos_embed"] = torch.cat([cls_pos, state.pop("pos_embed")], dim=1)
    state["cls_token"] = state["cls_token"] - cls_pos
    state["register_tokens"] = state.pop("reg_token")
    state["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    return state


def test_runs_only_needed_blocks_and_matches_timm_at_pretrain_size(timm_vit: torch.nn.Module) -> None:
    tap = ViTFeatureTap(NAME, layers=[1, 3], pretrained=False)
    tap.load_state_dict({k: v for k, v in timm_vit.state_dict().items() if k in tap.state_dict()})
    assert len(tap.blocks) == 4
    x = torch.randn(1, 3, 518, 518)
    ours = tap(x)
    with torch.no_grad():
        reference = timm_vit.forward_intermediates(x, indices=[1, 3], return_prefix_tokens=True, norm=False, output_fmt="NLC", intermediates_only=True)
    for mine, (patches, prefix) in zip(ours, reference, strict=True):
        torch.testing.assert_close(mine, torch.cat([prefix, patches], dim=1), atol=1e-5, rtol=1e-5)


def dinov2_interpolation(pos: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
    """DINOv2's formula for an image of grid_h x grid_w patches, written independently."""
    side = int(math.sqrt(pos.shape[1]))
    image = pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    out = F.interpolate(image, scale_factor=((grid_h + 0.1) / side, (grid_w + 0.1) / side), mode="bicubic", antialias=False)
    assert out.shape[-2:] == (grid_h, grid_w)
    return out.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)


@pytest.mark.parametrize(("grid_h", "grid_w"), [(28, 28), (16, 24)])
def test_dinov2_position_interpolation(grid_h: int, grid_w: int) -> None:
    tap = ViTFeatureTap(NAME, layers=[0], pretrained=False)
    ours = tap.interpolated_pos_embed(grid_h, grid_w)
    torch.testing.assert_close(ours, dinov2_interpolation(tap.pos_embed, grid_h, grid_w))
    timm_way = ViTFeatureTap(NAME, layers=[0], pretrained=False, pos_embed_interpolation="timm")
    timm_way.load_state_dict(tap.state_dict())
    assert (timm_way.interpolated_pos_embed(grid_h, grid_w) - ours).abs().max() > 1e-4  # the conventions really differ


def test_loads_dinov2_format_file(tmp_path: Path, timm_vit: torch.nn.Module) -> None:
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    state = dinov2_format_state_dict(timm_vit)
    torch.save(state, path)
    tap = ViTFeatureTap(NAME, layers=[0, 2], pretrained=path)
    # the class token carries its position embedding after conversion, as in timm's own DINOv2 weights
    torch.testing.assert_close(tap.cls_token, state["cls_token"] + state["pos_embed"][:, :1])
    torch.testing.assert_close(tap.reg_token, state["register_tokens"])
    torch.testing.assert_close(tap.blocks[2].mlp.fc1.weight, timm_vit.blocks[2].mlp.fc1.weight)
    assert not any(p.requires_grad for p in tap.parameters())


def test_loads_timm_format_file(tmp_path: Path, timm_vit: torch.nn.Module) -> None:
    path = tmp_path / "timm.pth"
    torch.save({"state_dict": timm_vit.state_dict()}, path)
    tap = ViTFeatureTap(NAME, layers=[0], pretrained=path)
    torch.testing.assert_close(tap.pos_embed, timm_vit.pos_embed)


def test_wrong_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(PretrainedWeightsError, match="do not fit"):
        ViTFeatureTap(NAME, layers=[0], pretrained=path)
    with pytest.raises(PretrainedWeightsError, match="not found"):
        ViTFeatureTap(NAME, layers=[0], pretrained=tmp_path / "missing.pth")


def test_failed_download_says_how_to_pass_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    real_create = timm.create_model

    def offline_create(name: str, pretrained: bool = False, **kwargs: object) -> torch.nn.Module:
        if pretrained:
            raise OSError("no network")  # what the hub client raises offline, without trying the network
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", offline_create)
    with pytest.raises(PretrainedWeightsError, match="pretrained='/path/to/weights.pth'"):
        weights_module.create_timm_model(NAME, True)


def test_bad_layer_lists() -> None:
    with pytest.raises(ValueError, match="out of range"):
        ViTFeatureTap(NAME, layers=[3, 12], pretrained=False)
    with pytest.raises(ValueError, match="increasing"):
        ViTFeatureTap(NAME, layers=[4, 2], pretrained=False)
    with pytest.raises(ValueError, match="Supported"):
        ViTFeatureTap("vit_tiny", layers=[0], pretrained=False)
