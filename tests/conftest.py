"""Shared fixtures: a small offline synthetic dataset and a tiny Dinomaly configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

#: Categories of the small dataset: two textures and one object.
SMALL_CATEGORIES = ("brick", "grass", "washer")


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small MVTec-layout dataset (64 px, 3 categories) written once per test session."""
    from anomalib_mcad.data.synthetic import generate_synthetic_dataset

    root = tmp_path_factory.mktemp("synthetic")
    return generate_synthetic_dataset(
        root,
        categories=SMALL_CATEGORIES,
        image_size=64,
        n_train=8,
        n_test_good=3,
        n_test_per_defect=1,
        seed=0,
    )


@pytest.fixture(scope="session")
def tiny_dinomaly_kwargs() -> dict[str, Any]:
    """A Dinomaly small enough for CPU tests: random ViT-S, 56 px input (4x4 patch grid)."""
    return {
        "encoder_name": "vit_small_patch14_reg4_dinov2",
        "pretrained": False,
        "image_size": 64,
        "crop_size": 56,
        "warmup_iters": 2,
        "hard_mining_warmup_iters": 4,
    }
