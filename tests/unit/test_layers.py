"""Linear attention and the decoder block."""

from __future__ import annotations

import torch
from torch.nn import functional as F  # noqa: N812

from anomalib_mcad.models.components.layers import (
    LinearAttention,
    NoisyBottleneck,
    elu_plus_one,
    init_reconstruction_weights,
    linear_attention_block,
)


def explicit_linear_attention(attn: LinearAttention, x: torch.Tensor) -> torch.Tensor:
    """Linear attention written as an explicit (N x N) row-normalised kernel matrix."""
    b, n, c = x.shape
    h = attn.num_heads
    q, k, v = attn.qkv(x).reshape(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    q, k = F.elu(q) + 1, F.elu(k) + 1
    weights = q @ k.transpose(-1, -2)  # (b, h, n, n)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    out = (weights @ v).transpose(1, 2).reshape(b, n, c)
    return attn.proj(out)


def test_linear_attention_equals_explicit_kernel_form() -> None:
    torch.manual_seed(0)
    attn = LinearAttention(32, num_heads=4, qkv_bias=True).eval()
    x = torch.randn(2, 10, 32)
    torch.testing.assert_close(attn(x), explicit_linear_attention(attn, x), atol=1e-5, rtol=1e-4)


def test_elu_plus_one_matches_elu() -> None:
    x = torch.linspace(-6, 6, 1001)
    torch.testing.assert_close(elu_plus_one(x), F.elu(x) + 1, atol=1e-6, rtol=1e-6)


def test_block_keeps_shape_and_has_bias_switch() -> None:
    block = linear_attention_block(32, 4, mlp_bias=False)
    assert block.mlp.fc1.bias is None and block.mlp.fc2.bias is None
    assert block.attn.qkv.bias is not None
    assert block.norm1.eps == 1e-8
    assert block(torch.randn(2, 7, 32)).shape == (2, 7, 32)


def test_bottleneck_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    bottleneck = NoisyBottleneck(16, 64, dropout=0.5)
    x = torch.randn(4, 5, 16)
    bottleneck.eval()
    torch.testing.assert_close(bottleneck(x), bottleneck(x))
    bottleneck.train()
    assert not torch.allclose(bottleneck(x), bottleneck(x))


def test_init_is_truncated_normal_with_zero_bias() -> None:
    torch.manual_seed(0)
    block = linear_attention_block(64, 4)
    init_reconstruction_weights(block)
    w = block.mlp.fc1.weight
    assert w.abs().max() <= 0.03 + 1e-7
    assert 0.005 < w.std() < 0.015
    assert torch.count_nonzero(block.mlp.fc1.bias) == 0
