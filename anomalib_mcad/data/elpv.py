"""ELPV electroluminescence solar-cell images, read from the installed PyPI package ``elpv-dataset``.

The package ships 2,624 grayscale 300 x 300 PNG cells (``elpv_dataset/data/images/``) and
``labels.csv`` (path, defect probability 0 / 1/3 / 2/3 / 1, cell type ``mono`` / ``poly``).
The images are licensed CC BY-NC-SA 4.0: they are read where the package installed them and
never copied. The categories are the two cell types; there are no pixel masks (image labels only).

Labels: probability 0 is normal, 1 is anomalous; the uncertain 1/3 and 2/3 cells are left out
unless ``include_uncertain=True``, which counts them as anomalous. Per category, a seeded draw
splits the normal cells into ``n_train_normal`` training and ``n_test_normal`` test cells, and
draws ``n_test_anomalous`` anomalous test cells (``None``: all that remain / all there are).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["ELPV_CATEGORIES", "ElpvSplit", "elpv_frames", "elpv_root", "read_elpv_labels"]

#: Cell types of ELPV, the datamodule's categories.
ELPV_CATEGORIES: tuple[str, ...] = ("mono", "poly")

#: ``label`` column (the "defect type" shown in figures) of each defect probability.
_LABEL_NAMES = {0.0: "good", 1.0: "defect", 1 / 3: "uncertain_1_3", 2 / 3: "uncertain_2_3"}


def elpv_root() -> Path:
    """The installed package's data folder (``labels.csv`` and ``images/``).

    Raises:
        ModuleNotFoundError: ``elpv-dataset`` is not installed (says how to install it).
    """
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or not spec.submodule_search_locations:
        msg = "dataset='elpv' reads the PyPI package elpv-dataset, which is not installed: pip install elpv-dataset (or pip install 'anomalib-mcad[elpv]')"
        raise ModuleNotFoundError(msg)
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def read_elpv_labels(root: str | Path | None = None) -> pd.DataFrame:
    """``labels.csv`` as a frame: ``image_path`` (absolute), ``probability``, ``category``.

    Args:
        root: a folder with ``labels.csv`` and the images it names; ``None``: the installed package's.
    """
    root = Path(root).expanduser() if root is not None else elpv_root()
    labels = root / "labels.csv"
    if not labels.is_file():
        msg = f"ELPV labels not found: {labels} (root must hold labels.csv and images/, as the elpv-dataset package does)"
        raise FileNotFoundError(msg)
    frame = pd.read_csv(labels, sep=r"\s+", header=None, names=["image_path", "probability", "category"])
    frame["image_path"] = [str(root / p) for p in frame["image_path"]]
    unknown = sorted(set(frame["category"]) - set(ELPV_CATEGORIES))
    if unknown:
        msg = f"{labels}: unknown cell types {unknown}; expected {list(ELPV_CATEGORIES)}"
        raise ValueError(msg)
    return frame


class ElpvSplit:
    """How ELPV's cells of one category become training and test images (``dataset_kwargs`` of the datamodule).

    Args:
        include_uncertain: count the 1/3 and 2/3 cells as anomalous (default: leave them out).
        n_train_normal: normal training cells per category (before the validation split).
        n_test_normal: normal test cells per category; ``None``: every normal cell not used for training.
        n_test_anomalous: anomalous test cells per category; ``None``: all.
        split_seed: seed of the draw (fixed, so every training seed sees the same test set).
    """

    def __init__(
        self,
        include_uncertain: bool = False,
        n_train_normal: int = 200,
        n_test_normal: int | None = 100,
        n_test_anomalous: int | None = 100,
        split_seed: int = 0,
    ) -> None:
        for name, value in (("n_train_normal", n_train_normal), ("n_test_normal", n_test_normal), ("n_test_anomalous", n_test_anomalous)):
            if value is not None and int(value) < 1:
                msg = f"ELPV {name} must be >= 1 (or null for all), got {value}"
                raise ValueError(msg)
        self.include_uncertain = bool(include_uncertain)
        self.n_train_normal = int(n_train_normal)
        self.n_test_normal = n_test_normal
        self.n_test_anomalous = n_test_anomalous
        self.split_seed = int(split_seed)


def elpv_frames(root: str | Path | None, category: str, split: ElpvSplit) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Training and test sample frames of one cell type, in anomalib's columns, without masks.

    Raises:
        ValueError: unknown category, or fewer cells than the counts ask for (the message gives what exists).
    """
    if category not in ELPV_CATEGORIES:
        msg = f"ELPV has no category '{category}'. Available: {list(ELPV_CATEGORIES)}"
        raise ValueError(msg)
    labels = read_elpv_labels(root)
    cells = labels[labels["category"] == category]
    certain = np.isclose(cells["probability"], 0.0) | np.isclose(cells["probability"], 1.0)
    if not split.include_uncertain:
        cells = cells[certain]
    normal = cells[np.isclose(cells["probability"], 0.0)]
    anomalous = cells[~np.isclose(cells["probability"], 0.0)]
    n_test_normal = len(normal) - split.n_train_normal if split.n_test_normal is None else int(split.n_test_normal)
    n_test_anomalous = len(anomalous) if split.n_test_anomalous is None else int(split.n_test_anomalous)
    if split.n_train_normal + n_test_normal > len(normal) or n_test_normal < 1:
        msg = (
            f"ELPV '{category}' has {len(normal)} normal cells, fewer than n_train_normal={split.n_train_normal} "
            f"+ n_test_normal={split.n_test_normal}"
        )
        raise ValueError(msg)
    if n_test_anomalous > len(anomalous):
        kind = "anomalous (probability 1/3, 2/3 or 1)" if split.include_uncertain else "anomalous (probability 1)"
        msg = f"ELPV '{category}' has {len(anomalous)} {kind} cells, fewer than n_test_anomalous={n_test_anomalous}"
        raise ValueError(msg)
    rng = np.random.default_rng([split.split_seed, ELPV_CATEGORIES.index(category)])
    order = rng.permutation(len(normal))
    train = normal.iloc[np.sort(order[: split.n_train_normal])]
    test_normal = normal.iloc[np.sort(order[split.n_train_normal : split.n_train_normal + n_test_normal])]
    test_anomalous = anomalous.iloc[np.sort(rng.permutation(len(anomalous))[:n_test_anomalous])]
    return _samples(train, "train"), _samples(pd.concat([test_normal, test_anomalous]), "test")


def _samples(cells: pd.DataFrame, split: str) -> pd.DataFrame:
    """anomalib's sample columns (``path, split, label, image_path, mask_path, label_index``); no masks."""
    probability = cells["probability"].to_numpy()
    names = [next(name for p, name in _LABEL_NAMES.items() if np.isclose(p, value)) for value in probability]
    frame = pd.DataFrame(
        {
            "path": [str(Path(p).parent) for p in cells["image_path"]],
            "split": split,
            "label": names,
            "image_path": cells["image_path"].to_numpy(),
            "mask_path": "",
            "label_index": (~np.isclose(probability, 0.0)).astype(int),
            "defect_probability": probability,
        },
    )
    frame.attrs["task"] = "classification"
    return frame.reset_index(drop=True)
