"""GEMM with a fused epilogue: ``act(x @ weight.T + bias) + residual``.

Every projection in BridgeTower is an ``nn.Linear`` followed by at most a bias, an activation (GELU erf in
the text/cross FFNs, QuickGELU in the CLIP vision MLP) and a residual add. Unfused, each of those is a
separate pass over the (M, N) output; for the FFN up-projection (N = 3072/4096) that is 2-3 extra reads and
writes of the largest activation in the model. Here the (BLOCK_M, BLOCK_N) fp32 accumulator of a tiled
matmul gets bias, activation and residual applied in registers and is written once, in x's dtype.

Tiling follows the classic Triton matmul: a program owns one output tile and walks K in BLOCK_K steps;
programs are grouped GROUP_M tiles tall so that neighbours share rows of x and columns of W in L2.
``weight`` is (N, K) like ``nn.Linear`` and is read through its strides (no transpose copy). fp32 inputs
use exact fp32 products (``input_precision="ieee"``, no TF32) so results match torch to ~1e-5.
"""

import math

import torch
import torch.nn.functional as F

from ._common import (
    CUSTOM_OPS,
    INTERPRET,
    common_reasons,
    dot_precision,
    dtype_reason,
    index_span,
    require_triton,
    tl,
    triton,
    triton_op,
    upcast_dot,
    wrap_triton,
)

ACTIVATIONS = (None, "gelu", "gelu_tanh", "quick_gelu", "relu")

# Offsets are int32 element offsets: every operand must stay below 2**31 elements.
_MAX_ELEMENTS = 2**31 - 1


def _config(bm: int, bn: int, bk: int, stages: int, warps: int) -> object:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=stages, num_warps=warps
    )


# Hopper-sized tiles for the real shapes (M = batch x tokens in the thousands, K and N in 768..4096), plus
# narrow ones for small M (heads, batch-1 text). Exact fp32 ("ieee": FMA, no tensor cores) gets its own short
# list of tiles that fit shared memory without deep pipelines: every candidate costs a compile at first use.
# One small tile under the interpreter.
_CONFIGS = (
    [_config(32, 32, 32, 1, 4)]
    if INTERPRET
    else [
        _config(128, 256, 64, 3, 8),
        _config(256, 128, 64, 3, 8),
        _config(128, 128, 64, 4, 8),
        _config(128, 128, 64, 3, 4),
        _config(64, 256, 32, 4, 4),
        _config(128, 128, 32, 4, 4),
        _config(128, 64, 32, 4, 4),
        _config(64, 128, 32, 4, 4),
        _config(64, 64, 64, 4, 4),
        _config(32, 64, 64, 5, 2),
        _config(16, 64, 128, 4, 4),
    ]
)
_FP32_CONFIGS = (
    _CONFIGS
    if INTERPRET
    else [_config(128, 128, 32, 4, 4), _config(128, 64, 32, 4, 4), _config(64, 64, 64, 4, 4), _config(32, 64, 64, 5, 2)]
)
_KEY = ["M_BUCKET", "N", "K"]


@triton.jit
def _activate(y, ACTIVATION: tl.constexpr):
    """The activations of BridgeTower's MLPs, in fp32 (tanh-GELU through ``1 + tanh(u) = 2 * sigmoid(2u)``)."""
    if ACTIVATION == "gelu":
        y = 0.5 * y * (1.0 + tl.erf(y * 0.7071067811865476))
    elif ACTIVATION == "gelu_tanh":
        inner = 0.7978845608028654 * (y + 0.044715 * y * y * y)
        y = y * tl.sigmoid(2.0 * inner)
    elif ACTIVATION == "quick_gelu":
        y = y * tl.sigmoid(1.702 * y)
    elif ACTIVATION == "relu":
        y = tl.maximum(y, 0.0)
    return y


@triton.jit
def _linear_kernel(
    X,
    W,
    Bias,
    Res,
    Out,
    M,
    N,
    K,
    M_BUCKET,
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_rm,
    stride_rn,
    stride_om,
    stride_on,
    ACTIVATION: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped order: walk GROUP_M tile rows down a column of tiles before moving right.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Out-of-range rows/columns wrap onto valid ones, so only the K tail needs a load mask.
    rows = offs_m % M
    cols = offs_n % N
    x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = W + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if UPCAST_DOT:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    if HAS_BIAS:
        acc += tl.load(Bias + cols).to(tl.float32)[None, :]
    acc = _activate(acc, ACTIVATION)
    in_tile = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if HAS_RESIDUAL:
        r_ptrs = Res + offs_m[:, None] * stride_rm + offs_n[None, :] * stride_rn
        acc += tl.load(r_ptrs, mask=in_tile, other=0.0).to(tl.float32)
    o_ptrs = Out + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=in_tile)


# The kernel autotuned over the tiles for its input dtype.
_TUNED = {
    True: triton.autotune(configs=_FP32_CONFIGS, key=_KEY)(_linear_kernel),
    False: triton.autotune(configs=_CONFIGS, key=_KEY)(_linear_kernel),
}


