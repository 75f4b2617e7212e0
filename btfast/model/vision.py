"""Vision tower: CLIP ViT patch embedding and pre-LN blocks (batch-first; the reference runs seq-first)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from btfast.model.attention import self_attention
from btfast.ops import Ops
from btfast.spec import ModelSpec
from btfast.weights import VisionBlock, Weights


def embed(w: Weights, ops: Ops, spec: ModelSpec, pixel_values: Tensor) -> Tensor:
    patches = F.conv2d(pixel_values.to(w.patch.dtype), w.patch, stride=spec.patch_size)
    patches = patches.flatten(2).transpose(1, 2)
    cls = w.class_emb.expand(patches.shape[0], 1, -1)
    x = torch.cat([cls, patches], dim=1) + w.vision_pos
    return ops.layer_norm(x, w.ln_pre)


def block(blk: VisionBlock, ops: Ops, spec: ModelSpec, x: Tensor) -> Tensor:
    a = self_attention(ops, ops.layer_norm(x, blk.ln_1), blk.qkv, spec.vision_heads, None)
    x = ops.linear(a, blk.attn_out, residual=x)
    f = ops.linear(ops.layer_norm(x, blk.ln_2), blk.fc1, activation="quick_gelu")
    return ops.linear(f, blk.fc2, residual=x)
