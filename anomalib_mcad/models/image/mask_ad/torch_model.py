"""MaskAD torch model: masked feature reconstruction, parallel test-time masks, OT discrepancy.

Pipeline (seed 003, "Methodology" and "Implementation Details"; scoring as in the authors' code,
``liugang-xd/MaskAD`` ``valad.py`` and ``protoflow_module/``, see README "Accuracy on real features"):

1. a frozen EfficientNet (timm ``efficientnet_b4``, stages 1-4 = 24 + 32 + 56 + 160 = 272
   channels) gives maps resized to 14 x 14 at 224 px and concatenated: ``h`` (B, 272, 14, 14);
2. training: ``h`` is masked (masked tokens replaced by a learned mask token after the linear
   map 272 -> 768), passed through a 5-layer ViT encoder and a 5-layer ViT decoder, and mapped
   back to 272 channels: ``h_hat``; the loss is ``|h - h_hat|^2`` over the whole map;
3. test: the reference map ``r`` replaces every token of ``h`` by its nearest nominal coreset
   token; a ProtoFlow (conditional flow on the residual ``h - r``) gives each patch a
   log-likelihood and M_po = ``1 - exp(log p - log p_ref)`` in [0, 1]; ``h`` and ``r`` are
   reconstructed under the same N = 3n + 1 masks (n prototype-oriented covering the top-k M_po
   patches, n random at 0.2, n block-wise at 0.15, one empty); each patch gets an error profile
   of N L2 norms for ``h`` and for ``r``; AssDis is the entropic OT (Sinkhorn, epsilon 0.1) between
   the patches of ``h`` and those of ``r`` under the cosine cost of their profiles, per patch
   ``1e4 * sum_j M*_ij C_ij``; Rec is the mean L2 over the masks; the map is
   ``blur_7(upsample(0.6 AssDis + 0.4 Rec) x upsample(M_po))``; the image score is its maximum.

Everything at inference is a tensor op with static shapes (the random and block-wise masks are
buffers drawn once from ``mask_seed``, in several sets; an image's set is picked by a hash of its
features), so the whole scheme exports and the same image always gets the same score.
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

from anomalib_mcad.models.components.cnn import GRID_RESIZE_MODES, CNNFeatureTap
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
    combined: torch.Tensor
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


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, H, W) maps, reflect padding, kernel radius ``int(4 sigma + 0.5)``.

    The kernel is built from Python numbers (the static sizes), so the op exports as two convolutions.
    """
    if sigma <= 0:
        return maps
    height, width = maps.shape[-2:]
    radius = max(1, min(int(4.0 * sigma + 0.5), int(height) - 1, int(width) - 1))
    offsets = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    padded = F.pad(maps, (radius, radius, radius, radius), mode="reflect")
    blurred = F.conv2d(padded, kernel.view(1, 1, 1, -1))
    return F.conv2d(blurred, kernel.view(1, 1, -1, 1))


