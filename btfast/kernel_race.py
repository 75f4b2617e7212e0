"""The kernel race: on CUDA, each Triton kernel is timed against the torch path it replaces, at the model's own
shapes, and serves only where it wins.

A kernel that is correct (`Ops.self_check`) can still lose to cuBLAS, SDPA or inductor's fused code on a given
GPU, torch and Triton version. Timing it once per model on the user's own GPU keeps the rule "a kernel serves
only where it wins" true on every card, not only on the one a benchmark ran on. The torch side is timed as the
runtime will run it: compiled with inductor when the model is compiled (LayerNorm and GEMM epilogues are what
inductor fuses), replayed from a CUDA graph when graphs are on (so neither side pays launch gaps). Figures per
forward go to `explain()`; results are cached per process.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm import tqdm

from btfast.ops import OPS, Lap, Ops, Verdicts, split_heads
from btfast.runtime import capture_graph
from btfast.spec import ModelSpec
from btfast.weights import Linear, Norm

log = logging.getLogger("btfast")

# Timed calls: REPS samples of INNER back-to-back calls each; the median sample counts.
REPS, INNER = 15, 10

Timer = Callable[[Callable[[], object]], float]  # milliseconds per call of a function


@dataclass(frozen=True)
class Workload:
    """The shapes one forward runs: a throughput-sized batch of text_len tokens and one image each."""

    batch: int
    text_len: int
    image_tokens: int
    hidden: int
    vision_hidden: int
    text_heads: int
    vision_heads: int
    layers: int  # text layers = vision blocks used
    cross_layers: int
    text_act: str

    @classmethod
    def of(cls, spec: ModelSpec, batch: int = 32, text_len: int = 40) -> Workload:
        return cls(
            batch=batch,
            text_len=min(text_len, spec.max_text_len),
            image_tokens=spec.image_tokens,
            hidden=spec.hidden,
            vision_hidden=spec.vision_hidden,
            text_heads=spec.text_heads,
            vision_heads=spec.vision_heads,
            layers=spec.text_layers,
            cross_layers=spec.cross_layers,
            text_act=spec.text_act,
        )

    def describe(self) -> str:
        return f"batch {self.batch}, text {self.text_len} tokens, image {self.image_tokens} tokens"


@dataclass(frozen=True)
class Case:
    """One call shape of an op, how often a forward makes it, and the two ways to serve it."""

    op: str
    name: str
    calls: int  # per forward
    triton: Callable[[], Tensor]
    torch: Callable[[], Tensor]


def cases(ops: Ops, w: Workload, device: torch.device, dtype: torch.dtype) -> list[Case]:
    """The calls a forward makes, per op, at the workload's shapes (random inputs, model-shaped weights)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    k = ops.kernels

    def rand(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype)

    def norm(n: int) -> Norm:
        return Norm(rand(n, scale=0.1) + 1, rand(n, scale=0.1), 1e-5)

    def lin(n_in: int, n_out: int) -> Linear:
        return Linear(rand(n_out, n_in, scale=n_in**-0.5), rand(n_out, scale=0.1))

    b, lt, li, h, vh = w.batch, w.text_len, w.image_tokens, w.hidden, w.vision_hidden
    mask = torch.ones(b, lt, dtype=torch.bool, device=device)
    mask[b // 2 :, lt * 3 // 4 :] = False  # half the batch padded, as real batches are

    def heads_of(tokens: int, width: int, heads: int, parts: int) -> list[Tensor]:
        return split_heads(rand(b, tokens, parts * width), parts, heads)  # the strided views the model passes

    out: list[Case] = []

    def add(op: str, name: str, calls: int, triton: Callable[[], Tensor], reference: Callable[[], Tensor]) -> None:
        if calls > 0:
            out.append(Case(op, name, calls, triton, reference))

    # add+LayerNorm: 2 per text layer, 3 per cross layer side plus a bridge; the vision blocks' pre-LNs (2 each)
    for side, tokens, width, calls in (
        ("text", lt, h, 2 * w.layers + 4 * w.cross_layers),
        ("image", li, vh, 2 * w.layers + 4 * w.cross_layers),
    ):
        x, r, n = rand(b, tokens, width), rand(b, tokens, width), norm(width)
        add(
            "add_layernorm",
            f"{side} {tokens}x{width}",
            calls,
            lambda x=x, r=r, n=n: k.add_layernorm(x, r, n.weight, n.bias, n.eps),
            lambda x=x, r=r, n=n: OPS["add_layernorm"].torch(x, r, n),
        )

    # attention: self per layer on each side (+ the cross layers' self attention), cross both ways per cross layer
    for name, (lq, lk, width, heads, key_mask, calls) in {
        "text self": (lt, lt, h, w.text_heads, mask, w.layers + w.cross_layers),
        "image self": (li, li, vh, w.vision_heads, None, w.layers + w.cross_layers),
        "text to image": (lt, li, h, w.text_heads, None, w.cross_layers),
        "image to text": (li, lt, h, w.text_heads, mask, w.cross_layers),
    }.items():
        (q,) = heads_of(lq, width, heads, 1)
        kk, v = heads_of(lk, width, heads, 2)
        add(
            "attention",
            f"{name} {lq}x{lk}",
            calls,
            lambda q=q, kk=kk, v=v, m=key_mask: k.attention(q, kk, v, key_mask=m),
            lambda q=q, kk=kk, v=v, m=key_mask: OPS["attention"].torch(q, kk, v, m),
        )

    # GEMMs: QKV, MLP up (with its activation) and MLP down (+ residual on the vision side), per side
    for side, tokens, width, act, residual, calls in (
        ("text", lt, h, w.text_act, False, w.layers + w.cross_layers),
        ("image", li, vh, "quick_gelu", True, w.layers),
    ):
        x, x4, r = rand(b, tokens, width), rand(b, tokens, 4 * width), rand(b, tokens, width)
        for name, xin, weights, a, res in (
            ("qkv", x, lin(width, 3 * width), None, None),
            ("mlp up", x, lin(width, 4 * width), act, None),
            ("mlp down", x4, lin(4 * width, width), None, r if residual else None),
        ):
            add(
                "linear",
                f"{side} {name} {b * tokens}x{weights.weight.shape[1]}x{weights.weight.shape[0]}",
                calls,
                lambda x=xin, li=weights, a=a, r=res: k.linear(x, li.weight, li.bias, activation=a, residual=r),
                lambda x=xin, li=weights, a=a, r=res: OPS["linear"].torch(x, li, a, r),
            )
    return out


def cuda_timer(graphs: bool) -> Timer:
    """Median milliseconds per call on the current CUDA device, from CUDA events.

    With graphs, INNER calls are captured once and replayed, as the runtime replays a bucket; a function that
    cannot be captured is timed eagerly.
    """

    def timer(fn: Callable[[], object]) -> float:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the default stream: autotuning, compilation, handles
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        run: Callable[[], object]

        def eager() -> None:
            for _ in range(INNER):
                fn()

        run = eager
        if graphs:
            try:
                run = capture_graph(eager)[0].replay
            except Exception:  # not capturable: time it as it would run, eagerly
                torch.cuda.synchronize()
        samples = []
        for _ in range(REPS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / INNER)
        return statistics.median(samples)

    return timer


_CACHE: dict[tuple, Verdicts] = {}


def race(
    ops: Ops,
    workload: Workload,
    device: torch.device,
    dtype: torch.dtype,
    compiled: bool | str | Callable,
    graphs: bool,
    timer: Timer | None = None,
) -> Verdicts:
    """Time every Triton kernel `ops` would race against torch at `workload`; the verdicts, for `ops.take`.

    `compiled`: time the torch side of add+LayerNorm and the GEMM compiled (True = inductor, or a backend),
    as the runtime will run them. `timer` defaults to CUDA events (tests pass their own). A kernel whose timing
    fails gets that reason (it does not serve, like a failed self-check). Results are cached per process.
    """
    racing = ops.racing()
    if not racing:
        return Verdicts()
    key = (str(device), torch.cuda.get_device_name(device) if device.type == "cuda" else "", dtype, workload,
           compiled, graphs, racing)  # fmt: skip
    verdicts = _CACHE.get(key) if timer is None else None
    began = time.perf_counter()
    if verdicts is None:
        verdicts = _run(ops, workload, device, dtype, compiled, cuda_timer(graphs) if timer is None else timer, racing)
        verdicts.where = f"{workload.describe()} ({time.perf_counter() - began:.1f} s)"
        if timer is None:
            _CACHE[key] = verdicts
    return verdicts


def _run(
    ops: Ops,
    w: Workload,
    device: torch.device,
    dtype: torch.dtype,
    compiled: bool | str | Callable,
    timer: Timer,
    racing: tuple[str, ...],
) -> Verdicts:
    verdicts = Verdicts()
    all_cases = cases(ops, w, device, dtype)
    for op in tqdm(racing, desc="btfast kernel race", unit="op", file=sys.stderr):
        triton_ms = torch_ms = 0.0
        try:
            for case in (c for c in all_cases if c.op == op):
                triton_ms += case.calls * timer(case.triton)
                torch_ms += case.calls * _time_reference(case, compiled, timer)
        except Exception as e:  # a kernel that cannot even be timed does not serve
            verdicts.failed[op] = f"kernel race failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
            log.warning("btfast: Triton %s kernel off for this model: %s", op, verdicts.failed[op])
            continue
        verdicts.laps[op] = Lap(triton_ms, torch_ms)
    return verdicts


def _time_reference(case: Case, compiled: bool | str | Callable, timer: Timer) -> float:
    """The torch side as the runtime runs it: compiled for norms and GEMMs (inductor fuses their epilogues;
    SDPA it calls as is), eager if compiling this one call fails."""
    if compiled and case.op != "attention":
        backend = "inductor" if compiled is True else compiled
        try:
            return timer(torch.compile(case.torch, backend=backend, dynamic=False, fullgraph=True))
        except Exception as e:
            log.info("btfast: kernel race times %s's torch side eagerly (compile failed: %s)", case.name, e)
    return timer(case.torch)
