"""Timing, percentiles, peak memory and the GEMM peak a run's MFU is measured against.

On CUDA every call is timed with a pair of CUDA events recorded around it, after a synchronize, so a figure is
the device time of that one call, launch gaps included (what a caller waits for). On CPU `time.perf_counter`
brackets each call. The first warmup call is timed on its own (it pays for compilation, autotuning and graph
capture) and reported apart from the steady-state figures, as gpt-fast does.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch


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
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def p50(self) -> float:
        return median(self.latencies)

    @property
    def p99(self) -> float:
        return percentile(self.latencies, 99.0)


def time_calls(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    warmup: int = 1,
    repeats: int = 5,
    max_seconds: float | None = None,
    min_repeats: int = 3,
    memory_baseline: int | None = None,
    on_warm: Callable[[Any], None] | None = None,
) -> Timing:
    """Call `fn` `warmup` times untimed (the first one's wall time is kept), then time up to `repeats` calls.

    Timed calls stop early once `max_seconds` of them have passed and at least `min_repeats` ran.
    `on_warm(output)` receives the last warmup call's output (outside any timed region), e.g. to keep it
    for an accuracy check. Peak memory covers the timed calls only (steady state).
    """
    warmup = max(1, warmup)
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        out = fn()
    sync(device)
    if on_warm is not None:
        on_warm(out)
    del out

    if device.type != "cuda":
        trim_heap()
    mem = PeakMemory(device, memory_baseline)
    mem.reset()
    latencies: list[float] = []
    capped = False
    spent = 0.0
    if device.type == "cuda":
        for i in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            latencies.append(start.elapsed_time(end) / 1e3)
            spent += latencies[-1]
            if max_seconds is not None and spent >= max_seconds and i + 1 >= min_repeats and i + 1 < repeats:
                capped = True
                break
    else:
        for i in range(repeats):
            t0 = time.perf_counter()
            fn()
            latencies.append(time.perf_counter() - t0)
            spent += latencies[-1]
            if max_seconds is not None and spent >= max_seconds and i + 1 >= min_repeats and i + 1 < repeats:
                capped = True
                break
    return Timing(latencies, first, warmup, mem.peak(), mem.kind, capped)


def timed_call(fn: Callable[[], Any], device: torch.device) -> tuple[float, int | None]:
    """One call timed alone: (seconds, bytes the call added at its peak over what was in use before it).

    CUDA: events after a synchronize, and `max_memory_allocated` - `memory_allocated` before. CPU:
    `perf_counter`, and the peak resident set size (VmHWM, reset first) - RSS before (None if unavailable).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, torch.cuda.max_memory_allocated(device) - before
    trim_heap()
    mem = PeakMemory(device, rss_bytes())
    mem.reset()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    return seconds, mem.peak()


# -- the GEMM peak ----------------------------------------------------------------------------------------------


@dataclass
class GemmPeak:
    """The best matmul throughput seen in this run: the denominator of MFU."""

    flops_per_s: float
    dtype: str
    n: int
    device: str
    note: str

    def as_dict(self) -> dict[str, Any]:
        return dict(flops_per_s=self.flops_per_s, dtype=self.dtype, n=self.n, device=self.device, note=self.note)


def measure_gemm_peak(device: torch.device, dtype: torch.dtype | None = None, n: int | None = None) -> GemmPeak:
    """Square n×n matmuls back to back; the best of 5 rounds. CUDA: bf16, n = 8192; CPU: fp32, n = 2048 (and, for
    the note only, bf16: a CPU with bf16 units runs it faster, so bf16 systems can pass 100 % MFU there)."""
    on_cuda = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if on_cuda else torch.float32)
    n = n or (8192 if on_cuda else 2048)
    iters = 20 if on_cuda else 2
    best = _gemm_rate(device, dtype, n, iters)
    name = str(dtype).replace("torch.", "")
    what = "bf16 GEMM peak" if dtype == torch.bfloat16 else f"{name} GEMM peak"
    note = f"{what}: best of 5 rounds of {iters} {n}x{n} matmuls (torch.matmul) in this run"
    if not on_cuda and dtype == torch.float32:
        bf16 = _gemm_rate(device, torch.bfloat16, n, iters)
        note += (
            f"; on CPU MFU is against this fp32 peak (bf16 matmuls here: {bf16 / 1e9:.3g} GFLOP/s, so bf16 "
            "systems can exceed 100 %; so can fp32 ones when other work slowed this measurement)"
        )
    return GemmPeak(best, name, n, device.type, note)


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


# -- device description -----------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = "CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    n = torch.get_num_threads()
    return f"{model} ({n} thread{'s' if n != 1 else ''})"


def device_slug(device: torch.device) -> str:
    """A short file-name tag: 'cpu', or the GPU model ('h100', 'a100', ...) where recognisable."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    m = re.search(r"\b([ahlbv]\d{2,3}[a-z]?|gb?\d{3}|rtx ?\d{4}|mi\d{3}x?)\b", name)
    tag = m.group(1) if m else name
    return re.sub(r"[^a-z0-9]+", "-", tag).strip("-") or "gpu"
