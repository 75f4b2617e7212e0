"""Shared assertions for comparing btfast with the transformers reference."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import (
    BridgeTowerForContrastiveLearning,
    BridgeTowerForImageAndTextRetrieval,
    BridgeTowerForMaskedLM,
    BridgeTowerModel,
)

# every head, and the output fields btfast computes for each (what a comparison must have compared)
HEADS = [
    BridgeTowerModel,
    BridgeTowerForImageAndTextRetrieval,
    BridgeTowerForMaskedLM,
    BridgeTowerForContrastiveLearning,
]
FIELDS = {
    BridgeTowerModel: ["text_features", "image_features", "pooler_output"],
    BridgeTowerForImageAndTextRetrieval: ["logits"],
    BridgeTowerForMaskedLM: ["logits"],
    BridgeTowerForContrastiveLearning: ["logits", "text_embeds", "image_embeds", "cross_embeds"],
}

OUTPUT_FIELDS = (
    "loss",
    "logits",
    "text_features",
    "image_features",
    "pooler_output",
    "text_embeds",
    "image_embeds",
    "cross_embeds",
)


def reference_model(model: nn.Module) -> nn.Module:
    """A deep copy the HF forward can run: a shared link tower becomes a list repeating that one module
    (the reference indexes it per layer and crashes otherwise, DESIGN.md §1 item 8)."""
    ref = copy.deepcopy(model)
    bt = getattr(ref, "bridgetower", ref)
    if ref.config.share_link_tower_layers:
        n = ref.config.num_hidden_layers - 1
        bt.cross_modal_text_link_tower = nn.ModuleList([bt.cross_modal_text_link_tower] * n)
        bt.cross_modal_image_link_tower = nn.ModuleList([bt.cross_modal_image_link_tower] * n)
    return ref


def assert_outputs_close(out, ref, rtol: float, valid: torch.Tensor | None = None) -> list[str]:
    """Every tensor field btfast returns equals the reference's to `rtol` relative to the field's scale.

    `valid` (B, L) restricts per-token text fields to real tokens (padded positions may differ).
    Returns the names of the fields compared, so a test can assert it compared what it meant to.
    """
    compared = []
    for name in OUTPUT_FIELDS:
        got = getattr(out, name, None)
        if got is None:
            continue
        want = getattr(ref, name)
        assert want is not None, f"btfast returned {name} but the reference did not"
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
        assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
        if valid is not None and name in ("text_features", "logits") and got.shape[:2] == valid.shape:
            got, want = got[valid], want[valid]
        scale = want.abs().max().clamp_min(1e-6)
        err = ((got.float() - want.float()).abs().max() / scale).item()
        assert err <= rtol, f"{name}: max error {err:.3g} of the field's scale > {rtol:g}"
        compared.append(name)
    return compared
