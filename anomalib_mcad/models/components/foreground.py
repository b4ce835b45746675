"""Label-free foreground estimation on a patch-feature grid.

Industrial images (MVTec-AD, VisA) mostly show one object on a fairly uniform background that
reaches the image border. Each patch's foreground score is the L2 distance of its feature
from the mean feature of the border ring; Otsu's threshold on each image's scores splits
foreground from background. Used by MaskAD's foreground masking in training; reusable for
region-limited masking (PMAD). For textures the split is arbitrary but harmless (any region of
a texture is "foreground").
"""

from __future__ import annotations

import torch


def foreground_scores(features: torch.Tensor, border: int = 1) -> torch.Tensor:
    """Distance of each patch feature from the image's mean border feature: (B, C, H, W) -> (B, H, W)."""
    if features.ndim != 4:
        msg = f"foreground_scores expects (B, C, H, W) features, got shape {tuple(features.shape)}"
        raise ValueError(msg)
    height, width = features.shape[-2:]
    if border < 1 or 2 * border >= min(height, width):
        msg = f"border {border} leaves no interior on a {height}x{width} grid"
        raise ValueError(msg)
    ring = torch.ones(height, width, dtype=torch.bool, device=features.device)
    ring[border:-border, border:-border] = False
    background = features[..., ring].mean(dim=-1)  # (B, C)
    return (features - background[..., None, None]).norm(dim=1)


def otsu_threshold(values: torch.Tensor) -> torch.Tensor:
    """Otsu's threshold of each row of ``values`` (B, N): the split maximising between-class variance."""
    ordered, _ = values.sort(dim=1)
    n = ordered.shape[1]
    counts = torch.arange(1, n, device=values.device, dtype=values.dtype)  # size of the low class
    cumsum = ordered.cumsum(dim=1)[:, :-1]
    total = ordered.sum(dim=1, keepdim=True)
    low_mean = cumsum / counts
    high_mean = (total - cumsum) / (n - counts)
    between = counts * (n - counts) * (low_mean - high_mean) ** 2
    best = between.argmax(dim=1, keepdim=True)
    return 0.5 * (ordered.gather(1, best) + ordered.gather(1, best + 1)).squeeze(1)


def foreground_mask(features: torch.Tensor, border: int = 1) -> torch.Tensor:
    """Boolean foreground (B, H, W): patches whose border distance is above the image's Otsu threshold."""
    scores = foreground_scores(features, border)
    threshold = otsu_threshold(scores.flatten(1))
    return scores > threshold[:, None, None]
