"""Bad input, for every model of ours and for the multi-class datamodule: clear errors that name the problem.

The model part is parametrized over :func:`anomalib_mcad.list_models`, each model built from its own
``configs/<model>/tiny_cpu.yaml`` with random weights, so a new model is covered as soon as it is
registered and ships its tiny config.
"""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path
from typing import Any

import openvino as ov
import pytest
import torch
from PIL import Image

from anomalib_mcad import get_model, list_models
from anomalib_mcad.data import MultiClassDataModule
from anomalib_mcad.data.multiclass import ImageReadError
from anomalib_mcad.models.components.validation import NotFittedError

REPO = Path(__file__).resolve().parents[2]
#: Models whose untrained network has no memory of the training data yet, and what their error says.
NEEDS_FIT = {
    "mask_ad": r"nearest-neighbour bank is empty: fit the model on training data",
    "pmad": r"ProtoFlow has no prototypes or likelihood reference yet: train the model \(Engine.fit\)",
}


def tiny_network(name: str, kwargs: dict[str, Any]) -> tuple[torch.nn.Module, int]:
    """The torch network of model ``name`` built from its tiny-config arguments ``kwargs``, and its input size."""
    module = get_model(name, **kwargs)
    if getattr(module, "model", None) is None and "num_classes" in inspect.signature(type(module)).parameters:
        module = get_model(name, **kwargs, num_classes=2)  # class-aware models build their head for known categories
    size = int(kwargs.get("crop_size") or kwargs.get("image_size") or 224)
    return module.model.eval(), size


@pytest.fixture(scope="module", params=list_models())
def network(request: pytest.FixtureRequest, tiny_kwargs: Any) -> tuple[str, torch.nn.Module, int]:  # noqa: ANN401
    net, size = tiny_network(request.param, tiny_kwargs(request.param))
    return request.param, net, size


def test_every_model_has_a_tiny_config() -> None:
    missing = [name for name in list_models() if not (REPO / "configs" / name / "tiny_cpu.yaml").is_file()]
    assert not missing, f"models without configs/<model>/tiny_cpu.yaml: {missing}"


def test_good_input_is_scored(network: tuple[str, torch.nn.Module, int]) -> None:
    """Scored, or, for models whose memory is built from training data, a ``NotFittedError`` naming the fit."""
    name, net, size = network
    if name in NEEDS_FIT:
        with pytest.raises(NotFittedError, match=NEEDS_FIT[name]), torch.no_grad():
            net(torch.rand(2, 3, size, size))
        return
    with torch.no_grad():
        out = net(torch.rand(2, 3, size, size))
    assert out.pred_score.shape == (2,), name
    assert torch.isfinite(out.pred_score).all() and torch.isfinite(out.anomaly_map).all(), name


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda s: torch.rand(1, 1, s, s), r"3-channel .* 1 channel"),
        (lambda s: torch.rand(1, 4, s, s), r"3-channel .* 4 channel"),
        (lambda s: torch.rand(3, s, s), r"shape \(B, 3, H, W\)"),
        (lambda s: torch.rand(1, 3, 8, 8), r"needs images of at least \d+x\d+ pixels, got 8x8"),
        (lambda s: torch.full((1, 3, s, s), float("nan")), "NaN or Inf"),
        (lambda s: torch.rand(1, 3, s, s).index_fill_(2, torch.tensor([0]), float("inf")), "NaN or Inf"),
    ],
    ids=["grayscale", "rgba", "no-batch", "too-small", "nan", "inf"],
)
def test_bad_tensors_are_named(network: tuple[str, torch.nn.Module, int], make: Any, match: str) -> None:  # noqa: ANN401
    name, net, size = network
    with pytest.raises(ValueError, match=match), torch.no_grad():
        net(make(size))


# ----------------------------------------------------------------------------- the datamodule
@pytest.fixture
def damaged_root(synthetic_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "brick", root / "brick")
    return root


