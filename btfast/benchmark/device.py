"""What the device is: its name, a file-name tag, whether it has units for a dtype, its published peak.

CPUs differ: some EPYCs have AVX-512 with bf16 units, others only AVX2/FMA, where torch emulates a bf16 or fp16
matmul about 20x slower than fp32 (512x512: 0.34 s against 0.016 s, one thread). A benchmark that must finish in
its time runs a half-precision dtype on CPU only where `native(device, dtype)` says so; `emulated_reason` is the
sentence it prints when it does not.
"""

from __future__ import annotations

import functools
import re

import torch

# The CPU flags (Linux /proc/cpuinfo) that mean native units for a half-precision matmul
_CPU_FLAGS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}

# Published dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, by a word of the device name
# (most specific first: "NVIDIA H100 PCIe", "NVIDIA H100 NVL", else the SXM part, "NVIDIA H100 80GB HBM3")
PUBLISHED_BF16_TFLOPS = {"h200": 989.0, "h100 pcie": 756.0, "h100 nvl": 835.0, "h100": 989.0, "a100": 312.0}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native(device: torch.device | str, dtype: str) -> bool:
    """Whether `device` computes `dtype` (fp32, bf16, fp16) in hardware: always on CUDA and for fp32; on CPU, a
    half precision needs torch's AVX-512 kernels (`get_cpu_capability()`) and the CPU's bf16 / fp16 units."""
    if torch.device(device).type != "cpu" or dtype not in _CPU_FLAGS:
        return True
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    return bool(cpu_flags() & set(_CPU_FLAGS[dtype]))


def emulated_reason(dtype: str) -> str:
    """Why `dtype` is slow on this CPU: the sentence a skipped or emulated system carries."""
    flags = " or ".join(_CPU_FLAGS.get(dtype, ()))
    return (
        f"{dtype} is emulated on this CPU (torch capability {torch.backends.cpu.get_cpu_capability()}, no {flags}): "
        f"a {dtype} matmul runs ~20x slower than fp32 here"
    )


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


def published_bf16_flops(name: str) -> float | None:
    """The published dense bf16 peak (FLOP/s) of a GPU named `name`, None when unknown (the first word that matches,
    most specific first)."""
    low = name.lower()
    for key, tflops in PUBLISHED_BF16_TFLOPS.items():
        if key in low:
            return tflops * 1e12
    return None
