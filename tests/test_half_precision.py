"""bf16 / fp16: btfast's error against the fp32 reference stays within the bounds README states.

Bounds (max error of a field relative to the field's largest magnitude): bf16 <= 6e-2, fp16 <= 1e-2,
and never more than 2x (+1e-3) the error of the transformers model itself run in that dtype.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    BridgeTowerForContrastiveLearning,
    BridgeTowerForImageAndTextRetrieval,
    BridgeTowerForMaskedLM,
    BridgeTowerModel,
)

import btfast
from btfast.testing import build, random_inputs, tiny_config

BOUND = {torch.bfloat16: 6e-2, torch.float16: 1e-2}
FIELDS = ("logits", "text_features", "image_features", "pooler_output", "text_embeds", "image_embeds", "cross_embeds")


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(
    "cls",
    [BridgeTowerModel, BridgeTowerForImageAndTextRetrieval, BridgeTowerForMaskedLM, BridgeTowerForContrastiveLearning],
    ids=lambda c: c.__name__,
)
def test_half_precision_bounds(cls, dtype):
    cfg = tiny_config(link_tower_type="interpolate")
    model = build(cls, cfg, seed=1)
    x = random_inputs(cfg, batch=3, lengths=[7, 4, 2], seed=1)
    with torch.no_grad():
        ref = model(**x)
        hf_half = copy.deepcopy(model).to(dtype)(**{**x, "pixel_values": x["pixel_values"].to(dtype)})
    out = btfast.optimize(model, dtype=dtype)(**x)
    valid = x["attention_mask"].bool()
    checked = 0
    for name in FIELDS:
        got = getattr(out, name, None)
        if got is None:
            continue
        assert got.dtype == dtype, f"{name} is {got.dtype}, expected {dtype}"
        want, own = ref[name], hf_half[name]
        if got.shape[:2] == valid.shape:
            got, want, own = got[valid], want[valid], own[valid]
        err, hf_err = _err(got, want), _err(own, want)
        assert err <= BOUND[dtype], f"{name}: error {err:.3g} > bound {BOUND[dtype]:g} (transformers: {hf_err:.3g})"
        assert err <= 2 * hf_err + 1e-3, f"{name}: error {err:.3g} > 2x transformers' own {hf_err:.3g}"
        checked += 1
    assert checked >= 1
