"""The runtime: buckets, padding, chunking, compile once per bucket, results never overwritten."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from helpers import assert_outputs_close
from torch._dynamo.testing import CompileCounter
from transformers import (
    BridgeTowerForContrastiveLearning,
    BridgeTowerForImageAndTextRetrieval,
    BridgeTowerForMaskedLM,
    BridgeTowerModel,
)

import btfast
import btfast.kernels
from btfast.runtime import Buckets
from btfast.testing import build, random_inputs, tiny_config

SMALL = dict(batch=(1, 2, 4), text=(8, 16))
FORWARD_LAYER_TYPES = ("text_layer", "vision_block", "cross_layer", "heads")  # what the whole forward compiles


def test_bucket_steps():
    b = Buckets(batch=(4, 1, 2, 2), text=(16, 8))
    assert b.batch == (1, 2, 4) and b.text == (8, 16)
    assert [b.batch_for(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 4]
    assert [b.text_for(n) for n in (1, 8, 9, 16, 17)] == [8, 8, 16, 16, 17]
    with pytest.raises(ValueError, match="positive integers"):
        Buckets(batch=(0, 2))
    default = Buckets()
    assert default.max_batch == 256 and default.text_for(40) == 40 and default.text_for(500) == 512


@pytest.mark.parametrize(
    "cls",
    [BridgeTowerModel, BridgeTowerForImageAndTextRetrieval, BridgeTowerForMaskedLM, BridgeTowerForContrastiveLearning],
    ids=lambda c: c.__name__,
)
def test_padded_buckets_give_unpadded_results(cls):
    """Batch 3 x length 7 runs in bucket 4 x 8 (a padded row, padded tokens); every field equals eager."""
    cfg = tiny_config()
    model = build(cls, cfg)
    x = random_inputs(cfg, batch=3, seq_len=7, lengths=[7, 4, 2])
    call = {"return_loss": True} if cls is BridgeTowerForContrastiveLearning else {}
    with torch.no_grad():
        ref = model(**x, **call)
    fast = btfast.optimize(model, compile=CompileCounter(), buckets=SMALL)
    out = fast(**x, **call)
    assert fast.runtime.stats.padded_rows == 1 and fast.runtime.stats.padded_tokens == 4 * 8 - 3 * 7
    assert assert_outputs_close(out, ref, 1e-5, valid=x["attention_mask"].bool())


def test_no_attention_mask_is_padded_correctly():
    cfg = tiny_config()
    model = build(BridgeTowerForMaskedLM, cfg)
    x = random_inputs(cfg, batch=3, seq_len=5)
    del x["attention_mask"]
    with torch.no_grad():
        ref = model(**x)
    out = btfast.optimize(model, compile=CompileCounter(), buckets=SMALL)(**x)
    assert_outputs_close(out, ref, 1e-5)


def test_batches_past_the_largest_bucket_are_chunked():
    cfg = tiny_config()
    model = build(BridgeTowerForContrastiveLearning, cfg)
    x = random_inputs(cfg, batch=7, seq_len=6, lengths=[6, 1, 2, 3, 4, 5, 6])
    with torch.no_grad():
        ref = model(**x, return_loss=True)
    fast = btfast.optimize(model, compile=CompileCounter(), buckets=SMALL)
    out = fast(**x, return_loss=True)
    assert fast.runtime.stats.chunks == 2  # 4 + 3 rows
    assert_outputs_close(out, ref, 1e-5)  # the loss spans both chunks


def test_zero_recompilations_after_warmup():
    cfg = tiny_config()
    counter = CompileCounter()
    fast = btfast.optimize(build(BridgeTowerForImageAndTextRetrieval, cfg), compile=counter, buckets=SMALL)
    costs = fast.warmup(batch_sizes=(1, 2, 4), text_lengths=(8, 16))["forward"]
    assert len(costs) == 6 and all(s > 0 for s in costs.values())
    frames = counter.frame_count
    assert frames >= 1
    for batch in (1, 2, 3, 4, 6):
        for length in (1, 5, 8, 12, 16):
            fast(**random_inputs(cfg, batch=batch, seq_len=length))
    assert counter.frame_count == frames, "a call inside the warmed buckets compiled again"
    text = fast.explain()
    assert "bucket batch    4 x text   16" in text and "hits" in text


@pytest.mark.parametrize("cls", [BridgeTowerForImageAndTextRetrieval, BridgeTowerModel], ids=lambda c: c.__name__)
def test_each_layer_type_compiles_once_for_every_bucket(cls):
    """Dynamo's own counters: one graph per layer type, whatever the bucket (batch 1 included) or the layer."""
    cfg = tiny_config(text_layers=4, cross_layers=3)
    counter = CompileCounter()
    fast = btfast.optimize(build(cls, cfg), compile=counter, buckets=SMALL)
    fast.warmup(batch_sizes=(4,), text_lengths=(8,))
    assert counter.frame_count == len(FORWARD_LAYER_TYPES)
    costs = fast.warmup(batch_sizes=(1, 2, 4), text_lengths=(8, 16))["forward"]
    assert len(costs) == 5  # every bucket but the first built here, none compiled
    assert counter.frame_count == len(FORWARD_LAYER_TYPES)
    fast.warmup(batch_sizes=(1, 4), text_lengths=(8, 16), stages=("text", "image", "fuse"))
    assert counter.frame_count == len(FORWARD_LAYER_TYPES) + 1  # the fuse stage's pooler; the towers are shared
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= counter.frame_count


