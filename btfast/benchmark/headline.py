"""The first GPU contact (`btfast bench --preset headline`): a smoke test, then where the time goes.

Smoke (before any timing; a failure is reported and the benchmark still runs):
    kernels  every Triton kernel against its torch path at the model's shapes (the kernel race's cases, batch 2)
    engine   btfast (every kernel, eager) against HF eager in the same dtype and in fp32, on one batch
    graphs   a CUDA-graph replay of btfast's forward against an eager call of the same ops

Where the time goes: a `torch.profiler` split of one call of a system by category (GEMM, attention, add/LayerNorm,
pointwise, copies, and the idle gaps between kernels), GEMMs by M×N×K where the profiler sees shapes (eager calls)
and by kernel name where it does not (a CUDA-graph replay); and each btfast system's kernel race verdicts, with
both timings (`verdicts`).
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from btfast.runtime import DTYPES

# category of a profiled op or kernel, by the first pattern its lowercased name matches
CATEGORIES = (
    ("attention", re.compile(r"attention|attn|fmha|flash|softmax|sdpa")),
    ("add/layernorm", re.compile(r"layer_?norm")),
    ("gemm", re.compile(r"gemm|matmul|addmm|\bmm\b|aten::mm|bmm|linear|cutlass|xmma|cublas|sm\d\d_")),
    ("copies", re.compile(r"copy|memcpy|memset|\bcat\b|aten::cat|contiguous|clone|index")),
)
TOLERANCE = {"fp32": 1e-4, "bf16": 6e-2, "fp16": 1e-2}  # README's fidelity bounds, relative to the largest value


def category(name: str) -> str:
    low = name.lower()
    return next((cat for cat, pattern in CATEGORIES if pattern.search(low)), "pointwise")


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float().cpu(), want.float().cpu()
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _check(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one smoke check; its result, or its failure with the reason: never raises."""
    t0 = time.perf_counter()
    try:
        out = fn()
    except Exception as e:
        text = " ".join(str(e).split())[:300]
        out = dict(status="failed", detail=f"{type(e).__name__}: {text}")
    return dict(check=name, **out, seconds=time.perf_counter() - t0)


def smoke(
    fresh: Callable[[], torch.nn.Module], inputs: dict[str, torch.Tensor], device: torch.device, dtype: str
) -> list[dict[str, Any]]:
    """The three smoke checks on `inputs` (one batch of the model `fresh()` builds); see the module docstring."""
    import btfast
    from btfast.kernel_race import Workload, cases
    from btfast.ops import Ops
    from btfast.spec import read_spec

    dt = DTYPES[dtype]
    on_cuda = device.type == "cuda"
    outputs: dict[str, torch.Tensor] = {}

    def hf(name: str, cast: torch.dtype) -> torch.Tensor:
        if name not in outputs:
            model = fresh().to(device=device, dtype=cast)
            batch = {k: v.to(device) for k, v in inputs.items()}
            batch["pixel_values"] = batch["pixel_values"].to(cast)
            with torch.no_grad():
                outputs[name] = model(**batch).logits.float().cpu()
            del model
        return outputs[name]

    def engine(graphs: bool) -> torch.Tensor:
        fast = btfast.optimize(fresh(), dtype=dt, device=device, kernels="all", compile=False, cuda_graphs=graphs)
        with torch.no_grad():
            for _ in range(2 if graphs else 1):  # graphs: the first call captures, the second replays
                out = fast(**{k: v.to(device) for k, v in inputs.items()}).logits
        return out.float().cpu()

    def kernels() -> dict[str, Any]:
        if not on_cuda:
            return dict(status="skipped", detail=f"the Triton kernels run on CUDA only (here: {device.type})")
        worst: dict[str, float] = {}
        for case in cases(Ops("all"), Workload.of(read_spec(fresh()), batch=2), device, dt):
            with torch.no_grad():
                worst[case.name] = _rel(case.triton(), case.torch())
        bad = {k: v for k, v in worst.items() if not v <= 3 * TOLERANCE[dtype]}
        detail = f"{len(worst)} cases, worst {max(worst.values()):.2e} ({max(worst, key=worst.get)})"
        return dict(status="failed" if bad else "ok", detail=detail, errors=worst)

    def engine_vs_hf() -> dict[str, Any]:
        got, same, ref = engine(False), hf(f"hf-eager-{dtype}", dt), hf("hf-eager-fp32", torch.float32)
        err, hf_err = _rel(got, ref), _rel(same, ref)
        ok = err <= TOLERANCE[dtype] and err <= 2 * hf_err + 1e-3
        detail = f"max rel err vs hf-eager-fp32 {err:.2e} (hf-eager-{dtype}: {hf_err:.2e}); vs hf-eager-{dtype} "
        detail += f"{_rel(got, same):.2e}"
        return dict(status="ok" if ok else "failed", detail=detail, error=err, hf_error=hf_err)

    def graph_replay() -> dict[str, Any]:
        if not on_cuda:
            return dict(status="skipped", detail=f"CUDA graphs need CUDA (here: {device.type})")
        diff = _rel(engine(True), engine(False))
        return dict(status="ok" if diff <= 1e-3 else "failed", detail=f"max rel diff replay vs eager {diff:.2e}")

    return [_check("kernels", kernels), _check("engine", engine_vs_hf), _check("graphs", graph_replay)]


