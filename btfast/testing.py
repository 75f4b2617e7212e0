"""Small BridgeTower configs and models with random weights, for tests and examples.

No checkpoint can be downloaded where btfast is developed, so tests build models from configs:
`tiny_config()` is fast enough for CI; `base_config()` is the real bridgetower-base architecture.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import BridgeTowerConfig


def tiny_config(
    *,
    hidden: int = 128,
    heads: int = 2,
    text_layers: int = 3,
    vision_layers: int | None = None,
    cross_layers: int = 2,
    image_size: int = 32,
    patch_size: int = 8,
    vocab_size: int = 120,
    max_positions: int = 40,
    hidden_act: str = "gelu",
    **overrides: Any,
) -> BridgeTowerConfig:
    """A small config with head dim 64 (as in every real checkpoint) and `cross_layers` fusion layers."""
    text = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=text_layers,
        num_attention_heads=heads,
        intermediate_size=hidden * 4,
        hidden_act=hidden_act,
        max_position_embeddings=max_positions,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    vision = dict(
        hidden_size=hidden,
        num_hidden_layers=vision_layers if vision_layers is not None else text_layers,
        image_size=image_size,
        patch_size=patch_size,
    )
    kw: dict[str, Any] = dict(
        text_config=text,
        vision_config=vision,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_hidden_layers=cross_layers,
        contrastive_hidden_size=32,
        logit_scale_init_value=2.6592,
    )
    kw.update(overrides)
    return BridgeTowerConfig(**kw)


def base_config(**overrides: Any) -> BridgeTowerConfig:
    """The bridgetower-base architecture (768 hidden, 12+12 layers, 6 cross layers, 288 px / 16 px patches)."""
    kw: dict[str, Any] = dict(contrastive_hidden_size=512, logit_scale_init_value=2.6592)
    kw.update(overrides)
    return BridgeTowerConfig(**kw)


def large_config(**overrides: Any) -> BridgeTowerConfig:
    """The bridgetower-large architecture (1024 hidden, 24+24 layers, 6 cross layers, 294 px / 14 px)."""
    kw: dict[str, Any] = dict(
        text_config=dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
        vision_config=dict(hidden_size=1024, num_hidden_layers=24, image_size=294, patch_size=14),
        hidden_size=1024,
        num_attention_heads=16,
        contrastive_hidden_size=512,
        logit_scale_init_value=2.6592,
    )
    kw.update(overrides)
    return BridgeTowerConfig(**kw)


def build(cls: type, config: BridgeTowerConfig, seed: int = 0) -> torch.nn.Module:
    """Instantiate `cls` (a BridgeTower head class) with random weights, in eval mode.

    Parameters that HF initialises to constants (LayerNorms, biases, link-tower factors) are
    randomised too, so a test cannot pass by accident of an identity LayerNorm or a zero bias.
    """
    torch.manual_seed(seed)
    model = cls._from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or p.dim() == 0:
                is_norm = "layernorm" in name.lower() or ".ln" in name
                if is_norm and name.endswith("weight"):
                    p.copy_(1.0 + 0.1 * torch.randn_like(p))
                elif name.endswith("scaled_factor") or name.endswith("beta"):
                    p.copy_(torch.rand_like(p) * 0.5 + 0.25)
                elif name.endswith("logit_scale"):
                    continue
                else:
                    p.copy_(0.02 * torch.randn_like(p))
    return model.eval()


def random_inputs(
    config: BridgeTowerConfig,
    batch: int = 2,
    seq_len: int = 7,
    lengths: list[int] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids` / `attention_mask` (pads use the pad id) and random `pixel_values`."""
    g = torch.Generator().manual_seed(seed)
    tc, vc = config.text_config, config.vision_config
    pad = tc.pad_token_id
    lengths = lengths or [seq_len] * batch
    ids = torch.randint(3, tc.vocab_size, (batch, seq_len), generator=g)
    ids[:, 0] = tc.bos_token_id
    mask = torch.zeros(batch, seq_len, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, n - 1] = tc.eos_token_id
        ids[i, n:] = pad
        mask[i, :n] = 1
    pixels = torch.randn(batch, 3, vc.image_size, vc.image_size, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}
