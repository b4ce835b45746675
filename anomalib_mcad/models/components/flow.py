"""A conditional normalizing flow over patch features, for abnormality ranking.

Shared by MaskAD (the flow-based ranking M_po behind its prototype-oriented masks) and PMAD's
ProtoFlow (4 coupling layers, clamp 1.9, 128-d positional condition, trained on residual
features). It is CFlow's decoder (Gudovskiy et al. 2022) applied to one feature map: every
patch vector goes through FrEIA ``AllInOneBlock`` couplings conditioned on a 2-D sin/cos
encoding of its position (anomalib's ``positional_encoding_2d``). Built from FrEIA's
``SequenceINN`` as anomalib's CFlow; it exports to ONNX and OpenVINO (tested).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from anomalib.models.image.cflow.utils import positional_encoding_2d
from FrEIA.framework import SequenceINN
from FrEIA.modules import AllInOneBlock
from torch import nn

from anomalib_mcad.models.components.validation import is_exporting


def _softplus_scale(softplus: nn.Module, scale: torch.Tensor) -> torch.Tensor:
    """FrEIA's SOFTPLUS global scale activation, as a module-level function so the flow pickles."""
    return 0.1 * softplus(scale)


def _subnet_factory(hidden_ratio: float) -> Callable[[int, int], nn.Module]:
    """Coupling subnet: Linear -> ReLU -> Linear with ``hidden_ratio`` x input width hidden units."""

    def subnet(dims_in: int, dims_out: int) -> nn.Module:
        hidden = max(1, int(round(dims_in * hidden_ratio)))
        return nn.Sequential(nn.Linear(dims_in, hidden), nn.ReLU(), nn.Linear(hidden, dims_out))

    return subnet


class ConditionalFlow(nn.Module):
    """Patch-wise conditional normalizing flow: (B, C, H, W) features -> latent of the same shape.

    Args:
        in_channels: C of the feature maps.
        n_coupling: number of AllInOneBlock coupling layers (CFlow/ProtoFlow: 4).
        clamp: affine clamping of the couplings (CFlow/ProtoFlow: 1.9).
        condition_dim: width of the positional condition, a multiple of 4; 0 = unconditional.
        hidden_ratio: subnet hidden width / subnet input width (anomalib's CFlow uses 2).
        permute_soft: FrEIA's soft (random orthogonal) channel mixing between couplings instead of a
            hard permutation (PMAD's and CFlow's authors use ``True``); fixed at construction and
            saved in the state dict either way.
    """

    def __init__(
        self,
        in_channels: int,
        n_coupling: int = 4,
        clamp: float = 1.9,
        condition_dim: int = 128,
        hidden_ratio: float = 2.0,
        permute_soft: bool = False,
    ) -> None:
        super().__init__()
        if in_channels < 2:
            msg = f"ConditionalFlow needs at least 2 channels to split in a coupling, got {in_channels}"
            raise ValueError(msg)
        if condition_dim < 0 or condition_dim % 4:
            msg = f"condition_dim must be 0 or a positive multiple of 4, got {condition_dim}"
            raise ValueError(msg)
        if n_coupling < 1:
            msg = f"n_coupling must be >= 1, got {n_coupling}"
            raise ValueError(msg)
        self.in_channels = int(in_channels)
        self.condition_dim = int(condition_dim)
        self.flow = SequenceINN(self.in_channels)
        extra = {"cond": 0, "cond_shape": (self.condition_dim,)} if self.condition_dim else {}
        for _ in range(n_coupling):
            self.flow.append(
                AllInOneBlock,
                subnet_constructor=_subnet_factory(hidden_ratio),
                affine_clamping=clamp,
                global_affine_type="SOFTPLUS",
                permute_soft=permute_soft,
                **extra,
            )
        for block in self.flow.module_list:
            # FrEIA stores this activation as a lambda, which torch.save (anomalib's torch export) cannot pickle
            block.global_scale_activation = functools.partial(_softplus_scale, block.softplus)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent ``z`` (B, C, H, W) and log |det J| per patch (B, H, W)."""
        if not is_exporting() and (features.ndim != 4 or features.shape[1] != self.in_channels):
            msg = f"ConditionalFlow expects (B, {self.in_channels}, H, W) features, got {tuple(features.shape)}"
            raise ValueError(msg)
        batch, channels, height, width = features.shape
        patches = features.permute(0, 2, 3, 1).reshape(-1, channels)
        if self.condition_dim:
            position = positional_encoding_2d(self.condition_dim, height, width).to(features)
            condition = position.permute(1, 2, 0).reshape(1, height * width, -1).expand(batch, -1, -1)
            z, log_jac = self.flow(patches, c=[condition.reshape(-1, self.condition_dim)])
        else:
            z, log_jac = self.flow(patches)
        z = z.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        return z, log_jac.reshape(batch, height, width)

    def nll(self, features: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood per patch and channel (B, H, W): the training loss (mean it).

        ``(0.5 |z|^2 + 0.5 C log 2 pi - log |det J|) / C`` under a standard normal prior.
        """
        z, log_jac = self(features)
        channels = z.shape[1]
        return (0.5 * (z * z).sum(1) + 0.5 * channels * math.log(2 * math.pi) - log_jac) / channels

    def abnormality(self, features: torch.Tensor) -> torch.Tensor:
        """Distance of each patch's latent from the origin, ``|z|_2`` (B, H, W): higher = less normal."""
        z, _ = self(features)
        return torch.sqrt((z * z).sum(1))
