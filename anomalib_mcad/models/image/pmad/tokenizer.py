"""Visual tokenizers for PMAD's masked image model: image -> grid of token ids.

Two families, as in the authors' code (xcyao00/PMAD):

- :class:`VqViTTokenizer`: a ViT-B/16 encoder, a Linear-Tanh-Linear projection to 32-d, l2
  normalisation and the nearest of 8,192 l2-normalised codes (BEiT v2's VQ-KD tokenizer, the
  authors' default ``vit_tokenizer``; only the encoder side is needed to produce targets).
  :meth:`VqViTTokenizer.small` builds a tiny one with random weights for tests and CPU runs.
- :class:`DalleTokenizer`: DALL-E's discrete-VAE encoder (4 groups of residual conv blocks,
  8,192-way logits at 1/8 resolution, argmax) on 112x112 inputs (the authors' ``dall-e``).

Both take the model's ImageNet-normalised input, undo the normalisation and apply their own
pre-processing, so the datamodule needs no second view. Both are frozen and load a local
weights file in the authors' format (``weights=...``) via ``load_weights_file``.

A third, :class:`FeatureCodeTokenizer`, is this package's offline stand-in for a pretrained
tokenizer: its codes are k-means centres of the pretrained CNN features ProtoFlow already
computes (VQ-KD's codes are quantised pretrained features too; a random tokenizer's codes carry
no image semantics, so its token targets make the cross-entropy score noise).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from anomalib.models.components.cluster import KMeans
from timm.models.beit import Beit
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_mcad.models.components.pre_processing import IMAGENET_MEAN, IMAGENET_STD
from anomalib_mcad.models.components.weights import load_weights_file


class _FrozenTokenizer(nn.Module):
    """Shared behaviour: ImageNet de-normalisation buffers, frozen weights, eval mode."""

    vocab_size: int
    reduction: int

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> _FrozenTokenizer:  # noqa: ARG002
        """Stay in eval mode: the tokenizer is a fixed target generator."""
        return super().train(False)

    def unit_range(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised images back to [0, 1]."""
        return (images * self.std + self.mean).clamp(0.0, 1.0)


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, p=2, dim=-1)


class VqViTTokenizer(_FrozenTokenizer):
    """ViT encoder + vector quantiser (BEiT v2 VQ-KD encoder side), token grid ``img_size / patch_size``.

    Args:
        img_size, patch_size, embed_dim, depth, num_heads: encoder ViT (224, 16, 768, 12, 12 in
            the authors' ``vit_tokenizer``).
        codebook_size: number of codes (8192).
        code_dim: code width (32).
        weights: local weights file in the authors' format (``{"model": state}`` with
            ``encoder.*``, ``encode_task_layer.*``, ``quantize.embedding.weight``; decoder keys are
            ignored). ``None``: random weights and a random l2-normalised codebook (seeded).
        seed: seed of the random codebook.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        codebook_size: int = 8192,
        code_dim: int = 32,
        weights: str | Path | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.vocab_size = int(codebook_size)
        self.reduction = int(patch_size)
        # The authors' encoder: abs. position embedding, no layer scale, mean-pooling style (the
        # final norm is applied to patch tokens as ``fc_norm``), q/v biases, LayerNorm eps 1e-6.
        self.encoder = Beit(
            img_size=img_size,
            patch_size=patch_size,
            num_classes=0,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            use_abs_pos_emb=True,
            use_rel_pos_bias=False,
            init_values=None,
            use_fc_norm=True,
        )
        self.encode_task_layer = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.Tanh(), nn.Linear(embed_dim, code_dim))
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("codebook", _l2norm(torch.randn(codebook_size, code_dim, generator=generator)))
        if weights is not None:
            load_weights_file(self, weights, key_map=self._authors_keys)
        self._freeze()

    @classmethod
    def small(cls, img_size: int = 64, patch_size: int = 8, codebook_size: int = 64, seed: int = 0) -> VqViTTokenizer:
        """A tiny random tokenizer (width 32, one block, 64 codes of width 8) for tests and CPU runs."""
        torch.manual_seed(seed)
        return cls(img_size, patch_size, embed_dim=32, depth=1, num_heads=2, codebook_size=codebook_size, code_dim=8, seed=seed)

    @staticmethod
    def _authors_keys(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """Keep the encoder side of the authors' checkpoint, renamed to this module's keys."""
        wanted = set(model.state_dict())
        out = {}
        for key, value in state.items():
            name = "codebook" if key == "quantize.embedding.weight" else key
            if name in wanted:
                out[name] = value
        return out

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """l2-normalised code-space features (B, N, code_dim) of ImageNet-normalised images."""
        x = self.unit_range(images) * 2.0 - 1.0  # the authors' 'default' pre-processing: [-1, 1]
        tokens = self.encoder.forward_features(x)[:, 1:]  # norm is Identity with use_fc_norm
        tokens = self.encoder.fc_norm(tokens)
        return _l2norm(self.encode_task_layer(tokens))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Token ids (B, N) of the nearest code to each patch (squared L2 on unit vectors)."""
        z = self.features(images)
        distance = (z * z).sum(-1, keepdim=True) + (self.codebook * self.codebook).sum(-1) - 2.0 * z @ self.codebook.T
        return distance.argmin(dim=-1)


