"""Multi-head attention over packed projections, shared by the text, vision and cross layers."""

from __future__ import annotations

from torch import Tensor

from btfast.ops import Ops
from btfast.weights import Linear


def split_heads(x: Tensor, parts: int, heads: int) -> list[Tensor]:
    """(B, L, parts·H) -> `parts` views of shape (B, heads, L, H/heads), no copy."""
    b, n, _ = x.shape
    return list(x.view(b, n, parts, heads, -1).permute(2, 0, 3, 1, 4).unbind(0))


def merge_heads(x: Tensor) -> Tensor:
    """(B, heads, L, D) -> (B, L, heads·D)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def self_attention(ops: Ops, x: Tensor, qkv: Linear, heads: int, key_mask: Tensor | None) -> Tensor:
    q, k, v = split_heads(ops.linear(x, qkv), 3, heads)
    return merge_heads(ops.attention(q, k, v, key_mask))


def cross_attention(
    ops: Ops, x: Tensor, other: Tensor, q_proj: Linear, kv_proj: Linear, heads: int, key_mask: Tensor | None
) -> Tensor:
    (q,) = split_heads(ops.linear(x, q_proj), 1, heads)
    k, v = split_heads(ops.linear(other, kv_proj), 2, heads)
    return merge_heads(ops.attention(q, k, v, key_mask))
