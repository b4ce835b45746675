"""ProtoFlow (PMAD appendix C): prototype-guided normalizing flow that proposes patches to mask.

1. A frozen EfficientNet gives two feature maps (stride 8 and 16: ``tf_efficientnet_b6`` stages 2
   and 3, 72 + 200 = 272 channels, Table 5's "hidden size 272"); each is 3x3 average-pooled and
   the coarse map is repeated onto the fine grid and concatenated (PaDiM's ``embedding_concat``),
   giving one 28x28 map at 224 input.
2. A per-category prototype pool: k-center greedy coreset (1 % of each category's training
   patches, the authors' ``coreset_sampling_ratio``) in a :class:`NearestNeighbourBank`.
3. A conditional flow (4 AllInOneBlock couplings, clamp 1.9, 128-d positional condition, soft
   permutations) on the residual ``x - nearest prototype`` (eq. 7); trained on
   ``-log sigmoid(log p / C)`` as the authors' code does (CFlow's loss).
4. Abnormality: the per-channel negative log-likelihood ``-log p / C``. The authors turn it into a
   weight ``max(p) - p`` with ``p = exp(log p / C - max over the TEST set)``; here the maximum is
   taken over the TRAINING patches (buffer ``reference_nll``), so every test image is scored alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_mcad.models.components.cnn import CNNFeatureTap
from anomalib_mcad.models.components.coreset import NearestNeighbourBank, kcenter_greedy_indices
from anomalib_mcad.models.components.flow import ConditionalFlow
from anomalib_mcad.models.components.weights import PretrainedArg


def aggregate_scales(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """PaDiM-style single-scale embedding: 3x3 average pooling, coarser maps repeated onto the finest grid, concatenated."""
    pooled = [F.avg_pool2d(m, 3, stride=1, padding=1) for m in maps]
    size = pooled[0].shape[-2:]
    return torch.cat([pooled[0], *(F.interpolate(m, size=size, mode="nearest") for m in pooled[1:])], dim=1)


class ProtoFlow(nn.Module):
    """Prototype pool + conditional flow on residual features.

    Args:
        backbone: timm EfficientNet (``tf_efficientnet_b6``, Table 5).
        stages: tapped ``feature_info`` stages (2, 3 = strides 8 and 16, the authors' ``out_indices``).
        pretrained: ``True`` (timm hub), ``False``, a local file or ``"pypi:<package>"``.
        n_coupling, clamp, condition_dim: flow (4, 1.9, 128; Table 5).
        coreset_ratio: share of each category's training patches kept as prototypes (0.01).
        seed: coreset seed.
    """

    def __init__(
        self,
        backbone: str = "tf_efficientnet_b6",
        stages: Sequence[int] = (2, 3),
        pretrained: PretrainedArg = True,
        n_coupling: int = 4,
        clamp: float = 1.9,
        condition_dim: int = 128,
        coreset_ratio: float = 0.01,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.encoder = CNNFeatureTap(backbone, stages, pretrained)
        self.channels = self.encoder.out_channels
        self.reduction = self.encoder.reductions[0]
        self.bank = NearestNeighbourBank()
        self.flow = ConditionalFlow(self.channels, n_coupling=n_coupling, clamp=clamp, condition_dim=condition_dim, permute_soft=True)
        self.coreset_ratio = float(coreset_ratio)
        self.seed = int(seed)
        # max over training patches of log p / C, stored as its negative (the smallest training NLL)
        self.register_buffer("reference_nll", torch.tensor(float("nan")))

    @property
    def is_fitted(self) -> bool:
        """True once prototypes exist."""
        return not self.bank.is_empty

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Aggregated patch features (B, C, H/8, W/8) of ImageNet-normalised images."""
        return aggregate_scales(self.encoder(images))

    @torch.no_grad()
    def fit_prototypes(self, embeddings: torch.Tensor, labels: torch.Tensor, ratio: float | None = None) -> torch.Tensor:
        """Coreset of each category's patch rows (N, C) -> prototypes (M, C) with labels (M,); returns the labels kept."""
        ratio = self.coreset_ratio if ratio is None else ratio
        kept = []
        for category in torch.unique(labels).tolist():
            rows = torch.nonzero(labels == category).squeeze(1)
            if ratio >= 1.0:
                kept.append(rows)
            else:
                kept.append(rows[kcenter_greedy_indices(embeddings[rows], sampling_ratio=ratio, seed=self.seed)])
        index = torch.cat(kept)
        return embeddings[index], labels[index]

    def set_prototypes(self, prototypes: torch.Tensor, labels: torch.Tensor) -> None:
        """Replace the pool (used after training-set and support-set coresets)."""
        self.bank.fit(prototypes.to(self.reference_nll.device), labels.to(self.reference_nll.device))

    def add_prototypes(self, prototypes: torch.Tensor, labels: torch.Tensor) -> None:
        """Append prototypes (e.g. of unseen categories from k-shot support images)."""
        if self.bank.is_empty:
            self.set_prototypes(prototypes, labels)
            return
        memory = torch.cat([self.bank.memory, prototypes.to(self.bank.memory)])
        self.bank.fit(memory, torch.cat([self.bank.labels, labels.to(self.bank.labels.device)]))

    def residual(self, embedding: torch.Tensor, category: torch.Tensor | None = None) -> torch.Tensor:
        """``x - nearest prototype`` per patch (B, C, H, W); ``category`` restricts the search to its pool."""
        return self.residual_and_labels(embedding, category)[0]

    def residual_and_labels(self, embedding: torch.Tensor, category: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Residual (B, C, H, W) and the category label of each patch's nearest prototype (B, H, W)."""
        query = embedding.permute(0, 2, 3, 1)
        nearest, _, index = self.bank.nearest(query, category=category)
        return embedding - nearest.permute(0, 3, 1, 2), self.bank.labels[index]

    def nll(self, residual: torch.Tensor) -> torch.Tensor:
        """Per-channel negative log-likelihood ``-log p / C`` (B, H, W) of residual features."""
        return self.flow.nll(residual)

    @staticmethod
    def loss(nll: torch.Tensor) -> torch.Tensor:
        """The authors' training loss ``-log sigmoid(log p / C)``, averaged over patches."""
        return -F.logsigmoid(-nll).mean()

    def abnormality(self, nll: torch.Tensor) -> torch.Tensor:
        """Weight in [0, 1): ``1 - exp(log p / C - max_train log p / C)`` (authors' ``max(p) - p``, training max)."""
        return 1.0 - torch.exp(-(nll - self.reference_nll).clamp_min(0.0))

    def forward(self, images: torch.Tensor, category: torch.Tensor | None = None) -> torch.Tensor:
        """Per-channel NLL map (B, H/8, W/8) of ImageNet-normalised images."""
        return self.propose(images, category)[0]

    def propose(self, images: torch.Tensor, category: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """NLL map (B, H/8, W/8) and the category label of each patch's nearest prototype (B, H/8, W/8)."""
        residual, labels = self.residual_and_labels(self.embed(images), category)
        return self.nll(residual), labels
