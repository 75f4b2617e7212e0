"""Fused (scaled) residual add + LayerNorm: ``LayerNorm(alpha * x + beta * residual)`` over the last dim.

BridgeTower spends a LayerNorm on every residual: post-LN text and cross layers (``LN(h + sublayer(h))``),
pre-LN vision blocks (``h = h + sublayer``, then the next ``ln_1``/``ln_2`` of ``h``) and the bridges, whose
link towers are ``add`` (``x + r``), ``scaled_add`` (``x * s + r``) or ``interpolate`` (``x * (1 - b) + r * b``).
Unfused, torch reads ``x`` and ``r``, writes the sum, reads it back for the statistics and again to normalise.
Here one program owns one row: it reads ``x`` and ``r`` once, keeps the row in registers (hence hidden
sizes up to 4096: the whole row is one block), writes the normalised row and, when asked, the sum (the
pre-LN residual stream needs it). Math is fp32 whatever the storage dtype; the sum is rounded to the storage
dtype before it is normalised, so ``normed == LayerNorm(sum)`` exactly as in the reference, which
normalises the stored tensor.

``alpha``/``beta`` are Python floats (baked into the launch) or one-element tensors read by the kernel
through a pointer, so a CUDA graph replays with the current value of the model's ``scaled_factor``/``beta``.
"""

import torch
import torch.nn.functional as F

from ._common import (
    CUSTOM_OPS,
    INTERPRET,
    common_reasons,
    dtype_reason,
    require_triton,
    scalar_reason,
    tl,
    triton,
    triton_op,
    wrap_triton,
)

MAX_HIDDEN = 4096

# The row is one block, so the only knob is how many warps share it; the best count depends on the hidden
# size (768 and 1024 here) and the dtype, both in the autotune key.
_CONFIGS = [triton.Config({}, num_warps=4)] if INTERPRET else [triton.Config({}, num_warps=w) for w in (1, 2, 4, 8, 16)]


@triton.autotune(configs=_CONFIGS, key=["N"])
@triton.jit
def _add_layernorm_kernel(
    X,
    R,
    W,
    B,
    Alpha,
    Beta,
    Out,
    Sum,
    stride_x,
    stride_r,
    stride_out,
    stride_sum,
    N,
    eps,
    alpha,
    beta,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ALPHA_FROM_PTR: tl.constexpr,
    BETA_FROM_PTR: tl.constexpr,
    STORE_SUM: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    in_row = cols < N

    if ALPHA_FROM_PTR:
        a = tl.load(Alpha).to(tl.float32)
    else:
        a = alpha
    s = tl.load(X + row * stride_x + cols, mask=in_row, other=0.0).to(tl.float32) * a
    if HAS_RESIDUAL:
        if BETA_FROM_PTR:
            b = tl.load(Beta).to(tl.float32)
        else:
            b = beta
        s += tl.load(R + row * stride_r + cols, mask=in_row, other=0.0).to(tl.float32) * b
    s = s.to(Out.dtype.element_ty)
    if STORE_SUM:
        tl.store(Sum + row * stride_sum + cols, s, mask=in_row)
    s = s.to(tl.float32)

    mean = tl.sum(s, axis=0) / N
    centred = tl.where(in_row, s - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / N + eps)
    y = centred * rstd
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=in_row, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=in_row, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_out + cols, y.to(Out.dtype.element_ty), mask=in_row)


