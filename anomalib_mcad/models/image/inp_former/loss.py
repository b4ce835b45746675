"""INP-Former's losses: soft-mining global cosine loss plus lambda x INP coherence loss."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_mcad.models.components.distributed import global_mean


def reweight_gradient(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Return exactly ``x`` in value, with its gradient multiplied by ``weight`` (broadcast).

    Written as ``x.detach() + (x - x.detach()) * weight`` instead of a backward hook so it
    composes with DDP, checkpointing and ``torch.compile``.
    """
    return x.detach() + (x - x.detach()) * weight


class SoftMiningCosineLoss(nn.Module):
    """Global cosine loss whose gradient is reweighted per point by ``(d / mean d) ** power``.

    ``d`` is the point-wise cosine distance between encoder and decoder maps (B, C, h, w) and
    ``mean d`` its mean over the batch (over the global batch under DDP, so a DDP step equals
    one single-process step on the union of the ranks' batches), so poorly reconstructed
    points get more gradient and well reconstructed ones less, without dropping any (the
    authors' ``global_cosine_hm_adaptive`` with ``y=3``). The loss value is the mean over groups of ``1 - cos`` between each image's
    flattened maps.
    """

    def __init__(self, power: float = 3.0) -> None:
        super().__init__()
        self.power = power

    def forward(self, encoder: list[torch.Tensor], decoder: list[torch.Tensor]) -> torch.Tensor:
        """Mean over groups of the global cosine loss."""
        total = encoder[0].new_zeros(())
        for en, de in zip(encoder, decoder, strict=True):
            en = en.detach()
            with torch.no_grad():
                point = 1 - F.cosine_similarity(en, de, dim=1).unsqueeze(1)
                weight = (point / global_mean(point)) ** self.power  # the global batch's mean under DDP
            de = reweight_gradient(de, weight)
            total = total + (1 - F.cosine_similarity(en.flatten(1), de.flatten(1), dim=1)).mean()
        return total / len(encoder)


class InpFormerLoss(nn.Module):
    """``L = L_soft-mining + coherence_weight * L_coherence`` (lambda = 0.2).

    The INP coherence loss is the mean over patches of the cosine distance of each patch's
    fused encoder feature to its nearest INP, which keeps the INPs normal.
    """

    def __init__(self, coherence_weight: float = 0.2, power: float = 3.0) -> None:
        super().__init__()
        if coherence_weight < 0:
            msg = f"coherence_weight must be >= 0, got {coherence_weight}"
            raise ValueError(msg)
        self.coherence_weight = coherence_weight
        self.reconstruction = SoftMiningCosineLoss(power)

    def forward(self, encoder: list[torch.Tensor], decoder: list[torch.Tensor], inp_distance: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"loss", "reconstruction", "coherence"}``."""
        reconstruction = self.reconstruction(encoder, decoder)
        coherence = inp_distance.mean()
        return {
            "loss": reconstruction + self.coherence_weight * coherence,
            "reconstruction": reconstruction,
            "coherence": coherence,
        }