def test_an_op_table_serving_kernels_compiles_once_and_still_keeps_its_books():
    """The op table's call counts must not reach dynamo's guards (they would change every call)."""
    cfg = tiny_config()
    counter = CompileCounter()
    fast = btfast.optimize(build(BridgeTowerForImageAndTextRetrieval, cfg), compile=counter, buckets=SMALL)
    # stand-ins for the Triton kernels (their torch references) that serve CPU tensors, as the kernels do on CUDA
    K = btfast.kernels
    fast.ops.kernels = SimpleNamespace(
        add_layernorm=lambda *a, **kw: K.add_layernorm_reference(*a, **kw)[0],
        linear=K.linear_reference,
        attention=K.attention_reference,
        **{f"{op}_unsupported_reasons": lambda *a: [] for op in ("add_layernorm", "linear", "attention")},
    )
    fast.ops.interpret = fast.ops.explicit = True
    fast.ops.off.clear()
    for seed in range(4):
        fast(**random_inputs(cfg, batch=2, seq_len=7, seed=seed))
    assert counter.frame_count == len(FORWARD_LAYER_TYPES), "the op table's bookkeeping made dynamo compile again"
    text = fast.explain()
    for op in ("add_layernorm", "linear", "attention"):
        assert f"{op}: triton (" in text, text  # recorded by the bucket's one eager call


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_graph_built_under_inference_mode_serves_calls_outside_it():
    cfg = tiny_config()
    fast = btfast.optimize(build(BridgeTowerModel, cfg), device="cuda", buckets=SMALL)
    with torch.inference_mode():
        a = fast(**random_inputs(cfg, batch=2, seed=1)).pooler_output
    with torch.no_grad():
        b = fast(**random_inputs(cfg, batch=2, seed=1)).pooler_output
    torch.testing.assert_close(a, b)
    assert any(e.graph is not None for e in fast.runtime.entries.values())


def test_results_are_not_overwritten_by_the_next_call():
    cfg = tiny_config()
    fast = btfast.optimize(build(BridgeTowerModel, cfg), compile=CompileCounter(), buckets=SMALL)
    a_in, b_in = random_inputs(cfg, batch=2, seed=1), random_inputs(cfg, batch=2, seed=2)
    a = fast(**a_in)
    kept = a.pooler_output.clone()
    fast(**b_in)
    torch.testing.assert_close(a.pooler_output, kept, rtol=0, atol=0)


