"""Compile every autotune config of btfast's Triton kernels for an H100 (sm_90) without a GPU.

Triton compiles ahead of time for a named target, so on a CPU machine this checks that each (kernel, dtype,
config) the autotuners may pick lowers to a cubin with the installed Triton, and that its shared memory fits
the H100's 227 KiB per block. It says nothing about speed. Writes one JSON row per compile:

    python bench/sm90_compile_check.py --out bench/results/<date>-sm90-compile-triton<version>.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource

import btfast.kernels  # noqa: F401  (registers the modules below)

LINEAR, ATTENTION, NORM = (sys.modules[f"btfast.kernels.{m}"] for m in ("linear", "attention", "add_layernorm"))
H100 = GPUTarget("cuda", 90, 32)
H100_SHARED = 232_448  # bytes of dynamic shared memory one block may use
TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _compile(jit: object, signature: dict, constants: dict, config: object, aligned: tuple[str, ...]) -> dict:
    attrs = {(jit.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    start = time.perf_counter()
    try:
        compiled = triton.compile(
            ASTSource(jit, signature, constants, attrs),
            target=H100,
            options=dict(num_warps=config.num_warps, num_stages=config.num_stages),
        )
        shared = compiled.metadata.shared
        return {"ok": shared <= H100_SHARED, "shared_bytes": shared, "seconds": round(time.perf_counter() - start, 2)}
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"}


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def linear_rows(dtype: torch.dtype) -> list[dict]:
    tuned = LINEAR._TUNED[dtype == torch.float32]
    p = "*" + TYPES[dtype]
    signature = {n: "i32" for n in tuned.fn.arg_names}
    signature.update(X=p, W=p, Bias=p, Res=p, Out=p)
    constexprs = ("stride_xk", "stride_wk", "stride_rn", "stride_on", "ACTIVATION", "HAS_BIAS", "HAS_RESIDUAL")
    constexprs += ("PRECISION", "UPCAST_DOT", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    rows = []
    for config in tuned.configs:
        constants = dict(stride_xk=1, stride_wk=1, stride_rn=1, stride_on=1, ACTIVATION="gelu", HAS_BIAS=True)
        constants |= dict(HAS_RESIDUAL=True, PRECISION=_precision(dtype), UPCAST_DOT=False, **config.kwargs)
        aligned = ("X", "W", "Bias", "Res", "Out", "N", "K", "stride_xm", "stride_wn", "stride_rm", "stride_om")
        result = _compile(tuned.fn, signature, constants, config, aligned)
        rows.append({"kernel": "linear", "dtype": TYPES[dtype], **config.kwargs, "stages": config.num_stages,
                     "warps": config.num_warps, **result})  # fmt: skip
    return rows


def attention_rows(dtype: torch.dtype, head_dim: int) -> list[dict]:
    tuned = ATTENTION._TUNED[dtype == torch.float32]
    p = "*" + TYPES[dtype]
    signature = {n: "i32" for n in tuned.fn.arg_names}
    signature.update(Q=p, K=p, V=p, Mask="*u8", Out=p, qk_scale="fp32")
    constexprs = ("stride_qd", "stride_kd", "stride_vd", "stride_mn", "stride_od", "HEAD_DIM", "HAS_MASK")
    constexprs += ("PRECISION", "UPCAST_DOT", "MASKED_SCORE", "BLOCK_M", "BLOCK_N")
    signature.update(dict.fromkeys(constexprs, "constexpr"))
    rows = []
    for config in tuned.configs:
        constants = dict(stride_qd=1, stride_kd=1, stride_vd=1, stride_mn=1, stride_od=1, HEAD_DIM=head_dim)
        constants |= dict(HAS_MASK=True, PRECISION=_precision(dtype), UPCAST_DOT=False, MASKED_SCORE=-1e30)
        result = _compile(tuned.fn, signature, constants | config.kwargs, config, ("Q", "K", "V", "Out"))
        rows.append({"kernel": "attention", "dtype": TYPES[dtype], "head_dim": head_dim, **config.kwargs,
                     "stages": config.num_stages, "warps": config.num_warps, **result})  # fmt: skip
    return rows


def norm_rows(dtype: torch.dtype, hidden: int) -> list[dict]:
    tuned = NORM._add_layernorm_kernel
    p = "*" + TYPES[dtype]
    signature = {n: "i32" for n in tuned.fn.arg_names}
    signature.update(X=p, R=p, W=p, B=p, Alpha="*fp32", Beta="*fp32", Out=p, Sum=p, eps="fp32", alpha="fp32")
    signature["beta"] = "fp32"
    flags = ("HAS_RESIDUAL", "HAS_WEIGHT", "HAS_BIAS", "ALPHA_FROM_PTR", "BETA_FROM_PTR", "STORE_SUM", "BLOCK_N")
    signature.update(dict.fromkeys(flags, "constexpr"))
    constants = dict.fromkeys(flags[:-1], True) | {"BETA_FROM_PTR": False, "BLOCK_N": triton.next_power_of_2(hidden)}
    rows = []
    for config in tuned.configs:
        result = _compile(tuned.fn, signature, constants, config, ("X", "R", "W", "B", "Out", "Sum"))
        rows.append({"kernel": "add_layernorm", "dtype": TYPES[dtype], "hidden": hidden, "warps": config.num_warps,
                     **result})  # fmt: skip
    return rows


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--kernels", default="add_layernorm,linear,attention", help="comma-separated subset")
    args = parser.parse_args()
    wanted = args.kernels.split(",")
    rows: list[dict] = []
    for dtype in TYPES:
        if "add_layernorm" in wanted:
            rows += [r for hidden in (768, 1024, 4096) for r in norm_rows(dtype, hidden)]
        if "linear" in wanted:
            rows += linear_rows(dtype)
        if "attention" in wanted:
            rows += attention_rows(dtype, 64)
        print(f"{TYPES[dtype]}: {sum(r['ok'] for r in rows)}/{len(rows)} compiled and fit so far", flush=True)
    report = {
        "what": "every autotune config compiled ahead of time for sm_90 (no GPU): lowers, and fits shared memory",
        "target": "cuda sm_90, warp 32",
        "commit": os.environ.get("BTFAST_COMMIT") or _commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "rows": rows,
        "failed": [r for r in rows if not r["ok"]],
    }
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"{len(rows) - len(report['failed'])}/{len(rows)} ok -> {args.out}")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
