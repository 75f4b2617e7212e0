"""linear (GEMM + bias/activation/residual epilogue) against its fp32 PyTorch reference.

Small odd shapes run under the interpreter (one 32x32x32 tile config, so M, N and K all cross tile edges);
the real projection shapes run on CUDA only. Tolerance as in flash-attention: fp32 within 1e-5; fp16/bf16
at most twice PyTorch's own error at that dtype, plus one ulp at the output's largest magnitude.
"""

import pytest
import torch
from kernel_checks import DEVICE, DTYPES, assert_matches, cuda_only

from btfast.kernels import ACTIVATIONS, linear, linear_reference, linear_unsupported_reasons

# The interpreter's numpy exp overflows to inf in sigmoid(-large) = 0: right answer, noisy warning.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def check(lead, k, n, dtype, activation=None, with_bias=True, with_residual=False) -> None:
    x = torch.randn(*lead, k, dtype=dtype, device=DEVICE)
    weight = (torch.randn(n, k, device=DEVICE) / k**0.5).to(dtype)
    bias = torch.randn(n, dtype=dtype, device=DEVICE) if with_bias else None
    residual = torch.randn(*lead, n, dtype=dtype, device=DEVICE) if with_residual else None
    out = linear(x, weight, bias, activation, residual)
    ref = linear_reference(x, weight, bias, activation, residual)
    assert_matches(out, ref, linear_reference(x, weight, bias, activation, residual, upcast=False), dtype)


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("k", "n"), [(48, 96), (64, 48), (96, 80)])
@pytest.mark.parametrize("lead", [(1,), (7,), (3, 11)], ids=["M1", "M7", "M3x11"])
def test_matches_reference(lead: tuple[int, ...], k: int, n: int, dtype: torch.dtype) -> None:
    torch.manual_seed(k + n + len(lead))
    check(lead, k, n, dtype)


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_activations_with_bias_and_residual(activation: str | None, dtype: torch.dtype) -> None:
    torch.manual_seed(5)
    check((2, 17), 80, 72, dtype, activation, with_bias=True, with_residual=True)


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize(("with_bias", "with_residual"), [(False, False), (False, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_without_bias(with_bias: bool, with_residual: bool, dtype: torch.dtype) -> None:
    torch.manual_seed(6)
    check((9,), 40, 56, dtype, "gelu", with_bias, with_residual)


@pytest.mark.usefixtures("poisoned_outputs")
def test_strided_operands() -> None:
    """x as a column slice of a wider tensor, weight as a transposed (K, N) buffer, residual as a slice."""
    torch.manual_seed(7)
    x = torch.randn(13, 100, device=DEVICE)[:, 10:74]
    weight = torch.randn(64, 40, device=DEVICE).t()  # (N=40, K=64), strides (1, 40)
    residual = torch.randn(13, 2, 40, device=DEVICE)[:, 1]
    out = linear(x, weight, None, "quick_gelu", residual)
    torch.testing.assert_close(out, linear_reference(x, weight, None, "quick_gelu", residual), rtol=1e-5, atol=1e-5)


def test_unsupported_reasons() -> None:
    x, w = torch.randn(4, 32, device=DEVICE), torch.randn(16, 32, device=DEVICE)
    assert linear_unsupported_reasons(x, w, torch.zeros(16, device=DEVICE), "gelu", torch.zeros(4, 16)) == []
    assert any("activation" in r for r in linear_unsupported_reasons(x, w, activation="swish"))
    assert any("in-features" in r for r in linear_unsupported_reasons(x, w[:, :8]))
    assert any("weight dtype" in r for r in linear_unsupported_reasons(x, w.half()))
    assert any("bias shape" in r for r in linear_unsupported_reasons(x, w, torch.zeros(8, device=DEVICE)))
    assert any("residual shape" in r for r in linear_unsupported_reasons(x, w, residual=torch.zeros(4, 8)))
    with pytest.raises(ValueError, match="activation"):
        linear(x, w, activation="swish")


def test_custom_op_is_registered() -> None:
    x, w = torch.randn(2, 3, 32, device=DEVICE), torch.randn(24, 32, device=DEVICE)
    b, r = torch.randn(24, device=DEVICE), torch.randn(2, 3, 24, device=DEVICE)
    out = torch.ops.btfast.linear(x, w, b, "gelu_tanh", r)
    torch.testing.assert_close(out, linear_reference(x, w, b, "gelu_tanh", r), rtol=1e-5, atol=1e-5)
    # Fake-tensor tests need real Triton: the interpreter would be handed fake tensors.
    checks = None if torch.cuda.is_available() else ("test_schema", "test_autograd_registration")
    torch.library.opcheck(torch.ops.btfast.linear.default, (x, w, b, "gelu_tanh", r), test_utils=checks)


# (K, N, activation, residual): fused QKV, attention output + residual, FFN up (GELU / QuickGELU), FFN down
# + residual, for base (768 / 3072) and large (1024 / 4096).
REAL = [
    (768, 2304, None, False),
    (768, 768, None, True),
    (768, 3072, "gelu", False),
    (768, 3072, "quick_gelu", False),
    (3072, 768, None, True),
    (1024, 4096, "gelu", False),
    (4096, 1024, None, True),
]


@cuda_only
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("k", "n", "activation", "with_residual"), REAL)
@pytest.mark.parametrize("lead", [(4, 325), (4, 40), (1,)], ids=["vision", "text", "M1"])
def test_real_shapes(lead, k: int, n: int, activation: str | None, with_residual: bool, dtype: torch.dtype) -> None:
    torch.manual_seed(k + n)
    check(lead, k, n, dtype, activation, True, with_residual)


@cuda_only
def test_torch_compile_traces_the_op() -> None:
    x = torch.randn(4, 325, 768, device="cuda", dtype=torch.bfloat16)
    w1 = torch.randn(3072, 768, device="cuda", dtype=torch.bfloat16) / 30
    w2 = torch.randn(768, 3072, device="cuda", dtype=torch.bfloat16) / 60

    def mlp(x: torch.Tensor) -> torch.Tensor:
        return linear(linear(x, w1, None, "quick_gelu"), w2, None, None, residual=x)

    torch.testing.assert_close(torch.compile(mlp, fullgraph=True)(x), mlp(x))
