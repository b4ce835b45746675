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

from anomalib_mcad.models.components.masking import masked_count


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


class ForegroundMaskGenerator:
    """Foreground masking (MaskAD's third training strategy): mask an image's label-free foreground.

    Per image, the :func:`foreground_mask` patches are masked in a random order up to
    ``floor(max_ratio * H * W)`` of them; an image with a foreground smaller than that has all of
    it masked (at least one patch: the patch farthest from the border, as Otsu always splits).

    Args:
        grid: (H, W) of the feature maps it will receive.
        max_ratio: upper bound of the masked share, in (0, 1); a ratio that masks no patch of the
            grid is an error (as for the other generators).
        border: width of the ring taken as background (:func:`foreground_scores`).
    """

    def __init__(self, grid: tuple[int, int] | int, max_ratio: float, border: int = 1) -> None:
        grid = (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))
        self.max_count = masked_count(grid, max_ratio)
        if border < 1 or 2 * border >= min(grid):
            msg = f"border {border} leaves no interior on a {grid[0]}x{grid[1]} grid"
            raise ValueError(msg)
        self.grid = grid
        self.border = int(border)

    def __call__(self, features: torch.Tensor, rng: torch.Generator | None = None) -> torch.Tensor:
        """Boolean masks (B, H, W) for feature maps (B, C, H, W); True = masked."""
        if features.ndim != 4 or tuple(features.shape[-2:]) != self.grid:
            msg = f"ForegroundMaskGenerator expects (B, C, {self.grid[0]}, {self.grid[1]}) features, got {tuple(features.shape)}"
            raise ValueError(msg)
        foreground = foreground_mask(features, self.border).flatten(1)  # (B, H*W)
        noise = torch.rand(foreground.shape, generator=rng).to(features.device)
        priority = torch.where(foreground, noise, noise - 2.0)  # foreground first, random order within
        rank = priority.argsort(dim=1, descending=True).argsort(dim=1)
        keep = foreground.sum(1, keepdim=True).clamp(1, self.max_count)
        return (rank < keep).reshape(features.shape[0], *self.grid)
