"""Build anomalib's built-in Dinomaly offline and copy its weights into ours.

Shared by ``tests/unit/test_dinomaly_builtin_parity.py`` and ``benchmarks/dinomaly_latency.py``
(the test puts this folder on ``sys.path``; a script run from here finds it directly).

The built-in builds its encoder with ``TimmFeatureExtractor(..., pre_trained=True)``. The keyword
is passed explicitly, so ``functools.partial(TimmFeatureExtractor, pre_trained=False)`` would be
overridden by it; :func:`build_builtin` forces the flag in a wrapper instead, and also makes timm's
pretrained loader raise, so no download can ever be attempted.

Note: constructing the built-in runs anomalib's ``_disable_pos_embed_antialiasing()``, which replaces
``timm.models.vision_transformer.resample_abs_pos_embed`` process-wide by an ``antialias=False``
version (the built-in relies on it at forward time, so it is left in place). Our ``ViTFeatureTap``
imports the function from ``timm.layers`` and is not affected.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

import torch
from torch import nn

from anomalib_mcad.compare.offline import DownloadBlockedError, block_downloads, random_backbone_weights

#: Constructor arguments that make our DinomalyModel follow the built-in's conventions.
BUILTIN_CONVENTIONS: dict[str, Any] = {
    "mlp_bias": False,
    "pos_embed_interpolation": "timm",
    "blur_padding": "reflect",
    "output_map": "raw",
}

_BUILTIN_ENCODER = "encoder.feature_extractor."
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


#: Raised if anything tries to load pretrained weights while the built-in is built.
DownloadAttemptedError = DownloadBlockedError


@contextmanager
def no_pretrained_download() -> Iterator[None]:
    """Force ``pre_trained=False`` in the built-in's encoder and forbid every weight download.

    The guards live in :mod:`anomalib_mcad.compare.offline` (the comparison command uses them too).
    """
    with random_backbone_weights(), block_downloads("the parity tools must stay offline"):
        yield


@contextmanager
def fast_random_init() -> Iterator[None]:
    """Replace truncated-normal initialisation by a clamped normal while models are built.

    ``torch.nn.init.trunc_normal_`` (inverse-erf sampling) dominates building a ViT on a CPU;
    the parity tools overwrite or only need *some* random weights, so a clamped normal will do.
    """
    import timm.models.vision_transformer as timm_vit  # noqa: PLC0415

    def clamped_normal(
        tensor: torch.Tensor,
        mean: float = 0.0,
        std: float = 1.0,
        a: float = -2.0,
        b: float = 2.0,
        **_: Any,  # noqa: ANN401
    ) -> torch.Tensor:
        with torch.no_grad():
            return tensor.normal_(mean, std).clamp_(a, b)

    with (
        mock.patch.object(torch.nn.init, "trunc_normal_", clamped_normal),
        mock.patch.object(timm_vit, "trunc_normal_", clamped_normal),
    ):
        yield


def build_builtin(encoder_name: str, seed: int | None = 0, **kwargs: Any) -> nn.Module:  # noqa: ANN401
    """anomalib's built-in ``DinomalyModel`` with random weights (seeded), in eval mode."""
    from anomalib.models.image.dinomaly.torch_model import DinomalyModel as BuiltinDinomaly  # noqa: PLC0415

    if seed is not None:
        torch.manual_seed(seed)
    with no_pretrained_download(), fast_random_init():
        model = BuiltinDinomaly(encoder_name=encoder_name, **kwargs)
    return model.eval()


def build_ours(encoder_name: str, builtin_conventions: bool, **kwargs: Any) -> nn.Module:  # noqa: ANN401
    """Our ``DinomalyModel`` with random weights, in eval mode; optionally in the built-in's conventions.

    ``kwargs`` override constructor arguments (e.g. ``mlp_bias=False`` with our default conventions).
    """
    from anomalib_mcad.models.image.dinomaly import DinomalyModel  # noqa: PLC0415

    options = {**(BUILTIN_CONVENTIONS if builtin_conventions else {}), **kwargs}
    with fast_random_init():
        model = DinomalyModel(encoder_name=encoder_name, pretrained=False, **options)
    return model.eval()


