"""MaskAD's training loss: squared L2 reconstruction of the whole feature map, plus the flow's NLL."""

from __future__ import annotations

import torch
from torch import nn


class MaskAdLoss(nn.Module):
    """``|h - h_hat|^2`` summed over channels, averaged over patches and images (masked and unmasked).

    The ranking flow's negative log-likelihood is added; it trains only the flow's parameters on
    detached features, so the sum is two independent objectives in one backward pass.
    """

    def forward(self, features: torch.Tensor, reconstructed: torch.Tensor, flow_nll: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"loss", "reconstruction", "flow_nll"}``."""
        reconstruction = (features - reconstructed).pow(2).sum(dim=1).mean()
        return {"loss": reconstruction + flow_nll, "reconstruction": reconstruction, "flow_nll": flow_nll}
