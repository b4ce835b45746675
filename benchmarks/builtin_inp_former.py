"""Build anomalib's built-in InpFormer offline and copy its weights into our InpFormerModel.

Shared by ``tests/unit/test_inp_former_builtin_parity.py`` and ``benchmarks/inp_former_latency.py``.
The built-in passes ``pre_trained=True`` to ``TimmFeatureExtractor`` explicitly, so it is wrapped
to force ``False``, and timm's pretrained loader is made to raise: no download can happen.
Building the built-in runs anomalib's process-wide ``antialias=False`` patch of timm's ViT
position-embedding resize (see ``builtin_dinomaly.py``); our ``ViTFeatureTap`` is not affected.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# the offline guards are shared with the Dinomaly tools (same folder: on sys.path for scripts and tests)
from builtin_dinomaly import DownloadAttemptedError, fast_random_init, no_pretrained_download  # noqa: F401  (re-exported for the tests)

#: Constructor arguments that put our InpFormerModel in the built-in's conventions.
BUILTIN_CONVENTIONS: dict[str, Any] = {
    "mlp_bias": False,
    "pos_embed_interpolation": "timm",
    "blur_padding": "reflect",
    "eval_size": None,
    "output_map": "smoothed",
}
_ENCODER = "encoder.feature_extractor."


def build_builtin(encoder_name: str, seed: int = 0) -> nn.Module:
    """anomalib's built-in ``InpFormerModel`` (as its Lightning module builds it), random weights, eval mode."""
    from anomalib.models.image.inp_former.torch_model import InpFormerModel as Builtin  # noqa: PLC0415

    torch.manual_seed(seed)
    with no_pretrained_download(), fast_random_init():
        model = Builtin(encoder_name=encoder_name, remove_class_token=True)
    return model.eval()


def perturb_(model: nn.Module, seed: int = 0) -> None:
    """Make random weights discriminative: spread LayerScales, non-trivial norms and biases.

    timm starts DINOv2's LayerScale at 1e-5 (blocks ~ identities) and the authors' init leaves
    zero biases and unit norms, under which a wrong mapping could hide below the tolerance.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma")):
                p.copy_(torch.empty(p.shape).uniform_(0.05, 0.3, generator=g))
            elif name.startswith(_ENCODER):
                continue
            elif "learn_scale" in name:
                p.copy_(1 + 0.5 * torch.rand(p.shape, generator=g))
            elif "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
            elif name.endswith("weight"):
                p.copy_(0.03 * torch.randn(p.shape, generator=g))


def our_key(key: str) -> str:
    """Our state-dict name for a built-in key (may not exist in ours: encoder tail, final norm)."""
    if key.startswith(_ENCODER):
        return "encoder." + key.removeprefix(_ENCODER)
    if key == "prototype_token.0":
        return "extractor.prototype_tokens"
    if key.startswith("aggregation.0."):
        return "extractor." + key.removeprefix("aggregation.0.")
    if key.startswith("bottleneck.0."):
        return "bottleneck.mlp." + key.removeprefix("bottleneck.0.")
    if key == "gaussian_blur.kernel":
        return "scorer.blur.kernel"
    return key  # decoder.{i}.*


def copy_builtin_weights(builtin: nn.Module, ours: nn.Module) -> tuple[list[str], list[str]]:
    """Copy by name; returns ``(unused built-in keys, keys of ours left unassigned)``."""
    target = ours.state_dict()
    new_state = dict(target)
    unused, assigned = [], set()
    for key, value in builtin.state_dict().items():
        name = our_key(key)
        if name not in target:
            unused.append(key)
            continue
        if target[name].shape != value.shape:
            msg = f"shape mismatch: built-in {key} {tuple(value.shape)} vs ours {name} {tuple(target[name].shape)}"
            raise ValueError(msg)
        new_state[name] = value
        assigned.add(name)
    ours.load_state_dict(new_state, strict=True)
    return unused, sorted(set(target) - assigned)


def build_ours(encoder_name: str, builtin_conventions: bool, **kwargs: Any) -> nn.Module:  # noqa: ANN401
    """Our ``InpFormerModel`` with random weights, eval mode; optionally in the built-in's conventions."""
    from anomalib_mcad.models.image.inp_former import InpFormerModel  # noqa: PLC0415

    options = {**(BUILTIN_CONVENTIONS if builtin_conventions else {}), **kwargs}
    with fast_random_init():
        return InpFormerModel(encoder_name=encoder_name, pretrained=False, **options).eval()
