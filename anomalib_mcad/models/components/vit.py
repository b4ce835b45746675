"""A frozen DINOv2 ViT that returns the tokens of chosen blocks, running no block after the last one.

Built on timm's ``vit_{small,base,large}_patch14_reg4_dinov2`` definitions. Two things differ
from calling timm's model directly:

* Only the blocks up to the last tapped one are kept and run (Dinomaly taps blocks 2..9 of
  12, so blocks 10 and 11 are dead weight at train and test time).
* Position embeddings are resized the way DINOv2's own code does (bicubic with a
  ``scale_factor`` of ``(grid + 0.1) / 37``, no antialias), which the Dinomaly and INP-Former
  authors' results rely on. anomalib's built-ins resize with timm to the exact grid (bicubic,
  antialias switched off by anomalib's feature extractor), a measurable difference at
  392x392; ``pos_embed_interpolation="timm"`` selects that way, for parity checks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_mcad.models.components.weights import DeferredHubWeights, PretrainedArg, create_timm_model

#: Supported encoders: embedding width, heads and depth of each, and the blocks Dinomaly taps.
DINOV2_ARCHITECTURES: dict[str, dict[str, int | tuple[int, ...]]] = {
    "vit_small_patch14_reg4_dinov2": {"embed_dim": 384, "num_heads": 6, "depth": 12, "dinomaly_layers": tuple(range(2, 10))},
    "vit_base_patch14_reg4_dinov2": {"embed_dim": 768, "num_heads": 12, "depth": 12, "dinomaly_layers": tuple(range(2, 10))},
    "vit_large_patch14_reg4_dinov2": {"embed_dim": 1024, "num_heads": 16, "depth": 24, "dinomaly_layers": tuple(range(4, 19, 2))},
    "vit_small_patch14_dinov2": {"embed_dim": 384, "num_heads": 6, "depth": 12, "dinomaly_layers": tuple(range(2, 10))},
    "vit_base_patch14_dinov2": {"embed_dim": 768, "num_heads": 12, "depth": 12, "dinomaly_layers": tuple(range(2, 10))},
    "vit_large_patch14_dinov2": {"embed_dim": 1024, "num_heads": 16, "depth": 24, "dinomaly_layers": tuple(range(4, 19, 2))},
}

PosEmbedInterpolation = Literal["dinov2", "timm"]


def architecture(name: str) -> dict[str, int | tuple[int, ...]]:
    """Look up an encoder's shape; the error lists what is supported."""
    if name not in DINOV2_ARCHITECTURES:
        msg = f"Unknown encoder '{name}'. Supported: {sorted(DINOV2_ARCHITECTURES)}"
        raise ValueError(msg)
    return DINOV2_ARCHITECTURES[name]


class ViTFeatureTap(DeferredHubWeights):
    """Frozen DINOv2 encoder returning the full token sequence after each tapped block.

    Args:
        model_name: timm name of a DINOv2 ViT (see :data:`DINOV2_ARCHITECTURES`).
        layers: 0-based indices of the blocks whose outputs are returned, in order.
        pretrained: ``True`` (timm download, on first use: :class:`DeferredHubWeights`), ``False``
            (random) or a local weights file in DINOv2's own format (``dinov2_vitb14_reg4_pretrain.pth``) or timm's.
        pos_embed_interpolation: ``"dinov2"`` (authors' convention, default) or ``"timm"``.

    Output tokens are ordered ``[cls, registers..., patches...]``; ``num_prefix_tokens`` says
    how many come before the patches.
    """

    def __init__(
        self,
        model_name: str = "vit_base_patch14_reg4_dinov2",
        layers: Sequence[int] = tuple(range(2, 10)),
        pretrained: PretrainedArg = True,
        pos_embed_interpolation: PosEmbedInterpolation = "dinov2",
    ) -> None:
        super().__init__()
        arch = architecture(model_name)
        self.layers = [int(i) for i in layers]
        if not self.layers or sorted(set(self.layers)) != self.layers:
            msg = f"layers must be a non-empty increasing list of block indices, got {list(layers)}"
            raise ValueError(msg)
        if self.layers[0] < 0 or self.layers[-1] >= int(arch["depth"]):
            msg = f"layers {self.layers} out of range for {model_name} with {arch['depth']} blocks"
            raise ValueError(msg)
        if pos_embed_interpolation not in ("dinov2", "timm"):
            msg = f"pos_embed_interpolation must be 'dinov2' or 'timm', got {pos_embed_interpolation!r}"
            raise ValueError(msg)
        self.pos_embed_interpolation = pos_embed_interpolation
        vit_kwargs: dict[str, object] = {"img_size": 518, "dynamic_img_size": True, "num_classes": 0}
        vit = create_timm_model(model_name, False if pretrained is True else pretrained, **vit_kwargs)
        if pretrained is True:
            self.defer_hub_weights(model_name, **vit_kwargs)
        self.patch_embed = vit.patch_embed
        self.cls_token = vit.cls_token
        self.reg_token = vit.reg_token
        self.pos_embed = vit.pos_embed
        self.norm_pre = vit.norm_pre
        self.blocks = nn.ModuleList(vit.blocks[: self.layers[-1] + 1])
        self.embed_dim = int(arch["embed_dim"])
        self.num_heads = int(arch["num_heads"])
        self.patch_size = int(self.patch_embed.patch_size[0])
        self.pretrain_grid = tuple(int(g) for g in self.patch_embed.grid_size)
        self.num_prefix_tokens = 1 + (0 if self.reg_token is None else self.reg_token.shape[1])
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> ViTFeatureTap:  # noqa: ARG002
        """Stay in eval mode: the encoder is frozen."""
        return super().train(False)

    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """Number of patch rows and columns for an input of ``height`` x ``width`` pixels."""
        return height // self.patch_size, width // self.patch_size

    def interpolated_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """Patch position embeddings (1, grid_h * grid_w, C) for a grid of the given size."""
        pos = self.pos_embed
        if (grid_h, grid_w) == self.pretrain_grid:
            return pos
        if self.pos_embed_interpolation == "timm":
            # exact grid without antialias: what anomalib 2.7's TimmFeatureExtractor makes timm do
            return resample_abs_pos_embed(
                pos,
                new_size=(grid_h, grid_w),
                old_size=self.pretrain_grid,
                num_prefix_tokens=0,
                antialias=False,
            )
        side = math.isqrt(pos.shape[1])
        grid = pos.float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(
            grid,
            scale_factor=((grid_h + 0.1) / side, (grid_w + 0.1) / side),
            mode="bicubic",
            antialias=False,
        )
        return grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1).to(pos.dtype)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Embed images (B, 3, H, W) into the token sequence fed to the first block."""
        patches = self.patch_embed(images)  # (B, h, w, C) with dynamic_img_size
        b, h, w, c = patches.shape
        patches = patches.reshape(b, h * w, c) + self.interpolated_pos_embed(h, w)
        prefix = [self.cls_token.expand(b, -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(b, -1, -1))
        return self.norm_pre(torch.cat([*prefix, patches], dim=1))

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Return the tokens (B, prefix + h*w, C) after each tapped block."""
        x = self.tokens(images)
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self.layers:
                outputs.append(x)
        return outputs
