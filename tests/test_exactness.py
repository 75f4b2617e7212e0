"""btfast against the transformers eager reference, fp32, on every head and config switch."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import FIELDS, HEADS, assert_outputs_close, reference_model
from transformers import (
    BridgeTowerForContrastiveLearning,
    BridgeTowerForImageAndTextRetrieval,
    BridgeTowerForMaskedLM,
    BridgeTowerModel,
)

import btfast
from btfast.testing import base_config, build, random_inputs, tiny_config

RTOL = 1e-5

SWITCHES = list(itertools.product(["add", "scaled_add", "interpolate"], [False, True], [True, False]))


def _compare(cls, cfg, lengths, seq_len, seed=0, **call):
    model = build(cls, cfg, seed=seed)
    x = random_inputs(cfg, batch=len(lengths), seq_len=seq_len, lengths=lengths, seed=seed)
    ref_model = reference_model(model)
    with torch.no_grad():
        ref = ref_model(**x, **call)
    fast = btfast.optimize(model)
    out = fast(**x, **call)
    assert type(out) is type(ref)
    compared = assert_outputs_close(out, ref, RTOL, valid=x["attention_mask"].bool())
    loss = ["loss"] if "labels" in call or call.get("return_loss") else []
    assert compared == loss + FIELDS[cls], f"compared {compared}"  # a forward returning None fails here
    return compared


@pytest.mark.parametrize("cls", HEADS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("link,share_links,share_transforms", SWITCHES)
def test_heads_and_switches(cls, link, share_links, share_transforms):
    if cls is BridgeTowerForContrastiveLearning and not share_transforms:
        pytest.skip("refused by design: see test_contrastive_unshared_transforms_refused")
    cfg = tiny_config(
        link_tower_type=link, share_link_tower_layers=share_links, share_cross_modal_transformer_layers=share_transforms
    )
    _compare(cls, cfg, lengths=[7, 3, 5], seq_len=7)


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
@pytest.mark.parametrize("cls", [BridgeTowerForImageAndTextRetrieval, BridgeTowerForMaskedLM], ids=lambda c: c.__name__)
def test_text_activations(cls, act):
    _compare(cls, tiny_config(hidden_act=act), lengths=[5, 2], seq_len=5)


@pytest.mark.parametrize("lengths,seq_len", [([1], 1), ([9], 9), ([13, 1, 6, 13], 13), ([4, 4], 11)])
def test_batch_sizes_and_lengths(lengths, seq_len):
    _compare(BridgeTowerModel, tiny_config(), lengths=lengths, seq_len=seq_len)


@pytest.mark.parametrize("cross_layers,text_layers,vision_layers", [(1, 3, 3), (3, 3, 3), (2, 4, 5)])
def test_layer_counts(cross_layers, text_layers, vision_layers):
    cfg = tiny_config(cross_layers=cross_layers, text_layers=text_layers, vision_layers=vision_layers)
    _compare(BridgeTowerForImageAndTextRetrieval, cfg, lengths=[6, 2], seq_len=6)


def test_itm_loss():
    _compare(
        BridgeTowerForImageAndTextRetrieval, tiny_config(), lengths=[6, 2, 4], seq_len=6, labels=torch.tensor([1, 0, 1])
    )


def test_mlm_loss_with_ignored_positions():
    labels = torch.randint(0, 120, (3, 6))
    labels[0, :2] = -100
    labels[1, 2:] = -100
    _compare(BridgeTowerForMaskedLM, tiny_config(), lengths=[6, 2, 4], seq_len=6, labels=labels)


def test_itc_return_loss():
    _compare(BridgeTowerForContrastiveLearning, tiny_config(), lengths=[6, 2, 4], seq_len=6, return_loss=True)


def test_return_dict_false_gives_the_reference_tuple():
    """The tuple holds (loss, logits) as the reference's does; the reference appends hidden states and
    attentions, which btfast returns only when asked for (output_hidden_states=True, served by HF)."""
    cfg = tiny_config()
    model = build(BridgeTowerForImageAndTextRetrieval, cfg)
    x = random_inputs(cfg, batch=2, lengths=[5, 3], seq_len=5)
    with torch.no_grad():
        ref = model(**x, labels=torch.tensor([0, 1]), return_dict=False)
    out = btfast.optimize(model)(**x, labels=torch.tensor([0, 1]), return_dict=False)
    assert isinstance(out, tuple) and len(out) == 2
    for a, b in zip(out, ref[:2]):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=1e-6)


def test_base_shapes():
    """The real bridgetower-base architecture (random weights): 12+12 layers, 6 cross layers, 325 image tokens."""
    cfg = base_config()
    _compare(BridgeTowerForImageAndTextRetrieval, cfg, lengths=[11, 4], seq_len=11)
