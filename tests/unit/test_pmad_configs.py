"""Every PMAD config parses through anomalib's CLI parser into a Pmad and a MultiClassDataModule (no training).

The datamodules are built on an empty MVTec-AD-layout folder (construction resolves the category
lists without reading images); each distinct model section is built once with its weights files
switched off (no downloads, no local weights here) on the meta device (no weight initialisation).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from anomalib.cli import AnomalibCLI

from anomalib_mcad.data import MultiClassDataModule
from anomalib_mcad.models.image.pmad import Pmad
from anomalib_mcad.models.image.pmad.torch_model import MVTEC_MASK_RATIOS
from anomalib_mcad.models.image.pmad.settings import MVTEC_CATEGORIES, MVTEC_OBJECTS, MVTEC_TEXTURES, SHOTS, render, setting_configs

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "pmad"
FILES = sorted(CONFIGS.rglob("*.yaml"))


@pytest.fixture(scope="module")
def train_parser() -> Any:  # noqa: ANN401
    """anomalib's CLI parser (all subcommands), built once; nothing is instantiated or run."""
    cli = AnomalibCLI.__new__(AnomalibCLI)
    cli.parser = cli.init_parser()
    cli.subcommand_parsers = {}
    cli.subcommand_method_arguments = {}
    cli.add_subcommands()
    return cli.parser


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MVTec-AD category folders (empty: the datamodule's constructor only lists them)."""
    root = tmp_path_factory.mktemp("MVTecAD")
    for category in MVTEC_CATEGORIES:
        (root / category / "train" / "good").mkdir(parents=True)
    return root


def _expected(relative: str) -> tuple[list[str], list[str], int | None] | None:
    """Training and test categories and support shots a setting's file name promises."""
    if match := re.fullmatch(r"cross_class/leave_out_(\w+)\.yaml", relative):
        held_out = match.group(1)
        return [c for c in MVTEC_CATEGORIES if c != held_out], [held_out], 50
    groups = {"objects": list(MVTEC_OBJECTS), "textures": list(MVTEC_TEXTURES)}
    if match := re.fullmatch(r"cross_class/(objects|textures)_to_(objects|textures)\.yaml", relative):
        return groups[match.group(1)], groups[match.group(2)], 50
    if match := re.fullmatch(r"few_shot/(objects|textures)_to_(objects|textures)_k(\d+)\.yaml", relative):
        return groups[match.group(1)], groups[match.group(2)], int(match.group(3))
    return None


def test_the_settings_are_all_there_and_generated() -> None:
    """15 leave-one-out files, both splits, k = 1..50 on both splits; the files equal the generator's output."""
    generated = setting_configs()
    names = {str(p.relative_to(CONFIGS)) for p in FILES}
    assert {f"cross_class/leave_out_{c}.yaml" for c in MVTEC_CATEGORIES} <= names
    assert {"cross_class/objects_to_textures.yaml", "cross_class/textures_to_objects.yaml"} <= names
    assert {f"few_shot/{s}_k{k}.yaml" for s in ("objects_to_textures", "textures_to_objects") for k in SHOTS} <= names
    assert SHOTS == (1, 5, 10, 20, 50)
    stale = {n for n in names if n.startswith(("cross_class/", "few_shot/"))} - set(generated)
    assert not stale, f"files the generator no longer writes: {stale}"
    for relative, (header, config) in generated.items():
        assert (CONFIGS / relative).read_text() == render(relative, header, config), f"{relative} differs from the generator"
    assert sorted(MVTEC_OBJECTS + MVTEC_TEXTURES) == sorted(MVTEC_CATEGORIES) and len(MVTEC_TEXTURES) == 5


def test_every_config_parses_into_the_model_and_datamodule(train_parser: Any, mvtec_root: Path, tmp_path: Path) -> None:  # noqa: ANN401
    assert len(FILES) >= 29
    built: dict[str, Pmad] = {}
    for path in FILES:
        relative = str(path.relative_to(CONFIGS))
        config = train_parser.parse_args(["train", "--config", str(path)]).train
        assert config.model.class_path == "anomalib_mcad.Pmad", relative
        assert config.data.class_path == "anomalib_mcad.data.MultiClassDataModule", relative
        model_args = dict(config.model.init_args)
        data_args = dict(config.data.init_args)

        # the model: every distinct model section once, weights files off
        key = repr(sorted(model_args.items()))
        if key not in built:
            offline = {**model_args, "tokenizer_weights": None, "pretrained": False, "proto_pretrained": False}
            with torch.device("meta"):  # shapes and argument checks without initialising ~200 M weights
                built[key] = Pmad(**offline)
        model = built[key]
        assert model.model.tokenizer.vocab_size == (64 if relative in ("tiny_cpu.yaml", "elpv_cpu.yaml") else 8192), relative

        # the datamodule, on the stand-in root
        if data_args["dataset"] == "mvtec_ad":
            data = MultiClassDataModule(**{**data_args, "root": mvtec_root})
        elif data_args["dataset"] == "elpv":  # read from the installed elpv-dataset package
            data = MultiClassDataModule(**data_args)
            assert data.train_categories == ["mono", "poly"], relative
        else:  # the tiny config reads an MVTec-layout folder of any categories
            root = tmp_path / "synthetic"
            (root / "brick" / "train" / "good").mkdir(parents=True, exist_ok=True)
            data = MultiClassDataModule(**{**data_args, "root": root})
        expected = _expected(relative)
        if expected is None:  # multi-class configs: train and test on every category found
            assert data.train_categories == data.test_categories, relative
            continue
        train, test, shots = expected
        assert data.train_categories == train, relative
        assert data.test_categories == test, relative
        assert not set(train) & set(test), relative  # unseen means unseen
        assert data.support_shots == shots, relative
        assert model.hparams.support_coreset_ratio == 1.0, relative  # few shots: every support patch is a prototype
        if relative.startswith("cross_class/leave_out_"):
            # the held-out category's mask ratio is its Table 6 value (the config keeps Table 6)
            assert model.mask_ratio(test[0]) == MVTEC_MASK_RATIOS[test[0]], relative
    assert len(built) == 3  # the paper-size model shared by every MVTec-AD config, the tiny one and the ELPV CPU one


def test_settings_command_writes_the_files(tmp_path: Path) -> None:
    module = importlib.import_module("anomalib_mcad.models.image.pmad.settings")
    module.main([str(tmp_path)])
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.yaml"))
    assert written == sorted(setting_configs())
    assert (tmp_path / "cross_class" / "leave_out_zipper.yaml").read_text() == (CONFIGS / "cross_class" / "leave_out_zipper.yaml").read_text()
