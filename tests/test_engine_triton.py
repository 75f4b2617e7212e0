"""The whole engine through the Triton kernels against the transformers reference.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest), forced with kernels="all"; on CUDA the
default kernel set and every kernel are checked at tiny and real shapes.
"""

from __future__ import annotations

import pytest
import torch
from helpers import assert_outputs_close
from transformers import BridgeTowerForImageAndTextRetrieval, BridgeTowerForMaskedLM, BridgeTowerModel

import btfast
from btfast.testing import base_config, build, random_inputs, tiny_config

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
interpreted = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter path; CUDA runs the real kernels")


def _check(cls, cfg, dtype, device, kernels, rtol, lengths=(7, 4), seq_len=7):
    model = build(cls, cfg)
    x = random_inputs(cfg, batch=len(lengths), seq_len=seq_len, lengths=list(lengths))
    with torch.no_grad():
        ref = model(**x)
    fast = btfast.optimize(model, dtype=dtype, device=device, kernels=kernels)
    out = fast(**x)
    ref_on = type(ref)(**{k: v.to(device=out[k].device, dtype=out[k].dtype) for k, v in ref.items() if k in out})
    assert assert_outputs_close(out, ref_on, rtol, valid=x["attention_mask"].bool().to(out[list(out)[0]].device))
    return fast


@interpreted
@pytest.mark.parametrize(
    "cls,link",
    [(BridgeTowerForImageAndTextRetrieval, "scaled_add"), (BridgeTowerModel, "interpolate")],
    ids=["itm-scaled_add", "base-interpolate"],
)
def test_interpreted_kernels_fp32_exact(cls, link):
    fast = _check(cls, tiny_config(link_tower_type=link), None, "cpu", "all", 1e-5)
    text = fast.explain()
    for op in ("add_layernorm: triton", "attention: triton", "linear: triton"):
        assert op in text, f"{op!r} not in explain():\n{text}"


@interpreted
def test_interpreted_kernels_bf16_within_bounds():
    _check(BridgeTowerForMaskedLM, tiny_config(), torch.bfloat16, "cpu", "all", 6e-2)


def test_kernel_choice_is_explained():
    fast = btfast.optimize(build(BridgeTowerModel, tiny_config()), kernels=["attention"])
    text = fast.explain()
    for op in ("linear", "add_layernorm"):
        assert f"{op}: torch (not asked for (optimize(..., kernels=['attention'])))" in text, text
    assert "attention: torch" not in text
    with pytest.raises(ValueError, match="unknown kernels"):
        btfast.optimize(build(BridgeTowerModel, tiny_config()), kernels=["softmax"])


@cuda
@pytest.mark.parametrize("kernels", [None, "all"], ids=["default", "all"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.bfloat16, 6e-2)], ids=["fp32", "bf16"])
def test_cuda_kernels_tiny(kernels, dtype, rtol):
    fast = _check(
        BridgeTowerForImageAndTextRetrieval, tiny_config(link_tower_type="interpolate"), dtype, "cuda", kernels, rtol
    )
    text = fast.explain()
    assert "self-check" not in text, text
    assert ("kernel race at" in text) == (kernels is None), text  # the default set races torch; "all" does not


@cuda
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-4), (torch.bfloat16, 6e-2)], ids=["fp32", "bf16"])
def test_cuda_kernels_base_shapes(dtype, rtol):
    _check(
        BridgeTowerForImageAndTextRetrieval,
        base_config(),
        dtype,
        "cuda",
        "all",
        rtol,
        lengths=(40, 17, 3, 40),
        seq_len=40,
    )
