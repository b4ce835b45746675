"""The comparison's YAML parsing, model instantiation and offline guards (no training)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from anomalib_mcad.compare import CompareSettings, DownloadBlockedError, ModelSpec, block_downloads, load_settings, random_backbone_weights
from anomalib_mcad.compare.config import instantiate

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "compare"


def test_synthetic_config_parses_into_specs_data_and_settings() -> None:
    models, data, settings = load_settings(CONFIGS / "synthetic_cpu.yaml")
    assert data["class_path"] == "anomalib_mcad.data.MultiClassDataModule"
    assert data["init_args"]["root"] == "./datasets/synthetic"
    paths = [m.class_path for m in models]
    assert "anomalib_mcad.Dinomaly" in paths and "anomalib.models.Patchcore" in paths
    builtin_dinomaly = next(m for m in models if m.class_path == "anomalib.models.Dinomaly")
    assert builtin_dinomaly.random_weights is True
    assert all(m.init_args.get("pretrained", m.init_args.get("pre_trained", False)) is False for m in models)
    assert settings.offline is True and settings.seed == 42
    assert settings.trainer["max_steps"] == 40
    assert isinstance(settings.output_dir, Path)


def test_mvtec_config_lists_our_five_models_and_four_builtins() -> None:
    models, data, settings = load_settings(CONFIGS / "mvtec_multiclass.yaml")
    paths = {m.class_path for m in models}
    ours = {"anomalib_mcad.Dinomaly", "anomalib_mcad.InpFormer", "anomalib_mcad.MintAd", "anomalib_mcad.MaskAd", "anomalib_mcad.Pmad"}
    builtins = {"anomalib.models.Dinomaly", "anomalib.models.InpFormer", "anomalib.models.Patchcore", "anomalib.models.ReverseDistillation"}
    assert paths == ours | builtins
    assert data["init_args"]["dataset"] == "mvtec_ad"
    assert settings.offline is False  # real data, pretrained weights


def test_command_line_overrides_the_yaml(tmp_path: Path) -> None:
    models, _, settings = load_settings(["--config", str(CONFIGS / "synthetic_cpu.yaml"), "--seed", "7", "--output_dir", str(tmp_path), "--openvino", "false"])
    assert settings.seed == 7 and settings.output_dir == tmp_path and settings.openvino is False
    assert len(models) >= 2


def test_mapping_input_and_bad_entries() -> None:
    config = {
        "data": {"class_path": "anomalib.data.MVTecAD", "init_args": {"root": "x", "category": "bottle"}},
        "models": [{"class_path": "anomalib.models.Padim", "name": "PaDiM", "trainer": {"max_epochs": 1}}],
    }
    models, data, settings = load_settings(config)
    assert models == [ModelSpec(class_path="anomalib.models.Padim", name="PaDiM", trainer={"max_epochs": 1})]
    assert settings == CompareSettings()  # defaults: offline, seed 42
    with pytest.raises(ValueError, match="unknown keys.*init_arg"):
        load_settings({**config, "models": [{"class_path": "anomalib.models.Padim", "init_arg": {}}]})
    with pytest.raises(ValueError, match="no class_path"):
        load_settings({**config, "models": [{"init_args": {}}]})


def test_instantiate_builds_nested_class_paths_and_checks_arguments() -> None:
    from anomalib.models import AnomalibModule

    spec = yaml.safe_load(
        """
        class_path: anomalib.models.Padim
        init_args:
          backbone: resnet18
          pre_trained: false
          layers: [layer1, layer2]
          pre_processor:
            class_path: anomalib.pre_processing.PreProcessor
            init_args:
              transform: {class_path: torchvision.transforms.v2.Resize, init_args: {size: [32, 32]}}
        """,
    )
    model = instantiate(AnomalibModule, spec)
    assert type(model).__name__ == "Padim"
    assert list(model.pre_processor.transform.size) == [32, 32]
    with pytest.raises(Exception, match="nope"):
        instantiate(AnomalibModule, {"class_path": "anomalib.models.Padim", "init_args": {"nope": 1}})
    with pytest.raises(ImportError, match="has no 'NoSuchModel'"):
        instantiate(AnomalibModule, {"class_path": "anomalib.models.NoSuchModel"})
    with pytest.raises(TypeError, match="not a subclass"):
        instantiate(AnomalibModule, {"class_path": "torch.nn.Linear"})


def test_offline_guard_blocks_downloads_and_random_weights_build_hardcoded_encoders() -> None:
    import timm
    from anomalib.models.components.feature_extractors import TimmFeatureExtractor

    with block_downloads("test"), pytest.raises(DownloadBlockedError, match="downloads are blocked"):
        timm.create_model("resnet18", pretrained=True)
    with block_downloads("test"), random_backbone_weights():
        extractor = TimmFeatureExtractor("resnet18", layers=["layer1"], pre_trained=True)  # as anomalib's Dinomaly passes it
    features = extractor(torch.rand(1, 3, 32, 32))
    assert features["layer1"].shape == (1, 64, 8, 8)
    # outside the guards the class is the original again
    assert TimmFeatureExtractor.__init__.__module__ == "anomalib.models.components.feature_extractors.timm"
