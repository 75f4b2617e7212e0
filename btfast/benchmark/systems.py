"""The systems under test: one name each, `<impl>-<dtype>`.

    hf-eager-<dtype>    the transformers model, eager attention, cast to <dtype>
    hf-compile-<dtype>  torch.compile(hf_model, mode="max-autotune", dynamic=False): one graph per shape (each
                        layer compiled on its own where a transformers release cannot be traced whole)
    btfast-<dtype>      btfast.optimize(model, dtype=..., device=...) with its defaults (whatever runtime,
                        compile, CUDA graphs and kernels `optimize` picks; `explain()` says which)
    btfast-torch-<d>    the same with kernels=False (torch ops only)
    btfast-triton-<d>   the same with kernels="all" (every Triton kernel, no race)

dtype is fp32, bf16 or fp16. Every system gets a freshly built model with the same seed (so the same
weights): `optimize` and `.to(dtype)` cast the model in place, so systems never share one.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from btfast.benchmark.timing import trim_heap
from btfast.runtime import DTYPES

IMPLS = ("hf-eager", "hf-compile", "btfast", "btfast-torch", "btfast-triton")
KERNELS = {"btfast": None, "btfast-torch": False, "btfast-triton": "all"}  # btfast impl -> optimize(kernels=...)
REFERENCE = "hf-eager-fp32"


@dataclass(frozen=True)
class System:
    impl: str
    dtype_name: str

    @property
    def name(self) -> str:
        return f"{self.impl}-{self.dtype_name}"

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def compiles(self) -> bool:
        return self.impl == "hf-compile"

    @property
    def is_btfast(self) -> bool:
        return self.impl in KERNELS


def parse_system(name: str) -> System:
    impl, _, dtype = name.rpartition("-")
    if impl in IMPLS and dtype in DTYPES:
        return System(impl, dtype)
    names = ", ".join(f"{i}-{d}" for i in IMPLS for d in DTYPES)
    raise ValueError(f"unknown system {name!r}; known: {names} (or hf-eager / hf-compile / btfast / all)")


def parse_systems(spec: str, low: str) -> list[System]:
    """A comma list of system names; a bare impl means `<impl>-<low>`; `all` is the default comparison."""
    out: list[System] = []
    for raw in spec.split(","):
        name = raw.strip()
        if not name:
            continue
        items = comparison(low) if name == "all" else [System(name, low)] if name in IMPLS else [parse_system(name)]
        out += [s for s in items if s not in out]
    if not out:
        raise ValueError("no systems given")
    return out


def comparison(low: str) -> list[System]:
    """The full comparison: HF eager fp32 (the reference) and `low`, btfast fp32 and `low`, HF compiled in `low`.

    The order is the run order: a time budget is shared out as systems start, so the slowest to set up
    (torch.compile with max-autotune) comes last and gets whatever the others left.
    """
    names = ["hf-eager-fp32", f"hf-eager-{low}", "btfast-fp32", f"btfast-{low}", f"hf-compile-{low}"]
    return [parse_system(n) for n in dict.fromkeys(names)]


@dataclass
class Loaded:
    """A system ready to call: `prepare` puts a batch on its device and dtype (untimed), `call` returns logits."""

    system: System
    module: torch.nn.Module
    call: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    device: torch.device
    build_s: float
    notes: list[str] = field(default_factory=list)
    explain: Callable[[], str] = lambda: ""

    def prepare(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {k: v.to(self.device) for k, v in batch.items()}
        if not self.system.is_btfast:  # btfast casts pixels itself (inside its timed call, as a user sees it)
            out["pixel_values"] = out["pixel_values"].to(self.system.dtype)
        return out

    def close(self) -> None:
        self.module = None  # type: ignore[assignment]
        self.call = None  # type: ignore[assignment]
        if self.system.compiles:
            torch._dynamo.reset()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        else:
            trim_heap()


def _configure_compile(limit: int = 256) -> None:
    # One graph per (batch, text length): a sweep has more shapes than dynamo's default limit of 8.
    cfg = torch._dynamo.config
    for attr in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(cfg, attr):
            setattr(cfg, attr, max(getattr(cfg, attr), limit))
    # max-autotune prints a table per tuned GEMM; keep the benchmark's log readable (display only)
    import torch._inductor.config as inductor

    for attr, quiet in (("autotune_num_choices_displayed", 0), ("max_autotune_report_choices_stats", False)):
        if hasattr(inductor, attr):
            setattr(inductor, attr, quiet)


_MASK_BUG = "Attempting to broadcast a dimension"


def compile_layers(model: torch.nn.Module, **options: Any) -> int:
    """torch.compile every text, vision and cross-modal layer of a transformers BridgeTower in place; returns
    how many. The code between layers (embeddings, masks, bridges, heads) stays eager."""
    core = getattr(model, "bridgetower", model)
    stacks = (
        core.text_model.encoder.layer,
        core.vision_model.visual.transformer.resblocks,
        core.cross_modal_text_layers,
        core.cross_modal_image_layers,
    )
    n = 0
    for stack in stacks:
        for layer in stack:
            layer.compile(dynamic=False, **options)
            n += 1
    return n


def load(
    system: System,
    build_model: Callable[[], torch.nn.Module],
    device: torch.device,
    compile_mode: str = "max-autotune",
    compile_backend: str = "inductor",
) -> Loaded:
    """Build a fresh model with `build_model()` and turn it into `system` on `device`."""
    import time

    t0 = time.perf_counter()
    model = build_model()
    notes: list[str] = []
    if system.is_btfast:
        import btfast

        dtype = None if system.dtype == torch.float32 else system.dtype
        fast = btfast.optimize(model, dtype=dtype, device=device, kernels=KERNELS[system.impl])

        def call(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return fast(**batch).logits

        return Loaded(system, fast, call, device, time.perf_counter() - t0, notes, fast.explain)

    model.to(device=device, dtype=system.dtype)
    runner: Any = model
    if system.compiles:
        _configure_compile()
        # mode is an inductor option (the default backend); other backends (tests use "eager") take none
        options: dict[str, Any] = {"mode": compile_mode} if compile_backend == "inductor" else {}
        runner = torch.compile(model, dynamic=False, backend=compile_backend, **options)
        notes.append(f"torch.compile(hf_model, dynamic=False, backend={compile_backend!r}, {options})")

    def call_hf(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        nonlocal runner
        try:
            return runner(**batch).logits
        except torch._dynamo.exc.TorchRuntimeError as e:
            if runner is model or _MASK_BUG not in str(e):
                raise
            # transformers 5.17 (the GPU image's) builds the text->image cross-attention mask with the image
            # length on both axes; eager drops that all-ones mask, a whole-model trace keeps it and fails.
            # Compiling each layer instead keeps the mask code eager: still torch.compile's best for HF.
            torch._dynamo.reset()
            runner = model
            layers = compile_layers(model, backend=compile_backend, **options)
            notes.append(
                f"whole-model trace failed in transformers' mask code ({' '.join(str(e).split())[:160]}); "
                f"compiled its {layers} layers one by one instead (regional compilation)"
            )
            return runner(**batch).logits

    attn = getattr(model.config, "_attn_implementation", "eager")
    notes.append(f"transformers {type(model).__name__}, attn_implementation={attn}, {system.dtype_name}")
    return Loaded(system, model, call_hf, device, time.perf_counter() - t0, notes, lambda: "; ".join(notes))
