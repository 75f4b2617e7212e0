"""Text tower: RoBERTa embeddings and post-LN layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from btfast.model.attention import self_attention
from btfast.ops import Ops
from btfast.spec import ModelSpec
from btfast.weights import TextLayer, Weights


def position_ids(input_ids: Tensor, pad_id: int) -> Tensor:
    """RoBERTa positions: count of non-pad tokens so far + pad_id; pads sit at pad_id (as the reference)."""
    mask = input_ids.ne(pad_id).int()
    return (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + pad_id


def embed(w: Weights, ops: Ops, spec: ModelSpec, input_ids: Tensor) -> Tensor:
    x = F.embedding(input_ids, w.word) + w.token_type0
    x = x + F.embedding(position_ids(input_ids, spec.pad_id), w.position)
    return ops.layer_norm(x, w.text_emb_ln)


def layer(layer: TextLayer, ops: Ops, spec: ModelSpec, x: Tensor, key_mask: Tensor | None) -> Tensor:
    a = self_attention(ops, x, layer.qkv, spec.text_heads, key_mask)
    h = ops.add_layernorm(ops.linear(a, layer.attn_out), x, layer.ln_attn)
    f = ops.linear(h, layer.fc1, activation=spec.text_act)
    return ops.add_layernorm(ops.linear(f, layer.fc2), h, layer.ln_out)
