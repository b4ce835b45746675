"""Loading pretrained weights: from timm's hub, or from a local file the user points to.

Every model's ``pretrained`` argument accepts ``True`` (download through timm), ``False``
(random initialisation) or a path to a local weights file. Downloads fail on machines
without network access; the error then says how to pass a local file instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

PretrainedArg = bool | str | Path


class PretrainedWeightsError(RuntimeError):
    """Raised when pretrained weights cannot be obtained or do not fit the model."""


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.pth``/``.pt``/``.bin``/``.ckpt`` or ``.safetensors``.

    Unwraps the usual containers (``{"model": ...}``, ``{"state_dict": ...}``) so both
    a bare state dict and a training checkpoint work.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        msg = f"Pretrained weights file not found: {path}"
        raise PretrainedWeightsError(msg)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # noqa: PLC0415

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "teacher"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        msg = f"{path} does not hold a state dict of tensors"
        raise PretrainedWeightsError(msg)
    return dict(state)


def create_timm_model(name: str, pretrained: PretrainedArg, **kwargs: object) -> nn.Module:
    """Create a timm model, loading weights from timm's hub (``True``) or a local file (path).

    A local file is passed through timm's own ``checkpoint_filter_fn`` for that architecture,
    so both timm's format and the original authors' format (e.g. DINOv2's ``*.pth``) load.
    """
    import timm  # noqa: PLC0415

    if isinstance(pretrained, bool):
        if not pretrained:
            return timm.create_model(name, pretrained=False, **kwargs)
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except Exception as err:  # network, hub or cache failures all end here
            msg = (
                f"Could not download pretrained weights for timm model '{name}' ({type(err).__name__}: {err}). "
                "Without network access, download the weights elsewhere and pass the file instead: "
                "pretrained='/path/to/weights.pth' (timm's or the authors' checkpoint format), "
                "or pretrained=False for random weights."
            )
            raise PretrainedWeightsError(msg) from err
    model = timm.create_model(name, pretrained=False, **kwargs)
    load_weights_file(model, pretrained)
    return model


def load_weights_file(
    model: nn.Module,
    path: str | Path,
    key_map: Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]] | None = None,
) -> None:
    """Load a local weights file into ``model`` strictly, converting its keys first.

    ``key_map`` converts a foreign naming to the model's; by default the timm module's
    ``checkpoint_filter_fn`` is used when it has one.
    """
    state = load_state_dict_file(path)
    if key_map is None:
        import sys  # noqa: PLC0415

        key_map = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if key_map is not None:
        state = key_map(state, model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        msg = (
            f"Weights in {path} do not fit {type(model).__name__}: "
            f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
        )
        raise PretrainedWeightsError(msg)
