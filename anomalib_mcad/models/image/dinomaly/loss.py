"""Dinomaly's loose loss: global cosine distance with hard-point mining (L_global-hm)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_mcad.models.components.distributed import gather_rows


def scale_gradient(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Return ``x`` unchanged in value whose gradient is multiplied by ``weight`` (broadcast)."""
    return x * weight + x.detach() * (1 - weight)


class GlobalCosineHardMiningLoss(nn.Module):
    """Global cosine loss whose gradient is damped on well-reconstructed points.

    For each group, the loss is ``1 - cos`` between the flattened encoder and decoder maps of
    each image. Points whose point-wise cosine distance lies below the ``(1 - p)`` quantile
    (the "easy" ones) pass only ``factor`` of their gradient, so training concentrates on
    hard points; under DDP the quantile is taken over the global batch (all ranks' points), so
    a DDP step is the single-process step on the union of the ranks' batches. ``p`` rises
    linearly from 0 to ``final_p`` over ``warmup_iters`` iterations
    (Dinomaly supplementary, sec. B: 0 -> 90 % over 1,000 iterations; factor 0.1 in the
    authors' code). Gradient damping is written as a value-preserving blend instead of a
    backward hook, so it behaves the same under DDP and ``torch.compile``.
    """

    def __init__(self, final_p: float = 0.9, warmup_iters: int = 1000, factor: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= final_p < 1.0:
            msg = f"final_p must be in [0, 1), got {final_p}"
            raise ValueError(msg)
        self.final_p = final_p
        self.warmup_iters = warmup_iters
        self.factor = factor

    def mining_rate(self, step: int) -> float:
        """Share of points treated as easy at iteration ``step``."""
        if self.warmup_iters <= 0:
            return self.final_p
        return min(self.final_p * step / self.warmup_iters, self.final_p)

    def forward(self, encoder: list[torch.Tensor], decoder: list[torch.Tensor], step: int) -> torch.Tensor:
        """Mean over groups of the global cosine loss; maps are (B, C, h, w)."""
        p = self.mining_rate(step)
        total = encoder[0].new_zeros(())
        for en, de in zip(encoder, decoder, strict=True):
            en = en.detach()
            with torch.no_grad():
                point_dist = 1 - F.cosine_similarity(en, de, dim=1).unsqueeze(1)
                everyone = gather_rows(point_dist)  # the quantile of the global batch under DDP
                k = int(everyone.numel() * (1 - p))
                threshold = torch.topk(everyone.flatten(), k=max(k, 1)).values[-1]
                weight = torch.ones_like(point_dist, dtype=de.dtype).masked_fill(point_dist < threshold, self.factor)
            de = scale_gradient(de, weight)
            total = total + (1 - F.cosine_similarity(en.flatten(1), de.flatten(1), dim=1)).mean()
        return total / len(encoder)
