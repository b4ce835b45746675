"""Batch-1 CPU latency of MaskAD's whole test-time scheme in torch eager and OpenVINO FP32, and where the time goes.

Paper settings: EfficientNet-b4 stages 1-4 at 224 x 224 (14 x 14 x 272), ViT 768 wide with 5 + 5
blocks, N = 13 masks on the test and the reference map (26 reconstructions per image), Sinkhorn
with 50 iterations, a coreset bank of ``--bank-rows`` rows (default: a full MVTec-AD coreset,
15 categories x ~240 images x 196 patches x 0.1). Random weights (``pretrained=False``; latency
does not depend on weight values). The OpenVINO model is converted from the torch module
through ``torch.export`` (as anomalib's exporter does), compiled with
``INFERENCE_PRECISION_HINT=f32`` and checked against torch before timing.

The share of eager time is measured by timing each part alone with the shapes the full forward
uses: the N parallel reconstructions (2 x 13 maps), the coreset search, Sinkhorn, and the rest
(backbone, flow ranking, masks, upsampling). Medians over ``--runs`` in milliseconds.

Usage::

    python benchmarks/mask_ad_latency.py [--runs 5] [--warmup 1] [--threads N] [--bank-rows 70560] [--skip-openvino]
"""

from __future__ import annotations

import argparse
import os

import torch

from anomalib_mcad.models.components.sinkhorn import sinkhorn
from anomalib_mcad.models.image.mask_ad import MaskAdModel
from anomalib_mcad.compare.profiling import ScoreAndMap, latency_ms, openvino_checked

PARITY_TOL = 1e-3


def main() -> None:
    """Build the paper-size model, time eager, its parts and OpenVINO, print one table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--bank-rows", type=int, default=70560)
    parser.add_argument("--skip-openvino", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = MaskAdModel(pretrained=False).eval()
    channels = model.backbone.out_channels
    model.bank.fit(torch.randn(args.bank_rows, channels), torch.arange(args.bank_rows) % 15)
    model.po_scale.fill_(1.0)
    example = torch.rand(1, 3, 224, 224)

    with torch.inference_mode():
        features = model.features(example)
        ranking = model.flow.abnormality(features)
        masks = model.test_masks(ranking)
        n_masks = masks.shape[1]
        grid = model.feature_size
        stacked = features.expand(2 * n_masks, -1, -1, -1).contiguous()
        stacked_masks = masks[0].repeat(2, 1, 1)
        cost = torch.rand(1, grid, grid, n_masks, n_masks)

        def total() -> object:
            return model(example)

        parts = {
            f"{2 * n_masks} parallel reconstructions": lambda: model.reconstruct(stacked, stacked_masks),
            f"coreset search ({args.bank_rows} rows)": lambda: model.reference(features),
            f"Sinkhorn ({model.sinkhorn_iterations} iterations)": lambda: sinkhorn(cost, model.sinkhorn_epsilon, model.sinkhorn_iterations),
            "backbone": lambda: model.features(example),
            "flow ranking": lambda: model.flow.abnormality(features),
        }
        eager = latency_ms(total, args.warmup, args.runs)[0]
        timed = {name: latency_ms(fn, args.warmup, args.runs)[0] for name, fn in parts.items()}

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"\nbatch 1, 224 x 224, torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.runs}; load average {load} (timings on a busy machine are inflated)")
    print("\n| runtime | latency (ms) |")
    print("| :-- | --: |")
    print(f"| torch eager (whole test-time scheme) | {eager:.0f} |")
    if not args.skip_openvino:
        run, error = openvino_checked(ScoreAndMap(model), (example,), PARITY_TOL)
        print(f"OpenVINO parity: max difference {error:.1e} relative (tolerance {PARITY_TOL})")
        print(f"| OpenVINO FP32 (whole test-time scheme) | {latency_ms(run, args.warmup, args.runs)[0]:.0f} |")
    print("\n| part (torch eager, timed alone) | ms | share of the whole |")
    print("| :-- | --: | --: |")
    for name, value in timed.items():
        print(f"| {name} | {value:.0f} | {100 * value / eager:.0f} % |")
    rest = eager - sum(timed.values())
    print(f"| rest (masks, RMSE, cost, upsampling; by difference) | {rest:.0f} | {100 * rest / eager:.0f} % |")


if __name__ == "__main__":
    main()