def first(dm: MultiClassDataModule, data: str) -> None:
    dataset = getattr(dm, data)
    for i in range(len(dataset)):
        dataset[i]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_image_names_the_file(damaged_root: Path, damage: str) -> None:
    victim = sorted((damaged_root / "brick" / "train" / "good").glob("*.png"))[0]
    data = victim.read_bytes()
    victim.write_bytes(b"not an image" if damage == "garbage" else data[: len(data) // 2])
    dm = MultiClassDataModule(root=damaged_root, num_workers=0, val_split_mode="none")
    dm.setup()
    with pytest.raises(ImageReadError, match=str(victim)):
        first(dm, "train_data")


def test_grayscale_and_rgba_files_load_as_rgb(damaged_root: Path) -> None:
    images = sorted((damaged_root / "brick" / "train" / "good").glob("*.png"))
    Image.open(images[0]).convert("L").save(images[0])
    Image.open(images[1]).convert("RGBA").save(images[1])
    dm = MultiClassDataModule(root=damaged_root, num_workers=0, val_split_mode="none")
    dm.setup()
    paths = list(dm.train_data.samples["image_path"])
    for image in images[:2]:
        item = dm.train_data[paths.index(str(image))]
        assert item.image.shape[0] == 3


def test_mask_of_another_size_names_both_files(damaged_root: Path) -> None:
    mask = sorted((damaged_root / "brick" / "ground_truth").rglob("*.png"))[0]
    Image.open(mask).resize((16, 16)).save(mask)
    dm = MultiClassDataModule(root=damaged_root, num_workers=0, val_split_mode="none")
    dm.setup()
    with pytest.raises(ImageReadError, match=rf"Mask {mask} is 16x16 but its image .* is 64x64"):
        first(dm, "test_data")


def test_empty_category_and_unknown_category(damaged_root: Path) -> None:
    (damaged_root / "empty" / "train" / "good").mkdir(parents=True)
    (damaged_root / "empty" / "test" / "good").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"Category 'empty' has no normal training images under .*empty"):
        MultiClassDataModule(root=damaged_root, num_workers=0).setup()
    with pytest.raises(ValueError, match=r"Unknown or missing category \['cable'\]"):
        MultiClassDataModule(root=damaged_root, categories=["brick", "cable"])


def test_int8_export_of_an_unfitted_post_processor_is_refused(tiny_kwargs: Any, synthetic_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN401
    """NaN normalisation statistics would make the INT8 graph fail to compile in OpenVINO: say so before quantizing."""
    module = get_model("mint_ad", **tiny_kwargs("mint_ad"), num_classes=3)
    dm = MultiClassDataModule(root=synthetic_root, train_batch_size=4, num_workers=0)
    with pytest.raises(ValueError, match=r"not fitted.*image_min"):
        module._post_training_quantization_ov(model=None, datamodule=dm)  # noqa: SLF001
    reached: list[Any] = []
    monkeypatch.setattr("nncf.quantize", lambda *args, **kwargs: reached.append(kwargs) or "quantized")
    graph = ov.convert_model(torch.nn.Conv2d(3, 1, 3).eval(), example_input=torch.rand(1, 3, 8, 8))
    for name, buffer in module.post_processor.named_buffers():  # as after a fit: the check lets it through
        buffer.fill_(0.5 if "threshold" in name else (0.0 if name.endswith("min") else 1.0))
    assert module._post_training_quantization_ov(model=graph, datamodule=dm) == "quantized"  # noqa: SLF001
    # statistics a disabled switch leaves out of the graph do not count
    module.post_processor.image_min.fill_(float("nan"))
    module.post_processor.enable_normalization = False
    assert module._post_training_quantization_ov(model=graph, datamodule=dm) == "quantized"  # noqa: SLF001
    assert len(reached) == 2 and reached[0]["subset_size"] == len(dm.train_data)  # every training image calibrates
