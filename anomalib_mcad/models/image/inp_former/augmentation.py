"""The few-shot augmentation of INP-Former's authors: 21 fixed views of each normal image.

Each of the k normal images per category is complemented by 8 rotations (+-pi/16 .. +-pi/4),
8 translations (+-0.1, +-0.2 of the half-width in both axes), a horizontal flip, a grey copy
and rotations by 90, 180 and 270 degrees; rotations and translations pad by reflection. As in
the authors' script the views are made from the normalised network input.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

ROTATIONS = tuple(s * math.pi * f for f in (1 / 4, 3 / 16, 1 / 8, 1 / 16) for s in (-1, 1))
TRANSLATIONS = ((0.2, 0.2), (-0.2, 0.2), (-0.2, -0.2), (0.2, -0.2), (0.1, 0.1), (-0.1, 0.1), (-0.1, -0.1), (0.1, -0.1))
GREY_WEIGHTS = (0.299, 0.587, 0.114)  # kornia's rgb_to_grayscale, which the authors use


def _affine(images: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """Resample (B, C, H, W) through a 2x3 affine matrix with reflection padding."""
    theta = matrix.to(images).unsqueeze(0).expand(images.shape[0], -1, -1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, padding_mode="reflection", align_corners=False)


def rotate(images: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotate by ``angle`` radians about the centre."""
    c, s = math.cos(angle), math.sin(angle)
    return _affine(images, torch.tensor([[c, -s, 0.0], [s, c, 0.0]]))


def translate(images: torch.Tensor, dx: float, dy: float) -> torch.Tensor:
    """Shift by (dx, dy) in normalised coordinates ([-1, 1] spans the image)."""
    return _affine(images, torch.tensor([[1.0, 0.0, dx], [0.0, 1.0, dy]]))


def grey(images: torch.Tensor) -> torch.Tensor:
    """Luma of the three channels, repeated to three channels."""
    w = images.new_tensor(GREY_WEIGHTS).view(1, 3, 1, 1)
    return (images * w).sum(dim=1, keepdim=True).expand(-1, 3, -1, -1).contiguous()


def augmented_views(images: torch.Tensor) -> list[torch.Tensor]:
    """All 22 views (the original first) of a batch (B, 3, H, W), each (B, 3, H, W)."""
    views = [images]
    views += [rotate(images, a) for a in ROTATIONS]
    views += [translate(images, dx, dy) for dx, dy in TRANSLATIONS]
    views.append(images.flip(-1))
    views.append(grey(images))
    views += [torch.rot90(images, k, dims=(-2, -1)) for k in (1, 2, 3)]
    return views


NUM_VIEWS = 22


class FewShotAugmentation(nn.Module):
    """Replace each training image by one of its 22 views, drawn uniformly at random.

    The authors expand the k-shot set 22-fold before training; drawing a view per image and
    step gives every view the same probability without storing the expanded set. Only the
    selected view of each image is computed.
    """

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augmented batch of the same shape; the identity when not training."""
        if not self.training:
            return images
        choice = torch.randint(NUM_VIEWS, (images.shape[0],), generator=generator).tolist()
        return torch.cat([view_of(images[i : i + 1], c) for i, c in enumerate(choice)])


def view_of(image: torch.Tensor, index: int) -> torch.Tensor:
    """View number ``index`` (0..21, in :func:`augmented_views` order) of a batch."""
    if index == 0:
        return image
    index -= 1
    if index < len(ROTATIONS):
        return rotate(image, ROTATIONS[index])
    index -= len(ROTATIONS)
    if index < len(TRANSLATIONS):
        return translate(image, *TRANSLATIONS[index])
    index -= len(TRANSLATIONS)
    if index == 0:
        return image.flip(-1)
    if index == 1:
        return grey(image)
    if 2 <= index <= 4:  # noqa: PLR2004
        return torch.rot90(image, index - 1, dims=(-2, -1))
    msg = f"view index must be in [0, {NUM_VIEWS}), got {index + 1 + len(ROTATIONS) + len(TRANSLATIONS)}"
    raise ValueError(msg)
