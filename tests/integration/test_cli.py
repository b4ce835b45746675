"""anomalib's CLI with our class paths, and our own console script."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_anomalib_console_script_trains_and_exports_with_plugin_classes(synthetic_root: Path, tmp_path: Path) -> None:
    """The ``anomalib`` console script itself (``train`` = fit + test, then ``export``); every model's
    in-process CLI run, predict included, is in ``test_cli_models.py``."""
    config = yaml.safe_load((REPO / "configs" / "dinomaly" / "tiny_cpu.yaml").read_text())
    config["data"]["init_args"]["root"] = str(synthetic_root)
    config["trainer"]["max_steps"] = 3
    config["model"]["init_args"].update(image_size=64, crop_size=56)
    config["default_root_dir"] = str(tmp_path / "results")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    anomalib = str(Path(sys.executable).with_name("anomalib"))
    result = run([anomalib, "train", "--config", str(path)], cwd=tmp_path)
    assert "| mean " in result.stdout and "pixel_AUPRO" in result.stdout  # the per-category table was printed
    assert list((tmp_path / "results").rglob("per_category_metrics.csv"))
    ckpts = sorted((tmp_path / "results").rglob("*.ckpt"))
    assert ckpts, "no checkpoint written"
    model_args = ["--model", "anomalib_mcad.Dinomaly", "--model.encoder_name", "vit_small_patch14_reg4_dinov2",
                  "--model.pretrained", "false", "--model.image_size", "64", "--model.crop_size", "56"]  # fmt: skip
    run([anomalib, "export", *model_args, "--ckpt_path", str(ckpts[-1]), "--export_type", "openvino",
         "--export_root", str(tmp_path / "export")], cwd=tmp_path)  # fmt: skip
    assert (tmp_path / "export" / "weights" / "openvino" / "model.xml").is_file()


def test_console_script_lists_models_and_writes_data(tmp_path: Path) -> None:
    result = run([sys.executable, "-m", "anomalib_mcad.cli", "models"], cwd=tmp_path)
    assert "dinomaly" in result.stdout.split()
    run([sys.executable, "-m", "anomalib_mcad.cli", "synth", "--root", str(tmp_path / "d"), "--categories", "bolt", "--image-size", "32"], cwd=tmp_path)
    assert (tmp_path / "d" / "bolt" / "train" / "good").is_dir()
