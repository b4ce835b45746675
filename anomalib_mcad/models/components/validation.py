"""Input checks that turn bad tensors into clear errors instead of silent wrong scores.

The checks are skipped while a model is traced or exported (they would be baked into the
graph as constants); the exported graph trusts its pre-processing.
"""

from __future__ import annotations

import torch


class NotFittedError(RuntimeError):
    """Inference asked of a model whose training-data memory (coreset, prototypes, network) is not built yet."""


def is_exporting() -> bool:
    """True while TorchScript tracing, ONNX export or torch.export/compile is running."""
    return bool(
        torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_compiling()
        or torch.compiler.is_exporting(),
    )


def check_images(images: torch.Tensor, min_size: int, what: str = "model", multiple: int = 1) -> None:
    """Raise ``ValueError`` naming the problem unless ``images`` is a finite (B, 3, H, W) batch.

    H and W must be at least ``min_size`` and multiples of ``multiple`` (a ViT's patch size).
    """
    if is_exporting():
        return
    if not isinstance(images, torch.Tensor):
        msg = f"{what} expects a torch.Tensor of images, got {type(images).__name__}"
        raise TypeError(msg)
    if images.ndim != 4:
        msg = f"{what} expects images of shape (B, 3, H, W), got shape {tuple(images.shape)}"
        raise ValueError(msg)
    channels = images.shape[1]
    if channels != 3:
        hint = (
            " Grayscale and RGBA files are converted to RGB by anomalib's image reader; "
            "convert tensors before normalisation (e.g. image.expand(3, -1, -1) or image[:3])."
        )
        msg = f"{what} expects 3-channel RGB images, got {channels} channel(s).{hint}"
        raise ValueError(msg)
    height, width = images.shape[-2:]
    if height < min_size or width < min_size:
        msg = f"{what} needs images of at least {min_size}x{min_size} pixels, got {height}x{width}"
        raise ValueError(msg)
    if height % multiple or width % multiple:
        msg = (
            f"{what} needs image sides that are multiples of the patch size {multiple}, got {height}x{width}; "
            f"resize or crop to e.g. {height // multiple * multiple}x{width // multiple * multiple}"
        )
        raise ValueError(msg)
    if not torch.isfinite(images).all():
        n_bad = int((~torch.isfinite(images)).sum())
        msg = f"{what} got images with {n_bad} NaN or Inf value(s); check the image files and pre-processing"
        raise ValueError(msg)
