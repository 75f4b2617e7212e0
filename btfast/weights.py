"""Packed views of a BridgeTower model's own parameters, laid out for btfast's forward.

No weight is copied: fused projections (text QKV, cross-attention KV) are packed once and the
model's own `query`/`key`/`value` parameters are replaced by views into the packed tensor, so the
original model keeps working, gives the same outputs, and parameter memory does not grow. The only
new tensors are the transform biases with the token-type embedding folded in (a few KB).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from btfast.spec import ModelSpec


@dataclass
class Linear:
    weight: Tensor  # (out, in), as nn.Linear
    bias: Tensor | None


@dataclass
class Norm:
    weight: Tensor
    bias: Tensor
    eps: float


@dataclass
class TextLayer:
    """A post-LN RoBERTa layer: LN(x + O·attn(QKV·x)), then LN(h + W2·act(W1·h))."""

    qkv: Linear
    attn_out: Linear
    ln_attn: Norm
    fc1: Linear
    fc2: Linear
    ln_out: Norm


@dataclass
class VisionBlock:
    """A pre-LN CLIP block: x + O·attn(QKV·ln_1(x)), then x + W2·quick_gelu(W1·ln_2(x))."""

    ln_1: Norm
    qkv: Linear
    attn_out: Linear
    ln_2: Norm
    fc1: Linear
    fc2: Linear


@dataclass
class CrossLayer:
    """Self-attention, cross-attention (keys/values from the other side), MLP; each post-LN."""

    self_qkv: Linear
    self_out: Linear
    ln_self: Norm
    cross_q: Linear
    cross_kv: Linear
    cross_out: Linear
    ln_cross: Norm
    fc1: Linear
    fc2: Linear
    ln_out: Norm


@dataclass
class Link:
    """A bridge LayerNorm: LN(alpha·bridge + beta·previous); alpha/beta None mean 1."""

    norm: Norm
    scale: Tensor | None  # scaled_add: the model's scaled_factor
    beta: Tensor | None  # interpolate: the model's beta (alpha = 1 - beta)


@dataclass
class Weights:
    # text tower
    word: Tensor
    position: Tensor
    token_type0: Tensor
    text_emb_ln: Norm
    text_layers: list[TextLayer]
    # vision tower
    patch: Tensor
    class_emb: Tensor
    vision_pos: Tensor
    ln_pre: Norm
    vision_blocks: list[VisionBlock]
    ln_post: Norm
    # fusion: one transform per cross layer (repeated when shared), token-type embedding in the bias
    text_transform: list[Linear]
    image_transform: list[Linear]
    text_ln0: Norm
    image_ln0: Norm
    text_links: list[Link]
    image_links: list[Link]
    cross_text: list[CrossLayer]
    cross_image: list[CrossLayer]
    pool_text: Linear
    pool_image: Linear
    # heads (only the model's own head is set)
    itm: Linear | None = None
    mlm_dense: Linear | None = None
    mlm_ln: Norm | None = None
    mlm_decoder: Linear | None = None
    itc_text: Linear | None = None
    itc_image: Linear | None = None
    itc_cross: Linear | None = None
    logit_scale: Tensor | None = None


def _lin(m: nn.Linear) -> Linear:
    return Linear(m.weight, m.bias)


def _norm(m: nn.LayerNorm) -> Norm:
    return Norm(m.weight, m.bias, float(m.eps))


def _already_packed(params: list[Tensor]) -> bool:
    """True when `params` are consecutive rows of one storage (packed by an earlier call)."""
    first = params[0]
    offset = first.storage_offset()
    for p in params:
        if not p.is_contiguous() or p.untyped_storage().data_ptr() != first.untyped_storage().data_ptr():
            return False
        if p.storage_offset() != offset:
            return False
        offset += p.numel()
    return True


def _pack_params(modules: list[nn.Linear], name: str) -> Tensor | None:
    params = [getattr(m, name) for m in modules]
    if params[0] is None:
        return None
    total = sum(p.shape[0] for p in params)
    shape = (total, *params[0].shape[1:])
    if _already_packed(params):
        return params[0].detach().as_strided(shape, torch.empty(shape, device="meta").stride())
    packed = torch.cat([p.detach() for p in params])
    start = 0
    for m, p in zip(modules, params):
        rows = p.shape[0]
        setattr(m, name, nn.Parameter(packed[start : start + rows], requires_grad=p.requires_grad))
        start += rows
    return packed


def pack_linears(modules: list[nn.Linear]) -> Linear:
    """One Linear whose output is the concatenation of `modules`' outputs; the modules become views."""
    return Linear(_pack_params(modules, "weight"), _pack_params(modules, "bias"))


def _folded(transform: nn.Linear, type_row: Tensor) -> Linear:
    return Linear(transform.weight, (transform.bias + type_row).detach())