def test_eager_runtime_runs_exact_shapes():
    cfg = tiny_config()
    fast = btfast.optimize(build(BridgeTowerModel, cfg), compile=False, cuda_graphs=False)
    fast(**random_inputs(cfg, batch=3, seq_len=7))
    assert fast.runtime.stats.padded_tokens == 0 and not fast.runtime.entries
    assert "eager, exact shapes" in fast.explain()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_graphs_match_eager_and_results_survive(dtype):
    cfg = tiny_config()
    model = build(BridgeTowerForImageAndTextRetrieval, cfg)
    x = random_inputs(cfg, batch=3, seq_len=7, lengths=[7, 4, 2])
    with torch.no_grad():
        ref = model(**x).logits
    fast = btfast.optimize(model, device="cuda", dtype=dtype, buckets=SMALL)
    first = fast(**x).logits
    kept = first.clone()
    fast(**random_inputs(cfg, batch=3, seq_len=7, seed=5))
    torch.testing.assert_close(first, kept, rtol=0, atol=0)
    tol = 1e-4 if dtype == torch.float32 else 6e-2
    assert ((first.float().cpu() - ref).abs().max() / ref.abs().max()).item() < tol
    assert any(e.graph is not None for e in fast.runtime.entries.values())


def test_a_compiler_failure_turns_compile_off_and_says_why(caplog):
    def broken_backend(gm, example_inputs):
        raise RuntimeError("this compiler cannot build the graph")

    cfg = tiny_config()
    model = build(BridgeTowerForImageAndTextRetrieval, cfg)
    x = random_inputs(cfg, batch=3, seq_len=7, lengths=[7, 4, 2])
    with torch.no_grad():
        ref = model(**x).logits
    fast = btfast.optimize(model, compile=broken_backend, buckets=SMALL)
    with caplog.at_level("WARNING", logger="btfast"):
        out = fast(**x).logits
        fast(**x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert sum("torch.compile off" in r.getMessage() for r in caplog.records) == 1
    assert "this compiler cannot build the graph" in fast.explain()


def test_stages_run_through_buckets_and_match_eager():
    """encode_text / encode_image / fuse (what offline scoring calls) are bucketed too, with the same results."""
    cfg = tiny_config()
    model = build(BridgeTowerForImageAndTextRetrieval, cfg)
    x = random_inputs(cfg, batch=3, seq_len=7, lengths=[7, 4, 2])
    eager = btfast.optimize(model, compile=False)
    want = eager.itm_logits(
        eager.encode_text(x["input_ids"], x["attention_mask"]), eager.encode_image(x["pixel_values"])
    )
    counter = CompileCounter()
    fast = btfast.optimize(model, compile=counter, buckets=SMALL)
    costs = fast.warmup(batch_sizes=(1, 4), text_lengths=(8,), stages=("text", "image", "fuse"))
    assert set(costs) == {"text", "image", "fuse"} and len(costs["image"]) == 2 and len(costs["text"]) == 2
    frames = counter.frame_count
    ts = fast.encode_text(x["input_ids"], x["attention_mask"])
    im = fast.encode_image(x["pixel_values"])
    assert ts.bridges.shape[:3] == (3, cfg.num_hidden_layers, 7) and len(im) == 3  # sliced back from 4 x 8
    torch.testing.assert_close(fast.itm_logits(ts, im), want, rtol=1e-5, atol=1e-6)
    grid = fast.itm_logits(ts.index(torch.tensor([0, 0, 1, 2])), im.index(torch.tensor([2, 1, 0, 0])))
    assert grid.shape == (4, 2)
    assert counter.frame_count == frames
    assert "text: torch.compile" in fast.explain() and "fuse: torch.compile" in fast.explain()
    with pytest.raises(btfast.InputError, match="unknown stages"):
        fast.warmup(stages=("decoder",))


def test_inductor_compiled_layers_match_eager_at_batch_one_and_more():
    """The real compiler (one graph per layer type, dynamic sizes, batch 1 run as two rows) against transformers."""
    cfg = tiny_config()
    model = build(BridgeTowerForContrastiveLearning, cfg)
    fast = btfast.optimize(copy.deepcopy(model), compile=True, buckets=SMALL)
    for lengths in ([5], [7, 2, 5]):
        x = random_inputs(cfg, batch=len(lengths), seq_len=max(lengths), lengths=lengths)
        with torch.no_grad():
            want = model(**x)
        compared = assert_outputs_close(fast(**x), want, 1e-5, valid=x["attention_mask"].bool())
        assert compared == ["logits", "text_embeds", "image_embeds", "cross_embeds"]