def verdicts(fast: Any) -> dict[str, Any]:
    """A btfast model's kernel race: per op, both timings (ms per forward) and whether its Triton kernel serves."""
    ops = fast.ops
    laps = {
        op: dict(triton_ms=lap.triton_ms, torch_ms=lap.torch_ms, speedup=lap.speedup, serves=op not in ops.off)
        for op, lap in ops.verdicts.laps.items()
    }
    where = ops.verdicts.where or "no race (kernels asked for by name, or off CUDA)"
    return dict(note=where, laps=laps, off=dict(ops.off))


def profile(call: Callable[[], Any], device: torch.device) -> dict[str, Any]:
    """One call of `call` under torch.profiler, its time split by category (see `CATEGORIES`): on CUDA the kernels'
    device time, on CPU the ops' own time; `idle` is the call's wall (device) time not covered by either."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with torch.no_grad():
        call()  # warm: nothing is built inside the profile
        if on_cuda:
            torch.cuda.synchronize(device)
        with torch_profile(activities=activities, record_shapes=True) as prof:
            t0 = time.perf_counter()
            call()
            if on_cuda:
                torch.cuda.synchronize(device)
            wall_us = (time.perf_counter() - t0) * 1e6
    by_cat: dict[str, float] = defaultdict(float)
    gemms: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for ev in prof.key_averages(group_by_input_shape=True):
        if on_cuda:
            us = ev.self_device_time_total if ev.device_type == torch.autograd.DeviceType.CUDA else 0.0
        else:
            us = ev.self_cpu_time_total if ev.key.startswith("aten::") else 0.0
        if us <= 0:
            continue
        cat = category(ev.key)
        by_cat[cat] += us
        if cat == "gemm":
            key = _mnk(ev.key, ev.input_shapes) or ev.key[:80]
            gemms[key][0] += us
            gemms[key][1] += ev.count
    busy = sum(by_cat.values())
    by_cat["idle"] = max(0.0, wall_us - busy)
    total = sum(by_cat.values()) or 1.0
    return dict(
        wall_ms=wall_us / 1e3,
        source="CUDA kernels' device time" if on_cuda else "CPU aten ops' self time",
        categories={k: dict(ms=v / 1e3, share=v / total) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        gemm=[
            dict(what=k, ms=v[0] / 1e3, calls=int(v[1]))
            for k, v in sorted(gemms.items(), key=lambda kv: -kv[1][0])[:12]
        ],
    )


def _mnk(name: str, shapes: Any) -> str | None:
    """'M×N×K' of an aten GEMM from its input shapes (addmm: bias, x, w; mm / linear: x, w), else None."""
    if not shapes:
        return None
    dims = [s for s in shapes if isinstance(s, list) and len(s) >= 2]
    if len(dims) < 2:
        return None
    x, w = dims[0], dims[1]
    m = 1
    for d in x[:-1]:
        m *= d
    k = x[-1]
    n = w[0] if name.endswith("linear") else w[-1]
    return f"{m}x{n}x{k}"