def _text_layer(layer: nn.Module) -> TextLayer:
    att = layer.attention
    return TextLayer(
        qkv=pack_linears([att.self.query, att.self.key, att.self.value]),
        attn_out=_lin(att.output.dense),
        ln_attn=_norm(att.output.LayerNorm),
        fc1=_lin(layer.intermediate.dense),
        fc2=_lin(layer.output.dense),
        ln_out=_norm(layer.output.LayerNorm),
    )


def _vision_block(block: nn.Module) -> VisionBlock:
    return VisionBlock(
        ln_1=_norm(block.ln_1),
        qkv=Linear(block.attn.in_proj_weight, block.attn.in_proj_bias),
        attn_out=_lin(block.attn.out_proj),
        ln_2=_norm(block.ln_2),
        fc1=_lin(block.mlp["c_fc"]),
        fc2=_lin(block.mlp["c_proj"]),
    )


def _cross_layer(layer: nn.Module) -> CrossLayer:
    sa, ca = layer.attention, layer.crossattention
    return CrossLayer(
        self_qkv=pack_linears([sa.self.query, sa.self.key, sa.self.value]),
        self_out=_lin(sa.output.dense),
        ln_self=_norm(sa.output.LayerNorm),
        cross_q=_lin(ca.self.query),
        cross_kv=pack_linears([ca.self.key, ca.self.value]),
        cross_out=_lin(ca.output.dense),
        ln_cross=_norm(ca.output.LayerNorm),
        fc1=_lin(layer.intermediate.dense),
        fc2=_lin(layer.output.dense),
        ln_out=_norm(layer.output.LayerNorm),
    )


def _link(tower: nn.Module) -> Link:
    return Link(_norm(tower.LayerNorm), getattr(tower, "scaled_factor", None), getattr(tower, "beta", None))


@torch.no_grad()
def pack(model: nn.Module, spec: ModelSpec) -> Weights:
    """Read (and pack in place) the parameters of `model`, one of the four BridgeTower heads."""
    bt = model if spec.head == "base" else model.bridgetower
    text, visual = bt.text_model, bt.vision_model.visual
    n_cross = spec.cross_layers

    def per_layer(obj: nn.Module, n: int) -> list[nn.Module]:
        # A shared link tower (one module, not a list) serves every layer: the meaning the reference intends.
        return list(obj) if isinstance(obj, nn.ModuleList) else [obj] * n

    type_emb = bt.token_type_embeddings.weight

    def transforms(obj: nn.Module, type_row: Tensor) -> list[Linear]:
        if isinstance(obj, nn.ModuleList):
            return [_folded(m, type_row) for m in obj]
        return [_folded(obj, type_row)] * n_cross

    emb = text.embeddings
    w = Weights(
        word=emb.word_embeddings.weight,
        position=emb.position_embeddings.weight,
        token_type0=emb.token_type_embeddings.weight[0],
        text_emb_ln=_norm(emb.LayerNorm),
        text_layers=[_text_layer(layer) for layer in text.encoder.layer],
        patch=visual.embeddings.patch_embedding.weight,
        class_emb=visual.embeddings.class_embedding,
        vision_pos=visual.embeddings.position_embedding.weight,
        ln_pre=_norm(visual.ln_pre),
        vision_blocks=[_vision_block(b) for b in visual.transformer.resblocks[: spec.text_layers]],
        ln_post=_norm(visual.ln_post),
        text_transform=transforms(bt.cross_modal_text_transform, type_emb[0]),
        image_transform=transforms(bt.cross_modal_image_transform, type_emb[1]),
        text_ln0=_norm(bt.cross_modal_text_layernorm),
        image_ln0=_norm(bt.cross_modal_image_layernorm),
        text_links=[_link(t) for t in per_layer(bt.cross_modal_text_link_tower, n_cross - 1)],
        image_links=[_link(t) for t in per_layer(bt.cross_modal_image_link_tower, n_cross - 1)],
        cross_text=[_cross_layer(layer) for layer in bt.cross_modal_text_layers],
        cross_image=[_cross_layer(layer) for layer in bt.cross_modal_image_layers],
        pool_text=_lin(bt.cross_modal_text_pooler.dense),
        pool_image=_lin(bt.cross_modal_image_pooler.dense),
    )
    if spec.head == "itm":
        w.itm = _lin(model.itm_score.fc)
    elif spec.head == "mlm":
        head = model.mlm_score
        w.mlm_dense = _lin(head.transform.dense)
        w.mlm_ln = _norm(head.transform.LayerNorm)
        w.mlm_decoder = Linear(head.decoder.weight, head.bias)
    elif spec.head == "itc":
        w.itc_text = _lin(model.itc_text_head.fc)
        w.itc_image = _lin(model.itc_image_head.fc)
        w.itc_cross = _lin(model.itc_cross_modal_head.fc)
        w.logit_scale = model.logit_scale
    return w
