"""Tests of the per-category metrics: metric functions, grouping, table and the callback."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from anomalib_mcad.data.dataclasses import CategoryImageBatch
from anomalib_mcad.metrics import (
    COLUMNS,
    METRIC_COLUMNS,
    PerCategoryMetrics,
    aupro,
    auroc,
    average_precision,
    binary_ranking_metrics,
    compute_per_category_metrics,
    f1_max,
    format_table,
)


# --------------------------------------------------------------------------------------
# independent references
# --------------------------------------------------------------------------------------
def sklearn_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """F1-max as the papers' code computes it, from sklearn's precision-recall curve."""
    precision, recall, _ = precision_recall_curve(labels, scores)
    denom = precision + recall
    f1 = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1), 0)
    return float(f1.max())


def reference_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Straightforward threshold sweep: label regions (8-connectivity), then for every distinct
    threshold compute FPR and the mean per-region overlap; trapezoids up to ``fpr_limit``."""
    flat_scores = maps.reshape(-1)
    normal = ~masks.reshape(-1)
    thresholds = np.unique(flat_scores)[::-1]  # descending
    above = flat_scores[None, :] >= thresholds[:, None]  # (T, P)
    fpr = (above & normal[None]).sum(1) / normal.sum()
    overlaps = []
    for image_idx, mask in enumerate(masks):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        for k in range(1, n + 1):
            region = np.zeros(masks.shape, dtype=bool)
            region[image_idx] = labelled == k
            overlaps.append(above[:, region.reshape(-1)].mean(1))
    pro = np.mean(overlaps, axis=0)
    fpr = np.concatenate([[0.0], fpr])
    pro = np.concatenate([[0.0], pro])
    keep = fpr <= fpr_limit
    last = np.nonzero(keep)[0][-1]
    xs, ys = list(fpr[: last + 1]), list(pro[: last + 1])
    if xs[-1] < fpr_limit:
        x1, x2, y1, y2 = fpr[last], fpr[last + 1], pro[last], pro[last + 1]
        xs.append(fpr_limit)
        ys.append(y1 + (y2 - y1) * (fpr_limit - x1) / (x2 - x1))
    return float(np.trapezoid(ys, xs) / fpr_limit)


