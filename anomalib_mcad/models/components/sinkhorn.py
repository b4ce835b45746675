"""Entropic optimal transport by a fixed number of log-domain Sinkhorn iterations (Cuturi 2013).

A plain torch function with a static loop, so it traces into ONNX/OpenVINO. Used by MaskAD's
reconstruction association discrepancy (AssDis = <M*, C>).
"""

from __future__ import annotations

import math

import torch


def sinkhorn(
    cost: torch.Tensor,
    epsilon: float = 1.0,
    iterations: int = 50,
) -> torch.Tensor:
    """Transport plan between two uniform distributions for a batch of costs (..., N, M).

    Solves ``min_M <M, C> + epsilon * sum M ln M`` s.t. ``M 1 = 1/N``, ``M^T 1 = 1/M`` by
    alternating updates of the dual potentials in the log domain (stable for small epsilon).

    Returns:
        the plan (..., N, M); rows sum to 1/N, columns to 1/M (up to convergence).
    """
    if epsilon <= 0:
        msg = f"sinkhorn epsilon must be > 0, got {epsilon}"
        raise ValueError(msg)
    if iterations < 1:
        msg = f"sinkhorn iterations must be >= 1, got {iterations}"
        raise ValueError(msg)
    n, m = cost.shape[-2:]
    log_a, log_b = -math.log(n), -math.log(m)
    scaled = -cost / epsilon
    f = torch.zeros_like(cost[..., :, 0])  # (..., N)
    g = torch.zeros_like(cost[..., 0, :])  # (..., M)
    for _ in range(int(iterations)):
        f = log_a - torch.logsumexp(scaled + g.unsqueeze(-2), dim=-1)
        g = log_b - torch.logsumexp(scaled + f.unsqueeze(-1), dim=-2)
    return torch.exp(scaled + f.unsqueeze(-1) + g.unsqueeze(-2))