def _launch(
    kernel: object,
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """Run ``kernel`` (raw or ``wrap_triton``-wrapped) on x viewed as (M, K); returns (*x.shape[:-1], N)."""
    k = x.shape[-1]
    n = weight.shape[0]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    r2 = residual.reshape(m, n) if residual is not None else None
    bias = bias.contiguous() if bias is not None else None
    if m > 0 and n > 0:

        def grid(meta: dict) -> tuple[int]:
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        kernel[grid](
            x2,
            weight,
            bias if bias is not None else out,
            r2 if r2 is not None else out,
            out,
            m,
            n,
            k,
            max(16, triton.next_power_of_2(m)),
            x2.stride(0),
            x2.stride(1),
            weight.stride(0),
            weight.stride(1),
            r2.stride(0) if r2 is not None else 0,
            r2.stride(1) if r2 is not None else 0,
            out.stride(0),
            out.stride(1),
            ACTIVATION=activation or "none",
            HAS_BIAS=bias is not None,
            HAS_RESIDUAL=r2 is not None,
            PRECISION=dot_precision(x.dtype),
            UPCAST_DOT=upcast_dot(x.dtype),
        )
    return out.view(*x.shape[:-1], n)


def _linear_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    residual: torch.Tensor | None,
) -> torch.Tensor:
    """``torch.ops.btfast.linear``."""
    return _launch(wrap_triton(_TUNED[x.dtype == torch.float32]), x, weight, bias, activation, residual)


if CUSTOM_OPS:
    triton_op("btfast::linear", _linear_op, mutates_args=())


def linear_unsupported_reasons(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
) -> list[str]:
    """Why the Triton kernel cannot serve these inputs (empty list: it can)."""
    reasons = common_reasons(x, weight, bias, residual) + dtype_reason("x", x)
    if activation not in ACTIVATIONS:
        reasons.append(f"activation {activation!r} is not one of {ACTIVATIONS}")
    if x.dim() == 0 or weight.dim() != 2:
        return [*reasons, f"x must be at least 1-D and weight 2-D, got {x.dim()}-D and {weight.dim()}-D"]
    n, k = weight.shape
    if x.shape[-1] != k:
        reasons.append(f"x's last dim {x.shape[-1]} does not match weight's in-features {k}")
    if weight.dtype != x.dtype:
        reasons.append(f"weight dtype {weight.dtype} differs from x dtype {x.dtype}")
    if bias is not None:
        if bias.shape != (n,):
            reasons.append(f"bias shape {tuple(bias.shape)} is not ({n},)")
        reasons += dtype_reason("bias", bias)
    if residual is not None:
        expected = (*x.shape[:-1], n)
        if tuple(residual.shape) != expected:
            reasons.append(f"residual shape {tuple(residual.shape)} is not {expected}")
        reasons += dtype_reason("residual", residual)
    m = x.numel() // max(k, 1)
    if max(m * n, *(index_span(t) for t in (x, weight, residual) if t is not None)) > _MAX_ELEMENTS:
        reasons.append("an operand spans 2**31 elements or more (the kernel uses int32 offsets)")
    return reasons


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(x @ weight.T + bias) + residual`` with fp32 accumulation, in x's dtype.

    ``weight`` is (N, K) like ``nn.Linear``; x has any leading dims; ``activation`` is one of
    ``None, "gelu" (erf), "gelu_tanh", "quick_gelu" (x * sigmoid(1.702 x)), "relu"``. On CUDA this calls the
    custom op ``torch.ops.btfast.linear``; elsewhere (TRITON_INTERPRET=1 on CPU) it launches the kernel directly.
    """
    require_triton()
    reasons = linear_unsupported_reasons(x, weight, bias, activation, residual)
    if reasons:
        raise ValueError("linear: " + "; ".join(reasons))
    if CUSTOM_OPS and x.is_cuda:
        return torch.ops.btfast.linear(x, weight, bias, activation, residual)
    return _launch(_TUNED[x.dtype == torch.float32], x, weight, bias, activation, residual)


def linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Plain PyTorch ``act(F.linear(x, weight, bias)) + residual``: in fp32 if ``upcast`` (the kernel's test
    reference), else in x's dtype (the engine's torch path for this op)."""
    if upcast:
        x, weight = x.float(), weight.float()
        bias = bias.float() if bias is not None else None
        residual = residual.float() if residual is not None else None
    y = F.linear(x, weight, bias.to(x.dtype) if bias is not None else None)
    if activation == "gelu":
        y = F.gelu(y)
    elif activation == "gelu_tanh":  # transformers' NewGELUActivation written out, so fp32 matches it exactly
        y = 0.5 * y * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (y + 0.044715 * torch.pow(y, 3.0))))
    elif activation == "quick_gelu":
        y = y * torch.sigmoid(1.702 * y)
    elif activation == "relu":
        y = F.relu(y)
    elif activation is not None:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    return y if residual is None else y + residual
