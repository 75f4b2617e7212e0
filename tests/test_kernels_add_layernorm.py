"""add_layernorm against its fp32 PyTorch reference: small odd shapes under the interpreter, real ones on CUDA.

Tolerance (flash-attention's practice): fp32 within 1e-5; fp16/bf16 at most twice the error PyTorch's own
ops make at that dtype against the fp32 reference, plus one unit in the last place at the output's largest
magnitude (the interpreter truncates fp32 -> bf16 instead of rounding, so its bf16 results carry an extra ulp).
"""

import pytest
import torch
from kernel_checks import DEVICE, DTYPES, assert_matches, cuda_only

from btfast.kernels import add_layernorm, add_layernorm_reference, add_layernorm_unsupported_reasons

MODES = ["plain", "add", "scaled_add", "interpolate", "float_scales"]


def make_inputs(lead: tuple[int, ...], hidden: int, dtype: torch.dtype, mode: str, weight_dtype: torch.dtype):
    x = torch.randn(*lead, hidden, dtype=dtype, device=DEVICE)
    residual = None if mode == "plain" else torch.randn(*lead, hidden, dtype=dtype, device=DEVICE)
    weight = (1 + 0.5 * torch.randn(hidden, device=DEVICE)).to(weight_dtype)
    bias = (0.5 * torch.randn(hidden, device=DEVICE)).to(weight_dtype)
    if mode == "scaled_add":  # x * s + r, with the model's fp32 scaled_factor parameter
        alpha, beta = torch.tensor(1.7, device=DEVICE), 1.0
    elif mode == "interpolate":  # x * (1 - b) + r * b, with b in the model's dtype
        b = torch.tensor(0.3, dtype=dtype, device=DEVICE)
        alpha, beta = 1 - b, b
    elif mode == "float_scales":
        alpha, beta = 0.5, -2.0
    else:
        alpha, beta = 1.0, 1.0
    return x, residual, weight, bias, alpha, beta


