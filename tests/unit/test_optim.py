"""The warm-up + cosine schedule, counted in iterations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from anomalib_mcad.models.components.optim import StableAdamW, WarmupCosineLR


def reference_schedule(base: float, final: float, total: int, warmup: int) -> np.ndarray:
    """The schedule as the Dinomaly authors precompute it: linspace warm-up, then cosine."""
    warm = np.linspace(0.0, base, warmup)
    iters = np.arange(total - warmup)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate([warm, cosine])


def run_schedule(total: int, warmup: int, steps: int, base: float = 2e-3, final: float = 2e-4) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=base)
    scheduler = WarmupCosineLR(optimizer, total_iters=total, warmup_iters=warmup, final_lr=final)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_schedule_matches_authors_precomputed_values() -> None:
    lrs = np.array(run_schedule(total=1000, warmup=100, steps=1000))
    np.testing.assert_allclose(lrs, reference_schedule(2e-3, 2e-4, 1000, 100), rtol=0, atol=1e-12)


def test_schedule_shape() -> None:
    lrs = run_schedule(total=300, warmup=10, steps=320)
    assert lrs[0] == 0.0
    assert lrs[9] == pytest.approx(2e-3)
    assert all(b <= a + 1e-15 for a, b in zip(lrs[10:300], lrs[11:300], strict=False))  # non-increasing after warm-up
    assert lrs[299] == pytest.approx(2e-4, rel=1e-3)
    assert lrs[310] == pytest.approx(2e-4)  # stays at the final rate past the end


def test_schedule_state_dict_is_plain_numbers() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    scheduler = WarmupCosineLR(torch.optim.SGD([param], lr=1.0), total_iters=10, warmup_iters=2)
    state = scheduler.state_dict()
    assert all(isinstance(v, int | float | list | bool | type(None)) for v in state.values()), state


def test_schedule_rejects_warmup_longer_than_training() -> None:
    param = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="total_iters"):
        WarmupCosineLR(torch.optim.SGD([param], lr=1.0), total_iters=10, warmup_iters=10)


def test_stable_adamw_reduces_a_quadratic() -> None:
    torch.manual_seed(0)
    target = torch.randn(20)
    param = torch.nn.Parameter(torch.zeros(20))
    optimizer = StableAdamW([param], lr=0.05, eps=1e-10, weight_decay=1e-4, amsgrad=True)
    losses = []
    for _ in range(200):
        loss = ((param - target) ** 2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.01 * losses[0]
    assert not math.isnan(losses[-1])
