"""Cost measurements of one model: parameters, FLOPs, latency (torch, OpenVINO), peak memory.

Every function measures one thing and returns plain numbers, so the report can say how each
was obtained:

* parameters: ``numel`` of ``model.parameters()`` (buffers such as PatchCore's memory bank
  are not parameters and are not counted); trainable = those the trainer's optimizers update;
* FLOPs: :class:`torch.utils.flop_counter.FlopCounterMode` over one batch-1 forward of the
  whole anomalib module (pre-processing, network, post-processing). It counts matrix products,
  convolutions and attention (2 FLOPs per multiply-add); element-wise ops, resizing and
  sorting count 0;
* latency: median and minimum wall time of batch-1 forwards after warm-up, the torch module in eval mode
  under ``torch.inference_mode`` and the exported OpenVINO model compiled in FP32;
* memory: the process's resident set size (psutil), sampled by a background thread, and on
  CUDA the allocator's peak.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import psutil
import torch
from torch import nn

__all__ = [
    "PeakMemory",
    "Timing",
    "count_flops",
    "count_parameters",
    "interleaved",
    "latency_ms",
    "openvino_checked",
    "openvino_latency_ms",
    "torch_latency_ms",
]

#: OpenVINO's CPU plugin runs in bfloat16 on CPUs that support it unless told otherwise.
OPENVINO_FP32 = {"INFERENCE_PRECISION_HINT": "f32"}


def count_parameters(model: nn.Module, optimizers: Sequence[torch.optim.Optimizer] | None = None) -> tuple[int, int]:
    """``(total, trainable)`` parameter counts.

    Trainable = handed to one of ``optimizers`` (the trainer's, after fit) and requiring grad:
    PaDiM or PatchCore leave ``requires_grad`` on in a backbone they never update, so the
    flag alone would count it. Without ``optimizers``: every parameter that requires grad.
    """
    params = list(model.parameters())
    if optimizers is None:
        trainable = [p for p in params if p.requires_grad]
    else:
        optimized = {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
        trainable = [p for p in params if p.requires_grad and id(p) in optimized]
    return sum(p.numel() for p in params), sum(p.numel() for p in trainable)


def count_flops(model: nn.Module, image: torch.Tensor) -> int:
    """FLOPs of one ``model(image)`` call in eval mode (raises if the forward cannot run)."""
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    was_training = model.training
    # the counter's module tracker hooks autograd on inputs that require grad; a parameter used
    # as a module input under no_grad (a learnable position encoding) then trips its assertion
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    model.eval()
    try:
        for p in requires_grad:
            p.requires_grad_(False)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(image)
        return int(counter.get_total_flops())
    finally:
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)
        model.train(was_training)


class ScoreAndMap(nn.Module):
    """``(pred_score, anomaly_map)`` of an eval-mode anomalib network: a plain tuple output for conversion."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score (B,) and map (B, 1, H, W)."""
        out = self.model(images)
        return out.pred_score, out.anomaly_map


def latency_ms(run: Callable[[], Any], warmup: int, runs: int, synchronize: Callable[[], None] | None = None) -> tuple[float, float]:
    """``(median, minimum)`` wall time of ``run()`` in milliseconds after ``warmup`` untimed calls.

    The median is the figure to quote on a quiet machine; the minimum is the least disturbed
    run, closer to it when other processes compete for the cores (torch's intra-op threads
    then wait at every operator for a descheduled partner, which inflates the median).
    """
    for _ in range(warmup):
        run()
    if synchronize is not None:
        synchronize()
    times = []
    for _ in range(max(1, runs)):
        start = time.perf_counter()
        run()
        if synchronize is not None:
            synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), min(times)


def torch_latency_ms(model: nn.Module, image: torch.Tensor, warmup: int = 3, runs: int = 20) -> tuple[float, float]:
    """Batch-1 ``(median, min)`` latency of the whole anomalib module on ``image``'s device."""
    was_training = model.training
    model.eval()
    sync = torch.cuda.synchronize if image.device.type == "cuda" else None
    try:
        with torch.inference_mode():
            return latency_ms(lambda: model(image), warmup, runs, sync)
    finally:
        model.train(was_training)


