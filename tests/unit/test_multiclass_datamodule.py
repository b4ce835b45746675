"""The multi-class datamodule over the synthetic dataset."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomalib_mcad.data import CategoryImageBatch, MultiClassDataModule

CATS = ["brick", "grass", "washer"]


def make(root: Path, **kwargs: object) -> MultiClassDataModule:
    dm = MultiClassDataModule(root=root, train_batch_size=4, eval_batch_size=4, num_workers=0, **kwargs)
    dm.setup()
    return dm


def test_all_categories_in_one_train_and_one_test_set(synthetic_root: Path) -> None:
    dm = make(synthetic_root)
    assert dm.category_names == sorted(CATS) and dm.category == "multiclass"
    train_cats = dm.train_data.samples["category"]
    # 8 normal images per category, 10 % held out as the (normal-only) validation set
    assert len(dm.train_data) + len(dm.val_data) == 8 * len(CATS)
    assert set(train_cats) == set(CATS)
    assert set(dm.val_data.samples["label_index"]) == {0}  # validation never sees test images
    test = dm.test_data.samples
    assert set(test["category"]) == set(CATS)
    assert (test.groupby("category").size() == 3 + 5).all()  # 3 good + 5 defect types x 1


def test_batches_carry_category_name_and_index(synthetic_root: Path) -> None:
    dm = make(synthetic_root)
    seen: dict[str, int] = {}
    for batch in dm.test_dataloader():
        assert isinstance(batch, CategoryImageBatch)
        assert batch.category_index.dtype == torch.long and batch.category_index.shape == (len(batch.category),)
        for name, index in zip(batch.category, batch.category_index.tolist(), strict=True):
            assert dm.category_names[index] == name
            assert name in Path(batch.image_path[batch.category.index(name)]).parts
            seen[name] = index
        assert batch.gt_mask is not None
    assert set(seen) == set(CATS)
    train_batch = next(iter(dm.train_dataloader()))
    assert isinstance(train_batch, CategoryImageBatch) and train_batch.gt_label.sum() == 0


def test_cross_class_split_and_support_set(synthetic_root: Path) -> None:
    dm = make(synthetic_root, categories=["brick", "grass"], test_categories=["washer"], support_shots=2, val_split_mode="none")
    assert dm.category == "crossclass"
    assert dm.category_names == ["brick", "grass", "washer"] and dm.num_train_categories == 2
    assert set(dm.train_data.samples["category"]) == {"brick", "grass"}
    assert set(dm.test_data.samples["category"]) == {"washer"}
    support = next(iter(dm.support_dataloader()))
    assert support.category == ["washer", "washer"] and support.category_index.tolist() == [2, 2]
    assert set(dm.support_data.samples["image_path"]).isdisjoint(dm.test_data.samples["image_path"])


def test_k_shot_is_deterministic_for_a_seed(synthetic_root: Path) -> None:
    a = make(synthetic_root, k_shot=2, val_split_mode="none", seed=3)
    b = make(synthetic_root, k_shot=2, val_split_mode="none", seed=3)
    c = make(synthetic_root, k_shot=2, val_split_mode="none", seed=4)
    assert (a.train_data.samples.groupby("category").size() == 2).all()
    assert list(a.train_data.samples["image_path"]) == list(b.train_data.samples["image_path"])
    assert list(a.train_data.samples["image_path"]) != list(c.train_data.samples["image_path"])
    with pytest.raises(ValueError, match="fewer than the 50 shots"):
        make(synthetic_root, k_shot=50)


def test_unknown_category_lists_what_exists(synthetic_root: Path) -> None:
    with pytest.raises(ValueError, match=r"Unknown or missing category \['cable'\].*Available: \['brick', 'grass', 'washer'\]"):
        MultiClassDataModule(root=synthetic_root, categories=["brick", "cable"])
    with pytest.raises(FileNotFoundError, match="Dataset root not found"):
        MultiClassDataModule(root=synthetic_root / "nowhere")


def test_empty_training_folder_is_a_clear_error(synthetic_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "brick", root / "brick")
    for png in (root / "brick" / "train" / "good").glob("*.png"):
        png.unlink()
    dm = MultiClassDataModule(root=root, num_workers=0)
    with pytest.raises(ValueError, match="no normal training images"):
        dm.setup()


def test_grayscale_and_rgba_files_are_read_as_rgb(synthetic_root: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "grass", root / "grass")
    good = root / "grass" / "train" / "good"
    rgb = np.array(Image.open(good / "000.png"))
    Image.fromarray(rgb[..., 0]).save(good / "000.png")  # grayscale
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(good / "001.png")  # RGBA
    dm = make(root, val_split_mode="none")
    images = {Path(p).name: img for batch in dm.train_dataloader() for p, img in zip(batch.image_path, batch.image, strict=True)}
    assert images["000.png"].shape == images["001.png"].shape == (3, 64, 64)
    gray = images["000.png"]
    torch.testing.assert_close(gray[0], gray[1])  # grayscale replicated to three channels


def test_union_of_datasets_prefixes_categories_and_averages_per_dataset(synthetic_root: Path, tmp_path: Path) -> None:
    """Two datasets that share a category folder name ('brick') stay apart as 'a/brick' and 'b/brick'."""
    from anomalib_mcad.metrics.per_category import compute_per_category_metrics

    second = tmp_path / "second"
    for category in ("brick", "grass"):
        shutil.copytree(synthetic_root / category, second / category)
    sources = [
        {"root": str(synthetic_root), "dataset": "mvtec_layout", "name": "a", "categories": ["brick", "washer"]},
        {"root": str(second), "name": "b"},
    ]
    dm = MultiClassDataModule(sources=sources, train_batch_size=4, eval_batch_size=4, num_workers=0, val_split_mode="none")
    dm.setup()
    assert dm.category_names == ["a/brick", "a/washer", "b/brick", "b/grass"]
    assert dm.num_train_categories == 4
    assert len(dm.train_data) == 4 * 8
    for name, path in zip(dm.test_data.samples["category"], dm.test_data.samples["image_path"], strict=True):
        root = synthetic_root if name.startswith("a/") else second
        assert Path(path).is_relative_to(root / name.split("/", 1)[1])
    batch = next(iter(dm.test_dataloader()))
    assert all(dm.category_names[i] == c for i, c in zip(batch.category_index.tolist(), batch.category, strict=True))

    samples = dm.test_data.samples
    labels = torch.tensor(samples["label_index"].to_numpy())
    scores = labels.float() + torch.linspace(0, 0.5, len(labels))  # separable everywhere: AUROC 1 per category
    table = compute_per_category_metrics(list(samples["category"]), labels, scores).set_index("category")
    assert list(table.index[-3:]) == ["mean/a", "mean/b", "mean"]
    assert table.loc["mean/a", "n_images"] == table.loc[["a/brick", "a/washer"], "n_images"].sum()
    assert table.loc["mean", "image_AUROC"] == pytest.approx(1.0)

    with pytest.raises(ValueError, match="either 'root'"):
        MultiClassDataModule(root=synthetic_root, sources=sources)
    with pytest.raises(ValueError, match="distinct names"):
        MultiClassDataModule(sources=[sources[1], sources[1]])
    with pytest.raises(ValueError, match=r"Source 'a': categories \['cable'\] not found"):
        MultiClassDataModule(sources=[{**sources[0], "categories": ["cable"]}])
