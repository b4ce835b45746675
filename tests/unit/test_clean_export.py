"""A plain export of our models prints no traceback and no ERROR (opset 18, what torch's exporter builds)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import onnx
import pytest

from anomalib_mcad import Dinomaly
from anomalib_mcad.models.components.base import ONNX_OPSET


def test_onnx_export_logs_no_traceback(tmp_path: Path, tiny_dinomaly_kwargs: dict[str, Any], caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]) -> None:
    model = Dinomaly(**tiny_dinomaly_kwargs).eval()
    with caplog.at_level(logging.DEBUG):
        path = model.to_onnx(tmp_path, input_size=(64, 64))
    out, err = capfd.readouterr()
    text = "\n".join([out, err, *(f"{r.levelname} {r.getMessage()} {r.exc_text or ''}" for r in caplog.records)])
    assert "Traceback" not in text, text[-3000:]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], text[-3000:]
    assert "ERROR" not in out + err
    opsets = {entry.domain: entry.version for entry in onnx.load(str(path)).opset_import}
    assert opsets[""] == ONNX_OPSET == 18
