"""Micro-benchmarks of btfast's Triton kernels against the torch ops they replace, at BridgeTower's real shapes.

Each case times the kernel and its eager-torch counterpart with ``triton.testing.do_bench`` (median of the
timed runs, after one untimed call that autotunes and compiles), and records the largest difference between
their outputs. The counterparts:

* ``add_layernorm``: ``F.layer_norm(x + r)`` (and the bridges' ``x * s + r`` / ``x * (1 - b) + r * b``);
* ``linear``: ``F.linear`` then a separate GELU / QuickGELU and residual add;
* ``attention``: ``F.scaled_dot_product_attention`` with the same key padding mask (as a boolean mask).

Shapes: base (hidden 768, FFN 3072, 12 heads, 325 image tokens) and large (1024, 4096, 16, 442) with texts of
40 tokens, ``--batch`` image-text pairs per call. Needs a CUDA GPU; writes every figure, with the device and
the torch / triton / CUDA versions, to the JSON file given by ``--out``.

    python bench/kernels_bench.py --out bench/results/kernels.json [--batch 32] [--dtype bf16] [--compile]
"""

import argparse
import json
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from btfast.kernels import add_layernorm, attention, linear

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MODELS = {
    "base": {"hidden": 768, "ffn": 3072, "heads": 12, "image_tokens": 325},
    "large": {"hidden": 1024, "ffn": 4096, "heads": 16, "image_tokens": 442},
}
TEXT_TOKENS = 40
HEAD_DIM = 64


@dataclass
class Case:
    """One comparison: the Triton kernel, the torch code it replaces, and the work both do."""

    kernel: str
    name: str
    shape: dict
    triton_fn: Callable[[], object]
    torch_fn: Callable[[], object]
    flops: float = 0.0
    bytes: float = 0.0
    extra: dict = field(default_factory=dict)


def _first(out: object) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def layernorm_case(m: int, hidden: int, mode: str, dtype: torch.dtype, device: str, name: str = "") -> Case:
    """``mode``: "add" (post-LN), "add_sum" (pre-LN stream, sum kept), "scaled_add" / "interpolate" (bridges)."""
    x, r = (torch.randn(m, hidden, dtype=dtype, device=device) for _ in range(2))
    w, b = torch.randn(hidden, dtype=dtype, device=device), torch.randn(hidden, dtype=dtype, device=device)
    s = torch.tensor(0.7, dtype=dtype, device=device)
    if mode == "scaled_add":
        alpha, beta = s, 1.0
    elif mode == "interpolate":
        alpha, beta = 1 - s, s
    else:
        alpha, beta = 1.0, 1.0
    keep_sum = mode == "add_sum"

    def with_triton() -> object:
        return add_layernorm(x, r, w, b, 1e-5, alpha, beta, return_sum=keep_sum)

    def with_torch() -> object:
        total = x * alpha + r * beta if mode in ("scaled_add", "interpolate") else x + r
        normed = F.layer_norm(total, (hidden,), w, b, 1e-5)
        return (normed, total) if keep_sum else normed

    moved = (2 + 1 + keep_sum) * m * hidden * x.element_size()
    return Case(
        "add_layernorm", name or mode, {"M": m, "hidden": hidden, "mode": mode}, with_triton, with_torch, bytes=moved
    )


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation == "gelu":
        return F.gelu(y)
    if activation == "quick_gelu":
        return y * torch.sigmoid(1.702 * y)
    return y


def linear_case(
    m: int, k: int, n: int, activation: str | None, with_residual: bool, dtype: torch.dtype, device: str, name: str
) -> Case:
    x = torch.randn(m, k, dtype=dtype, device=device)
    w = (torch.randn(n, k, device=device) / math.sqrt(k)).to(dtype)
    b = torch.randn(n, dtype=dtype, device=device)
    r = torch.randn(m, n, dtype=dtype, device=device) if with_residual else None

    def with_triton() -> object:
        return linear(x, w, b, activation, r)

    def with_torch() -> object:
        y = _activate(F.linear(x, w, b), activation)
        return y + r if r is not None else y

    moved = (m * k + n * k + m * n * (2 if with_residual else 1)) * x.element_size()
    shape = {"M": m, "K": k, "N": n, "activation": activation, "residual": with_residual}
    return Case("linear", name, shape, with_triton, with_torch, flops=2.0 * m * n * k, bytes=moved)


def attention_case(
    batch: int, heads: int, lq: int, lk: int, masked: bool, dtype: torch.dtype, device: str, name: str
) -> Case:
    """Masked cases pad each row to a random length >= 1 (SDPA gives NaN on all-masked rows; ours would not)."""
    q = torch.randn(batch, heads, lq, HEAD_DIM, dtype=dtype, device=device)
    k, v = (torch.randn(batch, heads, lk, HEAD_DIM, dtype=dtype, device=device) for _ in range(2))
    mask = None
    if masked:
        lengths = torch.randint(1, lk + 1, (batch,), device=device)
        mask = torch.arange(lk, device=device)[None, :] < lengths[:, None]
    sdpa_mask = mask[:, None, None, :] if mask is not None else None

    def with_triton() -> object:
        return attention(q, k, v, mask)

    def with_torch() -> object:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask)

    moved = (2 * batch * heads * lq * HEAD_DIM + 2 * batch * heads * lk * HEAD_DIM) * q.element_size()
    shape = {"B": batch, "H": heads, "Lq": lq, "Lk": lk, "D": HEAD_DIM, "masked": masked}
    return Case(
        "attention", name, shape, with_triton, with_torch, flops=4.0 * batch * heads * lq * lk * HEAD_DIM, bytes=moved
    )


