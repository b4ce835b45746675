"""A memory-lean k-center-greedy coreset for MaskAD's reference bank.

``components.coreset.kcenter_greedy_indices`` (anomalib's ``KCenterGreedy``) peaked above 20 GB
resident on ELPV's 35,280 x 192 training patches per category and was OOM-killed twice (see the
README, issue 16). This version keeps only the (N,) running minimum distances and one (N,) distance
vector per step (``|x|^2 - 2 x c + |c|^2``, a matrix-vector product), so its memory is the
features plus O(N).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def kcenter_greedy(features: torch.Tensor, size: int, seed: int = 0) -> torch.Tensor:
    """Indices (size,) of a k-center-greedy coreset of ``features`` (N, D): a seeded random start, then the farthest row each step."""
    n = features.shape[0]
    if size >= n:
        return torch.arange(n, device=features.device)
    x = features.detach().float()
    sq = (x * x).sum(1)
    generator = torch.Generator().manual_seed(int(seed))
    first = int(torch.randint(n, (1,), generator=generator))
    chosen = torch.empty(size, dtype=torch.long)
    chosen[0] = first
    best = (sq - 2.0 * (x @ x[first]) + sq[first]).clamp_min(0)
    best[first] = 0
    for i in range(1, size):
        idx = int(best.argmax())
        chosen[i] = idx
        best = torch.minimum(best, (sq - 2.0 * (x @ x[idx]) + sq[idx]).clamp_min(0))
        best[idx] = 0
    return chosen.to(features.device)


def per_category_coreset(features: torch.Tensor, labels: torch.Tensor, ratio: float, seed: int = 0) -> torch.Tensor:
    """Row indices of a ``ratio`` k-center-greedy coreset of each category's rows, concatenated."""
    kept = []
    for category in torch.unique(labels).tolist():
        rows = torch.nonzero(labels == category).squeeze(1)
        size = max(1, int(rows.numel() * float(ratio)))
        kept.append(rows[kcenter_greedy(features[rows], size, seed)])
    return torch.cat(kept)
