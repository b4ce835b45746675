"""The core shared with anomalib's built-in InpFormer is the same.

Both models are random (no download is attempted); the built-in's weights are copied into ours
by name and ours is put in the built-in's conventions (no extractor/decoder MLP biases, timm's
position-embedding resize, blur and top-1 % scoring at the input size with reflect padding).
Maps and scores then agree within 1e-4. With our defaults they clearly do not.

As for Dinomaly, timm's resize in ours uses ``antialias=True`` while the built-in's patched timm
uses ``False``; the ``builtin_resize`` fixture aligns that one flag.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import builtin_inp_former as bi  # noqa: E402

from anomalib_mcad.models.components import vit as vit_module  # noqa: E402

SMALL = "vit_small_patch14_reg4_dinov2"
TOL = 1e-4


@pytest.fixture
def builtin_resize(monkeypatch: pytest.MonkeyPatch) -> None:
    """Our 'timm' pos-embed resize with antialias=False, like the built-in's patched timm."""
    original: Any = vit_module.resample_abs_pos_embed
    monkeypatch.setattr(vit_module, "resample_abs_pos_embed", functools.partial(original, antialias=False))


@pytest.fixture(scope="module")
def builtin() -> nn.Module:
    model = bi.build_builtin(SMALL)
    bi.perturb_(model)
    return model


def outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        out = model(x)
    return out.pred_score, out.anomaly_map


def images(batch: int, size: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_no_download_is_attempted() -> None:
    import timm  # noqa: PLC0415

    with bi.no_pretrained_download(), pytest.raises(bi.DownloadAttemptedError):
        timm.create_model(SMALL, pretrained=True)


@pytest.mark.usefixtures("builtin_resize")
@pytest.mark.parametrize(("batch", "size"), [(2, 70), (1, 56)])
def test_parity_with_builtin_conventions(builtin: nn.Module, batch: int, size: int) -> None:
    """Same weights, built-in conventions: scores and maps within 1e-4."""
    ours = bi.build_ours(SMALL, builtin_conventions=True)
    unused, missing = bi.copy_builtin_weights(builtin, ours)
    assert missing == []
    # only the encoder tail (blocks 10, 11) and the final norm go unused
    assert unused and all(k.startswith(("encoder.feature_extractor.blocks.1", "encoder.feature_extractor.norm")) for k in unused)
    assert not any(k.startswith("encoder.feature_extractor.blocks.1.") for k in unused)
    x = images(batch, size)
    (sb, mb), (so, mo) = outputs(builtin, x), outputs(ours, x)
    assert mo.shape == mb.shape == (batch, 1, size, size)
    assert (so - sb).abs().max().item() <= TOL
    assert (mo - mb).abs().max().item() <= TOL


@pytest.mark.usefixtures("builtin_resize")
def test_zeroed_biases_are_what_the_builtin_lacks(builtin: nn.Module) -> None:
    """Ours with MLP biases (the authors') equals the built-in once those biases are zero."""
    ours = bi.build_ours(SMALL, builtin_conventions=True, mlp_bias=True)
    state = ours.state_dict()
    for key, value in builtin.state_dict().items():
        name = bi.our_key(key)
        if name in state:
            state[name] = value
    for name in list(state):
        if ".mlp.fc" in name and name.endswith("bias") and not name.startswith(("encoder.", "bottleneck.")):
            state[name] = torch.zeros_like(state[name])
    ours.load_state_dict(state)
    x = images(1, 70)
    (sb, mb), (so, mo) = outputs(builtin, x), outputs(ours, x)
    assert (so - sb).abs().max().item() <= TOL
    assert (mo - mb).abs().max().item() <= TOL


def test_default_conventions_differ(builtin: nn.Module) -> None:
    """Ours in its defaults (DINOv2 resize, 256 scoring, zero padding) gives clearly other outputs."""
    ours = bi.build_ours(SMALL, builtin_conventions=False, mlp_bias=False)
    bi.copy_builtin_weights(builtin, ours)
    x = images(2, 70)
    (sb, mb), (so, mo) = outputs(builtin, x), outputs(ours, x)
    assert (mo - mb).abs().max().item() > 100 * TOL
    assert (so - sb).abs().max().item() > 3 * TOL