def spread_layer_scales_(model: nn.Module, low: float = 0.05, high: float = 0.3, seed: int = 0) -> None:
    """Set every LayerScale ``gamma`` to uniform random values in ``[low, high]``.

    timm initialises DINOv2's LayerScale at 1e-5, which makes randomly initialised blocks
    near-identities; a wrong block mapping would then hide below a 1e-4 tolerance. Spreading
    the scales makes every block count.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma")):
                param.copy_(torch.empty(param.shape).uniform_(low, high, generator=generator))


def our_key(builtin_key: str) -> str:
    """The name in our model's state dict that a built-in state-dict key corresponds to.

    The result may not exist in ours (encoder blocks after the last tapped one, the final norm).
    """
    if builtin_key.startswith(_BUILTIN_ENCODER):
        return "encoder." + builtin_key.removeprefix(_BUILTIN_ENCODER)
    if builtin_key.startswith("bottleneck.0."):
        return "bottleneck.mlp." + builtin_key.removeprefix("bottleneck.0.")
    if builtin_key == "gaussian_blur.kernel":
        return "scorer.blur.kernel"
    return builtin_key  # decoder.{i}.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*


@dataclass
class CopyReport:
    """What :func:`copy_builtin_weights` did."""

    assigned: list[str] = field(default_factory=list)
    #: built-in keys with no counterpart in ours
    unused: list[str] = field(default_factory=list)
    #: keys of ours that received nothing (left as initialised)
    missing: list[str] = field(default_factory=list)

    def unused_summary(self) -> str:
        """Unused built-in keys grouped: encoder blocks by index, the rest by module."""
        blocks = sorted({int(m.group(1)) for k in self.unused if (m := _BLOCK.match(k.removeprefix(_BUILTIN_ENCODER)))})
        others = sorted(k for k in self.unused if not _BLOCK.match(k.removeprefix(_BUILTIN_ENCODER)))
        return f"encoder blocks {blocks}; other: {others}"


def copy_builtin_weights(builtin: nn.Module, ours: nn.Module) -> CopyReport:
    """Copy the built-in's parameters and buffers into ours by name; shapes must agree.

    Raises ``ValueError`` on a shape mismatch. Keys are reported, not raised on, so callers
    decide what is acceptable (the test requires ``missing == []``).
    """
    source: Mapping[str, torch.Tensor] = builtin.state_dict()
    target = ours.state_dict()
    report = CopyReport()
    new_state = dict(target)
    for key, value in source.items():
        name = our_key(key)
        if name not in target:
            report.unused.append(key)
            continue
        if target[name].shape != value.shape:
            msg = f"shape mismatch: built-in {key} {tuple(value.shape)} vs ours {name} {tuple(target[name].shape)}"
            raise ValueError(msg)
        new_state[name] = value  # load_state_dict copies into our tensors
        report.assigned.append(name)
    report.missing = sorted(set(target) - set(report.assigned))
    ours.load_state_dict(new_state, strict=True)
    return report


def expected_unused(builtin: nn.Module, last_tapped_block: int) -> set[str]:
    """Built-in keys ours should not use: encoder blocks after ``last_tapped_block``, final norm, head."""
    unused = set()
    for key in builtin.state_dict():
        if not key.startswith(_BUILTIN_ENCODER):
            continue
        rest = key.removeprefix(_BUILTIN_ENCODER)
        match = _BLOCK.match(rest)
        if (match and int(match.group(1)) > last_tapped_block) or rest.startswith(("norm.", "fc_norm.", "head.")):
            unused.add(key)
    return unused


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute element-wise difference (shapes must agree)."""
    if a.shape != b.shape:
        msg = f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}"
        raise ValueError(msg)
    return float((a.float() - b.float()).abs().max())
