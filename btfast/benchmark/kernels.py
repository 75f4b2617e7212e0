"""`btfast bench --mode kernels`: each Triton kernel against the torch path it replaces, at a model's own shapes.

The cases are the kernel race's (`btfast.kernel_race.cases`: every call shape one forward makes, and how often),
timed the race's way on CUDA (`kernel_race.cuda_timer`: CUDA events around CUDA-graph replays), so these figures
are the ones `optimize()` decides on, case by case. Off CUDA the kernels run only under TRITON_INTERPRET=1 (a
plumbing check: interpreted times mean nothing), each timed once after an untimed call (`timing.timed_call`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

from btfast.benchmark import timing
from btfast.benchmark.progress import Progress
from btfast.runtime import DTYPES


def _cpu_timer(fn: Callable[[], object]) -> float:
    fn()
    return timing.timed_call(fn, torch.device("cpu"), memory=False)[0] * 1e3


def run(config: Any, batch: int, text_len: int, dtype: str, device: torch.device, progress: Progress) -> dict:
    """Time every case of the race at (batch, text_len) on a model of `config`: per case ms per call on each side and
    the outputs' largest relative difference; per op ms per forward (calls × ms, summed), as the race adds them."""
    from transformers import BridgeTowerForImageAndTextRetrieval

    from btfast.kernel_race import Workload, cases, cuda_timer
    from btfast.ops import Ops
    from btfast.spec import read_spec

    with torch.device("meta"):  # the spec needs the config only: no weights are built
        spec = read_spec(BridgeTowerForImageAndTextRetrieval(config))
    workload = Workload.of(spec, batch=batch, text_len=text_len)
    ops = Ops("all")
    if ops.kernels is None:
        raise RuntimeError(f"the Triton kernels cannot be imported: {ops.off}")
    timer = cuda_timer(graphs=True) if device.type == "cuda" else _cpu_timer
    rows, per_op = [], defaultdict(lambda: [0.0, 0.0])
    for case in cases(ops, workload, device, DTYPES[dtype]):
        progress.status(f"{case.op}: {case.name}")
        with torch.no_grad():
            got, want = case.triton().float(), case.torch().float()
            diff = ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
            triton_ms, torch_ms = timer(case.triton), timer(case.torch)
        rows.append(
            dict(op=case.op, case=case.name, calls=case.calls, triton_ms=triton_ms, torch_ms=torch_ms,
                 speedup=torch_ms / triton_ms, max_rel_diff=diff)
        )  # fmt: skip
        per_op[case.op][0] += case.calls * triton_ms
        per_op[case.op][1] += case.calls * torch_ms
        progress.advance(f"{case.name}: Triton {triton_ms:.4g} ms, torch {torch_ms:.4g} ms")
    ops_total = {op: dict(triton_ms=t, torch_ms=r, speedup=r / t, triton_wins=t < r) for op, (t, r) in per_op.items()}
    return dict(workload=workload.describe(), dtype=dtype, cases=rows, per_forward=ops_total)


def markdown(entry: dict[str, Any]) -> list[str]:
    lines = ["", f"## Kernels against torch: {entry['workload']}, {entry['dtype']}", ""]
    lines += ["| op | case | calls per forward | Triton ms | torch ms | speed-up | max rel diff |"]
    lines += ["|---|---|---:|---:|---:|---:|---:|"]
    for r in entry["cases"]:
        lines.append(f"| {r['op']} | {r['case']} | {r['calls']} | {r['triton_ms']:.4g} | {r['torch_ms']:.4g} | "
                     f"{r['speedup']:.2f}× | {r['max_rel_diff']:.1e} |")  # fmt: skip
    lines += ["", "| op | Triton ms per forward | torch ms per forward | speed-up |", "|---|---:|---:|---:|"]
    for op, t in entry["per_forward"].items():
        lines.append(f"| {op} | {t['triton_ms']:.4g} | {t['torch_ms']:.4g} | {t['speedup']:.2f}× |")
    return lines
