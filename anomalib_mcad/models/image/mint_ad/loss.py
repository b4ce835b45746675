"""MINT-AD's training loss: L = L_MSE + lambda_a L_CE + lambda_b L_prior (eq. 6)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812


class MintAdLoss(nn.Module):
    """Reconstruction MSE, classification cross-entropy and the Gaussian prior NLL.

    * ``mse`` (eq. 5): mean squared error between the backbone features ``f'`` and their
      reconstruction, averaged over all elements as UniAD's ``FeatureMSELoss`` does.
    * ``ce`` (eq. 1): cross-entropy of the class logits against the training category.
    * ``prior`` (eq. 4): negative log-likelihood of the adapted features under the
      per-position diagonal Gaussian of the distribution decoder. Eq. 4 sums over positions;
      we average over positions, channels and images (constant ``log 2 pi`` term included),
      so the 0.1 weight acts on a quantity of the same scale as the mean MSE. Gradients reach
      both the adapter (the features) and the INR/decoder (the distribution), as sec. 3.4 asks.

    Args:
        ce_weight: ``lambda_a`` (1.0).
        prior_weight: ``lambda_b`` (0.1).
    """

    def __init__(self, ce_weight: float = 1.0, prior_weight: float = 0.1, prior_detach: bool = False) -> None:
        super().__init__()
        self.prior_detach = prior_detach
        self.ce_weight = ce_weight
        self.prior_weight = prior_weight

    def forward(
        self,
        original: torch.Tensor,
        reconstructed: torch.Tensor,
        adapted: torch.Tensor,
        prior_mean: torch.Tensor,
        prior_var: torch.Tensor,
        logits: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Return ``{"loss", "mse", "ce", "prior"}``; ``ce`` is 0 without logits (image prompt)."""
        mse = F.mse_loss(reconstructed, original.detach())
        target = adapted.detach() if self.prior_detach else adapted
        prior = F.gaussian_nll_loss(prior_mean, target, prior_var, full=True, eps=1e-6, reduction="mean")
        ce = mse.new_zeros(())
        if logits is not None:
            if labels is None:
                msg = "MINT-AD's classification loss needs the category labels of the training images"
                raise ValueError(msg)
            ce = F.cross_entropy(logits, labels.long())
        loss = mse + self.ce_weight * ce + self.prior_weight * prior
        return {"loss": loss, "mse": mse, "ce": ce, "prior": prior}