def check(lead, hidden, dtype, mode, weight_dtype=None, eps=1e-5) -> None:
    x, residual, weight, bias, alpha, beta = make_inputs(lead, hidden, dtype, mode, weight_dtype or dtype)
    normed, total = add_layernorm(x, residual, weight, bias, eps, alpha, beta, return_sum=True)
    ref_normed, ref_total = add_layernorm_reference(x, residual, weight, bias, eps, alpha, beta)
    pt_normed, pt_total = add_layernorm_reference(x, residual, weight, bias, eps, alpha, beta, upcast=False)
    assert_matches(total, ref_total, pt_total, dtype)
    assert_matches(normed, ref_normed, pt_normed, dtype)
    # The sum is normalised as stored, so the two outputs agree with each other exactly.
    torch.testing.assert_close(normed, add_layernorm(total, None, weight, bias, eps), rtol=0, atol=0)


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("hidden", [48, 64, 96])
@pytest.mark.parametrize("lead", [(1,), (7,), (3, 11)], ids=["M1", "M7", "M3x11"])
def test_matches_reference(lead: tuple[int, ...], hidden: int, mode: str, dtype: torch.dtype) -> None:
    torch.manual_seed(hidden + len(lead))
    check(lead, hidden, dtype, mode)


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_weights_with_low_precision_input(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    check((5,), 80, dtype, "add", weight_dtype=torch.float32)


@pytest.mark.usefixtures("poisoned_outputs")
def test_return_sum_false_gives_the_same_normed_tensor() -> None:
    torch.manual_seed(2)
    x, residual, weight, bias, alpha, beta = make_inputs((6,), 40, torch.float32, "interpolate", torch.float32)
    normed, _ = add_layernorm(x, residual, weight, bias, 1e-6, alpha, beta, return_sum=True)
    alone = add_layernorm(x, residual, weight, bias, 1e-6, alpha, beta)
    assert isinstance(alone, torch.Tensor)
    torch.testing.assert_close(alone, normed, rtol=0, atol=0)


@pytest.mark.usefixtures("poisoned_outputs")
def test_no_affine_and_strided_rows() -> None:
    torch.manual_seed(3)
    storage = torch.randn(9, 128, device=DEVICE)
    x, residual = storage[:, :72], storage[:, 50:122]  # row stride 128, rows overlap
    out = add_layernorm(x, residual, None, None, 1e-5)
    ref, _ = add_layernorm_reference(x, residual, None, None, 1e-5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_tensor_scales_are_read_at_run_time() -> None:
    torch.manual_seed(4)
    x, r = torch.randn(3, 32, device=DEVICE), torch.randn(3, 32, device=DEVICE)
    s = torch.tensor(1.0, device=DEVICE)
    first = add_layernorm(x, r, None, None, 1e-5, alpha=s)
    s.fill_(3.0)
    second = add_layernorm(x, r, None, None, 1e-5, alpha=s)
    torch.testing.assert_close(second, add_layernorm_reference(x, r, None, None, 1e-5, alpha=3.0)[0])
    assert not torch.allclose(first, second)


def test_unsupported_reasons() -> None:
    x = torch.randn(2, 16, device=DEVICE)
    assert add_layernorm_unsupported_reasons(x, x, torch.ones(16, device=DEVICE), None) == []
    assert any("hidden size" in r for r in add_layernorm_unsupported_reasons(torch.randn(2, 5000, device=DEVICE)))
    assert any("residual shape" in r for r in add_layernorm_unsupported_reasons(x, x[:, :8]))
    assert any("dtype" in r for r in add_layernorm_unsupported_reasons(x.long()))
    assert any("weight shape" in r for r in add_layernorm_unsupported_reasons(x, None, torch.ones(8, device=DEVICE)))
    assert any("alpha" in r for r in add_layernorm_unsupported_reasons(x, x, alpha=torch.ones(2, device=DEVICE)))
    with pytest.raises(ValueError, match="hidden size"):
        add_layernorm(torch.randn(1, 5000, device=DEVICE), None, None, None)


def test_custom_ops_are_registered() -> None:
    x, r, w = torch.randn(3, 24, device=DEVICE), torch.randn(3, 24, device=DEVICE), torch.randn(24, device=DEVICE)
    args = (x, r, w, None, 1e-5, 2.0, 1.0, None, torch.tensor(0.5, device=DEVICE))
    ref_normed, ref_total = add_layernorm_reference(x, r, w, None, 1e-5, 2.0, 0.5)
    torch.testing.assert_close(torch.ops.btfast.add_layernorm(*args), ref_normed, rtol=1e-5, atol=1e-5)
    normed, total = torch.ops.btfast.add_layernorm_sum(*args)
    torch.testing.assert_close(total, ref_total, rtol=1e-5, atol=1e-5)
    # Fake-tensor tests need real Triton: the interpreter would be handed fake tensors.
    checks = None if torch.cuda.is_available() else ("test_schema", "test_autograd_registration")
    torch.library.opcheck(torch.ops.btfast.add_layernorm_sum.default, args, test_utils=checks)


@cuda_only
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("lead", "hidden"), [((4, 325), 768), ((4, 40), 768), ((4, 442), 1024), ((2, 7), 4096)])
def test_real_shapes(lead: tuple[int, ...], hidden: int, mode: str, dtype: torch.dtype) -> None:
    torch.manual_seed(hidden)
    check(lead, hidden, dtype, mode)


@cuda_only
def test_cuda_graph_replays_with_new_scale() -> None:
    x, r = torch.randn(8, 768, device="cuda"), torch.randn(8, 768, device="cuda")
    b = torch.tensor(0.25, device="cuda")
    add_layernorm(x, r, None, None, 1e-5, 1 - b, b)  # autotune and compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = add_layernorm(x, r, None, None, 1e-5, 1 - b, b)
    b.fill_(0.75)
    graph.replay()
    torch.testing.assert_close(out, add_layernorm_reference(x, r, None, None, 1e-5, 0.25, 0.75)[0])


@cuda_only
def test_torch_compile_traces_the_op() -> None:
    x, r = (torch.randn(6, 325, 768, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w, b = torch.randn(768, device="cuda"), torch.randn(768, device="cuda")
    s = torch.tensor(0.5, device="cuda")

    def block(x: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return add_layernorm(x * 2, r, w, b, 1e-5, alpha=s, return_sum=True)

    eager, compiled = block(x, r), torch.compile(block, fullgraph=True)(x, r)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e)