def openvino_latency_ms(xml_path: str | Path, image: np.ndarray, warmup: int = 3, runs: int = 20, device: str = "CPU") -> tuple[float, float]:
    """Batch-1 ``(median, min)`` latency of an exported OpenVINO model compiled in FP32 on ``device``."""
    import openvino as ov  # noqa: PLC0415

    compiled = ov.Core().compile_model(str(xml_path), device, OPENVINO_FP32)
    request = compiled.create_infer_request()
    return latency_ms(lambda: request.infer([image]), warmup, runs)


@dataclass
class Timing:
    """Wall times of one callable, in milliseconds."""

    samples: list[float]

    @property
    def median(self) -> float:
        """Median latency."""
        return statistics.median(self.samples)

    @property
    def iqr(self) -> float:
        """Inter-quartile range (0 for a single sample)."""
        if len(self.samples) < 2:  # noqa: PLR2004
            return 0.0
        q1, _, q3 = statistics.quantiles(self.samples, n=4, method="inclusive")
        return q3 - q1


def interleaved(fns: dict[str, Callable[[], Any]], warmup: int, runs: int) -> dict[str, Timing]:
    """Time each callable ``runs`` times after ``warmup`` untimed rounds, one call of each per round.

    The order alternates every round, so background load and cache effects hit every callable
    alike; times of the same round can be paired for a ratio.
    """
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + max(1, runs)):
        for name in names if round_index % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            elapsed = (time.perf_counter() - start) * 1e3
            if round_index >= warmup:
                samples[name].append(elapsed)
    return {name: Timing(values) for name, values in samples.items()}


def openvino_checked(module: nn.Module, example: tuple[torch.Tensor, ...], tolerance: float = 1e-3) -> tuple[Callable[[], Any], float]:
    """Convert an eval module to OpenVINO FP32 through ``torch.export`` (anomalib's route) and check it.

    Every output is compared with torch's on ``example``, relative to ``max(|torch output|, 1)``.
    Returns a call of the compiled model on ``example`` (for timing) and the largest relative
    difference.

    Raises:
        RuntimeError: if an output differs by more than ``tolerance``.
    """
    import openvino as ov  # noqa: PLC0415

    module = module.eval()
    with torch.no_grad():
        converted = ov.convert_model(torch.export.export(module, example))
        reference = module(*example)
    reference = reference if isinstance(reference, tuple | list) else (reference,)
    compiled = ov.Core().compile_model(converted, "CPU", OPENVINO_FP32)
    data = [x.numpy() for x in example]
    out = compiled(data)
    error = max(
        float(np.abs(np.asarray(out[i]) - ref.numpy()).max()) / max(float(ref.abs().max()), 1.0)
        for i, ref in enumerate(reference)
    )
    if error > tolerance:
        msg = f"OpenVINO output of {type(module).__name__} differs from torch by {error:.2e} (relative; tolerance {tolerance:g})"
        raise RuntimeError(msg)
    return (lambda: compiled(data)), error


class PeakMemory:
    """Peak resident memory of this process while the ``with`` block runs (and CUDA peak).

    A daemon thread samples ``psutil.Process().memory_info().rss`` every ``interval`` seconds;
    spikes shorter than the interval can be missed. On CUDA the allocator's
    ``max_memory_allocated`` is reset on entry and read on exit.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak_rss_bytes = 0
        self.start_rss_bytes = 0
        self.peak_cuda_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process = psutil.Process()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_rss_bytes = max(self.peak_rss_bytes, self._process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        """Start sampling."""
        self.start_rss_bytes = self.peak_rss_bytes = self._process.memory_info().rss
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="peak-memory", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        """Stop sampling; take a last sample."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_rss_bytes = max(self.peak_rss_bytes, self._process.memory_info().rss)
        if torch.cuda.is_available():
            self.peak_cuda_bytes = int(torch.cuda.max_memory_allocated())

    @property
    def peak_rss_mb(self) -> float:
        """Peak RSS in MiB."""
        return self.peak_rss_bytes / 2**20
