"""Heads on top of fusion: pooler, ITM, MLM, ITC."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from btfast.ops import Ops
from btfast.spec import ModelSpec
from btfast.weights import Weights


def pooler(w: Weights, ops: Ops, text_features: Tensor, image_features: Tensor) -> Tensor:
    t = torch.tanh(ops.linear(text_features[:, 0], w.pool_text))
    v = torch.tanh(ops.linear(image_features[:, 0], w.pool_image))
    return torch.cat([t, v], dim=-1)


def itm_logits(w: Weights, ops: Ops, pooled: Tensor) -> Tensor:
    return ops.linear(pooled, w.itm)


def mlm_logits(w: Weights, ops: Ops, spec: ModelSpec, text_features: Tensor) -> Tensor:
    h = ops.layer_norm(ops.linear(text_features, w.mlm_dense, activation=spec.head_act), w.mlm_ln)
    return ops.linear(h, w.mlm_decoder)


def itc_text(w: Weights, ops: Ops, cls: Tensor) -> Tensor:
    return F.normalize(ops.linear(cls, w.itc_text), dim=-1, p=2)


def itc_image(w: Weights, ops: Ops, last_bridge_cls: Tensor) -> Tensor:
    return F.normalize(ops.linear(last_bridge_cls, w.itc_image), dim=-1, p=2)


def itc_cross(w: Weights, ops: Ops, pooled: Tensor) -> Tensor:
    return F.normalize(ops.linear(pooled, w.itc_cross), dim=-1, p=2)


def itc_loss(text: Tensor, image: Tensor, cross: Tensor, logit_scale: Tensor) -> Tensor:
    """The reference's contrastive loss: mean of text-image, text-cross and image-cross cross-entropies."""
    scale = logit_scale.exp()
    labels = torch.arange(text.shape[0], device=text.device)
    pairs = ((text, image), (text, cross), (image, cross))
    return sum(F.cross_entropy(a @ b.t() * scale, labels) for a, b in pairs) / 3.0
