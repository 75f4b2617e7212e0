"""Timing, percentiles, peak memory and the GEMM peak a run's MFU is measured against.

On CUDA every call is timed with a pair of CUDA events recorded around it, after a synchronize, so a figure is
the device time of that one call, launch gaps included (what a caller waits for). On CPU `time.perf_counter`
brackets each call. The runner times the first warmup call on its own (it pays for compilation, autotuning and graph
capture) and reports it apart from the steady-state figures, as gpt-fast does.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from btfast.benchmark.device import emulated_reason, native
from btfast.runtime import DTYPES


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: list[float]) -> float:
    return percentile(values, 50.0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- peak memory ------------------------------------------------------------------------------------------------


def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """The process's resident set size now (Linux), else None."""
    return _proc_status("VmRSS")


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise), so that RSS shows what is in use now and
    the next allocation shows up as growth: without it, a call reusing freed pages would seem to need nothing."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory over a stretch of calls.

    CUDA: `torch.cuda.max_memory_allocated` (everything allocated on the device: weights, activations,
    CUDA-graph pools). CPU: the process's peak resident set size (`VmHWM`, reset through
    `/proc/self/clear_refs`), less `baseline` (the RSS before the system's model was built), so the figure
    is the model plus its working memory, as on CUDA. None where the platform offers neither.
    """

    def __init__(self, device: torch.device, baseline: int | None = None) -> None:
        self.device = device
        self.baseline = baseline or 0
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS - RSS before build"
        self._ok = True

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")  # resets VmHWM to the current RSS
        except OSError:
            self._ok = False

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        hwm = _proc_status("VmHWM") if self._ok else None
        return None if hwm is None else max(0, hwm - self.baseline)


# -- timing calls -----------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Per-call latencies (seconds) of the timed calls, and the wall time of the first (warmup) call."""

    latencies: list[float]
    first_call_s: float
    warmup: int
    peak_mem: int | None = None
    peak_mem_kind: str = ""
    capped: bool = False  # stopped before `repeats` because the cell's time cap was reached

    @property
    def p50(self) -> float:
        return median(self.latencies)

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 99.0)


def timed_call(fn: Callable[[], Any], device: torch.device, memory: bool = True) -> tuple[float, int | None]:
    """One call timed alone: (seconds, bytes the call added at its peak over what was in use before it, or None
    when `memory` is off or unavailable).

    CUDA: events after a synchronize, and `max_memory_allocated` - `memory_allocated` before. CPU:
    `perf_counter`, and the peak resident set size (VmHWM, reset first) - RSS before.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        if memory:
            torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        added = torch.cuda.max_memory_allocated(device) - before if memory else None
        return start.elapsed_time(end) / 1e3, added
    mem = None
    if memory:
        trim_heap()
        mem = PeakMemory(device, rss_bytes())
        mem.reset()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return seconds, None if mem is None else mem.peak()


# -- the GEMM peak ----------------------------------------------------------------------------------------------


@dataclass
class GemmPeak:
    """The best matmul throughput seen in this run in one dtype: the denominator of that dtype's MFU."""

    flops_per_s: float
    dtype: str
    n: int
    device: str
    note: str

    def as_dict(self) -> dict[str, Any]:
        return dict(flops_per_s=self.flops_per_s, dtype=self.dtype, n=self.n, device=self.device, note=self.note)


def gemm_size(device: torch.device, dtype: str) -> tuple[int, int]:
    """(n, matmuls per round) of the peak measurement: big enough to saturate the device, short on a CPU (an emulated
    half precision gets n = 256: a 1024² bf16 matmul takes seconds on an AVX2 core)."""
    if device.type == "cuda":
        return 8192, 20
    return (1024, 3) if native(device, dtype) else (256, 3)


def measure_gemm_peak(device: torch.device, dtype: str, n: int | None = None) -> GemmPeak:
    """Square n×n matmuls of `dtype` (fp32, bf16, fp16) back to back; the best of 5 rounds (see `gemm_size`)."""
    size, iters = gemm_size(device, dtype)
    n = n or size
    best = _gemm_rate(device, DTYPES[dtype], n, iters)
    note = f"{dtype} GEMM peak: best of 5 rounds of {iters} {n}x{n} matmuls (torch.matmul) in this run"
    if not native(device, dtype):
        note += f"; {emulated_reason(dtype)}"
    return GemmPeak(best, dtype, n, device.type, note)


def _gemm_rate(device: torch.device, dtype: torch.dtype, n: int, iters: int, rounds: int = 5) -> float:
    """The best throughput (FLOP/s) over `rounds` rounds of `iters` n×n matmuls."""
    on_cuda = device.type == "cuda"
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    with torch.no_grad():
        for _ in range(3 if on_cuda else 1):
            a @ b
        best = 0.0
        for _ in range(rounds):
            sync(device)
            if on_cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    a @ b
                end.record()
                end.synchronize()
                seconds = start.elapsed_time(end) / 1e3
            else:
                t0 = time.perf_counter()
                for _ in range(iters):
                    a @ b
                seconds = time.perf_counter() - t0
            best = max(best, 2 * n**3 * iters / seconds)
    return best
