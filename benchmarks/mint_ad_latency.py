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
from collections.abc import Callable

import torch

from anomalib_mcad.compare.profiling import ScoreAndMap, interleaved, openvino_checked
from anomalib_mcad.models.image.dinomaly.torch_model import DinomalyModel
from anomalib_mcad.models.image.mint_ad.torch_model import MintAdModel

PARITY_TOL = 1e-3


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
        runners[f"{name} torch"] = lambda model=model, example=example: model(example)
        if not args.skip_openvino:
            runners[f"{name} OpenVINO FP32"] = openvino_checked(ScoreAndMap(model), (example,), PARITY_TOL)[0]
    with torch.inference_mode():
        timings = interleaved(runners, args.warmup, args.runs)
    print(f"Batch-1 CPU latency, {args.runs} interleaved runs, torch threads {torch.get_num_threads()}")
    print("| model | median (ms) | IQR (ms) |")
    print("| --- | ---: | ---: |")
    for key, timing in timings.items():
        print(f"| {key} | {timing.median:.1f} | {timing.iqr:.1f} |")


if __name__ == "__main__":
    main()
