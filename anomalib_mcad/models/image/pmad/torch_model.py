"""PMAD's torch model: BEiT-style masked image model + visual tokenizer + ProtoFlow proposals.

Inference (one image at a time, nothing from the test set):

1. ProtoFlow's per-patch NLL on its 28x28 grid is resized to the ViT grid (bilinear,
   ``align_corners=True``, as the authors) and the ``k = floor(m N)`` highest patches are masked
   (``m``: the mask ratio of the image's category, Table 6, or ``default_mask_ratio``; when the
   category is not given, it is the category most of the image's patches have their nearest
   prototype in, so the exported image-only graph still applies per-category ratios).
2. The masked image model predicts the visual token of every patch; the anomaly value of a
   masked patch is the cross-entropy of its true token (from the tokenizer on the unmasked
   image), zero elsewhere.
3. Both the token map (ViT grid) and ProtoFlow's abnormality weight (28x28) are upsampled to the
   input size (bilinear, ``align_corners=True``), multiplied, smoothed by a Gaussian of sigma 4;
   the image score is the map's maximum.

The top-k selection uses a full ``argsort`` and a comparison with a per-image count, so the
exported graph has static shapes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Literal

import torch
from anomalib.data import InferenceBatch
from anomalib.models.components import GaussianBlur2d
from timm.models.beit import Beit
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_mcad.models.components.validation import NotFittedError, check_images, is_exporting
from anomalib_mcad.models.components.weights import PretrainedArg, load_weights_file
from anomalib_mcad.models.image.pmad.protoflow import ProtoFlow
from anomalib_mcad.models.image.pmad.tokenizer import DalleTokenizer, FeatureCodeTokenizer, VqViTTokenizer

#: Table 5: ViT-Base and ViT-Large (patch 16, head size 64).
ARCHITECTURES: dict[str, dict[str, int]] = {
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
}

#: Table 6: mask ratio per MVTec-AD category.
MVTEC_MASK_RATIOS: dict[str, float] = {
    "carpet": 0.16, "grid": 0.16, "leather": 0.12, "tile": 0.38, "wood": 0.46,
    "bottle": 0.42, "cable": 0.28, "capsule": 0.16, "hazelnut": 0.36, "metal_nut": 0.48,
    "pill": 0.48, "screw": 0.04, "toothbrush": 0.22, "transistor": 0.48, "zipper": 0.2,
}  # fmt: skip

TokenizerType = Literal["vit", "dalle", "small", "features"]


class MaskedImageModel(nn.Module):
    """BEiT masked image model: masked patch embeddings replaced by a learned token, token-id logits per patch.

    The encoder is timm's ``Beit`` with the authors' settings (shared relative position bias, no
    absolute position embedding, layer scale 0.1, drop path 0.1); ``mask_token`` and ``lm_head``
    are added as in BEiT pre-training.

    Args:
        arch: ``"base"`` or ``"large"`` (Table 5), or a dict with embed_dim, depth, num_heads.
        img_size, patch_size: input side and patch (224, 16).
        vocab_size: tokenizer codes (8192).
        init_values: layer-scale init (0.1 for base in the authors' scripts; 1e-5 for large in BEiT).
        drop_path: stochastic depth (0.1).
        pretrained: ``False`` or a local BEiT checkpoint (the authors start from
            ``beit_base_patch16_224_pt22k.pth``; keys without ``encoder.``).
    """

    def __init__(
        self,
        arch: str | dict[str, int] = "base",
        img_size: int = 224,
        patch_size: int = 16,
        vocab_size: int = 8192,
        init_values: float = 0.1,
        drop_path: float = 0.1,
        pretrained: PretrainedArg = False,
    ) -> None:
        super().__init__()
        dims = ARCHITECTURES[arch] if isinstance(arch, str) else dict(arch)
        self.encoder = Beit(
            img_size=img_size,
            patch_size=patch_size,
            num_classes=0,
            use_abs_pos_emb=False,
            use_rel_pos_bias=False,
            use_shared_rel_pos_bias=True,
            init_values=init_values,
            drop_path_rate=drop_path,
            use_fc_norm=False,  # the final LayerNorm on every token (BEiT pre-training), not a pooled-head norm
            **dims,
        )
        embed_dim = dims["embed_dim"]
        self.grid = self.encoder.patch_embed.grid_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.lm_head = nn.Linear(embed_dim, vocab_size)
        nn.init.trunc_normal_(self.mask_token, std=0.02, a=-0.02, b=0.02)
        nn.init.trunc_normal_(self.lm_head.weight, std=0.02, a=-0.02, b=0.02)
        nn.init.zeros_(self.lm_head.bias)
        if pretrained not in (False, None):
            if pretrained is True:
                msg = "MaskedImageModel loads BEiT weights from a local file only: pass pretrained='/path/to/beit.pth'"
                raise ValueError(msg)
            load_weights_file(self, pretrained, key_map=self._beit_keys)

    @staticmethod
    def _beit_keys(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """BEiT/PMAD checkpoints name the encoder's tensors at the top level."""
        wanted = set(model.state_dict())
        out = {}
        for key, value in state.items():
            name = key if key.startswith(("mask_token", "lm_head")) else f"encoder.{key}"
            if name in wanted:
                out[name] = value
        for key in wanted - set(out):
            if key.endswith("relative_position_index"):  # a fixed index table, not a weight
                out[key] = model.state_dict()[key]
        return out

    @property
    def num_patches(self) -> int:
        """Tokens per image."""
        return self.grid[0] * self.grid[1]

    def forward(self, images: torch.Tensor, mask: torch.Tensor, masked_only: bool = False) -> torch.Tensor:
        """Token logits: (B, N, vocab) for all patches, or (M, vocab) for the masked ones (training)."""
        x = self.encoder.patch_embed(images)
        weight = mask.reshape(x.shape[0], -1, 1).to(x.dtype)
        x = x * (1.0 - weight) + self.mask_token.to(x.dtype) * weight
        x = torch.cat((self.encoder.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if self.encoder.pos_embed is not None:
            x = x + self.encoder.pos_embed
        x = self.encoder.pos_drop(x)
        bias = self.encoder.rel_pos_bias() if self.encoder.rel_pos_bias is not None else None
        for block in self.encoder.blocks:
            x = block(x, shared_rel_pos_bias=bias)
        x = self.encoder.norm(x)[:, 1:]
        if masked_only:
            return self.lm_head(x[mask.reshape(x.shape[0], -1).bool()])
        return self.lm_head(x)


def build_tokenizer(
    kind: TokenizerType,
    img_size: int,
    patch_size: int,
    weights: str | None = None,
    vocab_size: int | None = None,
    feature_channels: int | None = None,
) -> nn.Module:
    """Tokenizer whose grid matches the ViT's.

    ``vit`` (8192-code VQ ViT), ``dalle`` (DALL-E dVAE), ``small`` (random, tests) or ``features``
    (k-means codes of ProtoFlow's pretrained features, ``feature_channels`` wide; 256 codes).
    """
    if kind == "vit":
        return VqViTTokenizer(img_size=img_size, patch_size=patch_size, codebook_size=vocab_size or 8192, weights=weights)
    if kind == "dalle":
        return DalleTokenizer(vocab_size=vocab_size or 8192, input_size=img_size // patch_size * 8, weights=weights)
    if kind == "small":
        return VqViTTokenizer.small(img_size=img_size, patch_size=patch_size, codebook_size=vocab_size or 64)
    if kind == "features":
        if feature_channels is None:
            msg = "the 'features' tokenizer needs the width of ProtoFlow's features (feature_channels)"
            raise ValueError(msg)
        if weights is not None:
            msg = "the 'features' tokenizer is fitted on the training images; it takes no tokenizer_weights"
            raise ValueError(msg)
        return FeatureCodeTokenizer(feature_channels, codebook_size=vocab_size or 256, reduction=patch_size)
    msg = f"tokenizer must be 'vit', 'dalle', 'small' or 'features', got {kind!r}"
    raise ValueError(msg)


class PmadModel(nn.Module):
    """Masked image model + tokenizer + ProtoFlow, scoring images as PMAD's inference does.

    Args:
        arch, img_size, patch_size, init_values, drop_path, pretrained: :class:`MaskedImageModel`.
        tokenizer, tokenizer_weights, vocab_size: :func:`build_tokenizer`.
        proto_backbone, proto_stages, proto_pretrained, n_coupling, clamp, condition_dim,
        coreset_ratio: :class:`ProtoFlow`.
        default_mask_ratio: proposal ratio for images without a category ratio (0.3, the
            authors' ``--mask_ratio`` default), and of the image-only path when no category
            ratios are known or ``infer_category`` is off.
        sigma: Gaussian smoothing of the map (4).
    """

    def __init__(
        self,
        arch: str | dict[str, int] = "base",
        img_size: int = 224,
        patch_size: int = 16,
        init_values: float = 0.1,
        drop_path: float = 0.1,
        pretrained: PretrainedArg = False,
        tokenizer: TokenizerType = "vit",
        tokenizer_weights: str | None = None,
        vocab_size: int | None = None,
        proto_backbone: str = "tf_efficientnet_b6",
        proto_stages: Sequence[int] = (2, 3),
        proto_pretrained: PretrainedArg = True,
        n_coupling: int = 4,
        clamp: float = 1.9,
        condition_dim: int = 128,
        coreset_ratio: float = 0.01,
        default_mask_ratio: float = 0.3,
        sigma: float = 4.0,
    ) -> None:
        super().__init__()
        if not 0.0 < default_mask_ratio < 1.0:
            msg = f"mask ratio must lie in the open interval (0, 1), got {default_mask_ratio}"
            raise ValueError(msg)
        self.img_size = int(img_size)
        self.patch_size = int(patch_size)
        build_protoflow = partial(ProtoFlow, proto_backbone, proto_stages, proto_pretrained, n_coupling, clamp, condition_dim, coreset_ratio)
        # the features tokenizer needs ProtoFlow's width first; the others keep the original order
        # of construction (so a seed gives the same initial weights as before that tokenizer existed)
        protoflow = build_protoflow() if tokenizer == "features" else None
        self.tokenizer = build_tokenizer(tokenizer, img_size, patch_size, tokenizer_weights, vocab_size, protoflow.channels if protoflow else None)
        self.mim = MaskedImageModel(arch, img_size, patch_size, self.tokenizer.vocab_size, init_values, drop_path, pretrained)
        self.protoflow = protoflow if protoflow is not None else build_protoflow()
        if self.img_size % self.protoflow.reduction:
            msg = f"img_size {img_size} must be a multiple of ProtoFlow's stride {self.protoflow.reduction}"
            raise ValueError(msg)
        self.default_mask_ratio = float(default_mask_ratio)
        # derived from the constructor arguments, not learned: kept out of the state dict so a
        # checkpoint loaded for another deployment ratio does not overwrite it
        self.register_buffer("default_mask_count", torch.tensor(self.mask_count(default_mask_ratio)), persistent=False)
        #: masked-patch count per category index (the Table 6 ratio of each category the model
        #: knows); empty until training names the categories
        self.register_buffer("category_mask_counts", torch.empty(0, dtype=torch.long))
        #: image-only scoring: infer each image's category from its nearest prototypes and use that
        #: category's count (True), or always ``default_mask_count`` (False: one fixed ratio)
        self.infer_category = True
        self.blur = GaussianBlur2d(sigma=sigma, channels=1)

    @property
    def grid(self) -> tuple[int, int]:
        """ViT patch grid."""
        return self.mim.grid

    def mask_count(self, ratio: float) -> int:
        """Masked patches for a ratio: ``floor(ratio * N)`` (the authors' ``int(196 * m)``), at least 1."""
        if not 0.0 < ratio < 1.0:
            msg = f"mask ratio must lie in the open interval (0, 1), got {ratio}"
            raise ValueError(msg)
        return max(1, math.floor(ratio * self.mim.num_patches + 1e-9))

    def set_default_mask_ratio(self, ratio: float) -> None:
        """Ratio of the image-only path when the category is not inferred (e.g. one deployment category)."""
        count = self.mask_count(ratio)
        self.default_mask_ratio = float(ratio)
        self.default_mask_count.fill_(count)

    def set_category_mask_ratios(self, ratios: Sequence[float]) -> None:
        """Mask ratio of each category index (index = the label of its prototypes)."""
        counts = [self.mask_count(float(r)) for r in ratios]
        self.category_mask_counts = torch.tensor(counts, dtype=torch.long, device=self.default_mask_count.device)

    def inferred_mask_counts(self, labels: torch.Tensor) -> torch.Tensor:
        """Per-image count (B,) of the category most patches' nearest prototypes belong to.

        ``labels`` (B, h, w): nearest-prototype category per patch. Ties go to the lower index.
        Uses only the image and the training prototypes, so the exported graph needs no category input.
        """
        table = self.category_mask_counts
        classes = torch.arange(table.shape[0], device=labels.device)
        votes = (labels.flatten(1).unsqueeze(-1) == classes).sum(dim=1)
        return table[votes.argmax(dim=1)]

    def image_mask_counts(self, labels: torch.Tensor) -> torch.Tensor:
        """Counts of the image-only path: inferred category's ratio, else ``default_mask_count``."""
        if self.infer_category and self.category_mask_counts.numel() > 0:
            return self.inferred_mask_counts(labels)
        return self.default_mask_count.expand(labels.shape[0])

    def proposal_nll(self, images: torch.Tensor, category: torch.Tensor | None = None) -> torch.Tensor:
        """ProtoFlow's per-channel NLL (B, h, w) on its own grid."""
        return self.protoflow(images, category)

    def proposal_mask(self, nll: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Bool (B, N): the ``counts[b]`` patches of the ViT grid with the highest resized NLL."""
        rank = F.interpolate(nll.unsqueeze(1), size=self.grid, mode="bilinear", align_corners=True).flatten(1)
        order = torch.argsort(rank, dim=1, descending=True)
        position = torch.argsort(order, dim=1)
        return position < counts.reshape(-1, 1)

    @property
    def uses_feature_codes(self) -> bool:
        """True when the token targets are k-means codes of ProtoFlow's features (``tokenizer="features"``)."""
        return isinstance(self.tokenizer, FeatureCodeTokenizer)

    def grid_features(self, embedding: torch.Tensor) -> torch.Tensor:
        """ProtoFlow's embedding (B, C, H/8, W/8) average-pooled to the ViT grid (B, C, h, w)."""
        return F.adaptive_avg_pool2d(embedding, self.grid)

    @torch.no_grad()
    def fit_feature_codes(self, rows: torch.Tensor, seed: int = 0) -> None:
        """Fit the ``features`` tokenizer on the training set's embedding rows (images * H/8 * W/8, C), image-major."""
        side = self.img_size // self.protoflow.reduction
        maps = rows.reshape(-1, side, side, rows.shape[1]).permute(0, 3, 1, 2)
        pooled = self.grid_features(maps).permute(0, 2, 3, 1).reshape(-1, rows.shape[1])
        self.tokenizer.fit(pooled, seed=seed)

    def token_targets(self, images: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, N) of every patch; ``embedding``: ProtoFlow's, if already computed (``features`` tokenizer)."""
        if self.uses_feature_codes:
            embedding = self.protoflow.embed(images) if embedding is None else embedding
            return self.tokenizer(self.grid_features(embedding))
        return self.tokenizer(images)

    def token_errors(self, images: torch.Tensor, mask: torch.Tensor, embedding: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy of the true token at every patch (B, N) given the masked input."""
        targets = self.token_targets(images, embedding)
        logits = self.mim(images, mask)
        log_prob = F.log_softmax(logits.float(), dim=-1)
        return -log_prob.gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    def forward(
        self,
        images: torch.Tensor,
        mask_counts: torch.Tensor | None = None,
        category: torch.Tensor | None = None,
    ) -> InferenceBatch:
        """Anomaly maps (B, 1, H, W) and image scores (B,) of ImageNet-normalised images.

        Args:
            images: (B, 3, img_size, img_size).
            mask_counts: optional (B,) masked-patch count per image (the known category's ratio);
                default :meth:`image_mask_counts` (inferred category, or ``default_mask_count``).
            category: optional (B,) category index restricting the prototype search.
        """
        if not is_exporting():
            check_images(images, self.img_size, "PMAD", multiple=self.patch_size)
            if tuple(images.shape[-2:]) != (self.img_size, self.img_size):
                msg = f"PMAD was built for {self.img_size}x{self.img_size} inputs, got {tuple(images.shape[-2:])}"
                raise ValueError(msg)
            if not self.protoflow.is_fitted or not torch.isfinite(self.protoflow.reference_nll):
                msg = "PMAD's ProtoFlow has no prototypes or likelihood reference yet: train the model (Engine.fit) first"
                raise NotFittedError(msg)
        batch = images.shape[0]
        embedding = self.protoflow.embed(images)
        nll, labels = self.protoflow.propose(images, category, embedding=embedding)
        counts = self.image_mask_counts(labels) if mask_counts is None else mask_counts
        mask = self.proposal_mask(nll, counts)
        errors = self.token_errors(images, mask, embedding) * mask.to(images.dtype)
        size = images.shape[-2:]
        token_map = F.interpolate(errors.reshape(batch, 1, *self.grid), size=size, mode="bilinear", align_corners=True)
        weight = F.interpolate(self.protoflow.abnormality(nll).unsqueeze(1), size=size, mode="bilinear", align_corners=True)
        anomaly_map = self.blur(token_map * weight)
        return InferenceBatch(pred_score=anomaly_map.flatten(1).amax(dim=1), anomaly_map=anomaly_map)
