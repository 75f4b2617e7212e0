"""Flash-style attention forward: ``softmax(q @ k.T * scale + mask) @ v``, non-causal, with a key padding mask.

BridgeTower attends within each tower (text 40-50 tokens with padding, vision 325/442 tokens, no mask) and
across them (text queries over image keys and the reverse), always with head dim 64. Unfused, torch writes
the (B, H, Lq, Lk) score and probability matrices to memory; here a program owns BLOCK_M query rows of one
(batch, head), keeps them in registers and streams the keys and values in BLOCK_N chunks with an online
softmax (running max and denominator, fp32), so only q, k, v are read and the output written once.

Semantics follow the HF eager reference: masked keys get a huge negative score, not -inf. A row whose keys
are all masked therefore comes out as the plain average of all Lk values (uniform weights), like the
reference (which adds ``finfo.min``), never NaN. Keys past Lk in the last block (block padding) are -inf.

Inputs are read through their strides (q/k/v may be views into one fused QKV projection). The output is
returned as a (B, H, Lq, D) view of a (B, Lq, H, D) buffer, so ``out.transpose(1, 2).reshape(B, Lq, H * D)``
for the output projection costs no copy.
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

HEAD_DIMS = (16, 32, 64, 128)

# Offsets are int32 element offsets: every operand must stay below 2**31 elements.
_MAX_ELEMENTS = 2**31 - 1

# Score given to masked keys: far below any real score, far above -inf, so exp2 of (masked - row max) is 0
# next to a real key, and an all-masked row has equal scores everywhere (uniform weights).
_MASKED_SCORE = -1.0e30


def _config(bm: int, bn: int, stages: int, warps: int) -> object:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_stages=stages, num_warps=warps)


# BLOCK_M query rows x BLOCK_N keys per step; head dim 64 at bf16 keeps a 128x64 q tile and the 128x64
# accumulator in registers with 4-8 warps. BLOCK_N 32 suits the short (40-50 token) text keys. Under the
# interpreter 16x16 blocks keep the tests quick and still cross block edges.
_CONFIGS = (
    [_config(16, 16, 1, 4)]
    if INTERPRET
    else [_config(bm, bn, s, w) for bm in (64, 128) for bn in (32, 64) for s in (2, 3) for w in (4, 8)]
)
# fp32 tiles take twice the shared memory and compile slowly: a short list of the ones that fit easily
_FP32_CONFIGS = _CONFIGS if INTERPRET else [_config(64, bn, 2, w) for bn in (32, 64) for w in (4, 8)]
_KEY = ["Lq", "Lk", "HEAD_DIM"]


@triton.jit
def _attention_kernel(
    Q,
    K,
    V,
    Mask,
    Out,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_qm,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kn,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vn,
    stride_vd,
    stride_mb,
    stride_mn,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    H,
    Lq,
    Lk,
    HEAD_DIM: tl.constexpr,
    HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    MASKED_SCORE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # One flat grid, query blocks fastest: neighbouring programs share one head's K and V in L2, and
    # batch x heads never meets the 65535 limit of the grid's second axis.
    pid = tl.program_id(0)
    num_m = tl.cdiv(Lq, BLOCK_M)
    pid_m = pid % num_m
    bh = pid // num_m
    b = bh // H
    h = bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=offs_m[:, None] < Lq, other=0.0)
    if UPCAST_DOT:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running max (log2 domain)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running softmax denominator
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    # Every block starts below Lk, so it holds a real (maybe masked) key and m_i becomes finite at once.
    for start_n in range(0, Lk, BLOCK_N):
        keys = start_n + offs_n
        in_range = keys < Lk
        k = tl.load(k_base + keys[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=in_range[None, :], other=0.0)
        if UPCAST_DOT:
            k = k.to(tl.float32)
        s = tl.dot(q, k, input_precision=PRECISION) * qk_scale
        if HAS_MASK:
            keep = tl.load(Mask + b * stride_mb + keys * stride_mn, mask=in_range, other=0) != 0
            s = tl.where(keep[None, :], s, MASKED_SCORE)
        s = tl.where(in_range[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        correction = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * correction + tl.sum(p, axis=1)
        v = tl.load(v_base + keys[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=in_range[:, None], other=0.0)
        if UPCAST_DOT:
            v = v.to(tl.float32)
        acc = tl.dot(p.to(v.dtype), v, acc * correction[:, None], input_precision=PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=offs_m[:, None] < Lq)


# The kernel autotuned over the tiles for its input dtype.
_TUNED = {
    True: triton.autotune(configs=_FP32_CONFIGS, key=_KEY)(_attention_kernel),
    False: triton.autotune(configs=_CONFIGS, key=_KEY)(_attention_kernel),
}


def _launch(
    kernel: object,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Run ``kernel`` (raw or ``wrap_triton``-wrapped); returns (B, H, Lq, D) over a (B, Lq, H, D) buffer."""
    batch, heads, lq, head_dim = q.shape
    lk = k.shape[2]
    out = torch.empty((batch, lq, heads, head_dim), dtype=q.dtype, device=q.device).permute(0, 2, 1, 3)
    if key_mask is not None and key_mask.dtype == torch.bool:
        key_mask = key_mask.view(torch.uint8)  # same bytes; Triton loads uint8 everywhere
    if out.numel() > 0:

        def grid(meta: dict) -> tuple[int]:
            return (triton.cdiv(lq, meta["BLOCK_M"]) * batch * heads,)

        kernel[grid](
            q,
            k,
            v,
            key_mask if key_mask is not None else q,
            out,
            scale * math.log2(math.e),
            *q.stride(),
            *k.stride(),
            *v.stride(),
            *(key_mask.stride() if key_mask is not None else (0, 0)),
            *out.stride(),
            heads,
            lq,
            lk,
            HEAD_DIM=head_dim,
            HAS_MASK=key_mask is not None,
            PRECISION=dot_precision(q.dtype),
            UPCAST_DOT=upcast_dot(q.dtype),
            MASKED_SCORE=_MASKED_SCORE,
        )
    return out


