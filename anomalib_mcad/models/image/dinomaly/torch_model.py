"""Dinomaly torch model: frozen DINOv2 encoder, noisy bottleneck, linear-attention decoder."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from anomalib.data import InferenceBatch
from torch import nn

from anomalib_mcad.models.components.anomaly_map import SmoothedTopKScorer, cosine_distance_map
from anomalib_mcad.models.components.layers import NoisyBottleneck, init_reconstruction_weights, linear_attention_block
from anomalib_mcad.models.components.validation import check_images
from anomalib_mcad.models.components.vit import PosEmbedInterpolation, ViTFeatureTap, architecture
from anomalib_mcad.models.components.weights import PretrainedArg

DEFAULT_GROUPS: tuple[tuple[int, ...], ...] = ((0, 1, 2, 3), (4, 5, 6, 7))


class DinomalyModel(nn.Module):
    """Reconstruct the middle blocks of a frozen DINOv2 encoder; anomalies reconstruct badly.

    Args:
        encoder_name: timm DINOv2 name (ViT-S/B/L with registers by default B).
        pretrained: ``True``, ``False`` or a local weights file (DINOv2 or timm format).
        target_layers: encoder blocks fed to the bottleneck; default the paper's (2..9 for
            S/B, 4,6,...,18 for L).
        groups: loose constraint; indices into ``target_layers`` (encoder) and into the
            decoder blocks, summed per group. Default: two groups of four.
        bottleneck_dropout: dropout of the noisy bottleneck (0.2; 0.4 for Real-IAD).
        decoder_depth: number of linear-attention decoder blocks (8).
        mlp_bias: biases in bottleneck and decoder MLPs (the authors' have them; anomalib's
            built-in does not).
        pos_embed_interpolation, eval_size, blur_padding, top_k_ratio, output_map: see
            :class:`ViTFeatureTap` and :class:`SmoothedTopKScorer`.
    """

    def __init__(
        self,
        encoder_name: str = "vit_base_patch14_reg4_dinov2",
        pretrained: PretrainedArg = True,
        target_layers: Sequence[int] | None = None,
        groups: Sequence[Sequence[int]] = DEFAULT_GROUPS,
        bottleneck_dropout: float = 0.2,
        decoder_depth: int = 8,
        mlp_bias: bool = True,
        pos_embed_interpolation: PosEmbedInterpolation = "dinov2",
        eval_size: int | None = 256,
        blur_padding: Literal["zeros", "reflect"] = "zeros",
        top_k_ratio: float = 0.01,
        output_map: Literal["smoothed", "raw"] = "smoothed",
    ) -> None:
        super().__init__()
        arch = architecture(encoder_name)
        layers = list(target_layers) if target_layers is not None else list(arch["dinomaly_layers"])
        self.groups = [list(g) for g in groups]
        used = sorted({i for g in self.groups for i in g})
        if not self.groups or used[0] < 0 or used[-1] >= len(layers) or used[-1] >= decoder_depth:
            msg = (
                f"groups {self.groups} must index the {len(layers)} target layers and the "
                f"{decoder_depth} decoder blocks"
            )
            raise ValueError(msg)
        if decoder_depth < 1:
            msg = f"decoder_depth must be >= 1, got {decoder_depth}"
            raise ValueError(msg)
        self.encoder = ViTFeatureTap(encoder_name, layers, pretrained, pos_embed_interpolation)
        dim, heads = self.encoder.embed_dim, self.encoder.num_heads
        self.bottleneck = NoisyBottleneck(dim, dim * 4, dropout=bottleneck_dropout, bias=mlp_bias)
        self.decoder = nn.ModuleList(linear_attention_block(dim, heads, mlp_bias=mlp_bias) for _ in range(decoder_depth))
        init_reconstruction_weights(self.bottleneck)
        init_reconstruction_weights(self.decoder)
        self.scorer = SmoothedTopKScorer(
            eval_size=eval_size,
            padding=blur_padding,
            top_k_ratio=top_k_ratio,
            output=output_map,
        )

    def features(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Encoder and decoder maps per group, each (B, C, h, w)."""
        check_images(images, min_size=2 * self.encoder.patch_size, what="Dinomaly", multiple=self.encoder.patch_size)
        h, w = self.encoder.patch_grid(*images.shape[-2:])
        encoded = self.encoder(images)
        x = self.bottleneck(torch.stack(encoded, dim=1).mean(dim=1))
        decoded = []
        for block in self.decoder:
            x = block(x)
            decoded.append(x)
        decoded.reverse()  # decoder block i reconstructs target layer i counted from the deepest
        prefix = self.encoder.num_prefix_tokens

        def fuse(tokens: list[torch.Tensor], group: list[int]) -> torch.Tensor:
            fused = torch.stack([tokens[i] for i in group], dim=1).mean(dim=1)[:, prefix:]
            return fused.transpose(1, 2).reshape(fused.shape[0], -1, h, w)

        return [fuse(encoded, g) for g in self.groups], [fuse(decoded, g) for g in self.groups]

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]] | InferenceBatch:
        """Training: the (encoder, decoder) group maps for the loss. Eval: scores and anomaly maps."""
        encoder, decoder = self.features(images)
        if self.training:
            return encoder, decoder
        score, anomaly_map = self.scorer(cosine_distance_map(encoder, decoder, tuple(images.shape[-2:])))
        return InferenceBatch(pred_score=score, anomaly_map=anomaly_map)
