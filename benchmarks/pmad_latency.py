"""Batch-1 CPU latency of PMAD at the paper's size, torch eager and OpenVINO FP32, split into ProtoFlow proposal and token prediction.

Paper settings (Table 5): ViT-B/16 masked image model at 224 x 224 with the 8192-code VQ ViT
tokenizer (ViT-B/16 encoder); ProtoFlow on tf_efficientnet_b6 stages 2-3 (272 channels, 28 x 28),
4 couplings, 128-d condition; a prototype pool of ``--prototypes`` rows (default 28,000: about 1 %
of MVTec-AD's 3,629 x 784 training patches). Random weights (latency does not depend on values).

Three parts are timed, each as its own torch module and OpenVINO model:

* proposal: EfficientNet features, prototype search, flow, top-k mask (image -> NLL map, mask);
* token prediction: tokenizer + masked ViT + cross-entropy, maps, smoothing (image, mask -> score, map);
* end to end: the whole ``PmadModel.forward`` (what anomalib exports).

Each OpenVINO model is compared with torch before timing. Runs are interleaved round by round.

Usage::

    python benchmarks/pmad_latency.py [--runs 10] [--warmup 2] [--prototypes 28000] [--threads N] [--skip-openvino]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_mcad.compare.profiling import ScoreAndMap, interleaved, openvino_checked
from anomalib_mcad.models.image.pmad.torch_model import PmadModel

PARITY_TOL = 1e-3


class Proposal(nn.Module):
    """Image -> (ProtoFlow NLL map, proposal mask as float)."""

    def __init__(self, model: PmadModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """NLL (B, h, w) and mask (B, N)."""
        nll = self.model.proposal_nll(images)
        mask = self.model.proposal_mask(nll, self.model.default_mask_count.expand(images.shape[0]))
        return nll, mask.float()


class TokenPrediction(nn.Module):
    """(image, NLL, mask) -> (score, map): tokenizer, masked ViT, cross-entropy, weighting, smoothing."""

    def __init__(self, model: PmadModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, nll: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score (B,) and map (B, 1, H, W)."""
        model = self.model
        errors = model.token_errors(images, mask > 0.5) * mask
        size = images.shape[-2:]
        token_map = F.interpolate(errors.reshape(images.shape[0], 1, *model.grid), size=size, mode="bilinear", align_corners=True)
        weight = F.interpolate(model.protoflow.abnormality(nll).unsqueeze(1), size=size, mode="bilinear", align_corners=True)
        amap = model.blur(token_map * weight)
        return amap.flatten(1).amax(1), amap


def main() -> None:
    """Build the paper-size model, check OpenVINO parity, time interleaved, print a table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prototypes", type=int, default=28_000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-openvino", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = PmadModel(proto_pretrained=False, drop_path=0.0).eval()
    channels = model.protoflow.channels
    model.protoflow.set_prototypes(torch.randn(args.prototypes, channels), torch.arange(args.prototypes) % 15)
    image = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        model.protoflow.reference_nll.fill_(float(model.protoflow(image).min()))
        nll, mask = Proposal(model)(image)
    parts: dict[str, tuple[nn.Module, tuple[torch.Tensor, ...]]] = {
        "proposal (ProtoFlow + top-k)": (Proposal(model).eval(), (image,)),
        "token prediction (tokenizer + ViT + map)": (TokenPrediction(model).eval(), (image, nll, mask)),
        "end to end": (ScoreAndMap(model).eval(), (image,)),
    }
    runners: dict[str, Callable[[], object]] = {}
    for name, (module, example) in parts.items():
        runners[f"{name}, torch"] = lambda module=module, example=example: module(*example)
        if not args.skip_openvino:
            runners[f"{name}, OpenVINO FP32"] = openvino_checked(module, example, PARITY_TOL)[0]
    with torch.inference_mode():
        timings = interleaved(runners, args.warmup, args.runs)
    print(f"PMAD batch-1 CPU latency at 224 px, {args.prototypes} prototypes, {args.runs} interleaved runs, torch threads {torch.get_num_threads()}")
    print("| part | median (ms) | IQR (ms) |")
    print("| --- | ---: | ---: |")
    for key, timing in timings.items():
        print(f"| {key} | {timing.median:.1f} | {timing.iqr:.1f} |")

if __name__ == "__main__":
    main()