def _attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """``torch.ops.btfast.attention``."""
    return _launch(wrap_triton(_TUNED[q.dtype == torch.float32]), q, k, v, key_mask, scale)


if CUSTOM_OPS:
    triton_op("btfast::attention", _attention_op, mutates_args=())


def attention_unsupported_reasons(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> list[str]:
    """Why the Triton kernel cannot serve these inputs (empty list: it can)."""
    reasons = common_reasons(q, k, v, key_mask) + dtype_reason("q", q)
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return [*reasons, "q, k and v must be 4-D (batch, heads, length, head_dim)"]
    if k.dtype != q.dtype or v.dtype != q.dtype:
        reasons.append(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    batch, heads, _, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[1] != heads or k.shape[3] != head_dim:
        reasons.append(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if head_dim not in HEAD_DIMS:
        reasons.append(f"head dim {head_dim} is not one of {HEAD_DIMS}")
    if k.shape[2] == 0:
        reasons.append("no keys (Lk == 0)")
    if key_mask is not None:
        if tuple(key_mask.shape) != (batch, k.shape[2]):
            reasons.append(f"key_mask shape {tuple(key_mask.shape)} is not (batch, Lk) = {(batch, k.shape[2])}")
        if key_mask.dtype.is_floating_point or key_mask.dtype.is_complex:
            reasons.append(f"key_mask dtype {key_mask.dtype} is not bool or integer (additive masks unsupported)")
    if max(q.numel(), *(index_span(t) for t in (q, k, v))) > _MAX_ELEMENTS:
        reasons.append("an operand spans 2**31 elements or more (the kernel uses int32 offsets)")
    return reasons


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """``softmax(q @ k.T * scale, keys masked where key_mask == 0) @ v`` for (B, H, L, D) inputs.

    ``key_mask`` is (B, Lk), bool or integer, nonzero = attend; ``scale`` defaults to ``1 / sqrt(D)``. Lq and Lk
    may differ (cross-attention). Returns (B, H, Lq, D) in q's dtype (a view of a (B, Lq, H, D) buffer). On
    CUDA this calls the custom op ``torch.ops.btfast.attention``; elsewhere (TRITON_INTERPRET=1 on CPU) it
    launches the kernel directly.
    """
    require_triton()
    reasons = attention_unsupported_reasons(q, k, v, key_mask)
    if reasons:
        raise ValueError("attention: " + "; ".join(reasons))
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if CUSTOM_OPS and q.is_cuda:
        return torch.ops.btfast.attention(q, k, v, key_mask, scale)
    return _launch(_TUNED[q.dtype == torch.float32], q, k, v, key_mask, scale)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """HF eager attention's math through SDPA: ``finfo(dtype).min`` added at masked keys (a row with every key
    masked averages all values, as the reference's), softmax, @ v. In fp32 if ``upcast`` (the kernel's test
    reference), else in q's dtype (the engine's torch path for this op)."""
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    bias = None
    if key_mask is not None:
        masked = (key_mask == 0)[:, None, None, :]
        bias = masked.to(q.dtype) * torch.finfo(q.dtype).min
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
