"""Every model's tiny CPU config through anomalib's own CLI: train (fit + test), predict, export.

anomalib's ``AnomalibCLI`` runs in this process (the ``anomalib`` console script, with its ~10 s import per
command, is exercised once for Dinomaly in ``test_cli.py``: train and export). Each model's ``configs/<model>/tiny_cpu.yaml``
is used as shipped, with the data root pointed at the test dataset, 2 steps and small images.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from anomalib.cli import AnomalibCLI

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]

#: Per model: the class path users type, and init args that shrink the tiny config further.
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "dinomaly": ("anomalib_mcad.Dinomaly", {"image_size": 64, "crop_size": 56}),
    "inp_former": ("anomalib_mcad.InpFormer", {"image_size": 64, "crop_size": 56}),
    "mask_ad": ("anomalib_mcad.MaskAd", {"pretrained": False}),
    "mint_ad": ("anomalib_mcad.MintAd", {"pretrained": False}),
    "pmad": ("anomalib_mcad.Pmad", {"proto_pretrained": False}),
}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tiny_config_trains_predicts_and_exports_through_the_cli(name: str, synthetic_root: Path, tmp_path: Path) -> None:
    class_path, shrink = MODELS[name]
    config = yaml.safe_load((REPO / "configs" / name / "tiny_cpu.yaml").read_text())
    config["model"]["class_path"] = class_path
    config["model"]["init_args"].update(shrink)
    config["data"]["init_args"].update(root=str(synthetic_root), categories=["brick", "washer"])
    config["trainer"].update(max_steps=2, check_val_every_n_epoch=1, enable_progress_bar=False)
    config["default_root_dir"] = str(tmp_path / "results")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))

    AnomalibCLI(args=["train", "--config", str(path)])
    tables = list((tmp_path / "results").rglob("per_category_metrics.csv"))
    assert tables, "test did not write the per-category table"
    assert set(pd.read_csv(tables[0])["category"]) == {"brick", "washer", "mean"}
    ckpts = sorted((tmp_path / "results").rglob("*.ckpt"))
    assert ckpts, "no checkpoint written"

    model_args = ["--model", class_path, *[f"--model.{k}={v}" for k, v in config["model"]["init_args"].items()]]
    AnomalibCLI(args=["predict", *model_args, "--ckpt_path", str(ckpts[-1]),
                      "--data", str(synthetic_root / "washer" / "test" / "hole"),
                      "--default_root_dir", str(tmp_path / "pred")])  # fmt: skip
    assert list((tmp_path / "pred").rglob("*.png")), "predict wrote no images"

    AnomalibCLI(args=["export", *model_args, "--ckpt_path", str(ckpts[-1]), "--export_type", "torch",
                      "--export_root", str(tmp_path / "export")])  # fmt: skip
    exported = torch.load(tmp_path / "export" / "weights" / "torch" / "model.pt", weights_only=False)["model"].eval()
    with torch.no_grad():
        out = exported(torch.rand(1, 3, 64, 64))
    assert out.pred_score.shape == (1,)
    assert torch.isfinite(out.anomaly_map).all()