def model_cases(model: str, batch: int, dtype: torch.dtype, device: str) -> list[Case]:
    """The hot paths of one BridgeTower size, for ``batch`` image-text pairs."""
    cfg = MODELS[model]
    hidden, ffn, heads, image = cfg["hidden"], cfg["ffn"], cfg["heads"], cfg["image_tokens"]
    text_m, image_m = batch * TEXT_TOKENS, batch * image
    cases = [
        layernorm_case(text_m, hidden, "add", dtype, device, f"{model} text post-LN"),
        layernorm_case(image_m, hidden, "add_sum", dtype, device, f"{model} vision pre-LN stream"),
        layernorm_case(text_m, hidden, "scaled_add", dtype, device, f"{model} bridge scaled_add"),
        layernorm_case(image_m, hidden, "interpolate", dtype, device, f"{model} bridge interpolate"),
    ]
    for side, m, act in (("text", text_m, "gelu"), ("vision", image_m, "quick_gelu")):
        cases += [
            linear_case(m, hidden, 3 * hidden, None, False, dtype, device, f"{model} {side} fused QKV"),
            linear_case(m, hidden, hidden, None, True, dtype, device, f"{model} {side} attn out + residual"),
            linear_case(m, hidden, ffn, act, False, dtype, device, f"{model} {side} FFN up + {act}"),
            linear_case(m, ffn, hidden, None, True, dtype, device, f"{model} {side} FFN down + residual"),
        ]
    cases += [
        attention_case(batch, heads, TEXT_TOKENS, TEXT_TOKENS, True, dtype, device, f"{model} text self"),
        attention_case(batch, heads, image, image, False, dtype, device, f"{model} vision self"),
        attention_case(batch, heads, TEXT_TOKENS, image, False, dtype, device, f"{model} cross text->image"),
        attention_case(batch, heads, image, TEXT_TOKENS, True, dtype, device, f"{model} cross image->text"),
    ]
    return cases


def measure(case: Case, compile_baseline: bool) -> dict:
    """Time both sides (ms, median and 20th/80th percentiles) and compare their outputs."""
    from triton.testing import do_bench

    ours, theirs = _first(case.triton_fn()), _first(case.torch_fn())  # autotune / compile outside the timing
    row = {"kernel": case.kernel, "case": case.name, "shape": case.shape}
    row["max_abs_diff"] = (ours.float() - theirs.float()).abs().max().item()
    for label, fn in (("triton", case.triton_fn), ("torch", case.torch_fn)):
        median, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        row[f"{label}_ms"], row[f"{label}_ms_p20"], row[f"{label}_ms_p80"] = median, p20, p80
    if compile_baseline:
        compiled = torch.compile(case.torch_fn)
        compiled()
        row["torch_compile_ms"] = do_bench(compiled, return_mode="median")
        row["speedup_vs_torch_compile"] = row["torch_compile_ms"] / row["triton_ms"]
    row["speedup_vs_torch"] = row["torch_ms"] / row["triton_ms"]
    if case.flops:
        row["triton_tflops"] = case.flops / row["triton_ms"] / 1e9
        row["torch_tflops"] = case.flops / row["torch_ms"] / 1e9
    row["triton_gbps"] = case.bytes / row["triton_ms"] / 1e6
    row["torch_gbps"] = case.bytes / row["torch_ms"] / 1e6
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--batch", type=int, default=32, help="image-text pairs per call (default 32)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=sorted(MODELS))
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the torch side")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("kernels_bench.py needs a CUDA GPU (torch.cuda.is_available() is False); nothing was measured.")
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("kernels_bench.py times compiled kernels: unset TRITON_INTERPRET.")
    import triton

    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    results = []
    for model in args.models:
        for case in model_cases(model, args.batch, dtype, "cuda"):
            row = measure(case, args.compile)
            results.append(row)
            print(
                f"{row['case']:<40} triton {row['triton_ms']:8.4f} ms  torch {row['torch_ms']:8.4f} ms  "
                f"x{row['speedup_vs_torch']:5.2f}  max|diff| {row['max_abs_diff']:.2e}",
                flush=True,
            )
    report = {
        "device": torch.cuda.get_device_name(),
        "capability": ".".join(map(str, torch.cuda.get_device_capability())),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "dtype": args.dtype,
        "batch": args.batch,
        "timer": "triton.testing.do_bench, median ms (p20/p80 alongside)",
        "results": results,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
