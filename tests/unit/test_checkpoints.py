"""Checkpoints: plain types only, a record of plugin version and model, clear errors for the wrong model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning
import pytest
import torch

import anomalib_mcad
from torch import nn

from anomalib_mcad import Dinomaly
from anomalib_mcad.models.components.base import CHECKPOINT_FORMAT, CHECKPOINT_KEY, CheckpointMismatchError, McadModule

TINY_VIT = {"encoder_name": "vit_small_patch14_reg4_dinov2", "pretrained": False, "image_size": 64, "crop_size": 56}


def write_checkpoint(model: lightning.LightningModule, path: Path, record: bool = True) -> Path:
    """What Lightning's checkpoint connector writes for the model part: state, hyperparameters, hooks."""
    checkpoint: dict[str, Any] = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": lightning.__version__,
    }
    if record:
        model.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def dinomaly() -> Dinomaly:
    torch.manual_seed(0)
    return Dinomaly(**TINY_VIT)


def test_checkpoint_records_version_and_loads_with_weights_only(dinomaly: Dinomaly, tmp_path: Path) -> None:
    dinomaly.hparams["pretrained"] = tmp_path / "weights.pth"  # a Path would need a safe-globals entry
    path = write_checkpoint(dinomaly, tmp_path / "d.ckpt")
    dinomaly.hparams["pretrained"] = False
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    record = checkpoint[CHECKPOINT_KEY]
    assert record["version"] == anomalib_mcad.__version__
    assert record["format"] == CHECKPOINT_FORMAT
    assert record["model"] == "anomalib_mcad.models.image.dinomaly.lightning_model.Dinomaly"
    assert record["config"]["encoder_name"] == TINY_VIT["encoder_name"]
    assert checkpoint["hyper_parameters"]["pretrained"] == str(tmp_path / "weights.pth")


def test_reload_gives_identical_weights(dinomaly: Dinomaly, tmp_path: Path) -> None:
    path = write_checkpoint(dinomaly, tmp_path / "d.ckpt")
    loaded = Dinomaly.load_from_checkpoint(path, map_location="cpu", pretrained=False)
    for (name, a), (_, b) in zip(dinomaly.state_dict().items(), loaded.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)


class TinyNet(McadModule):
    """The smallest McadModule: the checkpoint rules live in the base class, so they are tested on it."""

    def __init__(self, width: int = 3) -> None:
        super().__init__(pre_processor=False, post_processor=False, evaluator=False, visualizer=False)
        self.save_hyperparameters()
        self.model = nn.Linear(width, 1)

    def training_step(self, batch: Any, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        del batch, args, kwargs

    def configure_optimizers(self) -> None:
        return None


class OtherNet(TinyNet):
    """Same weights layout, another model."""


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path: Path) -> None:
    path = write_checkpoint(TinyNet(), tmp_path / "t.ckpt")
    assert type(TinyNet.load_from_checkpoint(path)) is TinyNet
    with pytest.raises(CheckpointMismatchError, match=r"holds .*\.TinyNet .*cannot be loaded into .*\.OtherNet"):
        OtherNet.load_from_checkpoint(path)


def test_newer_checkpoint_format_is_a_clear_error(tmp_path: Path) -> None:
    path = write_checkpoint(TinyNet(), tmp_path / "t.ckpt")
    checkpoint = torch.load(path, weights_only=True)
    checkpoint[CHECKPOINT_KEY]["format"] = CHECKPOINT_FORMAT + 1
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointMismatchError, match="Upgrade anomalib_mcad"):
        TinyNet.load_from_checkpoint(path)


def test_checkpoint_without_record(tmp_path: Path) -> None:
    """An earlier plugin version's checkpoint (no record) still loads; foreign weights are refused by name."""
    model = TinyNet()
    old = write_checkpoint(model, tmp_path / "old.ckpt", record=False)
    torch.testing.assert_close(TinyNet.load_from_checkpoint(old).model.weight, model.model.weight)
    write_checkpoint(TinyNet(width=4), tmp_path / "wide.ckpt", record=False)
    with pytest.raises(CheckpointMismatchError, match=r"not written by anomalib_mcad's TinyNet"):
        TinyNet.load_from_checkpoint(tmp_path / "wide.ckpt", width=3)
    foreign = torch.load(old, weights_only=True)
    foreign["state_dict"] = {k.replace("model.", "model.encoder."): v for k, v in foreign["state_dict"].items()}
    torch.save(foreign, tmp_path / "foreign.ckpt")
    with pytest.raises(CheckpointMismatchError, match=r"2 missing .* 2 unexpected"):
        TinyNet.load_from_checkpoint(tmp_path / "foreign.ckpt")
