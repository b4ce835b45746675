"""INP-Former torch model: frozen DINOv2 encoder, INP extractor, bottleneck, INP-guided decoder."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
from anomalib.data import InferenceBatch
from timm.layers import Mlp
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_mcad.models.components.anomaly_map import SmoothedTopKScorer, cosine_distance_map
from anomalib_mcad.models.components.layers import NoisyBottleneck, init_reconstruction_weights
from anomalib_mcad.models.components.validation import check_images
from anomalib_mcad.models.components.vit import PosEmbedInterpolation, ViTFeatureTap, architecture
from anomalib_mcad.models.components.weights import PretrainedArg

#: Two groups of four tapped blocks (0-based indices into the 8 target layers): ViT-B blocks 3-6 and 7-10 (1-based).
DEFAULT_GROUPS: tuple[tuple[int, ...], ...] = ((0, 1, 2, 3), (4, 5, 6, 7))
LAYER_NORM_EPS = 1e-8  # the authors' LayerNorm eps in the extractor and decoder


class PrototypeCrossAttention(nn.Module):
    """Softmax cross-attention of prototype queries (B, M, C) over image tokens (B, N, C)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            msg = f"dim ({dim}) must be divisible by num_heads ({num_heads})"
            raise ValueError(msg)
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Aggregate ``tokens`` into one vector per query."""
        b, m, c = queries.shape
        n = tokens.shape[1]
        h = self.num_heads
        q = self.q(queries).reshape(b, m, h, c // h).transpose(1, 2)
        k, v = self.kv(tokens).reshape(b, n, 2, h, c // h).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, m, c))


class INPExtractor(nn.Module):
    """Pull ``num_prototypes`` intrinsic normal prototypes (INPs) out of each image.

    Learnable prototype tokens attend over the image's fused encoder tokens (pre-norm
    cross-attention, then an MLP, both residual). The same LayerNorm normalises queries and
    keys, as in the authors' block.
    """

    def __init__(self, dim: int, num_heads: int, num_prototypes: int = 6, mlp_ratio: float = 4.0, mlp_bias: bool = True) -> None:
        super().__init__()
        if num_prototypes < 1:
            msg = f"num_prototypes must be >= 1, got {num_prototypes}"
            raise ValueError(msg)
        self.prototype_tokens = nn.Parameter(torch.randn(num_prototypes, dim))
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = PrototypeCrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, bias=mlp_bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """INPs (B, M, C) of the images whose patch tokens (B, N, C) are given."""
        x = self.prototype_tokens.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        x = x + self.attn(self.norm1(x), self.norm1(tokens))
        return x + self.mlp(self.norm2(x))


class PrototypeGuidedAttention(nn.Module):
    """Patch queries attend to the INPs with ReLU-ed, learnably scaled cosine similarities.

    No softmax and no residual path around it (in :class:`INPGuidedBlock`): a patch can only be
    rebuilt from the INPs, so anomalous patches, which no normal prototype explains, are
    reconstructed poorly.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            msg = f"dim ({dim}) must be divisible by num_heads ({num_heads})"
            raise ValueError(msg)
        self.num_heads = num_heads
        self.learn_scale = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, C) rebuilt from prototypes (B, M, C)."""
        b, n, c = x.shape
        m = prototypes.shape[1]
        h = self.num_heads
        q = F.normalize(self.q(x).reshape(b, n, h, c // h).transpose(1, 2), dim=-1)
        k, v = self.kv(prototypes).reshape(b, m, 2, h, c // h).permute(2, 0, 3, 1, 4)
        attn = F.relu((q @ F.normalize(k, dim=-1).transpose(-2, -1)) * self.learn_scale)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class INPGuidedBlock(nn.Module):
    """One decoder block: prototype-guided attention (no residual), then a residual MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, mlp_bias: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.attn = PrototypeGuidedAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, bias=mlp_bias)

    def forward(self, x: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """Reconstruct tokens (B, N, C) from the INPs (B, M, C)."""
        x = self.attn(self.norm1(x), self.norm1(prototypes))
        return x + self.mlp(self.norm2(x))


def prototype_distance(tokens: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Cosine distance (B, N) of each token to its nearest prototype."""
    sim = F.normalize(tokens, dim=-1) @ F.normalize(prototypes, dim=-1).transpose(1, 2)
    return 1 - sim.amax(dim=-1)


class InpFormerFeatures(NamedTuple):
    """Training outputs: encoder and decoder maps per group (B, C, h, w) and the INP distance (B, N)."""

    encoder: list[torch.Tensor]
    decoder: list[torch.Tensor]
    inp_distance: torch.Tensor


class InpFormerModel(nn.Module):
    """Reconstruct frozen DINOv2 features from a few prototypes extracted from the same image.

    Args:
        encoder_name: timm DINOv2 name (ViT-S/B/L with registers; default B).
        pretrained: ``True``, ``False`` or a local weights file (DINOv2 or timm format).
        target_layers: encoder blocks (0-based) fused into the bottleneck input and
            reconstructed; default 2..9 for S/B, 4,6,...,18 for L (the authors').
        groups: indices into ``target_layers`` (encoder) and into the decoder outputs counted
            from the deepest, averaged per group; default two groups of four.
        num_prototypes: number of INPs (6).
        decoder_depth: INP-guided decoder blocks (8).
        bottleneck_dropout: dropout of the MLP bottleneck (0.0 in the authors' scripts).
        mlp_bias: biases in the extractor's and decoder's MLPs (authors: yes; anomalib's
            built-in: no).
        pos_embed_interpolation: ``"dinov2"`` (authors) or ``"timm"`` (anomalib's built-in).
        eval_size, blur_padding, top_k_ratio, output_map: see :class:`SmoothedTopKScorer`.
        zero_shot: score by each patch's distance to its nearest INP of the same image
            (appendix K) instead of by reconstruction.
    """

    def __init__(
        self,
        encoder_name: str = "vit_base_patch14_reg4_dinov2",
        pretrained: PretrainedArg = True,
        target_layers: Sequence[int] | None = None,
        groups: Sequence[Sequence[int]] = DEFAULT_GROUPS,
        num_prototypes: int = 6,
        decoder_depth: int = 8,
        bottleneck_dropout: float = 0.0,
        mlp_bias: bool = True,
        pos_embed_interpolation: PosEmbedInterpolation = "dinov2",
        eval_size: int | None = 256,
        blur_padding: Literal["zeros", "reflect"] = "zeros",
        top_k_ratio: float = 0.01,
        output_map: Literal["smoothed", "raw"] = "smoothed",
        zero_shot: bool = False,
    ) -> None:
        super().__init__()
        arch = architecture(encoder_name)
        layers = list(target_layers) if target_layers is not None else list(arch["dinomaly_layers"])
        if decoder_depth < 1:
            msg = f"decoder_depth must be >= 1, got {decoder_depth}"
            raise ValueError(msg)
        self.groups = [list(g) for g in groups]
        used = sorted({i for g in self.groups for i in g})
        if not self.groups or not all(self.groups) or used[0] < 0 or used[-1] >= len(layers) or used[-1] >= decoder_depth:
            msg = f"groups {self.groups} must index the {len(layers)} target layers and the {decoder_depth} decoder blocks"
            raise ValueError(msg)
        if num_prototypes < 1:
            msg = f"num_prototypes must be >= 1, got {num_prototypes}"
            raise ValueError(msg)
        self.scorer = SmoothedTopKScorer(eval_size=eval_size, padding=blur_padding, top_k_ratio=top_k_ratio, output=output_map)
        self.encoder = ViTFeatureTap(encoder_name, layers, pretrained, pos_embed_interpolation)
        dim, heads = self.encoder.embed_dim, self.encoder.num_heads
        self.extractor = INPExtractor(dim, heads, num_prototypes, mlp_bias=mlp_bias)
        self.bottleneck = NoisyBottleneck(dim, dim * 4, dropout=bottleneck_dropout, bias=True)
        self.decoder = nn.ModuleList(INPGuidedBlock(dim, heads, mlp_bias=mlp_bias) for _ in range(decoder_depth))
        for module in (self.extractor, self.bottleneck, self.decoder):
            init_reconstruction_weights(module)  # prototype tokens keep their N(0, 1) start, as the authors'
        self.zero_shot = zero_shot

    def features(self, images: torch.Tensor) -> InpFormerFeatures:
        """Encoder and decoder group maps (B, C, h, w) and each patch's distance to its nearest INP."""
        check_images(images, min_size=2 * self.encoder.patch_size, what="InpFormer")
        h, w = self.encoder.patch_grid(*images.shape[-2:])
        prefix = self.encoder.num_prefix_tokens
        encoded = [tokens[:, prefix:] for tokens in self.encoder(images)]
        x = torch.stack(encoded, dim=1).mean(dim=1)
        prototypes = self.extractor(x)
        distance = prototype_distance(x, prototypes)
        x = self.bottleneck(x)
        decoded = []
        for block in self.decoder:
            x = block(x, prototypes)
            decoded.append(x)
        decoded.reverse()  # decoder block i reconstructs target layer i counted from the deepest

        def fuse(tokens: list[torch.Tensor], group: list[int]) -> torch.Tensor:
            fused = torch.stack([tokens[i] for i in group], dim=1).mean(dim=1)
            return fused.transpose(1, 2).reshape(fused.shape[0], -1, h, w)

        return InpFormerFeatures(
            [fuse(encoded, g) for g in self.groups],
            [fuse(decoded, g) for g in self.groups],
            distance,
        )

    def raw_anomaly_map(self, features: InpFormerFeatures, size: tuple[int, int]) -> torch.Tensor:
        """Input-size map (B, 1, H, W): regional cosine distance, or INP distance in zero-shot mode."""
        if not self.zero_shot:
            return cosine_distance_map(features.encoder, features.decoder, size)
        b = features.inp_distance.shape[0]
        h, w = features.encoder[0].shape[-2:]
        grid = features.inp_distance.reshape(b, 1, h, w)
        return F.interpolate(grid, size=size, mode="bilinear", align_corners=True)

    def forward(self, images: torch.Tensor) -> InpFormerFeatures | InferenceBatch:
        """Training: features for the losses. Eval: image scores and anomaly maps."""
        features = self.features(images)
        if self.training:
            return features
        score, anomaly_map = self.scorer(self.raw_anomaly_map(features, tuple(images.shape[-2:])))
        return InferenceBatch(pred_score=score, anomaly_map=anomaly_map)
