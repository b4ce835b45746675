"""Patch-grid mask generators for masked image modelling (PMAD appendix A-B, MaskAD).

Every generator is a callable ``generator(rng=None, *, region=None, ...)`` returning a bool
tensor ``[H, W]`` over the patch grid (``True`` = masked). All randomness is drawn from the
optional ``torch.Generator``, so a seeded generator gives the same mask every time.

- :class:`RandomMaskGenerator`: ``floor(ratio * H * W)`` patches, uniformly or by weights.
- :class:`BlockwiseMaskGenerator`: Algorithm 1 of the PMAD appendix in BEiT's form (block
  area uniform in ``[min_patches, remaining]``, log-uniform aspect ratio in
  ``[min_aspect, max_aspect]``, 10 placement attempts per block, a block must add between 1 and
  ``remaining`` new patches), then a top-up so that ``|M| = mN`` as Algorithm 1's ``until``
  demands (BEiT stops short when 10 attempts fail).
- :class:`CombinationalMaskGenerator`: appendix B: region-limited or not, frequency / dynamic /
  uniform weights, random or blockwise sampling.
- :func:`patch_frequency_weights` and :class:`PatchErrorRecorder` supply the frequency-based and
  dynamic (recorded per-patch reconstruction error) sampling weights.

``region`` (bool ``[H, W]``) limits masked patches to that region (a foreground estimate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

_EPS = 1e-6


def _check_ratio(ratio: float) -> float:
    if not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) < 1.0:
        msg = f"mask ratio must lie in the open interval (0, 1), got {ratio!r}"
        raise ValueError(msg)
    return float(ratio)


def _check_grid(grid: tuple[int, int] | int) -> tuple[int, int]:
    if isinstance(grid, int):
        grid = (grid, grid)
    height, width = (int(v) for v in grid)
    if height < 1 or width < 1:
        msg = f"patch grid must have positive sides, got {grid!r}"
        raise ValueError(msg)
    return height, width


def masked_count(grid: tuple[int, int], ratio: float) -> int:
    """Number of masked patches ``floor(ratio * H * W)`` (the authors' ``int(N * m)``)."""
    height, width = _check_grid(grid)
    count = math.floor(_check_ratio(ratio) * height * width + 1e-9)
    if count < 1:
        msg = f"mask ratio {ratio} masks no patch of a {height}x{width} grid; use a larger ratio or a finer grid"
        raise ValueError(msg)
    return count


def _uniform(rng: torch.Generator | None) -> float:
    return float(torch.rand((), generator=rng))


def normalise_weights(weights: torch.Tensor) -> torch.Tensor:
    """Min-max normalise sampling weights to [0, 1] (appendix B); constant weights become ones."""
    weights = weights.float()
    if not torch.isfinite(weights).all() or (weights < 0).any():
        msg = "sampling weights must be finite and non-negative"
        raise ValueError(msg)
    low, high = weights.min(), weights.max()
    if float(high - low) <= 0:
        return torch.ones_like(weights)
    return (weights - low) / (high - low)


def _check_region(region: torch.Tensor | None, grid: tuple[int, int], needed: int) -> torch.Tensor:
    if region is None:
        return torch.ones(grid, dtype=torch.bool)
    if region.shape != grid:
        msg = f"region must have the patch-grid shape {grid}, got {tuple(region.shape)}"
        raise ValueError(msg)
    region = region.bool()
    available = int(region.sum())
    if available < needed:
        msg = f"region holds {available} patches but {needed} must be masked; the request cannot fit"
        raise ValueError(msg)
    return region


def _check_weights(weights: torch.Tensor | None, grid: tuple[int, int]) -> torch.Tensor | None:
    if weights is None:
        return None
    if weights.numel() != grid[0] * grid[1]:
        msg = f"sampling weights must have one value per patch ({grid[0]}x{grid[1]}), got {tuple(weights.shape)}"
        raise ValueError(msg)
    return normalise_weights(weights.reshape(grid))


class RandomMaskGenerator:
    """Mask ``floor(ratio * H * W)`` distinct patches, uniformly or with probability ~ weights.

    The authors draw weighted masks with replacement (so fewer distinct patches than asked); here
    draws are without replacement so the count is exact, and a floor of 1e-6 keeps the patch
    with the minimum weight (0 after min-max normalisation) drawable.
    """

    def __init__(self, grid: tuple[int, int] | int, ratio: float) -> None:
        self.grid = _check_grid(grid)
        self.ratio = _check_ratio(ratio)
        self.num_masked = masked_count(self.grid, self.ratio)

    def __repr__(self) -> str:
        return f"RandomMaskGenerator(grid={self.grid}, ratio={self.ratio}, num_masked={self.num_masked})"

    def __call__(
        self,
        rng: torch.Generator | None = None,
        *,
        region: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return a bool ``[H, W]`` mask with exactly ``num_masked`` True entries inside ``region``."""
        region = _check_region(region, self.grid, self.num_masked).flatten()
        norm = _check_weights(weights, self.grid)
        probs = torch.ones(region.numel()) if norm is None else norm.flatten().clamp_min(_EPS)
        probs = probs * region
        chosen = torch.multinomial(probs, self.num_masked, replacement=False, generator=rng)
        mask = torch.zeros(region.numel(), dtype=torch.bool)
        mask[chosen] = True
        return mask.reshape(self.grid)


class BlockwiseMaskGenerator:
    """Blockwise masking, Algorithm 1 of the PMAD appendix (BEiT's procedure).

    Args:
        grid: patch grid ``(H, W)``.
        ratio: mask ratio ``m`` in (0, 1); ``floor(m * H * W)`` patches are masked.
        min_patches: minimum block area (4 in Algorithm 1).
        min_aspect: minimum block aspect ratio (0.3); ``max_aspect`` defaults to ``1 / min_aspect``.
        max_patches: maximum block area (default: ``m * N``, as in Algorithm 1).
        attempts: placement attempts per block before the block loop stops (10, as BEiT).
        top_up: after the block loop stops, add patches next to masked ones until ``|M| = mN``
            (Algorithm 1's ``until |M| >= mN``); ``False`` keeps BEiT's possibly short mask.
    """

    def __init__(
        self,
        grid: tuple[int, int] | int,
        ratio: float,
        min_patches: int = 4,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        max_patches: int | None = None,
        attempts: int = 10,
        top_up: bool = True,
    ) -> None:
        self.grid = _check_grid(grid)
        self.ratio = _check_ratio(ratio)
        self.num_masked = masked_count(self.grid, self.ratio)
        height, width = self.grid
        max_aspect = 1.0 / min_aspect if max_aspect is None and min_aspect > 0 else max_aspect
        if min_aspect <= 0 or max_aspect is None or max_aspect < min_aspect:
            msg = f"aspect ratios must satisfy 0 < min_aspect <= max_aspect, got {min_aspect}, {max_aspect}"
            raise ValueError(msg)
        self.min_patches = int(min_patches)
        self.max_patches = self.num_masked if max_patches is None else int(max_patches)
        if self.num_masked < self.min_patches:
            msg = (
                f"blockwise masking cannot fit: ratio {ratio} masks {self.num_masked} patches of a {height}x{width} "
                f"grid, fewer than one block of min_patches={self.min_patches}"
            )
            raise ValueError(msg)
        if (height - 1) * (width - 1) < self.min_patches:
            msg = (
                f"blockwise masking cannot fit: blocks must be smaller than the {height}x{width} grid "
                f"and hold at least min_patches={self.min_patches} patches"
            )
            raise ValueError(msg)
        if self.min_patches < 1 or self.max_patches < self.min_patches:
            msg = f"block sizes must satisfy 1 <= min_patches <= max_patches, got {min_patches}, {self.max_patches}"
            raise ValueError(msg)
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.attempts = int(attempts)
        self.top_up = top_up

    def __repr__(self) -> str:
        return (
            f"BlockwiseMaskGenerator(grid={self.grid}, ratio={self.ratio}, num_masked={self.num_masked}, "
            f"blocks=[{self.min_patches}, {self.max_patches}], aspect=exp{self.log_aspect})"
        )

    def _place_block(
        self,
        mask: torch.Tensor,
        max_new: int,
        region: torch.Tensor,
        weights: torch.Tensor | None,
        rng: torch.Generator | None,
    ) -> int:
        """One masking step: try ``attempts`` blocks, keep the first adding 1..max_new patches."""
        height, width = self.grid
        for _ in range(self.attempts):
            area = self.min_patches + (max_new - self.min_patches) * _uniform(rng)
            log_lo, log_hi = self.log_aspect
            aspect = math.exp(log_lo + (log_hi - log_lo) * _uniform(rng))
            block_h = round(math.sqrt(area * aspect))
            block_w = round(math.sqrt(area / aspect))
            if not (block_w < width and block_h < height):
                continue
            # Top-left corners: all valid positions, restricted to the region (the authors' rule) unless
            # none lies in it; drawn uniformly or ~ the sampling weight at the corner.
            corners = torch.zeros(self.grid, dtype=torch.bool)
            corners[: height - block_h + 1, : width - block_w + 1] = True
            if (corners & region).any():
                corners &= region
            probs = corners.flatten().float()
            if weights is not None:
                probs = probs * weights.flatten().clamp_min(_EPS)
            corner = int(torch.multinomial(probs, 1, generator=rng))
            top, left = divmod(corner, width)
            block = torch.zeros(self.grid, dtype=torch.bool)
            block[top : top + block_h, left : left + block_w] = True
            new = block & region & ~mask
            n_new = int(new.sum())
            if 0 < n_new <= max_new:
                mask |= new
                return n_new
        return 0

    def _fill(
        self,
        mask: torch.Tensor,
        missing: int,
        region: torch.Tensor,
        weights: torch.Tensor | None,
        rng: torch.Generator | None,
    ) -> None:
        """Add ``missing`` patches one at a time, preferring unmasked neighbours of masked patches."""
        for _ in range(missing):
            free = region & ~mask
            near = torch.zeros_like(mask)
            near[1:] |= mask[:-1]
            near[:-1] |= mask[1:]
            near[:, 1:] |= mask[:, :-1]
            near[:, :-1] |= mask[:, 1:]
            candidates = free & near if (free & near).any() else free
            probs = candidates.flatten().float()
            if weights is not None:
                probs = probs * weights.flatten().clamp_min(_EPS)
            mask.view(-1)[int(torch.multinomial(probs, 1, generator=rng))] = True

    def __call__(
        self,
        rng: torch.Generator | None = None,
        *,
        region: torch.Tensor | None = None,
        weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return a bool ``[H, W]`` blockwise mask inside ``region`` (corners ~ ``weights`` if given)."""
        region = _check_region(region, self.grid, self.num_masked)
        norm = _check_weights(weights, self.grid)
        mask = torch.zeros(self.grid, dtype=torch.bool)
        count = 0
        while count < self.num_masked:
            max_new = min(self.num_masked - count, self.max_patches)
            delta = self._place_block(mask, max_new, region, norm, rng)
            if delta == 0:
                break
            count += delta
        if self.top_up and count < self.num_masked:
            self._fill(mask, self.num_masked - count, region, norm, rng)
        return mask


def patch_frequency_weights(image: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per-patch high-frequency energy of ``image`` ``[C, H, W]``, min-max normalised to [0, 1].

    Each patch of the grey image is Fourier-transformed; the energy outside the DC term is the
    patch's "frequency" (appendix B). The authors instead patchify the whole image's spectrum.
    """
    if image.ndim != 3:
        msg = f"expected one image of shape (C, H, W), got {tuple(image.shape)}"
        raise ValueError(msg)
    grid = _check_grid(grid)
    height, width = image.shape[-2:]
    if height % grid[0] or width % grid[1]:
        msg = f"image {height}x{width} does not split into a {grid[0]}x{grid[1]} patch grid"
        raise ValueError(msg)
    grey = image.float().mean(0)
    ph, pw = height // grid[0], width // grid[1]
    patches = grey.reshape(grid[0], ph, grid[1], pw).permute(0, 2, 1, 3)
    patches = patches - patches.mean(dim=(-2, -1), keepdim=True)  # removes the DC term
    energy = torch.fft.fft2(patches, norm="ortho").abs().pow(2).sum(dim=(-2, -1))
    return normalise_weights(energy)


class PatchErrorRecorder(nn.Module):
    """Running mean of the reconstruction error of every patch position, per class (dynamic masking).

    Buffers ``errors`` and ``counts`` ``[num_classes, H*W]`` are saved in checkpoints. Positions
    never recorded get the class's highest recorded error, so unexplored patches are sampled often
    (the authors give them the constant 1).
    """

    def __init__(self, num_classes: int, grid: tuple[int, int] | int) -> None:
        super().__init__()
        self.grid = _check_grid(grid)
        n = self.grid[0] * self.grid[1]
        self.register_buffer("errors", torch.zeros(num_classes, n))
        self.register_buffer("counts", torch.zeros(num_classes, n))

    @torch.no_grad()
    def update(self, class_index: torch.Tensor, mask: torch.Tensor, errors: torch.Tensor) -> None:
        """Record per-patch ``errors`` ``[B, H*W]`` at the masked positions ``mask`` ``[B, H, W]``."""
        mask = mask.reshape(mask.shape[0], -1).to(self.errors.device)
        errors = errors.reshape(errors.shape[0], -1).detach().float().to(self.errors.device)
        for row in range(mask.shape[0]):
            cls = int(class_index[row])
            sel = mask[row]
            count = self.counts[cls, sel]
            self.errors[cls, sel] = (self.errors[cls, sel] * count + errors[row, sel]) / (count + 1)
            self.counts[cls, sel] = count + 1

    def weights(self, class_index: int) -> torch.Tensor | None:
        """Sampling weights ``[H, W]`` for a class, or ``None`` before anything was recorded."""
        seen = self.counts[class_index] > 0
        if not seen.any():
            return None
        values = self.errors[class_index].clone()
        values[~seen] = values[seen].max()
        return normalise_weights(values.cpu()).reshape(self.grid)


def rank_loss_weights(weights: torch.Tensor, mask: torch.Tensor, bias: float = 1.0, power: float = 2.0) -> torch.Tensor:
    """Per-masked-patch loss weights ``(bias + r (2 - bias))^power`` from the rank ``r`` in [0, 1].

    ``r`` ranks the dynamic sampling weights of the masked patches (authors' code, used with dynamic
    masking); returns a vector in the order of ``weights.flatten()[mask.flatten()]``.
    """
    selected = weights.flatten()[mask.flatten()]
    if selected.numel() < 2:
        return torch.ones_like(selected)
    rank = torch.argsort(torch.argsort(selected)).float() / (selected.numel() - 1)
    return (bias + rank * (2.0 - bias)).pow(power)


@dataclass(frozen=True)
class MaskChoice:
    """Which branch of the combinational strategy produced a mask."""

    region_limited: bool
    weighting: str  # "frequency" | "dynamic" | "uniform"
    sampling: str  # "blockwise" | "random"


class CombinationalMaskGenerator:
    """Combinational masking of appendix B (Figure 4).

    For each mask: region-limited with probability ``p_region`` (0.5), then frequency / dynamic /
    uniform weights with probabilities ``weighting_probs`` (1/3 each), then blockwise with
    probability ``p_blockwise`` (0.5) else random sampling; the authors' choices. A branch whose input
    is missing falls back: no region (or one too small for the request) -> whole grid; no image or no
    recorded errors -> uniform weights.
    """

    WEIGHTINGS = ("frequency", "dynamic", "uniform")

    def __init__(
        self,
        grid: tuple[int, int] | int,
        ratio: float,
        min_patches: int = 4,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        max_patches: int | None = None,
        p_region: float = 0.5,
        weighting_probs: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3),
        p_blockwise: float = 0.5,
    ) -> None:
        self.random = RandomMaskGenerator(grid, ratio)
        self.blockwise = BlockwiseMaskGenerator(grid, ratio, min_patches, min_aspect, max_aspect, max_patches)
        self.grid = self.random.grid
        self.num_masked = self.random.num_masked
        probs = torch.tensor(weighting_probs, dtype=torch.float)
        if probs.numel() != 3 or (probs < 0).any() or float(probs.sum()) <= 0:
            msg = f"weighting_probs must be three non-negative numbers, got {weighting_probs}"
            raise ValueError(msg)
        for name, p in (("p_region", p_region), ("p_blockwise", p_blockwise)):
            if not 0.0 <= p <= 1.0:
                msg = f"{name} must be a probability, got {p}"
                raise ValueError(msg)
        self.p_region = p_region
        self.weighting_probs = probs / probs.sum()
        self.p_blockwise = p_blockwise

    def sample(
        self,
        rng: torch.Generator | None = None,
        *,
        region: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        dynamic_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MaskChoice]:
        """Draw the branch, then the mask; returns ``(mask [H, W] bool, choice)``."""
        limited = _uniform(rng) < self.p_region
        weighting = self.WEIGHTINGS[int(torch.multinomial(self.weighting_probs, 1, generator=rng))]
        sampling = "blockwise" if _uniform(rng) < self.p_blockwise else "random"
        if limited and (region is None or int(region.bool().sum()) < self.num_masked):
            limited = False
        weights = None
        if weighting == "frequency" and image is not None:
            weights = patch_frequency_weights(image, self.grid)
        elif weighting == "dynamic" and dynamic_weights is not None:
            weights = dynamic_weights
        else:
            weighting = "uniform"
        generator = self.blockwise if sampling == "blockwise" else self.random
        mask = generator(rng, region=region if limited else None, weights=weights)
        return mask, MaskChoice(limited, weighting, sampling)

    def __call__(
        self,
        rng: torch.Generator | None = None,
        *,
        region: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        dynamic_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return a bool ``[H, W]`` mask drawn by the combinational strategy."""
        return self.sample(rng, region=region, image=image, dynamic_weights=dynamic_weights)[0]
