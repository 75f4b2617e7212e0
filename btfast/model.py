"""The BridgeTower forward, top to bottom: text tower, vision tower, fusion (bridges into cross layers), heads.

Every primitive goes through the op table (`btfast.ops`: a Triton kernel where one serves, torch elsewhere); the
weights are packed views of the transformers model's own parameters (`btfast.weights`). The four layer types
(text layer, vision block, cross layer, heads) are plain functions of (their weights, their inputs): `Layers`
holds them eager or compiled once each with the batch and text length dynamic, so one compiled function serves
every layer of its type and every bucket. DESIGN.md §1 is the reference's meaning, step by step.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from btfast.ops import Ops, merge_heads, split_heads
from btfast.spec import ModelSpec
from btfast.states import ImageStates, TextStates
from btfast.weights import CrossLayer, Linear, TextLayer, VisionBlock, Weights

# -- attention over packed projections --------------------------------------------------------------------------


def self_attention(ops: Ops, x: Tensor, qkv: Linear, heads: int, key_mask: Tensor | None) -> Tensor:
    q, k, v = split_heads(ops.linear(x, qkv), 3, heads)
    return merge_heads(ops.attention(q, k, v, key_mask))


def cross_attention(
    ops: Ops, x: Tensor, other: Tensor, q_proj: Linear, kv_proj: Linear, heads: int, key_mask: Tensor | None
) -> Tensor:
    (q,) = split_heads(ops.linear(x, q_proj), 1, heads)
    k, v = split_heads(ops.linear(other, kv_proj), 2, heads)
    return merge_heads(ops.attention(q, k, v, key_mask))


# -- text tower: RoBERTa embeddings, post-LN layers -------------------------------------------------------------


def position_ids(input_ids: Tensor, pad_id: int) -> Tensor:
    """RoBERTa positions: count of non-pad tokens so far + pad_id; pads sit at pad_id (as the reference)."""
    mask = input_ids.ne(pad_id).int()
    return (torch.cumsum(mask, dim=1).type_as(mask) * mask).long() + pad_id


def text_embed(w: Weights, ops: Ops, spec: ModelSpec, input_ids: Tensor) -> Tensor:
    x = F.embedding(input_ids, w.word) + w.token_type0
    x = x + F.embedding(position_ids(input_ids, spec.pad_id), w.position)
    return ops.layer_norm(x, w.text_emb_ln)


def text_layer(layer: TextLayer, ops: Ops, spec: ModelSpec, x: Tensor, key_mask: Tensor | None) -> Tensor:
    """LN(x + O·attn(x)), then LN(h + W2·act(W1·h)); padding is a key mask only."""
    a = self_attention(ops, x, layer.qkv, spec.text_heads, key_mask)
    h = ops.add_layernorm(ops.linear(a, layer.attn_out), x, layer.ln_attn)
    f = ops.linear(h, layer.fc1, activation=spec.text_act)
    return ops.add_layernorm(ops.linear(f, layer.fc2), h, layer.ln_out)


# -- vision tower: CLIP ViT patch embedding, pre-LN blocks (batch-first; the reference runs seq-first) ----------


def vision_embed(w: Weights, ops: Ops, spec: ModelSpec, pixel_values: Tensor) -> Tensor:
    patches = F.conv2d(pixel_values.to(w.patch.dtype), w.patch, stride=spec.patch_size)
    patches = patches.flatten(2).transpose(1, 2)
    cls = w.class_emb.expand(patches.shape[0], 1, -1)
    x = torch.cat([cls, patches], dim=1) + w.vision_pos
    return ops.layer_norm(x, w.ln_pre)


def vision_block(blk: VisionBlock, ops: Ops, spec: ModelSpec, x: Tensor) -> Tensor:
    """x + O·attn(ln_1(x)), then x + W2·quick_gelu(W1·ln_2(x)); no mask."""
    a = self_attention(ops, ops.layer_norm(x, blk.ln_1), blk.qkv, spec.vision_heads, None)
    x = ops.linear(a, blk.attn_out, residual=x)
    f = ops.linear(ops.layer_norm(x, blk.ln_2), blk.fc1, activation="quick_gelu")
    return ops.linear(f, blk.fc2, residual=x)


# -- fusion: cross layers fed by bridges from the top unimodal layers -------------------------------------------


def cross_side(
    layer: CrossLayer,
    ops: Ops,
    spec: ModelSpec,
    x: Tensor,
    other: Tensor,
    self_mask: Tensor | None,
    other_mask: Tensor | None,
) -> Tensor:
    """One side of a cross layer: `x` attends to itself, then to `other` (the other side's layer input)."""
    a = self_attention(ops, x, layer.self_qkv, spec.text_heads, self_mask)
    h = ops.add_layernorm(ops.linear(a, layer.self_out), x, layer.ln_self)
    c = cross_attention(ops, h, other, layer.cross_q, layer.cross_kv, spec.text_heads, other_mask)
    h2 = ops.add_layernorm(ops.linear(c, layer.cross_out), h, layer.ln_cross)
    f = ops.linear(h2, layer.fc1, activation=spec.text_act)
    return ops.add_layernorm(ops.linear(f, layer.fc2), h2, layer.ln_out)


def cross_layer(
    text_side: CrossLayer,
    image_side: CrossLayer,
    ops: Ops,
    spec: ModelSpec,
    t: Tensor,
    v: Tensor,
    key_mask: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Both sides of one cross layer on its inputs (t, v); the text key mask applies wherever text is keyed."""
    return (
        cross_side(text_side, ops, spec, t, v, key_mask, None),
        cross_side(image_side, ops, spec, v, t, None, key_mask),
    )


# -- heads ------------------------------------------------------------------------------------------------------


def pooler(w: Weights, ops: Ops, text_features: Tensor, image_features: Tensor) -> Tensor:
    t = torch.tanh(ops.linear(text_features[:, 0], w.pool_text))
    v = torch.tanh(ops.linear(image_features[:, 0], w.pool_image))
    return torch.cat([t, v], dim=-1)


def itc_embedding(ops: Ops, x: Tensor, head: Linear) -> Tensor:
    return F.normalize(ops.linear(x, head), dim=-1, p=2)


def heads(
    w: Weights, ops: Ops, spec: ModelSpec, t: Tensor, v: Tensor, text_cls: Tensor, image_cls: Tensor
) -> tuple[Tensor, ...]:
    """The head's output tensors (no loss): base (text, image, pooler), ITM logits, MLM logits, or ITC
    (text, image, cross) embeddings. `text_cls`: the last unimodal text layer's first token; `image_cls`: the
    last image bridge's first token."""
    pooled = pooler(w, ops, t, v)
    if spec.head == "base":
        return t, v, pooled
    if spec.head == "itm":
        return (ops.linear(pooled, w.itm),)
    if spec.head == "mlm":
        h = ops.layer_norm(ops.linear(t, w.mlm_dense, activation=spec.head_act), w.mlm_ln)
        return (ops.linear(h, w.mlm_decoder),)
    return (
        itc_embedding(ops, text_cls, w.itc_text),
        itc_embedding(ops, image_cls, w.itc_image),
        itc_embedding(ops, pooled, w.itc_cross),
    )


def itc_loss(text: Tensor, image: Tensor, cross: Tensor, logit_scale: Tensor) -> Tensor:
    """The reference's contrastive loss: mean of text-image, text-cross and image-cross cross-entropies."""
    scale = logit_scale.exp()
    labels = torch.arange(text.shape[0], device=text.device)
    pairs = ((text, image), (text, cross), (image, cross))
    return sum(F.cross_entropy(a @ b.t() * scale, labels) for a, b in pairs) / 3.0


# -- the layer types, eager or compiled -------------------------------------------------------------------------

# Each compiled layer type: its function, and per positional argument the dims that vary between buckets (batch,
# text length). Weights, the op table and the spec are arguments too, so one graph serves every layer.
LAYER_TYPES: dict[str, tuple[Callable[..., Any], dict[int, tuple[int, ...]]]] = {
    "text_layer": (text_layer, {3: (0, 1), 4: (0, 1)}),
    "vision_block": (vision_block, {3: (0,)}),
    "cross_layer": (cross_layer, {4: (0, 1), 5: (0,), 6: (0, 1)}),
    "pooler": (pooler, {2: (0, 1), 3: (0,)}),
    "heads": (heads, {3: (0, 1), 4: (0,), 5: (0,), 6: (0,)}),
}


class _Compiled:
    """A layer type compiled once; each call marks the bucket-dependent dims dynamic, so no new bucket compiles.

    A batch of one runs as two identical rows (the output keeps the first): inductor's code specialises on a size
    of 1 and would compile every layer type again for the batch-1 bucket. Layers are row-wise, so the second row
    changes nothing, and where batch 1 matters (a GPU, weight-read bound) it costs little.
    """

    def __init__(self, fn: Callable[..., Any], dynamic: dict[int, tuple[int, ...]], backend: Any) -> None:
        # A copy of the function's code object: dynamo keeps its compiled graphs (and its recompile limit) per code
        # object, so every optimized model starts from its own, not from those of models built before it.
        own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
        self.compiled = torch.compile(own, backend=backend)
        self.dynamic = dynamic

    def __call__(self, *args: Any) -> Any:
        args = list(args)
        single = next(args[i] for i in self.dynamic if args[i] is not None).shape[0] == 1
        for i, dims in self.dynamic.items():
            if args[i] is not None:
                if single:
                    args[i] = args[i].expand(2, *args[i].shape[1:]).contiguous()
                for d in dims:
                    torch._dynamo.maybe_mark_dynamic(args[i], d)
        with torch.fx.experimental._config.patch(backed_size_oblivious=True):
            out = self.compiled(*args)
        if not single:
            return out
        return out[:1] if isinstance(out, Tensor) else tuple(o[:1] for o in out)


@dataclass
class Layers:
    """The layer-type functions the forward calls: eager (`Layers()`) or compiled (`Layers.compiled(backend)`)."""

    text_layer: Callable[..., Tensor] = text_layer
    vision_block: Callable[..., Tensor] = vision_block
    cross_layer: Callable[..., tuple[Tensor, Tensor]] = cross_layer
    pooler: Callable[..., Tensor] = pooler
    heads: Callable[..., tuple[Tensor, ...]] = heads

    @classmethod
    def compiled(cls, backend: Any) -> Layers:
        """Each layer type through torch.compile (`backend`: "inductor" or a backend callable), built on first use."""
        return cls(**{name: _Compiled(fn, dims, backend) for name, (fn, dims) in LAYER_TYPES.items()})


# -- the whole forward ------------------------------------------------------------------------------------------


class BridgeTower:
    """The BridgeTower forward over packed weights, in three stages (text, image, fuse) and as a whole."""

    def __init__(self, w: Weights, ops: Ops, spec: ModelSpec, layers: Layers | None = None) -> None:
        self.w, self.ops, self.spec = w, ops, spec
        self.layers = layers or Layers()

    def encode_text(self, input_ids: Tensor, key_mask: Tensor | None) -> TextStates:
        """Text layers 0..split-1 alone, then one bridge (transform, token type folded in) per later layer."""
        w, ops, spec, f = self.w, self.ops, self.spec, self.layers
        x = text_embed(w, ops, spec, input_ids)
        for layer in w.text_layers[: spec.split]:
            x = f.text_layer(layer, ops, spec, x, key_mask)
        bridges = [ops.linear(x, w.text_transform[0])]
        for j, layer in enumerate(w.text_layers[spec.split :], start=1):
            x = f.text_layer(layer, ops, spec, x, key_mask)
            bridges.append(ops.linear(x, w.text_transform[j]))
        return TextStates(torch.stack(bridges, dim=1), key_mask, x[:, 0])

    def encode_image(self, pixel_values: Tensor) -> ImageStates:
        """Vision blocks 0..split-1 alone, then one bridge (ln_post, transform, token type) per later block."""
        w, ops, spec, f = self.w, self.ops, self.spec, self.layers
        x = vision_embed(w, ops, spec, pixel_values)
        for blk in w.vision_blocks[: spec.split]:
            x = f.vision_block(blk, ops, spec, x)
        bridges = [ops.linear(ops.layer_norm(x, w.ln_post), w.image_transform[0])]
        for j, blk in enumerate(w.vision_blocks[spec.split :], start=1):
            x = f.vision_block(blk, ops, spec, x)
            bridges.append(ops.linear(ops.layer_norm(x, w.ln_post), w.image_transform[j]))
        return ImageStates(torch.stack(bridges, dim=1))

    def cross(self, text_bridges: Tensor, key_mask: Tensor | None, image_bridges: Tensor) -> tuple[Tensor, Tensor]:
        """The cross layers on bridges (B, C, L, H) and (B, C, N, H); the last text and image features.

        Bridge 0 enters through the cross-modal LayerNorms, bridge j > 0 through link tower j-1:
        LN(alpha·bridge + beta·previous cross layer's output).
        """
        w, ops, spec, f = self.w, self.ops, self.spec, self.layers
        t = ops.layer_norm(text_bridges[:, 0], w.text_ln0)
        v = ops.layer_norm(image_bridges[:, 0], w.image_ln0)
        t_out, v_out = f.cross_layer(w.cross_text[0], w.cross_image[0], ops, spec, t, v, key_mask)
        for j in range(1, spec.cross_layers):
            t_link, v_link = w.text_links[j - 1], w.image_links[j - 1]
            t = ops.add_layernorm(text_bridges[:, j], t_out, t_link.norm, t_link)
            v = ops.add_layernorm(image_bridges[:, j], v_out, v_link.norm, v_link)
            t_out, v_out = f.cross_layer(w.cross_text[j], w.cross_image[j], ops, spec, t, v, key_mask)
        return t_out, v_out

    def fuse(self, text_bridges: Tensor, key_mask: Tensor | None, image_bridges: Tensor) -> tuple[Tensor, ...]:
        """The fusion stage: (text features, image features, pooler output)."""
        t, v = self.cross(text_bridges, key_mask, image_bridges)
        return t, v, self.layers.pooler(self.w, self.ops, t, v)

    def forward(self, input_ids: Tensor, key_mask: Tensor | None, pixel_values: Tensor) -> tuple[Tensor, ...]:
        """The head's output tensors (no loss) for row-wise (text, image) pairs."""
        ts = self.encode_text(input_ids, key_mask)
        im = self.encode_image(pixel_values)
        t, v = self.cross(ts.bridges, key_mask, im.bridges)
        return self.layers.heads(self.w, self.ops, self.spec, t, v, ts.cls, im.bridges[:, -1, 0])
