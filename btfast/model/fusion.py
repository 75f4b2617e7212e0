"""Cross-modal fusion: bridges from the top unimodal layers into the cross layers."""

from __future__ import annotations

from torch import Tensor

from btfast.model.attention import cross_attention, self_attention
from btfast.ops import Ops
from btfast.spec import ModelSpec
from btfast.weights import CrossLayer, Weights


def cross_layer(
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


def fuse(
    w: Weights, ops: Ops, spec: ModelSpec, text_bridges: Tensor, key_mask: Tensor | None, image_bridges: Tensor
) -> tuple[Tensor, Tensor]:
    """Run the cross layers on bridges (B, C, L, H) and (B, C, N, H); return the last text and image features.

    Bridge j is the transform of unimodal layer split-1+j with its token-type embedding added; the
    first enters through the cross-modal LayerNorms, later ones through the link towers.
    """
    t = ops.layer_norm(text_bridges[:, 0], w.text_ln0)
    v = ops.layer_norm(image_bridges[:, 0], w.image_ln0)
    t_out = cross_layer(w.cross_text[0], ops, spec, t, v, key_mask, None)
    v_out = cross_layer(w.cross_image[0], ops, spec, v, t, None, key_mask)
    for j in range(1, spec.cross_layers):
        t_link, v_link = w.text_links[j - 1], w.image_links[j - 1]
        t = ops.add_layernorm(text_bridges[:, j], t_out, t_link.norm, t_link)
        v = ops.add_layernorm(image_bridges[:, j], v_out, v_link.norm, v_link)
        t_out = cross_layer(w.cross_text[j], ops, spec, t, v, key_mask, None)
        v_out = cross_layer(w.cross_image[j], ops, spec, v, t, None, key_mask)
    return t_out, v_out