def _rows(t: torch.Tensor, n: int) -> torch.Tensor:
    """``t`` as (rows, n) with unit stride along n; a view whenever the layout allows."""
    t = t.reshape(-1, n)
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(
    kernel: object,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    alpha: float,
    beta: float,
    alpha_t: torch.Tensor | None,
    beta_t: torch.Tensor | None,
    store_sum: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``kernel`` (the raw or ``wrap_triton``-wrapped kernel); returns (normed, sum or an empty tensor)."""
    n = x.shape[-1]
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    x2 = _rows(x, n)
    r2 = _rows(residual, n) if residual is not None else None
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    total = torch.empty(x2.shape if store_sum else (0,), dtype=x.dtype, device=x.device)
    if x2.shape[0] > 0:
        kernel[(x2.shape[0],)](
            x2,
            r2 if r2 is not None else x2,
            weight if weight is not None else x2,
            bias if bias is not None else x2,
            alpha_t if alpha_t is not None else x2,
            beta_t if beta_t is not None else x2,
            out,
            total if store_sum else out,
            x2.stride(0),
            r2.stride(0) if r2 is not None else 0,
            out.stride(0),
            total.stride(0) if store_sum else 0,
            n,
            eps,
            alpha,
            beta,
            HAS_RESIDUAL=r2 is not None,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            ALPHA_FROM_PTR=alpha_t is not None,
            BETA_FROM_PTR=beta_t is not None,
            STORE_SUM=store_sum,
            BLOCK_N=triton.next_power_of_2(n),
        )
    return out.view(x.shape), total.view(x.shape) if store_sum else total


def _add_layernorm_op(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    alpha: float,
    beta: float,
    alpha_t: torch.Tensor | None,
    beta_t: torch.Tensor | None,
) -> torch.Tensor:
    """``torch.ops.btfast.add_layernorm``: the normalised output only."""
    kernel = wrap_triton(_add_layernorm_kernel)
    return _launch(kernel, x, residual, weight, bias, eps, alpha, beta, alpha_t, beta_t, False)[0]


def _add_layernorm_sum_op(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    alpha: float,
    beta: float,
    alpha_t: torch.Tensor | None,
    beta_t: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.ops.btfast.add_layernorm_sum``: (normalised output, pre-LN sum)."""
    kernel = wrap_triton(_add_layernorm_kernel)
    return _launch(kernel, x, residual, weight, bias, eps, alpha, beta, alpha_t, beta_t, True)


if CUSTOM_OPS:
    triton_op("btfast::add_layernorm", _add_layernorm_op, mutates_args=())
    triton_op("btfast::add_layernorm_sum", _add_layernorm_sum_op, mutates_args=())


def add_layernorm_unsupported_reasons(
    x: torch.Tensor,
    residual: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    alpha: float | torch.Tensor = 1.0,
    beta: float | torch.Tensor = 1.0,
) -> list[str]:
    """Why the Triton kernel cannot serve these inputs (empty list: it can)."""
    scalars = [s for s in (alpha, beta) if isinstance(s, torch.Tensor)]
    reasons = common_reasons(x, residual, weight, bias, *scalars) + dtype_reason("x", x)
    if x.dim() == 0:
        return [*reasons, "x must have at least one dimension"]
    n = x.shape[-1]
    if not 0 < n <= MAX_HIDDEN:
        reasons.append(f"hidden size {n} is outside 1..{MAX_HIDDEN} (one row is one block)")
    if residual is not None:
        if residual.shape != x.shape:
            reasons.append(f"residual shape {tuple(residual.shape)} differs from x shape {tuple(x.shape)}")
        reasons += dtype_reason("residual", residual)
    for name, param in (("weight", weight), ("bias", bias)):
        if param is not None:
            if param.shape != (n,):
                reasons.append(f"{name} shape {tuple(param.shape)} is not ({n},)")
            reasons += dtype_reason(name, param)
    return reasons + scalar_reason("alpha", alpha, x) + scalar_reason("beta", beta, x)


def add_layernorm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    alpha: float | torch.Tensor = 1.0,
    beta: float | torch.Tensor = 1.0,
    return_sum: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``LayerNorm(alpha * x + beta * residual)`` over the last dim, in x's dtype; ``(normed, sum)`` if ``return_sum``.

    ``residual=None`` gives a plain LayerNorm (of ``alpha * x``). On CUDA this calls the custom ops
    ``torch.ops.btfast.add_layernorm[_sum]`` (visible to ``torch.compile``); elsewhere (TRITON_INTERPRET=1 on
    CPU) it launches the kernel directly, since older torch's ``wrap_triton`` rejects interpreted kernels.
    """
    require_triton()
    reasons = add_layernorm_unsupported_reasons(x, residual, weight, bias, alpha, beta)
    if reasons:
        raise ValueError("add_layernorm: " + "; ".join(reasons))
    alpha_t, alpha_f = (alpha, 1.0) if isinstance(alpha, torch.Tensor) else (None, float(alpha))
    beta_t, beta_f = (beta, 1.0) if isinstance(beta, torch.Tensor) else (None, float(beta))
    args = (x, residual, weight, bias, float(eps), alpha_f, beta_f, alpha_t, beta_t)
    if CUSTOM_OPS and x.is_cuda:
        return torch.ops.btfast.add_layernorm_sum(*args) if return_sum else torch.ops.btfast.add_layernorm(*args)
    normed, total = _launch(_add_layernorm_kernel, *args, return_sum)
    return (normed, total) if return_sum else normed


def add_layernorm_reference(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    alpha: float | torch.Tensor = 1.0,
    beta: float | torch.Tensor = 1.0,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch ``(LayerNorm(alpha * x + beta * residual), sum)``: the engine's torch path for this op
    (``upcast=True``, the output cast back to x's dtype) and the kernel's test reference.

    ``upcast=True``: everything in fp32 (the ground truth tests compare against). ``upcast=False``: in the inputs'
    dtype (its error against fp32 sets the tests' tolerance). A factor of exactly 1.0 is not multiplied.
    """

    def cast(t: torch.Tensor | float | None) -> torch.Tensor | float | None:
        return t.float() if upcast and isinstance(t, torch.Tensor) else t

    def scaled(t: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
        return t if isinstance(s, float) and s == 1.0 else t * s

    x, residual, weight, bias, alpha, beta = map(cast, (x, residual, weight, bias, alpha, beta))
    total = scaled(x, alpha) if residual is None else scaled(x, alpha) + scaled(residual, beta)
    return F.layer_norm(total, (x.shape[-1],), weight, bias, eps), total
