"""Parameters and FLOPs of MaskAD at 224 x 224 beside the paper's Table 3 (28.5 M parameters, 38.5 GFLOPs).

Run: ``python benchmarks/mask_ad_size.py [--bank-rows 70560]`` (CPU, random weights, ~1 min).

FLOPs are torch's :class:`~torch.utils.flop_counter.FlopCounterMode` count (every matmul,
convolution and attention product; it reports 2 x multiply-accumulates). Three scopes:

* one reconstruction: backbone + linear + 5 + 5 ViT blocks + head, one masked map;
* the whole test-time scheme for one image: backbone, flow ranking, coreset search over
  ``--bank-rows`` rows (a full MVTec-AD coreset: 15 categories x ~240 images x 196 patches x
  0.1), 2 x 13 reconstructions (test map and reference map, 13 masks each), Sinkhorn;
* and the same split by part.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from anomalib_mcad.models.components.sinkhorn import sinkhorn
from anomalib_mcad.models.image.mask_ad import MaskAdModel

PAPER = {"params_m": 28.5, "gflops": 38.5}


def count(module: nn.Module) -> float:
    """Parameters of ``module`` in millions."""
    return sum(p.numel() for p in module.parameters()) / 1e6


def gflops(fn: object, *args: object) -> float:
    """GFLOPs (2 x MACs) of one call."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)  # type: ignore[operator]
    return counter.get_total_flops() / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bank-rows", type=int, default=70560)
    args = parser.parse_args()
    model = MaskAdModel(pretrained=False).eval()
    channels = model.backbone.out_channels
    model.bank.fit(torch.randn(args.bank_rows, channels), torch.arange(args.bank_rows) % 15)
    image = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        features = model.features(image)
    grid = model.feature_size
    masks = model.test_masks(model.flow.abnormality(features))
    n_masks = masks.shape[1]
    stacked = features.expand(2 * n_masks, -1, -1, -1)
    stacked_masks = masks[0].repeat(2, 1, 1)

    print(f"feature map {tuple(features.shape[1:])} from efficientnet_b4 stages {model.backbone.stages} "
          f"(channels {model.backbone.channels})")  # fmt: skip
    print("\n| part | parameters (M) |")
    print("| :-- | --: |")
    rows = {
        "backbone (b4 stem + blocks to stage 4, frozen)": count(model.backbone),
        "reconstructor (linear 272->768, 5+5 ViT blocks, head)": count(model.reconstructor),
        "flow (4 couplings, ranking for M_po)": count(model.flow),
    }
    for name, value in rows.items():
        print(f"| {name} | {value:.2f} |")
    print(f"| total (ours) | {count(model):.2f} |")
    print(f"| paper, Table 3 | {PAPER['params_m']} |")
    print(f"\ncoreset bank: {args.bank_rows} x {channels} floats = {args.bank_rows * channels * 4 / 2**20:.1f} MiB (buffer, not parameters)")

    parts = {
        "backbone": gflops(model.features, image),
        "one reconstruction (linear + 10 blocks + head)": gflops(model.reconstruct, features, masks[:, 0]),
        "flow ranking": gflops(model.flow.abnormality, features),
        "coreset search": gflops(model.reference, features),
        f"{2 * n_masks} reconstructions (h and r, {n_masks} masks)": gflops(model.reconstruct, stacked, stacked_masks),
        "Sinkhorn (50 iterations, 196 patches, 13 x 13)": gflops(sinkhorn, torch.rand(1, grid, grid, n_masks, n_masks)),
    }
    total = gflops(model, image)
    print("\n| scope | GFLOPs at 224 |")
    print("| :-- | --: |")
    for name, value in parts.items():
        print(f"| {name} | {value:.2f} |")
    print(f"| backbone + one reconstruction | {parts['backbone'] + parts['one reconstruction (linear + 10 blocks + head)']:.2f} |")
    print(f"| whole test-time scheme, one image | {total:.2f} |")
    print(f"| paper, Table 3 | {PAPER['gflops']} |")


if __name__ == "__main__":
    main()
