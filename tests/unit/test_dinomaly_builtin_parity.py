"""Parity of our DinomalyModel with anomalib's built-in one, and that our conventions matter.

Both models are randomly initialised offline (no download is ever attempted), the built-in's
weights are copied into ours by name, and ours is put in the built-in's conventions
(``mlp_bias=False``, ``pos_embed_interpolation="timm"``, ``blur_padding="reflect"``,
``output_map="raw"``). Scores and anomaly maps must then agree within 1e-4; with our default
conventions they must not.

Sizes below 518 make both models resize their position embeddings; ``"timm"`` mode resizes
exactly as the built-in does (exact grid, bicubic, no antialias).

The helpers live in ``benchmarks/builtin_dinomaly.py`` (shared with the latency benchmark).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import builtin_dinomaly as bd  # noqa: E402

SMALL = "vit_small_patch14_reg4_dinov2"
BASE = "vit_base_patch14_reg4_dinov2"
LAST_TAPPED_BLOCK = 9
TOL = 1e-4


@pytest.fixture(scope="module")
def small_pair() -> tuple[nn.Module, nn.Module, bd.CopyReport]:
    """Built-in (ViT-S, spread LayerScales) and ours in its conventions with its weights."""
    builtin = bd.build_builtin(SMALL)
    bd.spread_layer_scales_(builtin)
    ours = bd.build_ours(SMALL, builtin_conventions=True)
    report = bd.copy_builtin_weights(builtin, ours)
    return builtin, ours, report


def images(batch: int, size: int, seed: int = 1) -> torch.Tensor:
    """Reproducible normalised-image-like input."""
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pred_score, anomaly_map)`` of a model in eval mode."""
    assert not model.training
    with torch.inference_mode():
        out = model(x)
    return out.pred_score, out.anomaly_map


def diffs(builtin: nn.Module, ours: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Max abs difference of (scores, maps) between the two models on ``x``."""
    (score_b, map_b), (score_o, map_o) = run(builtin, x), run(ours, x)
    assert map_o.shape == map_b.shape == (x.shape[0], 1, *x.shape[-2:])
    assert score_o.shape == score_b.shape == (x.shape[0],)
    return bd.max_abs_diff(score_b, score_o), bd.max_abs_diff(map_b, map_o)


def test_no_download_is_attempted() -> None:
    """The guard turns any pretrained-weights load into an immediate error."""
    import timm  # noqa: PLC0415

    with bd.no_pretrained_download(), bd.fast_random_init(), pytest.raises(bd.DownloadAttemptedError):
        timm.create_model(SMALL, pretrained=True)


def test_unused_builtin_keys_are_the_encoder_tail(small_pair: tuple[nn.Module, nn.Module, bd.CopyReport]) -> None:
    """Ours uses every built-in weight except encoder blocks 10, 11 and the final norm."""
    builtin, _, report = small_pair
    expected = bd.expected_unused(builtin, LAST_TAPPED_BLOCK)
    assert set(report.unused) == expected, report.unused_summary()
    assert any(k.startswith("encoder.feature_extractor.blocks.10.") for k in expected)
    assert any(k.startswith("encoder.feature_extractor.blocks.11.") for k in expected)
    assert {"encoder.feature_extractor.norm.weight", "encoder.feature_extractor.norm.bias"} <= expected
    assert report.unused_summary().startswith("encoder blocks [10, 11]")


def test_every_parameter_of_ours_is_assigned(small_pair: tuple[nn.Module, nn.Module, bd.CopyReport]) -> None:
    """Every parameter and buffer of ours received a built-in weight."""
    _, ours, report = small_pair
    assert report.missing == []
    assert {n for n, _ in ours.named_parameters()} <= set(report.assigned)


@pytest.mark.parametrize(("batch", "size"), [(2, 112), (1, 224)])
def test_parity_with_position_resize(
    small_pair: tuple[nn.Module, nn.Module, bd.CopyReport],
    batch: int,
    size: int,
) -> None:
    """Where the position embeddings are resized, the outputs agree."""
    builtin, ours, _ = small_pair
    score, amap = diffs(builtin, ours, images(batch, size))
    assert score <= TOL, f"score max abs diff {score:.3g}"
    assert amap <= TOL, f"map max abs diff {amap:.3g}"


def test_parity_vit_base_paper_size() -> None:
    """ViT-B/14 at the paper's 392x392 (28x28 grid)."""
    builtin = bd.build_builtin(BASE)
    bd.spread_layer_scales_(builtin)
    ours = bd.build_ours(BASE, builtin_conventions=True)
    report = bd.copy_builtin_weights(builtin, ours)
    assert set(report.unused) == bd.expected_unused(builtin, LAST_TAPPED_BLOCK)
    score, amap = diffs(builtin, ours, images(1, 392))
    assert score <= TOL, f"score max abs diff {score:.3g}"
    assert amap <= TOL, f"map max abs diff {amap:.3g}"


def test_default_conventions_differ(small_pair: tuple[nn.Module, nn.Module, bd.CopyReport]) -> None:
    """Ours in its defaults (DINOv2 resize, zero padding, smoothed map) gives clearly other outputs."""
    builtin, _, _ = small_pair
    ours = bd.build_ours(SMALL, builtin_conventions=False, mlp_bias=False)
    report = bd.copy_builtin_weights(builtin, ours)
    assert set(report.unused) == bd.expected_unused(builtin, LAST_TAPPED_BLOCK)
    score, amap = diffs(builtin, ours, images(2, 112))
    assert amap > 100 * TOL, f"map max abs diff only {amap:.3g}"
    assert score > 10 * TOL, f"score max abs diff only {score:.3g}"
