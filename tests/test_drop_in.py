"""btfast as a drop-in, in the spirit of transformers' own model tests: configs as its testers build them (small
hidden sizes, a few layers, head dims other than 64 on the text side), every head, every output flag both as a
keyword and as a config value, positional calls, and the arguments only the reference serves."""

from __future__ import annotations

import copy
import inspect
import logging

import pytest
import torch
from helpers import FIELDS, HEADS, assert_outputs_close
from transformers import (
    BridgeTowerForContrastiveLearning,
    BridgeTowerModel,
)

import btfast
from btfast.testing import build, random_inputs, tiny_config

# Tester-sized configs: text head dim 32 or 64, 2-4 text layers, 1-3 cross layers, more vision than text layers.
CONFIGS = {
    "h64-l2-c1": dict(hidden=64, heads=2, text_layers=2, cross_layers=1, image_size=32, patch_size=16),
    "h128-heads4-l2-c2": dict(hidden=128, heads=4, text_layers=2, cross_layers=2, image_size=64, patch_size=16),
    "h128-l4-v5-c3": dict(hidden=128, heads=2, text_layers=4, vision_layers=5, cross_layers=3, patch_size=16),
}
FLAGS = ["output_hidden_states", "output_attentions", "return_dict"]
RTOL = 1e-5


def _value(flag: str) -> bool:
    return flag != "return_dict"  # the value that changes the output: hidden states / attentions on, dict off


def _pair(cls, cfg, seed=0):
    model = build(cls, cfg, seed=seed)
    return model, copy.deepcopy(model)


def _tensors(obj) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (tuple, list)):
        return [t for o in obj for t in _tensors(o)]
    return []


@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", CONFIGS)
def test_tester_configs_match_eager(cls, name):
    cfg = tiny_config(**CONFIGS[name])
    fast_model, ref = _pair(cls, cfg)
    x = random_inputs(cfg, batch=3, seq_len=7, lengths=[7, 3, 5])
    with torch.no_grad():
        want = ref(**x)
    got = btfast.optimize(fast_model)(**x)
    assert type(got) is type(want)
    assert assert_outputs_close(got, want, RTOL, valid=x["attention_mask"].bool()) == FIELDS[cls]


@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("flag", FLAGS)
@pytest.mark.parametrize("how", ["keyword", "config"])
def test_output_flags_as_keyword_and_as_config(cls, flag, how, caplog):
    cfg = tiny_config(**CONFIGS["h128-heads4-l2-c2"])
    if how == "config":
        setattr(cfg, flag, _value(flag))
    call = {flag: _value(flag)} if how == "keyword" else {}
    fast_model, ref = _pair(cls, cfg)
    x = random_inputs(cfg, batch=2, seq_len=6, lengths=[6, 4])
    if flag == "return_dict" and cls is not BridgeTowerModel:
        # the reference heads crash on return_dict=False in the config (their inner model then returns a tuple):
        # btfast returns what the keyword gives
        ref.config.return_dict, call_ref = True, {"return_dict": False}
    else:
        call_ref = call
    with torch.no_grad():
        want = ref(**x, **call_ref)
    with caplog.at_level(logging.WARNING, logger="btfast"):
        got = btfast.optimize(fast_model)(**x, **call)
    served_by_reference = any("reference" in r.getMessage() for r in caplog.records)
    if flag == "return_dict":
        assert not served_by_reference
        assert isinstance(got, tuple) and isinstance(want, tuple)
        # btfast's tuple holds the fields it computes; the reference appends hidden states and attentions
        assert 1 <= len(got) <= len(want)
        for a, b in zip(got, want):
            scale = b.abs().max().clamp_min(1e-6)
            assert ((a - b).abs().max() / scale).item() <= RTOL
        return
    assert served_by_reference
    assert type(got) is type(want)
    assert assert_outputs_close(got, want, RTOL) == FIELDS[cls]
    field = "hidden_states" if flag == "output_hidden_states" else "attentions"
    got_t, want_t = _tensors(getattr(got, field)), _tensors(getattr(want, field))
    assert got_t and len(got_t) == len(want_t)
    for a, b in zip(got_t, want_t):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-6)


@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
def test_keyword_false_overrides_config_true(cls):
    """As transformers: an explicit keyword wins over the config's value."""
    cfg = tiny_config(output_hidden_states=True, return_dict=False)
    fast = btfast.optimize(build(cls, cfg))
    x = random_inputs(cfg, batch=2, seq_len=5)
    out = fast(**x, output_hidden_states=False, return_dict=True)
    assert not isinstance(out, tuple) and out.hidden_states is None


def test_base_model_return_dict_false_in_config_gives_a_tuple():
    cfg = tiny_config(return_dict=False)
    fast_model, ref = _pair(BridgeTowerModel, cfg)
    x = random_inputs(cfg, batch=2, seq_len=5)
    with torch.no_grad():
        want = ref(**x)
    got = btfast.optimize(fast_model)(**x)
    assert isinstance(want, tuple) and isinstance(got, tuple) and len(got) == 3
    for a, b in zip(got, want):
        assert a.shape == b.shape


@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
def test_forward_signature_is_the_references(cls):
    fast = btfast.optimize(build(cls, tiny_config()))
    ours = list(inspect.signature(fast.forward).parameters.values())
    theirs = list(inspect.signature(cls.forward).parameters.values())[1:]  # without self
    assert [(p.name, p.kind, p.default) for p in ours] == [(p.name, p.kind, p.default) for p in theirs]
    assert isinstance(fast, btfast.OptimizedBridgeTower)


@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
def test_positional_call_matches_keyword_call(cls):
    cfg = tiny_config()
    fast = btfast.optimize(build(cls, cfg))
    x = random_inputs(cfg, batch=2, seq_len=5, lengths=[5, 2])
    positional = fast(x["input_ids"], x["attention_mask"], None, x["pixel_values"])
    keyword = fast(**x)
    assert assert_outputs_close(positional, keyword, 0.0) == FIELDS[cls]


@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
def test_image_embeds_served_by_the_reference(cls):
    cfg = tiny_config()
    fast_model, ref = _pair(cls, cfg)
    x = random_inputs(cfg, batch=2, seq_len=5)
    bt = getattr(ref, "bridgetower", ref)
    with torch.no_grad():
        embeds = bt.vision_model.visual.forward_pre(x["pixel_values"]).permute(1, 0, 2)  # (batch, tokens, hidden)
        want = ref(input_ids=x["input_ids"], attention_mask=x["attention_mask"], image_embeds=embeds)
    got = btfast.optimize(fast_model)(input_ids=x["input_ids"], attention_mask=x["attention_mask"], image_embeds=embeds)
    assert assert_outputs_close(got, want, RTOL) == FIELDS[cls]


def test_image_token_type_idx_zero_is_one_as_in_the_reference():
    cfg = tiny_config()
    fast_model, ref = _pair(BridgeTowerModel, cfg)
    x = random_inputs(cfg, batch=2, seq_len=5)
    with torch.no_grad():
        want = ref(**x, image_token_type_idx=0)
    assert assert_outputs_close(btfast.optimize(fast_model)(**x, image_token_type_idx=0), want, RTOL)


def test_itc_with_a_vision_width_other_than_hidden_is_refused():
    cfg = tiny_config()
    cfg.vision_config.hidden_size = 192
    with pytest.raises(btfast.UnsupportedModelError, match=r"vision_config.hidden_size \(192\) != hidden_size \(128\)"):
        btfast.optimize(BridgeTowerForContrastiveLearning._from_config(cfg, attn_implementation="eager"))