def random_maps_and_masks(seed: int, n: int = 4, size: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Blob-shaped masks (irregular, several regions, diagonal contacts) and noisy maps."""
    rng = np.random.default_rng(seed)
    smooth = np.stack([ndimage.gaussian_filter(rng.normal(size=(size, size)), 2.0) for _ in range(n)])
    masks = smooth > np.quantile(smooth, 0.85)
    masks[0] = False  # one all-normal image
    maps = (masks * 0.6 + rng.normal(scale=0.5, size=masks.shape)).astype(np.float32)
    return maps, masks


# --------------------------------------------------------------------------------------
# metric functions
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("quantize", [None, 4, 20])
def test_ranking_metrics_match_sklearn(quantize: int | None) -> None:
    rng = np.random.default_rng(quantize or 0)
    labels = rng.random(300) < 0.3
    scores = rng.random(300) + 0.4 * labels
    if quantize:  # many ties
        scores = np.round(scores * quantize) / quantize
    result = binary_ranking_metrics(scores, labels)
    assert result["AUROC"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert result["AP"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    assert result["F1max"] == pytest.approx(sklearn_f1_max(labels, scores), abs=1e-12)
    # single-metric wrappers agree and accept torch input
    assert auroc(torch.from_numpy(scores), torch.from_numpy(labels)) == pytest.approx(result["AUROC"])
    assert average_precision(scores, labels.astype(int)) == pytest.approx(result["AP"])
    assert f1_max(scores.astype(np.float32), labels) == pytest.approx(sklearn_f1_max(labels, scores.astype(np.float32)))


def test_ranking_metrics_pixel_shapes_match_sklearn() -> None:
    maps, masks = random_maps_and_masks(3)
    result = binary_ranking_metrics(torch.from_numpy(maps), torch.from_numpy(masks))
    assert result["AUROC"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-10)
    assert result["AP"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-10)
    assert result["F1max"] == pytest.approx(sklearn_f1_max(masks.ravel(), maps.ravel()), abs=1e-10)


def test_ranking_metrics_hand_made() -> None:
    labels = [0, 0, 1, 1]
    assert auroc([0.1, 0.2, 0.8, 0.9], labels) == 1.0
    assert auroc([0.9, 0.8, 0.2, 0.1], labels) == 0.0
    assert average_precision([0.1, 0.2, 0.8, 0.9], labels) == 1.0
    assert f1_max([0.1, 0.2, 0.8, 0.9], labels) == 1.0
    # thresholds 0.8 / 0.4 / 0.35 / 0.1 give F1 = 2/3, 1/2, 4/5, 2/3
    assert f1_max([0.1, 0.4, 0.35, 0.8], labels) == pytest.approx(0.8)
    # AP: precision 1 at recall 1/2, precision 2/3 at recall 1
    assert average_precision([0.1, 0.4, 0.35, 0.8], labels) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    # all tied: one threshold, AUROC 0.5
    assert auroc([0.5] * 4, labels) == 0.5


def test_ranking_metrics_degenerate() -> None:
    assert math.isnan(auroc([0.1, 0.2], [0, 0]))
    assert math.isnan(auroc([0.1, 0.2], [1, 1]))
    assert math.isnan(average_precision([0.1, 0.2], [0, 0]))
    assert math.isnan(f1_max([0.1, 0.2], [0, 0]))
    with pytest.raises(ValueError, match="NaN"):
        auroc([0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="size"):
        auroc([0.1, 0.2, 0.3], [0, 1])


def test_aupro_perfect_reversed_and_region_averaging() -> None:
    masks = np.zeros((2, 8, 8), dtype=bool)
    masks[0, 1, 1] = True  # small region: 1 px
    masks[1, 2:6, 2:6] = True  # large region: 16 px
    assert aupro(masks.astype(np.float32), masks) == pytest.approx(1.0)
    assert aupro(1.0 - masks.astype(np.float32), masks) == pytest.approx(0.0)
    # small region ranked above everything, large region below every normal pixel:
    # PRO = mean over regions = 1/2 for every FPR < 1, so AUPRO = 0.5
    # (a pixel-wise TPR would give 1/17 instead)
    maps = np.full(masks.shape, 0.5, dtype=np.float32)
    maps[0, 1, 1] = 1.0
    maps[1, 2:6, 2:6] = 0.0
    assert aupro(maps, masks) == pytest.approx(0.5)
    # no anomalous pixel: undefined
    assert math.isnan(aupro(maps, np.zeros_like(masks)))


@pytest.mark.parametrize("seed", [0, 1])
def test_aupro_matches_threshold_sweep(seed: int) -> None:
    maps, masks = random_maps_and_masks(seed)
    expected = reference_aupro(maps, masks)
    assert 0.05 < expected < 0.95  # a non-trivial case
    assert aupro(torch.from_numpy(maps), torch.from_numpy(masks)) == pytest.approx(expected, abs=1e-4)
    # FPR limit matters: a different limit gives a different value
    assert aupro(maps, masks, fpr_limit=0.05) == pytest.approx(reference_aupro(maps, masks, 0.05), abs=1e-4)


# --------------------------------------------------------------------------------------
# grouping and table
# --------------------------------------------------------------------------------------
def _two_category_case() -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Category "good_cat" perfectly separated, "bad_cat" reversed, both 2 normal + 2 anomalous."""
    categories = ["good_cat", "bad_cat"] * 4  # interleaved on purpose
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    scores = np.where(labels == 1, 0.9, 0.1)
    scores = np.where(np.array(categories) == "bad_cat", 1 - scores, scores)
    masks = np.zeros((8, 16, 16), dtype=bool)
    masks[labels == 1, 4:10, 6:10] = True  # aligned to 2x2 blocks: survives a resize to 8x8 exactly
    maps = masks.astype(np.float32)
    maps[np.array(categories) == "bad_cat"] = 1 - maps[np.array(categories) == "bad_cat"]
    return categories, labels, scores, maps, masks


def test_compute_per_category_metrics_groups_and_means() -> None:
    categories, labels, scores, maps, masks = _two_category_case()
    df = compute_per_category_metrics(categories, labels, scores, maps, masks)
    assert list(df.columns) == list(COLUMNS)
    assert list(df["category"]) == ["good_cat", "bad_cat", "mean"]
    good, bad, mean = (df.iloc[i] for i in range(3))
    assert (good["n_images"], good["n_anomalous"]) == (4, 2)
    assert (mean["n_images"], mean["n_anomalous"]) == (8, 4)
    for column in METRIC_COLUMNS:
        assert good[column] == pytest.approx(1.0), column
    assert bad["image_AUROC"] == 0.0
    assert bad["pixel_AUROC"] == 0.0
    assert bad["pixel_AUPRO"] == pytest.approx(0.0)
    assert bad["image_AP"] == pytest.approx(0.5)  # both anomalies ranked last: P = 1/2 at R = 1
    for column in METRIC_COLUMNS:
        assert mean[column] == pytest.approx((good[column] + bad[column]) / 2), column


def test_compute_per_category_metrics_nan_rules() -> None:
    categories, labels, scores, maps, masks = _two_category_case()
    # a third category with only normal images: image metrics NaN, excluded from the mean
    categories = [*categories, "only_good", "only_good"]
    labels = np.concatenate([labels, [0, 0]])
    scores = np.concatenate([scores, [0.3, 0.4]])
    map_list: list = [*maps, np.zeros((16, 16)), np.zeros((16, 16))]
    # masks of normal images may be missing: they count as all-normal
    mask_list: list = [m if lab else None for m, lab in zip(masks, labels[:8], strict=True)] + [None, None]
    df = compute_per_category_metrics(categories, labels, scores, map_list, mask_list).set_index("category")
    full = compute_per_category_metrics(*_two_category_case()).set_index("category")
    assert df.loc["only_good", ["image_AUROC", "image_AP", "image_F1max", "pixel_AUROC"]].isna().all()
    pd.testing.assert_series_equal(df.loc["mean", list(METRIC_COLUMNS)], full.loc["mean", list(METRIC_COLUMNS)])
    pd.testing.assert_frame_equal(df.loc[["good_cat", "bad_cat"]], full.loc[["good_cat", "bad_cat"]])

    # a missing mask on an anomalous image makes that category's pixel metrics NaN
    mask_list[4] = None  # categories[4] == "good_cat", label 1
    df = compute_per_category_metrics(categories, labels, scores, map_list, mask_list).set_index("category")
    assert df.loc["good_cat", ["pixel_AUROC", "pixel_AP", "pixel_F1max", "pixel_AUPRO"]].isna().all()
    assert df.loc["good_cat", "image_AUROC"] == 1.0
    assert df.loc["mean", "pixel_AUROC"] == 0.0  # only bad_cat left

    # no maps at all: pixel metrics NaN everywhere, image metrics unchanged
    df = compute_per_category_metrics(categories, labels, scores).set_index("category")
    assert df[["pixel_AUROC", "pixel_AUPRO"]].isna().all().all()
    assert df.loc["mean", "image_AUROC"] == 0.5


def test_format_table() -> None:
    df = compute_per_category_metrics(*_two_category_case())
    df.loc[0, "pixel_AP"] = math.nan
    table = format_table(df)
    lines = table.splitlines()
    assert len(lines) == 2 + 3
    assert lines[0].startswith("| category") and "pixel_AUPRO" in lines[0]
    assert "100.00" in lines[2] and " - " in lines[2]
    assert lines[3].split("|")[4].strip() == "0.00"  # bad_cat image_AUROC
    assert lines[4].split("|")[1].strip() == "mean"
    assert lines[4].split("|")[4].strip() == "50.00"


# --------------------------------------------------------------------------------------
# callback without an engine (multi-class batches)
# --------------------------------------------------------------------------------------
def _fake_trainer(tmp_path: Path, callbacks: list) -> SimpleNamespace:
    return SimpleNamespace(
        world_size=1,
        is_global_zero=True,
        log_dir=str(tmp_path / "logs"),
        default_root_dir=str(tmp_path),
        callbacks=callbacks,
        datamodule=SimpleNamespace(category=None),
    )


def test_callback_with_category_batches(tmp_path: Path) -> None:
    categories, labels, scores, maps, masks = _two_category_case()
    callback = PerCategoryMetrics(eval_size=8, print_table=False)
    trainer = _fake_trainer(tmp_path, [callback])
    module = SimpleNamespace(post_processor=None)
    for repeat in range(2):  # a second test run must not accumulate
        callback.on_test_epoch_start(trainer, module)
        for start in (0, 4):
            sl = slice(start, start + 4)
            batch = CategoryImageBatch(
                image=torch.rand(4, 3, 16, 16),
                gt_label=torch.from_numpy(labels[sl]),
                gt_mask=torch.from_numpy(masks[sl]),
                anomaly_map=torch.from_numpy(maps[sl])[:, None],
                pred_score=torch.from_numpy(scores[sl]).float(),
                category=categories[sl],
                category_index=torch.tensor([0 if c == "good_cat" else 1 for c in categories[sl]]),
            )
            callback.on_test_batch_end(trainer, module, batch, batch, 0)
        callback.on_test_epoch_end(trainer, module)
        assert callback.results is not None
        assert callback.results["n_images"].tolist() == [4, 4, 8], repeat
    assert callback.score_source == "raw"
    # maps were resized to 8x8 before evaluation
    assert callback._records[0]["map"].shape == (4, 8, 8)
    assert callback._records[0]["mask"].dtype == torch.bool
    # CSV in trainer.log_dir by default, with the same numbers
    assert callback.csv_path == tmp_path / "logs" / "per_category_metrics.csv"
    saved = pd.read_csv(callback.csv_path)
    expected = compute_per_category_metrics(categories, labels, scores, maps, masks)
    assert saved["category"].tolist() == ["good_cat", "bad_cat", "mean"]
    np.testing.assert_allclose(saved[list(METRIC_COLUMNS)].to_numpy(), expected[list(METRIC_COLUMNS)].to_numpy())


def test_callback_missing_masks_and_maps(tmp_path: Path) -> None:
    callback = PerCategoryMetrics(eval_size=None, output_dir=tmp_path, print_table=False)
    trainer = _fake_trainer(tmp_path, [callback])
    trainer.datamodule = SimpleNamespace(category="bottle")
    module = SimpleNamespace(post_processor=None)
    callback.on_test_epoch_start(trainer, module)
    # a classification-style batch: scores only, no maps, no masks
    batch = SimpleNamespace(pred_score=torch.tensor([0.1, 0.9, 0.2]), gt_label=torch.tensor([0, 1, 0]))
    callback.on_test_batch_end(trainer, module, batch, batch, 0)
    callback.on_test_epoch_end(trainer, module)
    row = callback.results.iloc[0]
    assert row["category"] == "bottle"
    assert row["image_AUROC"] == 1.0
    assert math.isnan(row["pixel_AUROC"])
    assert (tmp_path / "per_category_metrics.csv").exists()


# --------------------------------------------------------------------------------------
# end to end with anomalib's Engine
# --------------------------------------------------------------------------------------
def _make_mvtec_folder(root: Path, category: str) -> None:
    """Tiny MVTec-layout dataset: bright square defects on smooth grey images."""
    rng = np.random.default_rng(0)

    def save(path: Path, array: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)

    def normal() -> np.ndarray:
        base = ndimage.gaussian_filter(rng.normal(128, 40, size=(64, 64)), 3)
        return np.repeat(np.clip(base, 0, 255).astype(np.uint8)[..., None], 3, axis=2)

    for i in range(4):
        save(root / category / "train" / "good" / f"{i:03d}.png", normal())
    for i in range(4):
        image = normal()
        if i == 3:  # an unusual but normal image (rougher texture) that scores high
            image = np.clip(image.astype(int) + rng.normal(0, 12, size=(64, 64, 1)), 0, 255).astype(np.uint8)
        save(root / category / "test" / "good" / f"{i:03d}.png", image)
    # defects from obvious to faint, so that image-level metrics are not all perfect
    for i, (size, contrast) in enumerate([(14, 120), (10, 60), (3, 12), (2, 6)]):
        image = normal()
        mask = np.zeros((64, 64), dtype=np.uint8)
        y, x = 8 + 12 * i, 44 - 10 * i
        mask[y : y + size, x : x + size + 2] = 255
        image[mask > 0] = np.clip(image[mask > 0].astype(int) + contrast, 0, 255).astype(np.uint8)
        save(root / category / "test" / "bad" / f"{i:03d}.png", image)
        save(root / category / "ground_truth" / "bad" / f"{i:03d}_mask.png", mask)


@pytest.mark.filterwarnings("ignore")
def test_callback_end_to_end_with_engine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models import Padim
    from lightning.pytorch import seed_everything

    seed_everything(0)
    _make_mvtec_folder(tmp_path / "data", "toy")
    datamodule = MVTecAD(
        root=tmp_path / "data", category="toy", train_batch_size=2, eval_batch_size=2, num_workers=0, seed=0
    )
    size = 128  # model input size (PreProcessor resize) = evaluation size, to keep the test fast
    model = Padim(
        backbone="resnet18",
        pre_trained=False,
        layers=["layer1"],
        n_features=16,
        pre_processor=Padim.configure_pre_processor(image_size=(size, size)),
        visualizer=False,
    )
    callback = PerCategoryMetrics(eval_size=size, output_dir=tmp_path / "out")
    engine = Engine(
        max_epochs=1,
        logger=False,
        default_root_dir=tmp_path,
        devices=1,
        accelerator="cpu",
        callbacks=[callback],
        enable_progress_bar=False,
    )
    engine.fit(model=model, datamodule=datamodule)
    test_results = engine.test(model=model, datamodule=datamodule)[0]

    # the model's own callbacks come after ours, so we saw raw (unnormalised) scores
    assert callback.score_source == "raw"
    names = [type(c).__name__ for c in engine.trainer.callbacks]
    assert names.index("PerCategoryMetrics") < names.index("PostProcessor")
    raw_scores = torch.cat([r["score"] for r in callback._records])
    assert raw_scores.max() > 1.0  # Mahalanobis distances, not [0, 1] values

    csv_path = tmp_path / "out" / "per_category_metrics.csv"
    assert csv_path.exists()
    saved = pd.read_csv(csv_path)
    assert saved["category"].tolist() == ["toy", "mean"]
    assert saved["n_images"].tolist() == [8, 8]
    assert saved["n_anomalous"].tolist() == [4, 4]
    values = saved[list(METRIC_COLUMNS)].to_numpy()
    assert np.isfinite(values).all()
    assert ((values >= 0) & (values <= 1)).all()
    assert "| toy " in capsys.readouterr().out

    # image AUROC equals anomalib's own (computed on normalised scores; here no clipping at the
    # decision boundary), and the means are logged into the results of engine.test
    assert 0.5 < saved.loc[0, "image_AUROC"] < 1.0  # a non-trivial case
    assert saved.loc[0, "image_AUROC"] == pytest.approx(test_results["image_AUROC"], abs=1e-6)
    assert test_results["per_category_mean_image_AUROC"] == pytest.approx(saved.loc[1, "image_AUROC"], abs=1e-6)
    assert {f"per_category_mean_{c}" for c in METRIC_COLUMNS} <= test_results.keys()
    assert not any(key.startswith("mean_") for key in test_results)  # the old, ambiguous names are gone
    # pixel AUROC at the model input size is close to anomalib's, which sees normalised maps
    # clipped to [0, 1] (ties at 1.0)
    assert saved.loc[0, "pixel_AUROC"] == pytest.approx(test_results["pixel_AUROC"], abs=1e-3)

    # all seven recomputed from the raw outputs of the torch model, run by hand on the test set
    model.eval()
    labels, scores, maps, masks = [], [], [], []
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            image, mask = model.pre_processor.transform(batch.image, batch.gt_mask)
            output = model.model(image)
            labels.append(batch.gt_label)
            scores.append(output.pred_score)
            maps.append(output.anomaly_map.reshape(-1, size, size))
            masks.append(mask.reshape(-1, size, size))
    recomputed = compute_per_category_metrics(
        ["toy"] * 8, torch.cat(labels), torch.cat(scores), torch.cat(maps), torch.cat(masks)
    )
    np.testing.assert_allclose(values, recomputed[list(METRIC_COLUMNS)].to_numpy(), atol=1e-6)

    # engine.predict returns post-processed (normalised, clipped) outputs: close, not identical
    predictions = engine.predict(model=model, datamodule=datamodule)
    from_predict = compute_per_category_metrics(
        ["toy"] * 8,
        torch.cat([p.gt_label for p in predictions]),
        torch.cat([p.pred_score for p in predictions]),
        torch.cat([p.anomaly_map.reshape(-1, size, size) for p in predictions]),
        torch.cat([p.gt_mask.reshape(-1, size, size) for p in predictions]),
    )
    np.testing.assert_allclose(values, from_predict[list(METRIC_COLUMNS)].to_numpy(), atol=2e-2)

    # a second test run starts from scratch
    engine.test(model=model, datamodule=datamodule)
    assert callback.results["n_images"].tolist() == [8, 8]


# --------------------------------------------------------------------------------------
# DDP: two CPU processes (gloo)
# --------------------------------------------------------------------------------------
def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    """One rank: feed half of the two-category case (plus one image the sampler repeats)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        categories, labels, scores, maps, masks = _two_category_case()
        # DistributedSampler order: rank r gets r, r+2, ...; rank 1 also gets image 0 again (padding)
        idx = [0, 2, 4, 6] if rank == 0 else [1, 3, 5, 7, 0]
        callback = PerCategoryMetrics(eval_size=None, output_dir=out_dir, print_table=False)
        trainer = SimpleNamespace(
            world_size=2, is_global_zero=rank == 0, log_dir=out_dir, default_root_dir=out_dir, callbacks=[callback],
            datamodule=None,
        )
        module = SimpleNamespace(post_processor=None)
        callback.on_test_epoch_start(trainer, module)
        batch = CategoryImageBatch(
            image=torch.rand(len(idx), 3, 16, 16),
            gt_label=torch.from_numpy(labels[idx]),
            gt_mask=torch.from_numpy(masks[idx]),
            anomaly_map=torch.from_numpy(maps[idx]),
            pred_score=torch.from_numpy(scores[idx]).float(),
            category=[categories[i] for i in idx],
            image_path=[f"img_{i}.png" for i in idx],
        )
        callback.on_test_batch_end(trainer, module, batch, batch, 0)
        callback.on_test_epoch_end(trainer, module)
        assert (callback.results is not None) == (rank == 0)
    finally:
        torch.distributed.destroy_process_group()


def test_callback_gathers_across_ranks(tmp_path: Path) -> None:
    # fork: the children inherit the imported modules instead of importing anomalib again
    torch.multiprocessing.start_processes(
        _ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    saved = pd.read_csv(tmp_path / "per_category_metrics.csv")
    expected = compute_per_category_metrics(*_two_category_case())
    assert saved["n_images"].tolist() == [4, 4, 8]  # the repeated image was dropped
    np.testing.assert_allclose(saved[list(METRIC_COLUMNS)].to_numpy(), expected[list(METRIC_COLUMNS)].to_numpy())
