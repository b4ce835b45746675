"""Anomaly-map post-processing shared by the feature-reconstruction models (INP-Former, ...).

The authors' evaluation (Dinomaly's and INP-Former's ``evaluation_batch``): a per-patch
distance map is upsampled to the input size (bilinear, ``align_corners=True``), resized to
``eval_size`` (256; bilinear, ``align_corners=False``), smoothed with a 5x5 Gaussian of sigma 4
(zero padding), and the image score is the mean of the top 1 % of the smoothed map.
"""

from __future__ import annotations

from typing import Literal

import torch
from anomalib.models.components import GaussianBlur2d
from torch import nn
from torch.nn import functional as F  # noqa: N812


def cosine_distance_map(encoder: list[torch.Tensor], decoder: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Mean over groups of the point-wise ``1 - cos`` of (B, C, h, w) maps, upsampled to ``size``: (B, 1, H, W)."""
    maps = [
        F.interpolate(
            (1 - F.cosine_similarity(en, de, dim=1)).unsqueeze(1),
            size=size,
            mode="bilinear",
            align_corners=True,
        )
        for en, de in zip(encoder, decoder, strict=True)
    ]
    return torch.cat(maps, dim=1).mean(dim=1, keepdim=True)


def top_k_mean(anomaly_map: torch.Tensor, ratio: float) -> torch.Tensor:
    """Mean of the largest ``ratio`` share of each map's values (the max when ``ratio`` is 0)."""
    flat = anomaly_map.flatten(1)
    if ratio <= 0:
        return flat.amax(dim=1)
    k = max(int(flat.shape[1] * ratio), 1)
    return flat.topk(k, dim=1).values.mean(dim=1)


class SmoothedTopKScorer(nn.Module):
    """Smooth an input-size anomaly map and score it by its top-k mean.

    Args:
        eval_size: side of the map that is smoothed and scored (256 as the authors); ``None``
            scores at the input size (anomalib's built-ins).
        sigma, kernel_size: Gaussian smoothing (4 and 5 as the authors).
        padding: ``"zeros"`` (authors) or ``"reflect"`` (anomalib's built-ins).
        top_k_ratio: share of top pixels averaged into the image score (0.01).
        output: ``"smoothed"`` returns the smoothed, scored map resized back to the input size;
            ``"raw"`` returns the unsmoothed input-size map.
    """

    def __init__(
        self,
        eval_size: int | None = 256,
        sigma: float = 4.0,
        kernel_size: int = 5,
        padding: Literal["zeros", "reflect"] = "zeros",
        top_k_ratio: float = 0.01,
        output: Literal["smoothed", "raw"] = "smoothed",
    ) -> None:
        super().__init__()
        if padding not in ("zeros", "reflect"):
            msg = f"padding must be 'zeros' or 'reflect', got {padding!r}"
            raise ValueError(msg)
        if output not in ("smoothed", "raw"):
            msg = f"output must be 'smoothed' or 'raw', got {output!r}"
            raise ValueError(msg)
        if not 0.0 <= top_k_ratio <= 1.0:
            msg = f"top_k_ratio must be in [0, 1], got {top_k_ratio}"
            raise ValueError(msg)
        self.eval_size = eval_size
        self.top_k_ratio = top_k_ratio
        self.output = output
        self.blur = GaussianBlur2d(
            sigma=sigma,
            channels=1,
            kernel_size=kernel_size,
            border_type="constant" if padding == "zeros" else "reflect",
        )

    def forward(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(score (B,), anomaly_map (B, 1, H, W))`` for a raw input-size map (B, 1, H, W)."""
        scored = raw
        if self.eval_size is not None:
            scored = F.interpolate(raw, size=(self.eval_size, self.eval_size), mode="bilinear", align_corners=False)
        smoothed = self.blur(scored)
        score = top_k_mean(smoothed, self.top_k_ratio)
        if self.output == "raw":
            return score, raw
        if smoothed.shape[-2:] != raw.shape[-2:]:
            smoothed = F.interpolate(smoothed, size=raw.shape[-2:], mode="bilinear", align_corners=False)
        return score, smoothed
