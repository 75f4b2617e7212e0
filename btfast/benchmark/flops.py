"""FLOPs of one image-text pair through a BridgeTower ITM model, counted from its config.

Convention: a multiply-add is 2 FLOPs; counted are the GEMMs (every nn.Linear, the patch convolution) and
the two attention products (q·kᵀ and p·v); LayerNorm, softmax, activations, embeddings and additions are
not (they are < 1 % here). With text length L, N = (image / patch)² + 1 image tokens, text hidden Ht and FFN
Ft (the cross layers use the text config), vision hidden Hv (FFN 4·Hv), cross hidden H, C cross layers:

    encoder layer over S tokens, hidden h, FFN f:   dense(S, h, f) = 8·S·h² + 4·S·h·f   (q, k, v, o; FFN)
    self-attention products:                        attn(S, S', h) = 4·S·S'·h

    text tower    T_t · (dense(L, Ht, Ft) + attn(L, L, Ht))
    vision tower  T_v · (dense(N, Hv, 4Hv) + attn(N, N, Hv))  +  2·(N-1)·3·P²·Hv          (patch conv)
    bridges       C · 2·(L·Ht·H + N·Hv·H)       (the cross-modal text / image transforms, one per cross layer)
    fusion        C · [ dense(L, Ht, Ft) + attn(L, L, Ht) + 4·L·Ht² + 4·N·Ht² + attn(L, N, Ht)     (text side)
                      + dense(N, Ht, Ft) + attn(N, N, Ht) + 4·N·Ht² + 4·L·Ht² + attn(N, L, Ht) ]   (image side)
                  (each side: self-attention and FFN, plus cross-attention whose q/o project its own tokens
                  and whose k/v project the other side's tokens)
    heads         2 · 2·H·H (the two poolers, CLS only)  +  2·2H·2 (ITM)

bridgetower-base at 40 tokens: 112.7 GFLOP/pair; bridgetower-large: 419.8. DESIGN.md's 109 / 401 are the same
count *without the vision tower's attention products* (3.9 / 19.2 GFLOP): that is what
`torch.utils.flop_counter.FlopCounterMode` reports for the transformers model on CPU, where CLIP's
`nn.MultiheadAttention` runs a fused attention op that the counter has no formula for. `FlopCount.total`
includes that work (the GPU does it); `FlopCount.counter_visible` reproduces the counter's figure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class FlopCount:
    """FLOPs per image-text pair, by part (see the module docstring for the formula)."""

    text_tower: int
    vision_tower: int
    bridges: int
    fusion: int
    heads: int
    vision_attention: int  # the part of vision_tower spent in attention products (informational)

    @property
    def total(self) -> int:
        return self.text_tower + self.vision_tower + self.bridges + self.fusion + self.heads

    @property
    def counter_visible(self) -> int:
        """The total less the vision attention products: FlopCounterMode's figure on CPU (DESIGN.md's 109 / 401)."""
        return self.total - self.vision_attention

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total": self.total, "counter_visible": self.counter_visible}


def _dense(tokens: int, hidden: int, ffn: int) -> int:
    """q, k, v and output projections plus the two FFN GEMMs of one layer over `tokens` tokens."""
    return 8 * tokens * hidden * hidden + 4 * tokens * hidden * ffn


def _attn(queries: int, keys: int, hidden: int) -> int:
    """q·kᵀ and p·v over all heads (heads × head dim = hidden)."""
    return 4 * queries * keys * hidden


def image_tokens(config: Any) -> int:
    vc = config.vision_config
    return (vc.image_size // vc.patch_size) ** 2 + 1


def flops_per_pair(config: Any, text_len: int) -> FlopCount:
    """FLOPs of one pair (text of `text_len` tokens, one image) through BridgeTowerForImageAndTextRetrieval."""
    tc, vc = config.text_config, config.vision_config
    length, n = int(text_len), image_tokens(config)
    ht, ft, hv, h = tc.hidden_size, tc.intermediate_size, vc.hidden_size, config.hidden_size
    cross = config.num_hidden_layers

    text_tower = tc.num_hidden_layers * (_dense(length, ht, ft) + _attn(length, length, ht))
    vision_attention = vc.num_hidden_layers * _attn(n, n, hv)
    patch = 2 * (n - 1) * 3 * vc.patch_size * vc.patch_size * hv
    vision_tower = vc.num_hidden_layers * _dense(n, hv, 4 * hv) + vision_attention + patch
    bridges = cross * 2 * (length * ht * h + n * hv * h)
    text_side = _dense(length, ht, ft) + _attn(length, length, ht) + 4 * length * ht * ht + 4 * n * ht * ht
    text_side += _attn(length, n, ht)
    image_side = _dense(n, ht, ft) + _attn(n, n, ht) + 4 * n * ht * ht + 4 * length * ht * ht + _attn(n, length, ht)
    fusion = cross * (text_side + image_side)
    heads = 2 * 2 * h * h + 2 * (2 * h) * 2
    return FlopCount(text_tower, vision_tower, bridges, fusion, heads, vision_attention)
