"""MaskAD torch model: masked feature reconstruction, parallel test-time masks, OT discrepancy.

Pipeline (seed 003, "Methodology" and "Implementation Details"):

1. a frozen EfficientNet (timm ``efficientnet_b4``, stages 1-4 = 24 + 32 + 56 + 160 = 272
   channels) gives maps resized to 14 x 14 at 224 px and concatenated: ``h`` (B, 272, 14, 14);
2. training: ``h`` is masked (masked tokens replaced by a learned mask token after the linear
   map 272 -> 768), passed through a 5-layer ViT encoder and a 5-layer ViT decoder, and mapped
   back to 272 channels: ``h_hat``; the loss is ``|h - h_hat|^2`` over the whole map;
3. test: the reference map ``r`` replaces every token of ``h`` by its nearest nominal coreset
   token; ``h`` and ``r`` are reconstructed under the same N = 3n + 1 masks (n prototype-oriented
   from a normalizing-flow ranking, ratios in [0.01, 0.08]; n random at 0.2; n block-wise at
   0.15; one empty); per-patch RMSEs ``e_h`` (N) and ``e_r`` (N); AssDis = <M*, C> with
   ``C_ij = |e_h_i - e_r_j|`` and M* the entropic OT plan (Sinkhorn); Rec = mean_i |h - h_hat_i|^2;
   score map = upsample((Rec + AssDis) x M_po); image score = its max (eq. 2).

Everything at inference is a tensor op with static shapes (masks that do not depend on the image
are buffers drawn once from ``mask_seed``), so the whole scheme exports.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from anomalib.data import InferenceBatch
from anomalib.models.image.cflow.utils import positional_encoding_2d
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_mcad.models.components.cnn import CNNFeatureTap
from anomalib_mcad.models.components.coreset import NearestNeighbourBank
from anomalib_mcad.models.components.flow import ConditionalFlow
from anomalib_mcad.models.components.masking import BlockwiseMaskGenerator, RandomMaskGenerator
from anomalib_mcad.models.components.sinkhorn import sinkhorn
from anomalib_mcad.models.components.validation import check_images, is_exporting
from anomalib_mcad.models.components.weights import PretrainedArg


@dataclass
class MaskAdScores:
    """Intermediate per-patch maps of the test-time scheme (B, h, w) each, for inspection and ablations."""

    rec: torch.Tensor
    assdis: torch.Tensor
    refdis: torch.Tensor
    po: torch.Tensor
    patch_score: torch.Tensor


def prototype_ratios(low: float, high: float, n: int) -> list[float]:
    """``n`` mask ratios evenly spaced over [low, high] (the paper's range 0.01-0.08)."""
    if not 0.0 < low <= high < 1.0:
        msg = f"prototype mask ratios must satisfy 0 < low <= high < 1, got ({low}, {high})"
        raise ValueError(msg)
    if n == 1:
        return [low]
    return [low + (high - low) * i / (n - 1) for i in range(n)]


def prototype_oriented_masks(ranking: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Masks of each image's ``k`` highest-ranked patches, one per ``k`` in ``counts``: (B, len(counts), h, w).

    ``ranking`` (B, h, w) is the flow's abnormality (higher = more suspicious); the masks are nested
    (a larger ``k`` covers a smaller one's patches). Each ``k`` must lie in [1, h * w).
    """
    if ranking.ndim != 3:
        msg = f"ranking must be (B, h, w), got {tuple(ranking.shape)}"
        raise ValueError(msg)
    n_patches = ranking.shape[-2] * ranking.shape[-1]
    if not is_exporting() and (not counts or any(not 1 <= int(k) < n_patches for k in counts)):
        msg = f"prototype mask counts {list(counts)} must each lie in [1, {n_patches}) on a {ranking.shape[-2]}x{ranking.shape[-1]} grid"
        raise ValueError(msg)
    flat = ranking.flatten(1)
    order = flat.argsort(dim=1, descending=True)
    rank = order.argsort(dim=1)  # 0 = most abnormal
    limits = torch.tensor([int(k) for k in counts], device=ranking.device).view(1, -1, 1)
    return (rank.unsqueeze(1) < limits).reshape(ranking.shape[0], -1, *ranking.shape[-2:])


class MaskedReconstructor(nn.Module):
    """Linear 272 -> 768, mask token, fixed 2-D sin-cos positions, ViT encoder + decoder, linear back."""

    def __init__(
        self,
        in_channels: int,
        grid: int,
        embed_dim: int = 768,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        num_encoder_layers: int = 5,
        num_decoder_layers: int = 5,
    ) -> None:
        super().__init__()
        if embed_dim % 4:
            msg = f"embed_dim must be a multiple of 4 (2-D sin-cos positions), got {embed_dim}"
            raise ValueError(msg)
        self.embed = nn.Linear(in_channels, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        position = positional_encoding_2d(embed_dim, grid, grid).flatten(1).T.unsqueeze(0)
        self.register_buffer("position", position, persistent=False)
        self.encoder = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(num_encoder_layers)])
        self.encoder_norm = nn.LayerNorm(embed_dim)
        self.decoder = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True) for _ in range(num_decoder_layers)])
        self.decoder_norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, in_channels)
        trunc_normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Reconstruct (B, C, h, w) features from the tokens left by ``mask`` (B, h, w), True = masked."""
        batch, channels, height, width = features.shape
        tokens = self.embed(features.flatten(2).transpose(1, 2))
        masked = mask.reshape(batch, height * width, 1).to(tokens.dtype)
        tokens = tokens * (1 - masked) + self.mask_token * masked + self.position
        tokens = self.decoder_norm(self.decoder(self.encoder_norm(self.encoder(tokens))))
        return self.head(tokens).transpose(1, 2).reshape(batch, channels, height, width)


class MaskAdModel(nn.Module):
    """MaskAD network and test-time scheme; training returns reconstructions, eval an InferenceBatch.

    Args:
        backbone, pretrained, stages: frozen timm EfficientNet and the tapped stages
            (``efficientnet_b4``, (0, 1, 2, 3): 272 channels).
        feature_size: side of the feature grid (14 at 224 px; stages are resized to it).
        embed_dim, num_heads, mlp_ratio, num_encoder_layers, num_decoder_layers: the ViT (768, 12,
            4, 5, 5).
        n_masks: n masks per test strategy (4); N = 3n + 1.
        random_ratio, block_ratio: test random / block-wise mask ratios (0.2, 0.15).
        prototype_ratio_range: prototype-oriented mask ratios, n evenly spaced values (0.01, 0.08).
        po_ratio: M_po's ratio (0.01): the flow score is divided by its top-``po_ratio`` quantile
            over training patches and clamped below at 1 (see README, "Reading of M_po").
        block_min_patches, block_min_aspect: block-wise generator (4 patches, aspect 0.3).
        mask_seed: seed of the image-independent test masks (stored as buffers).
        flow_coupling, flow_clamp, flow_condition_dim, flow_hidden_ratio: the ranking flow.
        sinkhorn_epsilon, sinkhorn_iterations: entropy weight (1, eq. 1) and fixed iteration count.
        parallel, use_po, use_reference, use_assdis, use_rec: Table 2's ablation switches.
        restrict_to_category: search only the image's own category's coreset (needs the category).
        normalize_features: standardise each backbone channel with its mean and standard deviation
            over the training patches (buffers set by :meth:`fit_feature_statistics`; see README).
    """

    def __init__(
        self,
        backbone: str = "efficientnet_b4",
        pretrained: PretrainedArg = True,
        stages: Sequence[int] = (0, 1, 2, 3),
        feature_size: int = 14,
        embed_dim: int = 768,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        num_encoder_layers: int = 5,
        num_decoder_layers: int = 5,
        n_masks: int = 4,
        random_ratio: float = 0.2,
        block_ratio: float = 0.15,
        prototype_ratio_range: Sequence[float] = (0.01, 0.08),
        po_ratio: float = 0.01,
        block_min_patches: int = 4,
        block_min_aspect: float = 0.3,
        mask_seed: int = 0,
        flow_coupling: int = 4,
        flow_clamp: float = 1.9,
        flow_condition_dim: int = 128,
        flow_hidden_ratio: float = 2.0,
        sinkhorn_epsilon: float = 1.0,
        sinkhorn_iterations: int = 50,
        parallel: bool = True,
        use_po: bool = True,
        use_reference: bool = True,
        use_assdis: bool = True,
        use_rec: bool = True,
        restrict_to_category: bool = False,
        normalize_features: bool = True,
    ) -> None:
        super().__init__()
        if feature_size < 2:
            msg = f"feature_size must be >= 2, got {feature_size}"
            raise ValueError(msg)
        if n_masks < 1:
            msg = f"n_masks must be >= 1, got {n_masks}"
            raise ValueError(msg)
        if not 0.0 < po_ratio < 1.0:
            msg = f"po_ratio must lie in (0, 1), got {po_ratio}"
            raise ValueError(msg)
        if not (use_rec or use_assdis or use_reference):
            msg = "at least one of use_rec, use_assdis, use_reference must be on: the score would be empty"
            raise ValueError(msg)
        self.feature_size = int(feature_size)
        self.parallel = parallel
        self.use_po = use_po
        self.use_reference = use_reference
        self.use_assdis = use_assdis
        self.use_rec = use_rec
        self.restrict_to_category = restrict_to_category
        self.sinkhorn_epsilon = float(sinkhorn_epsilon)
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        self.po_ratio = float(po_ratio)
        grid = (self.feature_size, self.feature_size)
        n_patches = self.feature_size**2

        self.backbone = CNNFeatureTap(backbone, stages, pretrained)
        channels = self.backbone.out_channels
        self.normalize_features = normalize_features
        self.register_buffer("feature_mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("feature_std", torch.ones(1, channels, 1, 1))
        self.register_buffer("statistics_fitted", torch.tensor(False))
        self.reconstructor = MaskedReconstructor(
            channels, self.feature_size, embed_dim, num_heads, mlp_ratio, num_encoder_layers, num_decoder_layers
        )
        self.flow = ConditionalFlow(channels, flow_coupling, flow_clamp, flow_condition_dim, flow_hidden_ratio)
        self.bank = NearestNeighbourBank()
        # flow-score quantile over training patches (M_po's normaliser); set with the bank
        self.register_buffer("po_scale", torch.ones(()))

        # Test masks. Generators raise clear errors for impossible ratios on this grid.
        self.random_generator = RandomMaskGenerator(grid, random_ratio)
        self.block_generator = BlockwiseMaskGenerator(grid, block_ratio, min_patches=block_min_patches, min_aspect=block_min_aspect)
        ratios = prototype_ratios(float(prototype_ratio_range[0]), float(prototype_ratio_range[-1]), n_masks)
        counts = [max(1, round(r * n_patches)) for r in ratios]
        if max(counts) >= n_patches:
            msg = f"prototype mask ratios {ratios} mask every patch of a {grid[0]}x{grid[1]} grid"
            raise ValueError(msg)
        self.prototype_counts = counts
        rng = torch.Generator().manual_seed(int(mask_seed))
        fixed = [self.random_generator(rng) for _ in range(n_masks)]
        fixed += [self.block_generator(rng) for _ in range(n_masks)]
        fixed.append(torch.zeros(grid, dtype=torch.bool))
        self.register_buffer("fixed_masks", torch.stack(fixed))  # (2n + 1, h, w): random, block-wise, empty
        self.n_masks = int(n_masks)

    # ------------------------------------------------------------------ features
    @property
    def min_image_size(self) -> int:
        """Smallest input side: two cells of the coarsest tapped stage."""
        return 2 * max(self.backbone.reductions)

    def raw_features(self, images: torch.Tensor) -> torch.Tensor:
        """Tapped stages bilinearly resized to ``feature_size`` and concatenated (B, C, h, w)."""
        size = (self.feature_size, self.feature_size)
        maps = [F.interpolate(m, size=size, mode="bilinear", align_corners=True) for m in self.backbone(images)]
        return torch.cat(maps, dim=1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``h``: the raw features, standardised per channel when ``normalize_features``."""
        raw = self.raw_features(images)
        if not self.normalize_features:
            return raw
        return (raw - self.feature_mean) / self.feature_std

    @torch.no_grad()
    def fit_feature_statistics(self, raw: torch.Tensor) -> None:
        """Per-channel mean and standard deviation of raw training features (N, C, h, w)."""
        if raw.ndim != 4 or raw.shape[0] == 0:
            msg = f"fit_feature_statistics needs raw training features (N, C, h, w), got {tuple(raw.shape)}"
            raise ValueError(msg)
        self.feature_mean.copy_(raw.mean(dim=(0, 2, 3), keepdim=True))
        self.feature_std.copy_(raw.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6))
        self.statistics_fitted.fill_(True)

    def reconstruct(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``D(E(h x m))`` for features (B, C, h, w) and masks (B, h, w)."""
        return self.reconstructor(features, mask)

    # ------------------------------------------------------------------ test-time scheme
    def prototype_masks(self, ranking: torch.Tensor) -> torch.Tensor:
        """n masks per image covering its top-k_i flow-ranked patches: (B, n, h, w)."""
        return prototype_oriented_masks(ranking, self.prototype_counts)

    def test_masks(self, ranking: torch.Tensor) -> torch.Tensor:
        """The N masks of every image (B, N, h, w): prototype-oriented, random, block-wise, empty.

        With ``parallel=False`` only the first random mask ("one masked image", Table 2).
        """
        batch = ranking.shape[0]
        fixed = self.fixed_masks.unsqueeze(0).expand(batch, -1, -1, -1)
        if not self.parallel:
            return fixed[:, :1]
        return torch.cat([self.prototype_masks(ranking), fixed], dim=1)

    def reference(self, features: torch.Tensor, category_index: torch.Tensor | None = None) -> torch.Tensor:
        """``r``: every token of ``h`` replaced by its nearest coreset token (B, C, h, w)."""
        tokens = features.flatten(2).transpose(1, 2)
        category = category_index if self.restrict_to_category else None
        if category is not None and not is_exporting():
            known = set(self.bank.labels.unique().tolist())
            unknown = sorted(set(category.tolist()) - known)
            if unknown:
                msg = f"category index {unknown} has no coreset (known: {sorted(known)}); use restrict_to_category=False"
                raise ValueError(msg)
        neighbours, _, _ = self.bank.nearest(tokens, category)
        return neighbours.transpose(1, 2).reshape_as(features)

    def po_map(self, ranking: torch.Tensor) -> torch.Tensor:
        """M_po: flow score over its training top-``po_ratio`` quantile, clamped below at 1 (B, h, w)."""
        return (ranking / self.po_scale).clamp_min(1.0)

    def patch_scores(self, features: torch.Tensor, category_index: torch.Tensor | None = None) -> MaskAdScores:
        """Rec, AssDis, M_po and their combination per patch (B, h, w)."""
        batch, channels, height, width = features.shape
        ranking = self.flow.abnormality(features)
        masks = self.test_masks(ranking)  # (B, N, h, w)
        n_masks = masks.shape[1]
        if self.use_reference:
            reference = self.reference(features, category_index)
            inputs = torch.stack([features, reference], dim=1)  # (B, 2, C, h, w)
        else:
            inputs = features.unsqueeze(1)
        n_maps = inputs.shape[1]
        # one batch of B * n_maps * N masked maps through the reconstructor: the parallel branches
        stacked = inputs.unsqueeze(2).expand(-1, -1, n_masks, -1, -1, -1).reshape(-1, channels, height, width)
        stacked_masks = masks.unsqueeze(1).expand(-1, n_maps, -1, -1, -1).reshape(-1, height, width)
        reconstructed = self.reconstruct(stacked, stacked_masks)
        squared = (stacked - reconstructed).pow(2).reshape(batch, n_maps, n_masks, channels, height, width)
        rec = squared[:, 0].sum(dim=2).mean(dim=1)  # Rec: mean over masks of |h - h_hat_i|^2
        rmse = squared.mean(dim=3).sqrt()  # (B, n_maps, N, h, w)
        e_h = rmse[:, 0].permute(0, 2, 3, 1)  # (B, h, w, N)
        e_r = rmse[:, 1].permute(0, 2, 3, 1) if self.use_reference else torch.zeros_like(e_h)
        cost = (e_h.unsqueeze(-1) - e_r.unsqueeze(-2)).abs()  # (B, h, w, N, N)
        zeros = torch.zeros_like(rec)
        if self.use_assdis:
            plan = sinkhorn(cost, self.sinkhorn_epsilon, self.sinkhorn_iterations)
            assdis = (plan * cost).sum(dim=(-1, -2))
        else:
            assdis = zeros
        # reference without OT (Table 2, row 3): mask-by-mask |e_h_i - e_r_i|
        refdis = cost.diagonal(dim1=-2, dim2=-1).mean(-1) if (self.use_reference and not self.use_assdis) else zeros
        po = self.po_map(ranking) if self.use_po else torch.ones_like(rec)
        combined = (rec if self.use_rec else zeros) + assdis + refdis
        return MaskAdScores(rec=rec, assdis=assdis, refdis=refdis, po=po, patch_score=combined * po)

    def forward(
        self,
        images: torch.Tensor,
        mask: torch.Tensor | None = None,
        category_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor] | InferenceBatch:
        """Training: ``(h, h_hat)`` for a training mask (B, h, w). Eval: scores and maps from the image alone."""
        check_images(images, min_size=self.min_image_size, what="MaskAD")
        with torch.no_grad():
            features = self.features(images)
        if self.training:
            if mask is None:
                msg = "MaskAD training needs a mask (B, h, w) per image"
                raise ValueError(msg)
            return features, self.reconstruct(features, mask)
        scores = self.patch_scores(features, category_index)
        anomaly_map = F.interpolate(scores.patch_score.unsqueeze(1), size=images.shape[-2:], mode="bilinear", align_corners=False)
        return InferenceBatch(pred_score=anomaly_map.flatten(1).amax(dim=1), anomaly_map=anomaly_map)
