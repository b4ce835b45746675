"""Batch-1 CPU inference latency of MINT-AD beside our Dinomaly, in torch eager and OpenVINO FP32, in one process.

Paper settings: MINT-AD with EfficientNet-b4 at 224 x 224; Dinomaly with ViT-B/14 at 392 x 392.
Both randomly initialised (``pretrained=False``; latency does not depend on weight values).
Each OpenVINO model (converted from the torch module, compiled with
``INFERENCE_PRECISION_HINT=f32``; this CPU would otherwise run bfloat16) is checked against its
torch model before timing. Runs of the models are interleaved round by round so background load
hits all alike; medians and inter-quartile ranges in milliseconds are printed.

Usage::

    python benchmarks/mint_ad_latency.py [--runs 15] [--warmup 3] [--threads N] [--skip-openvino]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from anomalib_mcad.models.image.dinomaly.torch_model import DinomalyModel
from anomalib_mcad.models.image.mint_ad.torch_model import MintAdModel
from anomalib_mcad.compare.profiling import ScoreAndMap

PARITY_TOL = 1e-3


def openvino_runner(model: nn.Module, example: torch.Tensor) -> Callable[[], object]:
    """Convert ``model`` to OpenVINO FP32, check it against torch, and return a timed call."""
    import openvino as ov  # noqa: PLC0415

    wrapper = ScoreAndMap(model).eval()
    with torch.no_grad():
        # through torch.export (as anomalib's exporter): TorchScript tracing cannot follow DINOv2's
        # scale-factor position-embedding resize
        ov_model = ov.convert_model(torch.export.export(wrapper, (example,)))
        ref_score, ref_map = wrapper(example)
    compiled = ov.Core().compile_model(ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    data = example.numpy()
    out = compiled(data)
    score, amap = np.asarray(out[0]), np.asarray(out[1])
    scale = max(float(ref_map.abs().max()), 1.0)
    error = max(float(np.abs(score - ref_score.numpy()).max()), float(np.abs(amap - ref_map.numpy()).max())) / scale
    if error > PARITY_TOL:
        msg = f"OpenVINO output differs from torch by {error:.2e} (relative to the map's max)"
        raise RuntimeError(msg)
    return lambda: compiled(data)


def torch_runner(model: nn.Module, example: torch.Tensor) -> Callable[[], object]:
    """A timed eager call under ``inference_mode``."""

    def run() -> object:
        with torch.inference_mode():
            return model(example)

    return run


def main() -> None:
    """Build both models, check OpenVINO parity, time interleaved, print a table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-openvino", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = {
        "MINT-AD (EfficientNet-b4, 224)": (MintAdModel(pretrained=False, num_classes=15).eval(), torch.randn(1, 3, 224, 224)),
        "Dinomaly (ViT-B/14, 392)": (DinomalyModel(pretrained=False).eval(), torch.randn(1, 3, 392, 392)),
    }
    runners: dict[str, Callable[[], object]] = {}
    for name, (model, example) in models.items():
        runners[f"{name} torch"] = torch_runner(model, example)
        if not args.skip_openvino:
            runners[f"{name} OpenVINO FP32"] = openvino_runner(model, example)
    for run in runners.values():
        for _ in range(args.warmup):
            run()
    samples: dict[str, list[float]] = {k: [] for k in runners}
    order = list(runners)
    for round_index in range(args.runs):
        for key in order if round_index % 2 == 0 else reversed(order):
            start = time.perf_counter()
            runners[key]()
            samples[key].append((time.perf_counter() - start) * 1e3)
    print(f"Batch-1 CPU latency, {args.runs} interleaved runs, torch threads {torch.get_num_threads()}")
    print("| model | median (ms) | IQR (ms) |")
    print("| --- | ---: | ---: |")
    for key, values in samples.items():
        q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
        print(f"| {key} | {statistics.median(values):.1f} | {q[2] - q[0]:.1f} |")


if __name__ == "__main__":
    main()