class MaskAdModel(nn.Module):
    """MaskAD network and test-time scheme; training returns reconstructions, eval an InferenceBatch.

    Args:
        backbone, pretrained, stages: frozen timm EfficientNet and the tapped stages
            (``efficientnet_b4``, (0, 1, 2, 3): 272 channels).
        feature_size: side of the feature grid (14 at 224 px; stages are resized to it).
        embed_dim, num_heads, mlp_ratio, num_encoder_layers, num_decoder_layers: the ViT (768, 12,
            4, 5, 5).
        n_masks: n masks per test strategy (4).
        random_ratio, block_ratio: test random / block-wise mask ratios (0.2, 0.15).
        prototype_ratio_range: prototype-oriented mask ratios, n evenly spaced values from the
            first to the last, inclusive ((0.01, 0.07): 1, 5, 9, 13 of 196 patches, the authors'
            ``int(196 * r)`` for r in 0.01, 0.03, 0.05, 0.07).
        empty_mask: add the paper's zero-mask (N = 3n + 1); the authors' code uses N = 3n.
        mask_banks: sets of random + block-wise test masks drawn once from ``mask_seed``; each image
            uses the set picked by a hash of its own features (1 = the same masks for every image).
        po_ratio: M_po's calibration: its reference log-likelihood is the training patches' top
            ``po_ratio`` quantile (0 = their maximum).
        block_min_patches, block_min_aspect: block-wise generator (4 patches, aspect 0.3).
        mask_seed: seed of the image-independent test masks (stored as buffers).
        flow_coupling, flow_clamp, flow_condition_dim, flow_hidden_ratio: the ProtoFlow (8, 1.9,
            128, 2: the authors').
        sinkhorn_epsilon, sinkhorn_iterations: entropy weight (0.1, the authors') and fixed
            iteration count of the OT between patches.
        ot_weight, ot_scale: patch score ``ot_weight * ot_scale * OT + (1 - ot_weight) * mean L2``
            (0.6 and 1e4, the authors').
        blur_sigma: Gaussian blur of the anomaly map, in pixels of a 224-px input (7, the
            authors'; scaled with the input side; 0 = none).
        parallel, use_po, use_reference, use_assdis, use_rec: Table 2's ablation switches.
        restrict_to_category: search only the image's own category's coreset (needs the category).
        normalize_features: standardise each backbone channel with its mean and standard deviation
            over the training patches (buffers set by :meth:`fit_feature_statistics`; see README).
        feature_resize: how the tapped stages reach ``feature_size``: ``"bilinear"`` (align
            corners, UniAD's neck and the authors' code; a stride-2 map shrunk 8x this way keeps
            one sample per cell and aliases) or ``"area"`` (each cell averages its block of the
            finer map; measured better on ELPV, see README; exports exactly).
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
        prototype_ratio_range: Sequence[float] = (0.01, 0.07),
        empty_mask: bool = True,
        mask_banks: int = 8,
        po_ratio: float = 0.0,
        block_min_patches: int = 4,
        block_min_aspect: float = 0.3,
        mask_seed: int = 0,
        flow_coupling: int = 8,
        flow_clamp: float = 1.9,
        flow_condition_dim: int = 128,
        flow_hidden_ratio: float = 2.0,
        sinkhorn_epsilon: float = 0.1,
        sinkhorn_iterations: int = 100,
        ot_weight: float = 0.6,
        ot_scale: float = 1e4,
        blur_sigma: float = 7.0,
        parallel: bool = True,
        use_po: bool = True,
        use_reference: bool = True,
        use_assdis: bool = True,
        use_rec: bool = True,
        restrict_to_category: bool = False,
        normalize_features: bool = True,
        feature_resize: str = "bilinear",
    ) -> None:
        super().__init__()
        if feature_size < 2:
            msg = f"feature_size must be >= 2, got {feature_size}"
            raise ValueError(msg)
        if n_masks < 1:
            msg = f"n_masks must be >= 1, got {n_masks}"
            raise ValueError(msg)
        if mask_banks < 1:
            msg = f"mask_banks must be >= 1, got {mask_banks}"
            raise ValueError(msg)
        if not 0.0 <= po_ratio < 1.0:
            msg = f"po_ratio must lie in [0, 1), got {po_ratio}"
            raise ValueError(msg)
        if not 0.0 <= ot_weight <= 1.0:
            msg = f"ot_weight must lie in [0, 1], got {ot_weight}"
            raise ValueError(msg)
        if feature_resize not in GRID_RESIZE_MODES:
            msg = f"feature_resize must be one of {GRID_RESIZE_MODES}, got {feature_resize!r}"
            raise ValueError(msg)
        if not (use_rec or use_assdis or use_reference):
            msg = "at least one of use_rec, use_assdis, use_reference must be on: the score would be empty"
            raise ValueError(msg)
        self.feature_size = int(feature_size)
        self.feature_resize = feature_resize
        self.parallel = parallel
        self.use_po = use_po
        self.use_reference = use_reference
        self.use_assdis = use_assdis
        self.use_rec = use_rec
        self.restrict_to_category = restrict_to_category
        self.sinkhorn_epsilon = float(sinkhorn_epsilon)
        self.sinkhorn_iterations = int(sinkhorn_iterations)
        self.ot_weight = float(ot_weight)
        self.ot_scale = float(ot_scale)
        self.blur_sigma = float(blur_sigma)
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
        # ProtoFlow: a conditional flow on the residual h - (nearest coreset token)
        self.flow = ConditionalFlow(channels, flow_coupling, flow_clamp, flow_condition_dim, flow_hidden_ratio, permute_soft=True)
        self.bank = NearestNeighbourBank()
        # M_po's reference: the training patches' (top-quantile) log-likelihood per channel; set after training
        self.register_buffer("po_scale", torch.zeros(()))

        # Test masks. Generators raise clear errors for impossible ratios on this grid.
        self.random_generator = RandomMaskGenerator(grid, random_ratio)
        self.block_generator = BlockwiseMaskGenerator(grid, block_ratio, min_patches=block_min_patches, min_aspect=block_min_aspect)
        ratios = prototype_ratios(float(prototype_ratio_range[0]), float(prototype_ratio_range[-1]), n_masks)
        counts = [max(1, int(r * n_patches + 1e-6)) for r in ratios]
        if max(counts) >= n_patches:
            msg = f"prototype mask ratios {ratios} mask every patch of a {grid[0]}x{grid[1]} grid"
            raise ValueError(msg)
        self.prototype_counts = counts
        rng = torch.Generator().manual_seed(int(mask_seed))
        banks = []
        for _ in range(int(mask_banks)):
            fixed = [self.random_generator(rng) for _ in range(n_masks)]
            fixed += [self.block_generator(rng) for _ in range(n_masks)]
            if empty_mask:
                fixed.append(torch.zeros(grid, dtype=torch.bool))
            banks.append(torch.stack(fixed))
        # (K, 2n [+ 1], h, w): K sets of random, block-wise [, empty] masks
        self.register_buffer("fixed_masks", torch.stack(banks))
        self.n_masks = int(n_masks)

    # ------------------------------------------------------------------ features
    @property
    def min_image_size(self) -> int:
        """Smallest input side: two cells of the coarsest tapped stage."""
        return 2 * max(self.backbone.reductions)

    def raw_features(self, images: torch.Tensor) -> torch.Tensor:
        """Tapped stages resized to ``feature_size`` (``feature_resize``) and concatenated (B, C, h, w)."""
        return self.backbone.grid_features(images, self.feature_size, self.feature_resize)

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

    # ------------------------------------------------------------------ ProtoFlow and M_po
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

    def log_likelihood(self, residual: torch.Tensor) -> torch.Tensor:
        """ProtoFlow log-density per channel of the residuals ``h - r`` (B, C, h, w) -> (B, h, w), log-det included."""
        return -self.flow.nll(residual)

    def po_map(self, log_likelihood: torch.Tensor) -> torch.Tensor:
        """M_po = ``1 - exp(log p - log p_ref)`` clamped to [0, 1] (B, h, w): 0 as likely as the most likely training patches, 1 unlikely."""
        return (1.0 - torch.exp(log_likelihood - self.po_scale)).clamp(0.0, 1.0)

    # ------------------------------------------------------------------ test-time scheme
    def prototype_masks(self, ranking: torch.Tensor) -> torch.Tensor:
        """n masks per image covering its top-k_i ranked patches: (B, n, h, w)."""
        return prototype_oriented_masks(ranking, self.prototype_counts)

    def bank_index(self, features: torch.Tensor) -> torch.Tensor:
        """Which set of random/block-wise masks each image uses (B,): a coarse hash of its features.

        The same image always gets the same set (deterministic, exportable: float ops, floor and
        remainder); different images get different sets, so no patch position is always masked.
        """
        banks = self.fixed_masks.shape[0]
        code = torch.floor(features.mean(dim=(1, 2, 3)).abs() * 1000.0)
        return torch.remainder(code, banks).long()

    def test_masks(self, ranking: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """The N masks of every image (B, N, h, w): prototype-oriented, random, block-wise[, empty].

        With ``parallel=False`` only the first random mask ("one masked image", Table 2).
        """
        batch = ranking.shape[0]
        if self.fixed_masks.shape[0] == 1 or features is None:
            fixed = self.fixed_masks[0].unsqueeze(0).expand(batch, -1, -1, -1)
        else:
            fixed = self.fixed_masks[self.bank_index(features)]
        if not self.parallel:
            return fixed[:, :1]
        return torch.cat([self.prototype_masks(ranking), fixed], dim=1)

    def patch_scores(self, features: torch.Tensor, category_index: torch.Tensor | None = None) -> MaskAdScores:
        """Rec (mean L2), AssDis (OT between patches' error profiles), M_po and their combination per patch (B, h, w)."""
        batch, channels, height, width = features.shape
        reference = self.reference(features, category_index)
        po = self.po_map(self.log_likelihood(features - reference))
        masks = self.test_masks(po, features)  # (B, N, h, w)
        n_masks = masks.shape[1]
        inputs = torch.stack([features, reference], dim=1) if self.use_reference else features.unsqueeze(1)
        n_maps = inputs.shape[1]
        # one batch of B * n_maps * N masked maps through the reconstructor: the parallel branches
        stacked = inputs.unsqueeze(2).expand(-1, -1, n_masks, -1, -1, -1).reshape(-1, channels, height, width)
        stacked_masks = masks.unsqueeze(1).expand(-1, n_maps, -1, -1, -1).reshape(-1, height, width)
        reconstructed = self.reconstruct(stacked, stacked_masks)
        squared = (stacked - reconstructed).pow(2).sum(dim=1).reshape(batch, n_maps, n_masks, height, width)
        l2 = squared.clamp_min(0.0).sqrt()  # per-patch L2 error under each mask
        rec = l2[:, 0].mean(dim=1)  # Rec: mean over masks
        # error profiles (B, hw, N); without a reference, the uniform profile (Table 2's "uniform distribution")
        e_h = l2[:, 0].flatten(2).transpose(1, 2)
        e_r = l2[:, 1].flatten(2).transpose(1, 2) if self.use_reference else torch.ones_like(e_h)
        cost = (1.0 - F.cosine_similarity(e_h.unsqueeze(2), e_r.unsqueeze(1), dim=-1, eps=1e-8)).clamp_min(0.0)  # (B, hw, hw)
        zeros = torch.zeros_like(rec)
        if self.use_assdis:
            plan = sinkhorn(cost, self.sinkhorn_epsilon, self.sinkhorn_iterations)
            assdis = self.ot_scale * (plan * cost).sum(dim=-1).reshape(batch, height, width)
            refdis = zeros
        else:
            assdis = zeros
            # reference without OT (Table 2, row 3): each patch against the same patch, identity plan 1/hw
            refdis = (self.ot_scale / (height * width)) * cost.diagonal(dim1=-2, dim2=-1).reshape(batch, height, width) if self.use_reference else zeros
        po = po if self.use_po else torch.ones_like(rec)
        weight = self.ot_weight
        combined = (1.0 - weight) * (rec if self.use_rec else zeros) + weight * (assdis + refdis)
        return MaskAdScores(rec=rec, assdis=assdis, refdis=refdis, po=po, combined=combined, patch_score=combined * po)

    def anomaly_map(self, scores: MaskAdScores, size: tuple[int, int]) -> torch.Tensor:
        """Upsample the combined score and M_po to ``size`` (bilinear), multiply, blur (B, 1, H, W)."""
        up = F.interpolate(scores.combined.unsqueeze(1), size=size, mode="bilinear", align_corners=True)
        up = up * F.interpolate(scores.po.unsqueeze(1), size=size, mode="bilinear", align_corners=True)
        return gaussian_blur(up, self.blur_sigma * size[0] / 224.0)

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
        anomaly_map = self.anomaly_map(scores, tuple(images.shape[-2:]))
        return InferenceBatch(pred_score=anomaly_map.flatten(1).amax(dim=1), anomaly_map=anomaly_map)
