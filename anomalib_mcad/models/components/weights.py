"""Loading pretrained weights: from timm's hub, or from a local file the user points to.

Every model's ``pretrained`` argument accepts ``True`` (download through timm), ``False``
(random initialisation) or a path to a local weights file. Downloads fail on machines
without network access; the error then says how to pass a local file instead.

The frozen feature taps built with ``pretrained=True`` do not download when they are built
(:class:`DeferredHubWeights`): a model rebuilt only to receive a checkpoint (``anomalib export``
or ``anomalib test`` with ``--ckpt_path``, ``load_from_checkpoint``) gets every weight from the
checkpoint and so must not need the network.
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


def _download_timm_model(name: str, **kwargs: object) -> nn.Module:
    """A timm model with its hub weights; a failed download says how to pass a local file."""
    import timm  # noqa: PLC0415

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


def create_timm_model(name: str, pretrained: PretrainedArg, **kwargs: object) -> nn.Module:
    """Create a timm model, loading weights from timm's hub (``True``) or a local file (path).

    A local file is passed through timm's own ``checkpoint_filter_fn`` for that architecture,
    so both timm's format and the original authors' format (e.g. DINOv2's ``*.pth``) load.
    """
    import timm  # noqa: PLC0415

    if isinstance(pretrained, bool):
        return _download_timm_model(name, **kwargs) if pretrained else timm.create_model(name, pretrained=False, **kwargs)
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


class DeferredHubWeights(nn.Module):
    """Base of a frozen feature tap whose timm hub weights are fetched when first needed, not when built.

    A tap built with ``pretrained=True`` starts with random weights and remembers which timm model
    to download. It downloads on its first ``forward`` (or :func:`fetch_hub_weights`), and never
    if a state dict is loaded into it first: then a checkpoint supplies every weight, so
    ``anomalib export/test --ckpt_path ...`` and ``load_from_checkpoint`` work offline. The tap's
    parameter names must be a subset of the timm model's (it keeps some of its submodules).
    """

    def __init__(self) -> None:
        super().__init__()
        self._hub_model: tuple[str, dict[str, object]] | None = None
        self._register_load_state_dict_pre_hook(self._drop_hub_weights_on_load)

    def defer_hub_weights(self, name: str, **kwargs: object) -> None:
        """Download timm model ``name`` (built with ``kwargs``) on first use instead of now."""
        self._hub_model = (name, dict(kwargs))

    @property
    def hub_weights_pending(self) -> bool:
        """Whether the hub weights still have to be downloaded."""
        return self._hub_model is not None

    def fetch_hub_weights(self) -> None:
        """Download the hub weights now (once) and copy them into this tap."""
        if self._hub_model is None:
            return
        name, kwargs = self._hub_model
        own = self.state_dict()
        with torch.inference_mode(False), torch.no_grad():  # also when first needed inside a test loop
            full = _download_timm_model(name, **kwargs).state_dict()
            self.load_state_dict({key: full[key].to(value.device, value.dtype) for key, value in own.items()})

    def _drop_hub_weights_on_load(self, *args: object, **kwargs: object) -> None:
        """Loading a state dict (a checkpoint, or the hub weights themselves) settles the weights."""
        del args, kwargs
        self._hub_model = None

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Fetch pending hub weights, then run the tap (:meth:`features`)."""
        self.fetch_hub_weights()
        return self.features(images)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The tapped features of ``images``; defined by each tap."""
        raise NotImplementedError


def fetch_hub_weights(module: nn.Module) -> None:
    """Download the pending hub weights of every :class:`DeferredHubWeights` tap inside ``module``."""
    for child in module.modules():
        if isinstance(child, DeferredHubWeights):
            child.fetch_hub_weights()
