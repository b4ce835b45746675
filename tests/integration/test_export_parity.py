"""Export parity for every model of ours: torch, ONNX and OpenVINO give the same scores, maps and labels.

Parametrized over :func:`anomalib_mcad.list_models`: each model is built from its
``configs/<model>/tiny_cpu.yaml`` (random weights), fitted for one epoch of two batches on the synthetic
dataset, exported through anomalib's ``Engine.export`` to torch and ONNX, and to OpenVINO as anomalib's
``to_openvino`` does it (the ONNX file converted by ``openvino.convert_model``, saved in FP32), and the synthetic test
set (every second image, as one batch) is run through the exported torch module and anomalib's
``OpenVINOInferencer`` (which also reads the ONNX file). The exported graphs keep anomalib's
thresholding but not its min-max normalisation, so *raw* scores and maps are compared: normalised
scores saturate at 0 and 1 with a validation set this small, which would hide differences.

Stated tolerance, per output (image scores; anomaly maps): ``max |export - torch| <= 1e-4 x
max(1, max |torch|)`` (FP32; OpenVINO is compiled with ``INFERENCE_PRECISION_HINT=f32``, since on
CPUs with bfloat16 it would otherwise run bfloat16); predicted labels identical.
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
from anomalib.deploy import ExportType, OpenVINOInferencer
from anomalib.post_processing import PostProcessor
from lightning.pytorch import seed_everything

from anomalib_mcad import get_model, list_models

pytestmark = pytest.mark.slow

#: Relative tolerance on raw scores and maps (FP32 on CPU), scaled by ``max(1, max |torch|)``.
RELATIVE_TOLERANCE = 1e-4
OPENVINO_FP32 = {"INFERENCE_PRECISION_HINT": "f32"}


def outputs(prediction: Any) -> dict[str, np.ndarray]:  # noqa: ANN401
    """Scores, maps and labels of an inferencer's prediction as flat float arrays."""
    result = {}
    for field in ("pred_score", "anomaly_map", "pred_label"):
        value = getattr(prediction, field)
        value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        result[field] = value.astype(np.float64).reshape(len(value), -1)
    return result


@pytest.mark.parametrize("name", list_models())
def test_torch_onnx_openvino_agree(
    name: str, synthetic_root: Path, tmp_path: Path, tiny_kwargs: Callable[[str], dict[str, Any]], cpu_engine: Any, multiclass_datamodule: Any  # noqa: ANN401
) -> None:
    seed_everything(0)
    model = get_model(name, **tiny_kwargs(name), post_processor=PostProcessor(enable_normalization=False), evaluator=False, visualizer=False)
    datamodule = multiclass_datamodule(synthetic_root)
    engine = cpu_engine(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1, enable_progress_bar=False)
    engine.fit(model=model, datamodule=datamodule)

    paths = {kind: Path(engine.export(model=model, export_type=kind, export_root=tmp_path / kind.value)) for kind in (ExportType.TORCH, ExportType.ONNX)}
    # anomalib's OpenVINO export is its ONNX export converted and saved in FP32 (ExportMixin.to_openvino); doing
    # that to the ONNX file just exported gives the same IR without a second (slow) ONNX export
    paths[ExportType.OPENVINO] = tmp_path / "openvino" / "model.xml"
    ov.save_model(ov.convert_model(paths[ExportType.ONNX]), paths[ExportType.OPENVINO], compress_to_fp16=False)
    for kind, path in paths.items():
        assert path.is_file() and path.stat().st_size > 0, (kind, path)
    assert paths[ExportType.OPENVINO].with_suffix(".bin").stat().st_size > 0
    for kind in (ExportType.ONNX, ExportType.OPENVINO):  # one input, the image (no category label, no mask)
        assert len(ov.Core().read_model(str(paths[kind])).inputs) == 1, kind

    images = torch.stack([read_image(p, as_tensor=True) for p in sorted(synthetic_root.rglob("test/*/*.png"))[::2]])
    with torch.no_grad():
        # what anomalib's TorchInferencer does, without its TRUST_REMOTE_CODE gate on pickled modules
        reference = outputs(torch.load(paths[ExportType.TORCH], map_location="cpu", weights_only=False)["model"].eval()(images))
        model.eval()
        in_memory = model(images)
    # the torch export is the fitted model itself
    np.testing.assert_allclose(reference["pred_score"].ravel(), in_memory.pred_score.numpy().ravel(), rtol=0, atol=1e-6)
    assert np.isfinite(reference["pred_score"]).all() and np.isfinite(reference["anomaly_map"]).all()
    assert np.ptp(reference["pred_score"]) > 0, "all scores equal: the comparison would not test anything"

    worst = {}
    for kind in (ExportType.ONNX, ExportType.OPENVINO):
        inferencer = OpenVINOInferencer(path=paths[kind], device="CPU", config=OPENVINO_FP32)
        exported = outputs(inferencer.predict(images.numpy()))
        for field in ("pred_score", "anomaly_map"):
            scale = max(1.0, float(np.abs(reference[field]).max()))
            worst[kind.value, field] = float(np.abs(exported[field] - reference[field]).max()) / scale
        np.testing.assert_array_equal(exported["pred_label"], reference["pred_label"], err_msg=f"{name} {kind.value} labels")
    print(f"{name}: max difference to torch (relative to max(1, |torch|)): " + ", ".join(f"{k[0]} {k[1]} {v:.1e}" for k, v in worst.items()))
    assert max(worst.values()) <= RELATIVE_TOLERANCE, worst
