"""Parameter count and FLOPs of MINT-AD at 224 x 224, beside the paper's Table 6 and Table 9.

Run: ``python benchmarks/mint_ad_size.py`` (CPU, random weights, a few seconds).

Two FLOP counts are printed:

* ``torch`` — :class:`torch.utils.flop_counter.FlopCounterMode`: every matmul, convolution and
  attention product, as multiply-accumulates (MACs; FLOPs = 2 x MACs).
* ``per-module hooks`` — what a per-module profiler in the style of ``thop`` sees: only
  ``nn.Linear`` / ``nn.Conv2d`` *modules* are counted (MACs), so the input projections inside
  ``nn.MultiheadAttention`` (a bare parameter, not a module) and the attention products
  themselves are missed. This is the count that lands near the paper's figures.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from anomalib_mcad.models.image.mint_ad import MintAdModel

PAPER = {"mint_ad_params_m": 9.44, "mint_ad_gflops": 1.13, "uniad_params_m": 6.27, "uniad_gflops": 0.92, "inr_params_m": 0.602}


def count_params(module: nn.Module) -> int:
    """Number of parameters of ``module``."""
    return sum(p.numel() for p in module.parameters())


def torch_macs(fn: object, *args: torch.Tensor) -> int:
    """Multiply-accumulates of one call, counted by torch's flop counter."""
    with FlopCounterMode(display=False) as counter:
        fn(*args)  # type: ignore[operator]
    return counter.get_total_flops() // 2


def module_hook_macs(model: nn.Module, fn: object, *args: torch.Tensor, skip: tuple[nn.Module, ...] = ()) -> int:
    """MACs of ``nn.Linear``/``nn.Conv2d`` modules only, as a thop-style profiler counts them."""
    total = 0
    skipped = {id(m) for s in skip for m in s.modules()}

    def linear_hook(module: nn.Linear, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if id(module) not in skipped:
            total += out.numel() * module.in_features

    def conv_hook(module: nn.Conv2d, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if id(module) not in skipped:
            total += out.numel() * (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
    with torch.no_grad():
        fn(*args)  # type: ignore[operator]
    for h in handles:
        h.remove()
    return total


def leaf_params_without_mha_inproj(module: nn.Module) -> int:
    """Parameters a thop-style profiler reports: those of leaf modules (MHA's in-projection is not in one)."""
    return sum(count_params(m) for m in module.modules() if not list(m.children()))


def main() -> None:
    """Print the size table (markdown)."""
    torch.manual_seed(0)
    model = MintAdModel(backbone="efficientnet_b4", pretrained=False, num_classes=15).eval().requires_grad_(False)
    x = torch.randn(1, 3, 224, 224)
    n_total = count_params(model)
    n_backbone = count_params(model.backbone)
    n_inr = count_params(model.inr)
    trainable = n_total - n_backbone
    macs_all = torch_macs(model, x)
    macs_backbone = torch_macs(model.backbone, x)
    token = torch.softmax(torch.randn(1, 32), dim=-1)
    macs_inr = torch_macs(model.inr, token)
    hook_all = module_hook_macs(model, model, x)
    hook_no_backbone = module_hook_macs(model, model, x, skip=(model.backbone,))
    hook_inr = module_hook_macs(model.inr, model.inr, token)
    leaf_params = leaf_params_without_mha_inproj(model) - leaf_params_without_mha_inproj(model.backbone)
    rows = [
        ("whole model incl. frozen EfficientNet-b4 stages 1-4", n_total, macs_all, hook_all),
        ("frozen backbone alone", n_backbone, macs_backbone, hook_all - hook_no_backbone),
        ("whole model without the backbone (trainable part)", trainable, macs_all - macs_backbone, hook_no_backbone),
        ("  of which the INR", n_inr, macs_inr, hook_inr),
        ("  transformer + adapter + output projection", count_params(model.transformer) + count_params(model.adapter) + count_params(model.output_proj) + count_params(model.pos_embed), None, None),
        ("  class prompt mapper (Table 12, 15-class head)", count_params(model.prompt_mapper), None, None),
        ("  distribution decoder (Table 14)", count_params(model.distribution_decoder), None, None),
    ]
    print("| part | params (M) | GMACs (torch) | GMACs (per-module hooks) |")
    print("| --- | ---: | ---: | ---: |")
    for name, params, macs, hooks in rows:
        m = "" if macs is None else f"{macs / 1e9:.3f}"
        h = "" if hooks is None else f"{hooks / 1e9:.3f}"
        print(f"| {name} | {params / 1e6:.3f} | {m} | {h} |")
    print(f"| trainable part, leaf-module parameters only (thop-style) | {leaf_params / 1e6:.3f} | | |")
    print()
    print(f"Paper: MINT-AD {PAPER['mint_ad_params_m']} M params, {PAPER['mint_ad_gflops']} GFLOPs (Table 6); "
          f"UniAD {PAPER['uniad_params_m']} M, {PAPER['uniad_gflops']} GFLOPs; INR {PAPER['inr_params_m']} M (Table 9).")


if __name__ == "__main__":
    main()
