"""Tests for the offline synthetic MVTec-AD-layout dataset generator."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalib_mcad.data.synthetic import (
    ALL_CATEGORIES,
    DEFECT_TYPES,
    MANIFEST_NAME,
    OBJECT_CATEGORIES,
    TEXTURE_CATEGORIES,
    generate_synthetic_dataset,
    main,
    render_sample,
)

SIZE = 64
N_TRAIN, N_GOOD, N_DEFECT = 8, 3, 2


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All categories at a small size; shared by the read-only tests."""
    root = tmp_path_factory.mktemp("synthetic")
    return generate_synthetic_dataset(
        root, image_size=SIZE, n_train=N_TRAIN, n_test_good=N_GOOD, n_test_per_defect=N_DEFECT, seed=0
    )


def _load(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_public_constants() -> None:
    assert len(TEXTURE_CATEGORIES) >= 4
    assert len(OBJECT_CATEGORIES) >= 2
    assert len(DEFECT_TYPES) >= 3
    assert ALL_CATEGORIES == TEXTURE_CATEGORIES + OBJECT_CATEGORIES
    assert len(set(ALL_CATEGORIES)) == len(ALL_CATEGORIES)
    assert "good" not in DEFECT_TYPES


@pytest.mark.parametrize("category", ["brick", "tissue", "bolt", "pcb"])
def test_layout_counts_and_masks(dataset: Path, category: str) -> None:
    cat = dataset / category
    assert sorted(p.name for p in (cat / "train" / "good").iterdir()) == [f"{i:03d}.png" for i in range(N_TRAIN)]
    assert sorted(p.name for p in (cat / "test").iterdir()) == sorted(["good", *DEFECT_TYPES])
    assert sorted(p.name for p in (cat / "test" / "good").iterdir()) == [f"{i:03d}.png" for i in range(N_GOOD)]
    # Normal images have no masks at all.
    assert sorted(p.name for p in (cat / "ground_truth").iterdir()) == sorted(DEFECT_TYPES)

    for image_path in sorted((cat / "train" / "good").glob("*.png")) + sorted((cat / "test" / "good").glob("*.png")):
        with Image.open(image_path) as im:
            assert im.mode == "RGB"
            assert im.size == (SIZE, SIZE)

    for defect in DEFECT_TYPES:
        names = sorted(p.name for p in (cat / "test" / defect).iterdir())
        assert names == [f"{i:03d}.png" for i in range(N_DEFECT)]
        mask_names = sorted(p.name for p in (cat / "ground_truth" / defect).iterdir())
        assert mask_names == [f"{i:03d}_mask.png" for i in range(N_DEFECT)]
        for i in range(N_DEFECT):
            with Image.open(cat / "test" / defect / f"{i:03d}.png") as im:
                assert im.mode == "RGB"
                assert im.size == (SIZE, SIZE)
            with Image.open(cat / "ground_truth" / defect / f"{i:03d}_mask.png") as mk:
                assert mk.mode == "L"
                mask = np.asarray(mk)
            assert mask.shape == (SIZE, SIZE)
            assert set(np.unique(mask).tolist()) == {0, 255}
            fraction = float((mask > 0).mean())
            assert 0.005 <= fraction <= 0.15, (defect, i, fraction)


@pytest.mark.parametrize("category", ["gravel", "washer", "pcb"])
def test_disk_matches_render_and_mask_covers_exactly_the_changes(dataset: Path, category: str) -> None:
    for defect in DEFECT_TYPES:
        for i in range(N_DEFECT):
            sample = render_sample(category, "test", i, defect=defect, image_size=SIZE, seed=0)
            assert np.array_equal(_load(dataset / category / "test" / defect / f"{i:03d}.png"), sample.image)
            assert np.array_equal(_load(dataset / category / "ground_truth" / defect / f"{i:03d}_mask.png"), sample.mask)
            changed = np.abs(sample.image.astype(int) - sample.clean.astype(int)).max(axis=-1) > 0
            mask = sample.mask > 0
            assert not (changed & ~mask).any(), "pixels changed outside the mask"
            assert changed[mask].mean() > 0.9, "mask covers pixels that were not changed"
    good = render_sample(category, "test", 0, image_size=SIZE, seed=0)
    assert good.mask is None
    assert np.array_equal(_load(dataset / category / "test" / "good" / "000.png"), good.image)


def test_deterministic_and_independent_of_other_categories(tmp_path: Path) -> None:
    kwargs = {"image_size": 48, "n_train": 3, "n_test_good": 2, "n_test_per_defect": 1}
    a = generate_synthetic_dataset(tmp_path / "a", categories=["gravel", "washer"], seed=7, **kwargs)
    b = generate_synthetic_dataset(tmp_path / "b", categories=["gravel", "washer"], seed=7, **kwargs)
    alone = generate_synthetic_dataset(tmp_path / "alone", categories=["washer"], seed=7, **kwargs)
    other = generate_synthetic_dataset(tmp_path / "other", categories=["gravel", "washer"], seed=8, **kwargs)

    bytes_a = _tree_bytes(a)
    assert len(bytes_a) == 2 * (3 + 2 + 2 * len(DEFECT_TYPES))
    assert bytes_a == _tree_bytes(b)
    washer_a = {k: v for k, v in bytes_a.items() if k.startswith("washer")}
    assert washer_a == _tree_bytes(alone)

    bytes_other = _tree_bytes(other)
    assert bytes_other.keys() == bytes_a.keys()
    images = [k for k in bytes_a if "ground_truth" not in k]
    differing = sum(bytes_a[k] != bytes_other[k] for k in images)
    assert differing == len(images), "a different seed must change every image"


def test_normal_images_vary(dataset: Path) -> None:
    for category in ALL_CATEGORIES:
        train = [_load(p).astype(np.float32) for p in sorted((dataset / category / "train" / "good").glob("*.png"))]
        for first, second in zip(train, train[1:]):
            assert np.abs(first - second).mean() > 2.0, f"{category}: consecutive normal images nearly identical"


def test_anomalib_mvtec_datamodule_reads_it(dataset: Path) -> None:
    import torch
    from anomalib.data import MVTecAD

    for category in ("brick", "pcb"):
        dm = MVTecAD(root=dataset, category=category, train_batch_size=4, eval_batch_size=4, num_workers=0)
        dm.setup()
        assert len(dm.train_data) == N_TRAIN
        assert len(dm.test_data) == N_GOOD + N_DEFECT * len(DEFECT_TYPES)
        labels, masks = [], []
        for batch in dm.test_dataloader():
            assert batch.image.shape[-2:] == (SIZE, SIZE)
            labels.append(batch.gt_label.long())
            masks.append(batch.gt_mask.bool())
        label = torch.cat(labels)
        mask = torch.cat(masks)
        assert set(label.tolist()) == {0, 1}
        assert int(mask.sum()) > 0
        # Per image: a positive mask exactly for the anomalous images.
        has_defect_pixels = mask.flatten(1).any(dim=1).long()
        assert torch.equal(has_defect_pixels, label)


def _block_scores(image: np.ndarray, bank: np.ndarray, block: int) -> np.ndarray:
    """Per-pixel nearest-neighbour distance of block colour statistics to a normal memory bank."""
    feats = _block_features(image, block)
    dist = np.sqrt(((feats.reshape(-1, 1, 6) - bank[None]) ** 2).sum(-1)).min(1).reshape(feats.shape[:2])
    return np.kron(dist, np.ones((block, block)))


def _block_features(image: np.ndarray, block: int) -> np.ndarray:
    h, w, _ = image.shape
    blocks = image.reshape(h // block, block, w // block, block, 3).transpose(0, 2, 1, 3, 4)
    blocks = blocks.reshape(h // block, w // block, block * block, 3)
    return np.concatenate([blocks.mean(2), blocks.std(2)], axis=-1)


@pytest.mark.parametrize("category", ALL_CATEGORIES)
def test_defects_detectable_where_the_masks_are(dataset: Path, category: str) -> None:
    """A crude patch-kNN detector (like PatchCore on colour statistics) must light up inside masks.

    Normal blocks from the training images form the memory bank; each defective test image's
    per-pixel anomaly score must be much higher inside its mask than outside. The same masks
    shifted by half an image (a misalignment) must not show this, so the test has power.
    """
    block = 4
    cat = dataset / category
    bank = np.concatenate(
        [
            _block_features(_load(p).astype(np.float32) / 255, block).reshape(-1, 6)
            for p in sorted((cat / "train" / "good").glob("*.png"))
        ]
    )
    ratios, shifted_ratios, defect_max = [], [], []
    for defect in DEFECT_TYPES:
        for i in range(N_DEFECT):
            score = _block_scores(_load(cat / "test" / defect / f"{i:03d}.png").astype(np.float32) / 255, bank, block)
            mask = _load(cat / "ground_truth" / defect / f"{i:03d}_mask.png") > 0
            ratios.append(score[mask].mean() / score[~mask].mean())
            shifted = np.roll(mask, (SIZE // 2, SIZE // 2), axis=(0, 1)) & ~mask
            if shifted.any():
                shifted_ratios.append(score[shifted].mean() / score[~shifted].mean())
            defect_max.append(score.max())
    good_max = [
        _block_scores(_load(p).astype(np.float32) / 255, bank, block).max()
        for p in sorted((cat / "test" / "good").glob("*.png"))
    ]
    assert min(ratios) > 1.5, (category, ratios)
    assert float(np.median(ratios)) > 3.0, (category, ratios)
    assert float(np.median(shifted_ratios)) < 1.2, (category, shifted_ratios)
    assert float(np.mean(defect_max)) > float(np.mean(good_max)), category


def test_unknown_category_lists_known_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="known categories") as err:
        generate_synthetic_dataset(tmp_path, categories=["brick", "bottle"])
    for name in ALL_CATEGORIES:
        assert name in str(err.value)
    assert "bottle" in str(err.value)
    assert not (tmp_path / "brick").exists(), "nothing is written when the request is invalid"

    assert main(["--root", str(tmp_path), "--categories", "nope"]) == 2
    assert "known categories" in capsys.readouterr().err


def test_invalid_settings_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image_size"):
        generate_synthetic_dataset(tmp_path, categories=["brick"], image_size=8)
    with pytest.raises(ValueError):
        generate_synthetic_dataset(tmp_path, categories=["brick"], n_train=0)


def _mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_reuse_unless_overwrite_or_settings_change(tmp_path: Path) -> None:
    kwargs = {"categories": ["grass", "bolt"], "image_size": 40, "n_train": 2, "n_test_good": 1, "n_test_per_defect": 1}
    root = generate_synthetic_dataset(tmp_path, **kwargs)
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    assert manifest["categories"]["grass"]["settings"]["image_size"] == 40
    before = _mtimes(root)
    time.sleep(0.02)

    assert generate_synthetic_dataset(tmp_path, **kwargs) == tmp_path
    assert _mtimes(root) == before, "same settings must reuse the files untouched"

    # A subset of already generated categories is reused as well.
    generate_synthetic_dataset(tmp_path, **{**kwargs, "categories": ["bolt"]})
    assert _mtimes(root) == before

    generate_synthetic_dataset(tmp_path, **kwargs, overwrite=True)
    after = _mtimes(root)
    png = [k for k in before if k.endswith(".png")]
    assert all(after[k] != before[k] for k in png), "overwrite=True must rewrite every image"

    # Changed settings regenerate that category (image size differs on disk afterwards).
    generate_synthetic_dataset(tmp_path, **{**kwargs, "image_size": 48, "categories": ["grass"]})
    with Image.open(root / "grass" / "train" / "good" / "000.png") as im:
        assert im.size == (48, 48)
    with Image.open(root / "bolt" / "train" / "good" / "000.png") as im:
        assert im.size == (40, 40)

    # A deleted file makes the category incomplete, so it is regenerated.
    (root / "bolt" / "test" / "good" / "000.png").unlink()
    generate_synthetic_dataset(tmp_path, **kwargs)
    assert (root / "bolt" / "test" / "good" / "000.png").exists()


def test_refuses_to_replace_unrecorded_folder(tmp_path: Path) -> None:
    foreign = tmp_path / "brick" / "train" / "good"
    foreign.mkdir(parents=True)
    (foreign / "keep.png").write_bytes(b"not ours")
    with pytest.raises(FileExistsError):
        generate_synthetic_dataset(tmp_path, categories=["brick"], image_size=32, n_train=1, n_test_good=1)
    assert (foreign / "keep.png").exists()
    generate_synthetic_dataset(tmp_path, categories=["brick"], image_size=32, n_train=1, n_test_good=1, overwrite=True)
    assert not (foreign / "keep.png").exists()


def test_cli_writes_and_summarises(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--root", str(tmp_path / "out"), "--categories", "grass", "washer", "--image-size", "40"]
    argv += ["--n-train", "2", "--n-test-good", "1", "--n-test-per-defect", "1", "--seed", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert str((tmp_path / "out").resolve()) in out
    assert "grass" in out and "washer" in out and "generated" in out
    assert len(list((tmp_path / "out" / "washer" / "train" / "good").glob("*.png"))) == 2
    assert len(list((tmp_path / "out" / "washer" / "ground_truth").rglob("*_mask.png"))) == len(DEFECT_TYPES)
    assert main(argv) == 0
    assert "reused" in capsys.readouterr().out
