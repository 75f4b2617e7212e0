"""optimize(): memory, the original model, device/dtype moves, loading from a folder, errors, stages."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers import assert_outputs_close
from transformers import (
    BridgeTowerConfig,
    BridgeTowerForContrastiveLearning,
    BridgeTowerForImageAndTextRetrieval,
    BridgeTowerForMaskedLM,
    BridgeTowerModel,
)

import btfast
from btfast.testing import build, random_inputs, tiny_config


def _param_bytes(model: torch.nn.Module) -> int:
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())


def test_no_second_copy_and_original_model_still_exact():
    cfg = tiny_config()
    model = build(BridgeTowerForImageAndTextRetrieval, cfg)
    x = random_inputs(cfg, batch=2, lengths=[6, 3], seq_len=6)
    with torch.no_grad():
        before = model(**x).logits
    bytes_before = _param_bytes(model)
    fast = btfast.optimize(model)
    new_tensors = sum(lin.bias.numel() * 4 for lin in fast.weights.text_transform + fast.weights.image_transform)
    assert _param_bytes(model) + new_tensors <= 1.05 * bytes_before
    layer = model.bridgetower.text_model.encoder.layer[0].attention.self
    assert layer.query.weight.untyped_storage().data_ptr() == layer.key.weight.untyped_storage().data_ptr()
    with torch.no_grad():
        after = model(**x).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    torch.testing.assert_close(fast(**x).logits, before, rtol=1e-5, atol=1e-6)


def test_optimize_twice_reuses_packing():
    cfg = tiny_config()
    model = build(BridgeTowerModel, cfg)
    first = btfast.optimize(model)
    ptr = first.weights.text_layers[0].qkv.weight.data_ptr()
    second = btfast.optimize(model)
    assert second.weights.text_layers[0].qkv.weight.data_ptr() == ptr


def test_to_dtype_after_optimize_repacks():
    cfg = tiny_config()
    model = build(BridgeTowerModel, cfg)
    x = random_inputs(cfg, batch=2, lengths=[6, 3], seq_len=6)
    fast = btfast.optimize(model).to(torch.float64)
    assert fast.dtype == torch.float64 and fast.weights.text_layers[0].qkv.weight.dtype == torch.float64
    out = fast(**x)
    assert out.text_features.dtype == torch.float64


def test_from_pretrained_folder(tmp_path):
    cfg = tiny_config()
    build(BridgeTowerForMaskedLM, cfg, seed=3).save_pretrained(tmp_path / "mlm")
    model = BridgeTowerForMaskedLM.from_pretrained(tmp_path / "mlm").eval()
    x = random_inputs(cfg, batch=2, lengths=[6, 3], seq_len=6)
    with torch.no_grad():
        ref = model(**x)
    out = btfast.optimize(model)(**x)
    assert assert_outputs_close(out, ref, 1e-5, valid=x["attention_mask"].bool()) == ["logits"]


def test_stages_match_forward_and_pair_many_to_many():
    cfg = tiny_config()
    fast = btfast.optimize(build(BridgeTowerForImageAndTextRetrieval, cfg))
    x = random_inputs(cfg, batch=3, lengths=[6, 3, 4], seq_len=6)
    ts = fast.encode_text(x["input_ids"], x["attention_mask"])
    im = fast.encode_image(x["pixel_values"])
    torch.testing.assert_close(fast.itm_logits(ts, im), fast(**x).logits, rtol=1e-5, atol=1e-6)
    # all 9 pairs from 3 encoded texts and 3 encoded images = pairwise forward calls
    ti, ii = torch.meshgrid(torch.arange(3), torch.arange(3), indexing="ij")
    grid = fast.itm_logits(ts.index(ti.flatten()), im.index(ii.flatten()))
    pair = fast(
        input_ids=x["input_ids"][ti.flatten()],
        attention_mask=x["attention_mask"][ti.flatten()],
        pixel_values=x["pixel_values"][ii.flatten()],
    ).logits
    torch.testing.assert_close(grid, pair, rtol=1e-5, atol=1e-6)


def test_text_states_concat_pads_without_changing_results():
    cfg = tiny_config()
    fast = btfast.optimize(build(BridgeTowerForImageAndTextRetrieval, cfg))
    x = random_inputs(cfg, batch=2, lengths=[6, 3], seq_len=6)
    short = fast.encode_text(x["input_ids"][1:, :3])
    long = fast.encode_text(x["input_ids"][:1], x["attention_mask"][:1])
    joined = btfast.TextStates.concat([long, short])
    im = fast.encode_image(x["pixel_values"])
    torch.testing.assert_close(fast.itm_logits(joined, im), fast(**x).logits, rtol=1e-5, atol=1e-6)


def test_itc_embeddings_need_no_fusion():
    cfg = tiny_config()
    fast = btfast.optimize(build(BridgeTowerForContrastiveLearning, cfg))
    x = random_inputs(cfg, batch=2, lengths=[6, 3], seq_len=6)
    out = fast(**x)
    t, v = fast.itc_embeddings(
        fast.encode_text(x["input_ids"], x["attention_mask"]), fast.encode_image(x["pixel_values"])
    )
    torch.testing.assert_close(t, out.text_embeds)
    torch.testing.assert_close(v, out.image_embeds)


# -- refusals and errors -------------------------------------------------------------------------------


def test_not_a_bridgetower_model():
    with pytest.raises(btfast.UnsupportedModelError, match="expects a transformers BridgeTower model"):
        btfast.optimize(torch.nn.Linear(2, 2))


def test_contrastive_unshared_transforms_refused():
    model = build(BridgeTowerForContrastiveLearning, tiny_config(share_cross_modal_transformer_layers=False))
    with pytest.raises(btfast.UnsupportedModelError, match="share_cross_modal_transformer_layers=False"):
        btfast.optimize(model)


def test_unsupported_activation_refused():
    cfg = tiny_config(hidden_act="gelu")
    cfg.text_config.hidden_act = "mish"
    model = BridgeTowerModel._from_config(cfg)
    with pytest.raises(btfast.UnsupportedModelError, match="mish"):
        btfast.optimize(model)


@pytest.fixture(scope="module")
def fast_itm():
    cfg = tiny_config()
    return cfg, btfast.optimize(build(BridgeTowerForImageAndTextRetrieval, cfg))


def test_text_too_long(fast_itm):
    cfg, fast = fast_itm
    x = random_inputs(cfg, batch=1, seq_len=39)  # tiny_config has 40 positions -> at most 38 tokens
    with pytest.raises(btfast.InputError, match="38 tokens"):
        fast(**x)


def test_padding_beyond_the_position_table_is_fine(fast_itm):
    cfg, fast = fast_itm
    x = random_inputs(cfg, batch=2, seq_len=45, lengths=[38, 5])
    assert fast(**x).logits.shape == (2, 2)


def test_wrong_image_size(fast_itm):
    cfg, fast = fast_itm
    x = random_inputs(cfg, batch=1, seq_len=5)
    x["pixel_values"] = torch.randn(1, 3, 48, 48)
    with pytest.raises(btfast.InputError, match=r"pixel_values must be \(batch, 3, 32, 32\)"):
        fast(**x)


def test_batch_mismatch(fast_itm):
    cfg, fast = fast_itm
    x = random_inputs(cfg, batch=2, seq_len=5)
    x["pixel_values"] = x["pixel_values"][:1]
    with pytest.raises(btfast.InputError, match=r"text batch \(2\) and image batch \(1\) differ"):
        fast(**x)


def test_token_ids_out_of_vocab(fast_itm):
    cfg, fast = fast_itm
    x = random_inputs(cfg, batch=1, seq_len=5)
    x["input_ids"][0, 2] = 5000
    with pytest.raises(btfast.InputError, match=r"input_ids must be in \[0, 120\)"):
        fast(**x)


def test_inputs_embeds_refused(fast_itm):
    cfg, fast = fast_itm
    x = random_inputs(cfg, batch=1, seq_len=5)
    with pytest.raises(btfast.InputError, match="inputs_embeds"):
        fast(**x, inputs_embeds=torch.randn(1, 5, 128))


def test_bad_dtype_refused():
    with pytest.raises(btfast.InputError, match="dtype"):
        btfast.optimize(build(BridgeTowerModel, tiny_config()), dtype=torch.int8)


def test_output_hidden_states_served_by_reference_with_one_warning(fast_itm, caplog):
    cfg, fast = fast_itm
    x = random_inputs(cfg, batch=2, seq_len=5)
    with caplog.at_level(logging.WARNING, logger="btfast"):
        a = fast(**x, output_hidden_states=True)
        b = fast(**x, output_hidden_states=True)
    assert a.hidden_states is not None and b.hidden_states is not None
    warnings = [r for r in caplog.records if "output_hidden_states" in r.getMessage()]
    assert len(warnings) == 1 and "reference" in warnings[0].getMessage()
    torch.testing.assert_close(a.logits, fast(**x).logits, rtol=1e-5, atol=1e-6)
    assert "output_hidden_states" in fast.explain()


def test_explain_names_the_model(fast_itm):
    _, fast = fast_itm
    text = fast.explain()
    assert "BridgeTowerForImageAndTextRetrieval" in text and "fusion from layer 2" in text


def test_default_config_is_bridgetower_base():
    spec = btfast.optimize(
        BridgeTowerModel._from_config(
            BridgeTowerConfig(text_config=dict(num_hidden_layers=6), vision_config=dict(num_hidden_layers=6))
        )
    ).spec
    assert (spec.hidden, spec.image_tokens, spec.max_text_len, spec.split) == (768, 325, 512, 1)


def test_token_id_check_reads_no_value_of_a_device_tensor():
    """Ids already on a device are checked there, asynchronously: a meta tensor has no values, so any host read
    (`int()`, `.item()`, `aminmax` back to Python) of it would raise here. CPU ids get the full, immediate check."""
    from btfast import inputs
    from btfast.spec import read_spec

    spec = read_spec(build(BridgeTowerModel, tiny_config()))
    inputs.check_text(spec, 120, torch.empty(2, 7, dtype=torch.long, device="meta"), None)
    with pytest.raises(btfast.InputError, match=r"in \[0, 120\); got values in \[3, 120\]"):
        inputs.check_text(spec, 120, torch.tensor([[3, 120]]), None)
