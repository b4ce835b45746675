"""Transformer building blocks shared by the ViT reconstruction models (Dinomaly, INP-Former)."""

from __future__ import annotations

from functools import partial

import torch
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import nn
from torch.nn import functional as F  # noqa: N812

from anomalib_mcad.models.components.validation import is_exporting


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """``elu(x) + 1``, the positive feature map of linear attention.

    In eager mode written as ``exp(min(x, 0)) + max(x, 0)`` (the same values; several times
    faster than ``F.elu`` on CPU); exported graphs keep the native Elu, which OpenVINO runs best.
    """
    if is_exporting():
        return F.elu(x) + 1.0
    return torch.exp(x.clamp(max=0)) + x.clamp(min=0)


class LinearAttention(nn.Module):
    """Multi-head linear attention with the ``elu(x) + 1`` feature map.

    Attention is ``phi(q) (phi(k)^T v) / (phi(q) . sum_s phi(k_s))``: linear in the number of
    tokens, and unable to focus sharply on single tokens, which is why Dinomaly uses it to
    keep the decoder from copying anomalies through ("identity shortcut"). Accepts and ignores
    timm's attention keyword arguments so it plugs into :class:`timm.models.vision_transformer.Block`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        proj_bias: bool = True,
        **_: object,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            msg = f"dim ({dim}) must be divisible by num_heads ({num_heads})"
            raise ValueError(msg)
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)  # kept for state-dict and API symmetry; linear attention has no weights to drop
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, **_: object) -> torch.Tensor:
        """Attend over all tokens of ``x`` (B, N, C); ``attn_mask`` is not supported and must be None."""
        if attn_mask is not None:
            msg = "LinearAttention does not support attention masks"
            raise ValueError(msg)
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = elu_plus_one(q), elu_plus_one(k)
        # Plain matmuls rather than einsum: OpenVINO lowers ONNX Einsum to slow generic transposes.
        kv = k.transpose(-2, -1) @ v  # (b, h, d, d)
        normaliser = 1.0 / (q @ k.sum(dim=-2).unsqueeze(-1))  # (b, h, n, 1)
        out = ((q @ kv) * normaliser).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))


def linear_attention_block(dim: int, num_heads: int, mlp_ratio: float = 4.0, mlp_bias: bool = True) -> Block:
    """A pre-norm ViT block with linear attention, as in the Dinomaly / INP-Former decoders.

    LayerNorm eps 1e-8 and qkv bias follow the authors' code; ``mlp_bias=False`` reproduces
    anomalib's built-in variant (used only for the parity check).
    """
    block = Block(
        dim=dim,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-8),
        attn_layer=LinearAttention,
    )
    # timm passes its ``proj_bias`` to the MLP too; set the MLP's bias on its own.
    block.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, bias=mlp_bias)
    return block


class NoisyBottleneck(nn.Module):
    """MLP bottleneck with dropout on its input, hidden and output ("noisy bottleneck").

    Dropout on the input features acts as the feature noise that stops the decoder from
    learning an identity mapping (Dinomaly, sec. 3.2).
    """

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.2, bias: bool = True) -> None:
        super().__init__()
        self.input_drop = nn.Dropout(dropout)
        self.mlp = Mlp(dim, hidden_dim, dim, act_layer=nn.GELU, drop=dropout, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map tokens (B, N, C) to (B, N, C)."""
        return self.mlp(self.input_drop(x))


def init_reconstruction_weights(module: nn.Module) -> None:
    """Initialise trainable layers as the authors do: truncated normal (std 0.01, +-0.03), zero bias, unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.01, a=-0.03, b=0.03)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
