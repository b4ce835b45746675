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
   taken over HELD-OUT residuals of the training patches (buffer ``reference_nll``; set by the
   Lightning module), so every test image is scored alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torchvision.transforms import v2

from anomalib_mcad.models.components.cnn import CNNFeatureTap

from anomalib_mcad.models.components.coreset import NearestNeighbourBank, block_rows, per_category_coreset_indices, squared_distances
from anomalib_mcad.models.components.flow import ConditionalFlow
from anomalib_mcad.models.components.weights import PretrainedArg


def aggregate_scales(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """PaDiM-style single-scale embedding: 3x3 average pooling, coarser maps repeated onto the finest grid, concatenated."""
    pooled = [F.avg_pool2d(m, 3, stride=1, padding=1) for m in maps]
    size = pooled[0].shape[-2:]
    return torch.cat([pooled[0], *(F.interpolate(m, size=size, mode="nearest") for m in pooled[1:])], dim=1)


@torch.no_grad()
def augmented_views(images: torch.Tensor, scale: tuple[float, float] = (0.2, 1.0), flip: float = 0.5) -> torch.Tensor:
    """The authors' ProtoFlow training views of a batch: per image a RandomResizedCrop (area ``scale``,
    aspect 3/4-4/3, bicubic) back to the input size and a horizontal flip with probability ``flip``.

    Applied to the already normalised tensors (the authors crop the PIL image before normalising;
    both are linear per pixel up to the resampling). Uses torch's global RNG.
    """
    size = list(images.shape[-2:])
    crop = v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    views = []
    for image in images:
        view = crop(image)
        if torch.rand(()) < flip:
            view = view.flip(-1)
        views.append(view)
    return torch.stack(views)


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
        self.prototype_sources: torch.Tensor | None = None
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
    def fit_prototypes(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        ratio: float | None = None,
        sources: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """Coreset of each category's patch rows (N, C) -> prototypes (M, C) and their labels (M,).

        With ``sources`` (N,) (the training image each row comes from) the kept rows' sources (M,)
        are returned as a third tensor, for :meth:`heldout_residual`.
        """
        ratio = self.coreset_ratio if ratio is None else ratio
        index = per_category_coreset_indices(embeddings, labels, ratio, seed=self.seed)
        if sources is None:
            return embeddings[index], labels[index]
        return embeddings[index], labels[index], sources[index]

    def set_prototypes(self, prototypes: torch.Tensor, labels: torch.Tensor, sources: torch.Tensor | None = None) -> None:
        """Replace the pool (used after training-set and support-set coresets).

        ``sources`` (M,): the training image of each prototype (-1: none), kept in memory only
        (not in the state dict) for held-out residuals during training.
        """
        self.bank.fit(prototypes.to(self.reference_nll.device), labels.to(self.reference_nll.device))
        if sources is None:
            sources = torch.full((prototypes.shape[0],), -1, dtype=torch.long)
        self.prototype_sources = sources.long().to(self.reference_nll.device)

    def add_prototypes(self, prototypes: torch.Tensor, labels: torch.Tensor) -> None:
        """Append prototypes (e.g. of unseen categories from k-shot support images)."""
        if self.bank.is_empty:
            self.set_prototypes(prototypes, labels)
            return
        old = self.sources_or_none()
        memory = torch.cat([self.bank.memory, prototypes.to(self.bank.memory)])
        self.bank.fit(memory, torch.cat([self.bank.labels, labels.to(self.bank.labels.device)]))
        self.prototype_sources = torch.cat([old, torch.full((prototypes.shape[0],), -1, dtype=torch.long, device=old.device)])

    def sources_or_none(self) -> torch.Tensor:
        """Source image of each prototype; all -1 (unknown, e.g. after loading a checkpoint) if not recorded."""
        sources = getattr(self, "prototype_sources", None)
        if sources is None or sources.shape[0] != self.bank.memory.shape[0]:
            return torch.full((self.bank.memory.shape[0],), -1, dtype=torch.long, device=self.bank.memory.device)
        return sources

    @torch.no_grad()
    def heldout_residual(
        self,
        embedding: torch.Tensor,
        category: torch.Tensor | None = None,
        source: torch.Tensor | None = None,
        chunk: int = 4096,
    ) -> torch.Tensor:
        """Residual (B, C, H, W) to the nearest prototype that does NOT come from the patch's own image.

        ``source`` (B,): each image's training index (-1 or ``None``: no exclusion); ``category`` (B,):
        search only that category's prototypes. A training patch's plain residual is exactly zero
        when the patch is itself a prototype and biased small when a neighbouring patch of the same
        image is; excluding the own image gives the residual the patch would have as an unseen
        normal image (leave-one-image-out), i.e. the distribution test patches of normal images follow.
        ``chunk``: queries per distance block, fewer for a big pool (as in :class:`NearestNeighbourBank`).
        """
        b, c, h, w = embedding.shape
        flat = embedding.permute(0, 2, 3, 1).reshape(-1, c)
        memory, labels, sources = self.bank.memory, self.bank.labels, self.sources_or_none()
        per = h * w
        img_src = (source if source is not None else torch.full((b,), -1, dtype=torch.long)).to(memory.device).long().repeat_interleave(per)
        img_cat = category.to(memory.device).long().repeat_interleave(per) if category is not None else None
        mem_sq = (memory * memory).sum(1)
        step = block_rows(memory.shape[0], chunk)
        nearest = []
        for start in range(0, flat.shape[0], step):
            sq = squared_distances(flat[start : start + step], memory, mem_sq)
            if img_cat is not None:
                sq.masked_fill_(img_cat[start : start + step, None] != labels[None, :], float("inf"))
            plain = sq.argmin(dim=1)
            own = (img_src[start : start + step, None] >= 0) & (img_src[start : start + step, None] == sources[None, :])
            best, held = sq.masked_fill_(own, float("inf")).min(dim=1)
            # a pool made only of the image's own patches (one training image): keep them
            nearest.append(memory[torch.where(torch.isinf(best), plain, held)])
        return embedding - torch.cat(nearest).reshape(b, h, w, c).permute(0, 3, 1, 2)

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

    def propose(
        self,
        images: torch.Tensor,
        category: torch.Tensor | None = None,
        embedding: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """NLL map (B, H/8, W/8) and the category label of each patch's nearest prototype (B, H/8, W/8).

        ``embedding``: :meth:`embed` of ``images`` if the caller already has it (computed once per batch).
        """
        residual, labels = self.residual_and_labels(self.embed(images) if embedding is None else embedding, category)
        return self.nll(residual), labels
