"""ELPV (real solar-cell defects, image labels only), MVTec-layout folders without masks, anomalib's Folder, per-category validation split."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_mcad.data import MultiClassDataModule
from anomalib_mcad.data.elpv import ElpvSplit, elpv_frames, read_elpv_labels

needs_elpv = pytest.mark.skipif(importlib.util.find_spec("elpv_dataset") is None, reason="elpv-dataset is not installed (pip install -e '.[elpv]')")


@needs_elpv
def test_elpv_split_counts_labels_and_channels() -> None:
    dm = MultiClassDataModule(dataset="elpv", train_batch_size=4, eval_batch_size=8, num_workers=0)
    dm.setup()
    assert dm.category_names == ["mono", "poly"]
    train = dm.train_data.samples
    val = dm.val_data.samples
    test = dm.test_data.samples
    # 200 normal training cells per type, 10 % of each type held out for validation
    assert train.groupby("category").size().to_dict() == {"mono": 180, "poly": 180}
    assert val.groupby("category").size().to_dict() == {"mono": 20, "poly": 20}
    assert set(train["label_index"]) == set(val["label_index"]) == {0}
    counts = test.groupby(["category", "label_index"]).size().to_dict()
    assert counts == {("mono", 0): 100, ("mono", 1): 100, ("poly", 0): 100, ("poly", 1): 100}
    assert set(test["defect_probability"].round(3)) == {0.0, 1.0}  # uncertain cells left out by default
    assert not set(train["image_path"]) & set(test["image_path"])  # no normal cell is both trained on and tested
    batch = next(iter(dm.test_dataloader()))
    assert batch.image.shape[1] == 3 and batch.gt_mask is None  # grayscale read as 3 channels; no masks
    assert torch.allclose(batch.image[:, 0], batch.image[:, 1])


@needs_elpv
def test_elpv_split_is_seeded_and_options_work() -> None:
    first = elpv_frames(None, "poly", ElpvSplit())
    again = elpv_frames(None, "poly", ElpvSplit())
    other = elpv_frames(None, "poly", ElpvSplit(split_seed=1))
    assert list(first[0]["image_path"]) == list(again[0]["image_path"])
    assert list(first[0]["image_path"]) != list(other[0]["image_path"])
    uncertain = elpv_frames(None, "mono", ElpvSplit(include_uncertain=True, n_test_anomalous=None))[1]
    labels = read_elpv_labels()
    mono = labels[labels["category"] == "mono"]
    assert int(uncertain["label_index"].sum()) == int((mono["probability"] > 0).sum())  # 1/3, 2/3 and 1 all anomalous
    with pytest.raises(ValueError, match="has 588 normal cells, fewer than n_train_normal=600"):
        elpv_frames(None, "mono", ElpvSplit(n_train_normal=600))
    with pytest.raises(ValueError, match="ELPV has no category 'cigs'"):
        elpv_frames(None, "cigs", ElpvSplit())
    with pytest.raises(ValueError, match="bad dataset_kwargs .*Allowed: include_uncertain"):
        MultiClassDataModule(dataset="elpv", dataset_kwargs={"n_train": 5})


def test_elpv_reader_on_a_written_copy(tmp_path: Path) -> None:
    """The reader's own logic on a tiny labels.csv the test writes (runs without the package)."""
    (tmp_path / "images").mkdir()
    rows = []
    for i, (prob, kind) in enumerate([(0.0, "mono")] * 6 + [(1.0, "mono")] * 2 + [(1 / 3, "mono")] + [(0.0, "poly")] * 6 + [(1.0, "poly")] * 2):
        Image.fromarray(np.full((20, 20), 10 * i, np.uint8)).save(tmp_path / "images" / f"cell{i:04d}.png")
        rows.append(f"images/cell{i:04d}.png  {prob:.16f}  {kind}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    dm = MultiClassDataModule(dataset="elpv", root=tmp_path, dataset_kwargs={"n_train_normal": 4, "n_test_normal": 2, "n_test_anomalous": 2}, val_split_mode="none", num_workers=0)
    dm.setup()
    assert dm.train_data.samples.groupby("category").size().to_dict() == {"mono": 4, "poly": 4}
    assert dm.test_data.samples.groupby(["category", "label_index"]).size().to_dict() == {("mono", 0): 2, ("mono", 1): 2, ("poly", 0): 2, ("poly", 1): 2}
    with pytest.raises(ValueError, match="has 2 anomalous \\(probability 1\\) cells, fewer than n_test_anomalous=3"):
        elpv_frames(tmp_path, "mono", ElpvSplit(n_train_normal=4, n_test_normal=2, n_test_anomalous=3))


def test_mvtec_layout_folder_without_ground_truth_loads(synthetic_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "no_masks"
    shutil.copytree(synthetic_root / "brick", root / "brick", ignore=shutil.ignore_patterns("ground_truth"))
    dm = MultiClassDataModule(root=root, num_workers=0, eval_batch_size=64)
    dm.setup()
    test = dm.test_data.samples
    assert (test["mask_path"] == "").all() and test["label_index"].sum() == 5 and (test["label_index"] == 0).sum() == 3
    batch = next(iter(dm.test_dataloader()))
    assert batch.gt_mask is None and batch.gt_label.sum() == 5


def test_mixing_categories_with_and_without_masks_is_refused(synthetic_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    shutil.copytree(synthetic_root / "brick", root / "brick", ignore=shutil.ignore_patterns("ground_truth"))
    shutil.copytree(synthetic_root / "grass", root / "grass")
    with pytest.raises(ValueError, match=r"Categories \['grass'\] have pixel masks but \['brick'\] have none"):
        MultiClassDataModule(root=root, num_workers=0).setup()


def test_anomalib_folder_as_dataset(synthetic_root: Path) -> None:
    dm = MultiClassDataModule(
        root=synthetic_root,
        dataset="anomalib.data.Folder",
        categories=["brick", "grass"],
        dataset_kwargs={"normal_dir": "train/good", "abnormal_dir": "test/scratch", "normal_test_dir": "test/good", "mask_dir": "ground_truth/scratch"},
        num_workers=0,
    )
    dm.setup()
    test = dm.test_data.samples
    assert set(test["category"]) == {"brick", "grass"}
    assert test.groupby("category")["label_index"].sum().to_dict() == {"brick": 1, "grass": 1}
    with pytest.raises(ValueError, match="normal_dir missing"):
        MultiClassDataModule(root=synthetic_root, dataset="anomalib_folder", dataset_kwargs={"abnormal_dir": "x"})


def test_validation_split_is_taken_per_category(tmp_path: Path) -> None:
    from anomalib_mcad.data.synthetic import generate_synthetic_dataset

    root = generate_synthetic_dataset(tmp_path / "uneven", categories=("brick", "washer"), image_size=32, n_train=10, n_test_good=1, n_test_per_defect=1, seed=0)
    for extra in range(10, 30):  # washer gets 30 training images, brick keeps 10
        shutil.copy(root / "washer/train/good/000.png", root / f"washer/train/good/{extra:03d}.png")
    dm = MultiClassDataModule(root=root, num_workers=0, val_split_ratio=0.2, seed=3)
    dm.setup()
    assert dm.val_data.samples.groupby("category").size().to_dict() == {"brick": 2, "washer": 6}
    again = MultiClassDataModule(root=root, num_workers=0, val_split_ratio=0.2, seed=3)
    again.setup()
    assert list(again.val_data.samples["image_path"]) == list(dm.val_data.samples["image_path"])