class _DalleBlock(nn.Module):
    """DALL-E encoder block: identity (or 1x1) path + gain x (ReLU-conv3-ReLU-conv3-ReLU-conv3-ReLU-conv1)."""

    def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
        super().__init__()
        hidden = n_out // 4
        self.post_gain = 1.0 / n_layers**2
        self.id_path = nn.Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            OrderedDict(
                [
                    ("relu_1", nn.ReLU()),
                    ("conv_1", nn.Conv2d(n_in, hidden, 3, padding=1)),
                    ("relu_2", nn.ReLU()),
                    ("conv_2", nn.Conv2d(hidden, hidden, 3, padding=1)),
                    ("relu_3", nn.ReLU()),
                    ("conv_3", nn.Conv2d(hidden, hidden, 3, padding=1)),
                    ("relu_4", nn.ReLU()),
                    ("conv_4", nn.Conv2d(hidden, n_out, 1)),
                ],
            ),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block output."""
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleTokenizer(_FrozenTokenizer):
    """DALL-E discrete-VAE encoder: 8,192-way logits at 1/8 of a 112x112 input, argmax = token id.

    The model input (224) is resized to ``input_size`` (112; average pooling for an exact 2x) and
    mapped to [0.1, 0.9] (DALL-E's ``map_pixels``), as the authors' ``dall-e`` pipeline does.

    Args:
        n_hid: width of the first group (256); groups are 1x, 2x, 4x, 8x.
        n_blk_per_group: residual blocks per group (2).
        vocab_size: codes (8192).
        input_size: side fed to the encoder (112 -> a 14x14 token grid).
        weights: DALL-E's ``encoder.pkl`` state dict saved as a tensor file (keys ``blocks.*.w``/``.b``).
    """

    def __init__(
        self,
        n_hid: int = 256,
        n_blk_per_group: int = 2,
        vocab_size: int = 8192,
        input_size: int = 112,
        weights: str | Path | None = None,
    ) -> None:
        super().__init__()
        self.vocab_size = int(vocab_size)
        self.input_size = int(input_size)
        self.reduction = 8
        n_layers = 4 * n_blk_per_group
        widths = [n_hid, n_hid, 2 * n_hid, 4 * n_hid, 8 * n_hid]
        groups: list[tuple[str, nn.Module]] = [("input", nn.Conv2d(3, n_hid, 7, padding=3))]
        for g in range(4):
            layers = [
                (f"block_{i + 1}", _DalleBlock(widths[g] if i == 0 else widths[g + 1], widths[g + 1], n_layers))
                for i in range(n_blk_per_group)
            ]
            if g < 3:
                layers.append(("pool", nn.MaxPool2d(kernel_size=2)))
            groups.append((f"group_{g + 1}", nn.Sequential(OrderedDict(layers))))
        groups.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", nn.Conv2d(8 * n_hid, vocab_size, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(groups))
        if weights is not None:
            load_weights_file(self, weights, key_map=self._authors_keys)
        self._freeze()

    @staticmethod
    def _authors_keys(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """DALL-E's custom conv stores ``w``/``b``; ours are ``weight``/``bias``."""
        del model
        renamed = {}
        for key, value in state.items():
            if key.endswith(".w"):
                key = key[:-2] + ".weight"
            elif key.endswith(".b"):
                key = key[:-2] + ".bias"
            renamed[key] = value
        return renamed

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Token logits (B, vocab, input_size / 8, input_size / 8)."""
        x = self.unit_range(images)
        if x.shape[-1] == 2 * self.input_size and x.shape[-2] == 2 * self.input_size:
            x = F.avg_pool2d(x, 2)
        elif x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = 0.8 * x + 0.1  # DALL-E map_pixels with logit-Laplace eps 0.1
        return self.blocks(x)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Token ids (B, N)."""
        return self.logits(images).argmax(dim=1).flatten(1)


class FeatureCodeTokenizer(_FrozenTokenizer):
    """Token id = nearest k-means centre of a patch's pretrained CNN feature (fitted on training patches).

    Unlike the image tokenizers it reads features, not images: (B, C, h, w) on the ViT grid, which
    :class:`~anomalib_mcad.models.image.pmad.torch_model.PmadModel` pools from ProtoFlow's frozen
    embedding. The codebook is a buffer, so checkpoints and exports carry it.

    Args:
        channels: feature width (ProtoFlow's aggregated stages).
        codebook_size: number of codes (k of the k-means).
        reduction: stride of the token grid in input pixels (the ViT patch size).
    """

    def __init__(self, channels: int, codebook_size: int = 256, reduction: int = 16) -> None:
        super().__init__()
        if codebook_size < 2:
            msg = f"a feature codebook needs at least 2 codes, got {codebook_size}"
            raise ValueError(msg)
        self.vocab_size = int(codebook_size)
        self.reduction = int(reduction)
        self.register_buffer("codebook", torch.zeros(self.vocab_size, int(channels)))
        self.register_buffer("fitted", torch.tensor(False))
        self._freeze()

    @property
    def is_fitted(self) -> bool:
        """True once :meth:`fit` has set the codebook (or a checkpoint has)."""
        return bool(self.fitted)

    @torch.no_grad()
    def fit(self, features: torch.Tensor, seed: int = 0, iterations: int = 20) -> None:
        """k-means (anomalib's) on training patch features (N, C); the global random stream is left untouched."""
        if features.ndim != 2 or features.shape[1] != self.codebook.shape[1]:
            msg = f"FeatureCodeTokenizer.fit needs patch features (N, {self.codebook.shape[1]}), got {tuple(features.shape)}"
            raise ValueError(msg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _, centres = KMeans(self.vocab_size, iterations).fit(features.float().to(self.codebook.device))
        self.codebook.copy_(centres)
        self.fitted.fill_(True)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Token ids (B, h*w): nearest code to each position of ``features`` (B, C, h, w)."""
        z = features.flatten(2).transpose(1, 2)
        distance = (self.codebook * self.codebook).sum(-1) - 2.0 * z @ self.codebook.T  # + |z|^2, constant per row
        return distance.argmin(dim=-1)
