"""How ``benchmarks/memory_throughput.py`` configures anomalib's built-in Dinomaly and InpFormer (no model is built)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from torchvision.transforms.v2 import CenterCrop, Resize

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import memory_throughput  # noqa: E402

TINY = {"encoder_name": "vit_small_patch14_reg4_dinov2", "pretrained": False, "image_size": 128, "crop_size": 112, "warmup_iters": 20}


def test_ours_take_the_tiny_config_whole() -> None:
    kwargs, ignored = memory_throughput.tiny_kwargs("dinomaly", TINY)
    assert kwargs == TINY
    assert ignored == {}


@pytest.mark.parametrize("name", sorted(memory_throughput.BUILTIN_TWINS))
def test_builtins_get_encoder_and_resize_crop_and_report_the_rest(name: str) -> None:
    kwargs, ignored = memory_throughput.tiny_kwargs(name, TINY)
    assert kwargs["encoder_name"] == "vit_small_patch14_reg4_dinov2"
    transforms = kwargs["pre_processor"].transform.transforms
    assert [list(t.size) for t in transforms if isinstance(t, Resize)] == [[128, 128]]
    assert [list(t.size) for t in transforms if isinstance(t, CenterCrop)] == [[112, 112]]
    assert ignored == {"warmup_iters": 20}  # no schedule arguments in anomalib's modules; pretrained is forced off


def test_builtins_are_named_not_default() -> None:
    assert set(memory_throughput.BUILTIN_TWINS).isdisjoint(memory_throughput.MODELS)
    assert set(memory_throughput.BUILTIN_TWINS.values()) <= set(memory_throughput.MODELS)
