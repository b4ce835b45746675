"""Dinomaly's anomaly map and image score, as the authors evaluate them.

Per group, ``1 - cos`` between encoder and decoder features at each patch, upsampled
(bilinear, ``align_corners=True``) to the input size and averaged over groups. The map is
then resized to ``eval_size`` (256), smoothed with a 5x5 Gaussian of sigma 4 (zero padding in
the authors' code) and the image score is the mean of its top 1 % values.
"""

from __future__ import annotations

from typing import Literal

import torch
from anomalib.models.components import GaussianBlur2d
from torch import nn
from torch.nn import functional as F  # noqa: N812


def cosine_distance_map(encoder: list[torch.Tensor], decoder: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """Mean over groups of the point-wise cosine distance, upsampled to ``size``: (B, 1, H, W)."""
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


class AnomalyMapScorer(nn.Module):
    """Turn encoder/decoder feature groups into an anomaly map and an image score.

    Args:
        eval_size: side of the map that is smoothed and scored (256 as the authors); ``None``
            scores at the input size.
        sigma, kernel_size: Gaussian smoothing (4, 5 as the authors).
        padding: ``"zeros"`` (authors) or ``"reflect"`` (anomalib's built-in).
        top_k_ratio: share of top pixels averaged into the image score (0.01).
        output: ``"smoothed"`` returns the smoothed map resized back to the input size (what
            is scored, the map the authors evaluate); ``"raw"`` returns the unsmoothed
            input-size map (anomalib's built-in convention).
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
        self.eval_size = eval_size
        self.top_k_ratio = top_k_ratio
        self.output = output
        self.blur = GaussianBlur2d(
            sigma=sigma,
            channels=1,
            kernel_size=kernel_size,
            border_type="constant" if padding == "zeros" else "reflect",
        )

    def forward(self, encoder: list[torch.Tensor], decoder: list[torch.Tensor], size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(score (B,), anomaly_map (B, 1, H, W))`` for an input of ``size``."""
        raw = cosine_distance_map(encoder, decoder, size)
        scored = raw
        if self.eval_size is not None:
            scored = F.interpolate(raw, size=(self.eval_size, self.eval_size), mode="bilinear", align_corners=False)
        smoothed = self.blur(scored)
        score = top_k_mean(smoothed, self.top_k_ratio)
        if self.output == "raw":
            return score, raw
        if smoothed.shape[-2:] != raw.shape[-2:]:
            smoothed = F.interpolate(smoothed, size=size, mode="bilinear", align_corners=False)
        return score, smoothed
