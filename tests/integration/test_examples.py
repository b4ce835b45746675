"""Every script in examples/ runs in its --fast default, offline, and prints what it promises (issue 17)."""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"


def run_example(name: str, cwd: Path) -> str:
    """Run ``examples/<name>`` with its defaults in ``cwd``, this worktree's package, the hub unreachable."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HOME": str(cwd / "hf_home")}
    result = subprocess.run([sys.executable, str(EXAMPLES / name)], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_every_example_is_tested_and_listed() -> None:
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    tested = sorted(n.removeprefix("test_").replace("_runs", "") + ".py" for n in globals() if n.startswith("test_") and n.endswith("_runs"))
    assert scripts == tested
    listing = (EXAMPLES / "README.md").read_text()
    assert all(f"python examples/{s}" in listing for s in scripts)


def test_train_one_model_all_categories_runs(tmp_path: Path) -> None:
    out = run_example("train_one_model_all_categories.py", tmp_path)
    for category in ("brick", "grass", "washer", "mean"):
        images = 21 if category == "mean" else 7  # per category: 2 good + 5 defect types x 1
        assert re.search(rf"^\| {category} +\| +{images} +\|", out, flags=re.MULTILINE), out[-2000:]
    value = float(re.search(r"^per_category_mean_image_AUROC (\S+)$", out, flags=re.MULTILINE).group(1))
    assert 0.0 <= value <= 1.0
    checkpoint = tmp_path / re.search(r"^Checkpoint: (.+)$", out, flags=re.MULTILINE).group(1)
    assert "state_dict" in torch.load(checkpoint, map_location="cpu", weights_only=False)


def test_export_and_deploy_openvino_runs(tmp_path: Path) -> None:
    out = run_example("export_and_deploy_openvino.py", tmp_path)
    for precision in ("FP32", "INT8"):
        assert (tmp_path / re.search(rf"^OpenVINO {precision}: (.+)$", out, flags=re.MULTILINE).group(1)).is_file()
    scored = re.findall(r"^\w+_\d+: score FP32 (\S+)  INT8 (\S+)", out, flags=re.MULTILINE)
    assert len(scored) == 7  # washer's test folder: 2 good + 5 defect types x 1
    assert all(0.0 <= float(v) <= 1.0 for pair in scored for v in pair)
    assert len(list((tmp_path / "example_output" / "openvino" / "overlays").glob("*.png"))) == 7
    latencies = re.search(r"torch (\S+) ms \| OpenVINO FP32 (\S+) ms \| OpenVINO INT8 (\S+) ms", out)
    assert latencies and all(math.isfinite(float(v)) and float(v) > 0 for v in latencies.groups())


def test_compare_with_anomalib_runs(tmp_path: Path) -> None:
    out = run_example("compare_with_anomalib.py", tmp_path)
    for label in ("Dinomaly (ours)", "PatchCore (anomalib, Lite0)", "Dinomaly (anomalib)"):
        value = float(re.search(rf"^{re.escape(label)} +mean image AUROC (\S+) %$", out, flags=re.MULTILINE).group(1))
        assert 0.0 <= value <= 100.0
    report = tmp_path / re.search(r"^The report went to (.+)$", out, flags=re.MULTILINE).group(1)
    assert "## Mean over categories (%)" in report.read_text()


@pytest.mark.skipif(importlib.util.find_spec("elpv_dataset") is None, reason="elpv-dataset not installed")
def test_real_defects_elpv_runs(tmp_path: Path) -> None:
    out = run_example("real_defects_elpv.py", tmp_path)
    found = re.findall(r"^ELPV (\w+) *: image AUROC (\S+) \((\d+) defective of (\d+) cells\)$", out, flags=re.MULTILINE)
    assert [f[0] for f in found] == ["mono", "poly", "mean"], out[-2000:]
    assert [(f[2], f[3]) for f in found] == [("10", "20"), ("10", "20"), ("20", "40")]
    assert all(0.0 <= float(f[1]) <= 1.0 for f in found)


def test_pretrained_weights_runs(tmp_path: Path) -> None:
    out = run_example("pretrained_weights.py", tmp_path)
    assert re.search(r"^missing file -> PretrainedWeightsError: .*no_such_file\.pth$", out, flags=re.MULTILINE)
    assert re.search(r"^wrong file   -> PretrainedWeightsError: Weights in .*efficientnet-lite0.*do not fit VisionTransformer", out, flags=re.MULTILINE)
    loaded = re.search(r"the encoder's (\d+) tensors include (\d+) identical", out)
    assert loaded and int(loaded.group(1)) > 100 and loaded.group(1) == loaded.group(2)
