"""Timing and export-check helpers of :mod:`anomalib_mcad.compare.profiling` (used by the benchmarks)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from anomalib_mcad.compare.profiling import Timing, interleaved, openvino_checked


def test_interleaved_counts_runs_skips_warmup_and_alternates_order() -> None:
    calls: list[str] = []
    timings = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=2, runs=3)
    assert [len(t.samples) for t in timings.values()] == [3, 3]
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a", "a", "b"]  # 2 warm-up + 3 timed rounds
    assert all(value >= 0.0 for t in timings.values() for value in t.samples)


def test_timing_median_and_iqr() -> None:
    timing = Timing([1.0, 2.0, 3.0, 4.0, 5.0])
    assert timing.median == 3.0
    assert timing.iqr == pytest.approx(2.0)
    assert Timing([7.0]).iqr == 0.0


class TwoOutputs(nn.Module):
    """A small network with two outputs; ``drift`` adds a Python-side offset that changes at every call.

    Export bakes the offset of its trace into the graph as a constant, so the eager reference
    differs from the converted model by about ``drift``: a stand-in for a bad conversion.
    """

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 4)
        self.drift = 0.0
        self.counter = itertools.count()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.linear(x) + self.drift * next(self.counter)
        return y.sum(1), torch.relu(y)


def test_openvino_checked_matches_torch_and_refuses_a_mismatch() -> None:
    torch.manual_seed(0)
    example = (torch.randn(2, 8),)
    run, error = openvino_checked(TwoOutputs(), example, tolerance=1e-4)
    assert error < 1e-5
    out = run()
    assert np.asarray(out[1]).shape == (2, 4)
    drifting = TwoOutputs()
    drifting.drift = 10.0  # the eager reference call no longer matches the exported trace
    with pytest.raises(RuntimeError, match="differs from torch"):
        openvino_checked(drifting, example, tolerance=1e-4)
