"""pytest-benchmark suite, end to end: HF eager and btfast forwards, btfast's stages and all-pairs scoring.

Tiny shapes (CPU: fp32 and bf16; CUDA: fp32 and bf16 on the GPU), so it runs anywhere in seconds. CI runs it
with ``--benchmark-disable`` (each body runs once, as a test, and the results are still checked against
hf-eager-fp32); ``make bench-suite`` times it. Real shapes and the full comparison: ``btfast bench``.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("pytest_benchmark")

import bench_e2e  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16 against the fp32 reference: btfast's bound (README, "Fidelity") is 6e-2 of the largest logit
TOL = {"fp32": 1e-5, "bf16": 6e-2}


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float().cpu() - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("system", ["hf-eager-fp32", "hf-eager-bf16", "btfast-fp32", "btfast-bf16"])
def test_forward(benchmark, system: str, batch: int) -> None:
    case = bench_e2e.forward_case(system, batch, 16, DEVICE)
    try:
        benchmark.group = f"forward b{batch}"
        logits = benchmark(case.fn)
    finally:
        case.close()
    assert logits.shape == (batch, 2)
    assert _rel_err(logits, bench_e2e.reference_logits(batch, 16)) <= TOL[system.rsplit("-", 1)[1]]


@pytest.mark.parametrize("stage", ["encode_text", "encode_image", "fuse"])
def test_btfast_stages(benchmark, stage: str) -> None:
    """Where btfast's time goes: the two towers and the fusion, each alone (batch 8, text 16)."""
    from transformers import BridgeTowerForImageAndTextRetrieval

    import btfast
    from btfast.testing import build, random_inputs, tiny_config

    config = tiny_config()
    fast = btfast.optimize(build(BridgeTowerForImageAndTextRetrieval, config), device=DEVICE)
    x = {k: v.to(DEVICE) for k, v in random_inputs(config, batch=8, seq_len=16).items()}
    ts, im = fast.encode_text(x["input_ids"], x["attention_mask"]), fast.encode_image(x["pixel_values"])
    fns = {
        "encode_text": lambda: fast.encode_text(x["input_ids"], x["attention_mask"]),
        "encode_image": lambda: fast.encode_image(x["pixel_values"]),
        "fuse": lambda: fast.fuse(ts, im),
    }
    benchmark.group = "btfast stages"
    out = benchmark(fns[stage])
    assert len(out) == 8 if stage != "fuse" else out.pooler_output.shape[0] == 8


def test_all_pairs(benchmark) -> None:
    """4 images × 6 texts: btfast encodes 4 + 6 items once and fuses 24 pairs; equals HF run pair by pair."""
    from transformers import BridgeTowerForImageAndTextRetrieval

    from btfast.testing import build

    fn, x, config = bench_e2e.all_pairs_case(4, 6, 12, DEVICE)
    benchmark.group = "all pairs"
    logits = benchmark(fn)
    model = build(BridgeTowerForImageAndTextRetrieval, config)
    with torch.no_grad():
        want = model(
            input_ids=x["input_ids"][x["text_idx"]].cpu(),
            attention_mask=x["attention_mask"][x["text_idx"]].cpu(),
            pixel_values=x["pixel_values"][x["image_idx"]].cpu(),
        ).logits
    assert logits.shape == (24, 2) and _rel_err(logits, want) <= TOL["fp32"]
