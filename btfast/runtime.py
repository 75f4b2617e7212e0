"""The runtime behind `optimize()`: static shape buckets over compiled layers, and CUDA graphs.

A call's batch size and text length are rounded up to a bucket; inputs are padded (pad id for text,
so RoBERTa positions stay right; masked keys; zero images) and outputs sliced back. The forward it runs
calls layers compiled once per layer type with the batch and text length dynamic (btfast.model.Layers),
so a new bucket costs a run, not a compile; on CUDA each bucket is then captured as one CUDA graph,
reused forever; all graphs share one memory pool, and outputs are copied out of it, so a result kept
from one call is never overwritten by the next. Batches larger than the largest bucket are split into
chunks and joined.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

log = logging.getLogger("btfast")

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # by name

DEFAULT_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DEFAULT_TEXT = (8, 16, 24, 32, 40, 48, 56, 64, 96, 128, 192, 256, 384, 512)


@dataclass(frozen=True)
class Buckets:
    """Batch-size and text-length steps; a call is padded up to the next step of each."""

    batch: tuple[int, ...] = DEFAULT_BATCH
    text: tuple[int, ...] = DEFAULT_TEXT

    def __post_init__(self) -> None:
        for name in ("batch", "text"):
            steps = tuple(getattr(self, name))
            if not steps or any(int(s) != s or s < 1 for s in steps):
                raise ValueError(f"bucket steps for {name} must be positive integers; got {steps}")
            object.__setattr__(self, name, tuple(sorted(set(int(s) for s in steps))))

    @property
    def max_batch(self) -> int:
        return self.batch[-1]

    def batch_for(self, n: int) -> int:
        return next(s for s in self.batch if s >= n)

    def text_for(self, n: int) -> int:
        """The text step for length n; past the largest step, n itself (one more compiled shape)."""
        return next((s for s in self.text if s >= n), n)


def as_buckets(buckets: Buckets | dict | None) -> Buckets:
    if buckets is None:
        return Buckets()
    if isinstance(buckets, Buckets):
        return buckets
    if isinstance(buckets, dict):
        return Buckets(**buckets)
    raise TypeError(f"buckets must be a btfast.Buckets or a dict(batch=..., text=...); got {type(buckets).__name__}")


@dataclass(frozen=True)
class Arg:
    """How a runtime input is padded: the value of padded rows / positions, and which dim (if any) is text."""

    pad: float | int | bool
    text_dim: int | None = None


def capture_graph(fn: Callable[[], Any], pool: Any = None) -> tuple[Any, Any]:
    """(CUDA graph, fn's outputs) of one capture of fn() (warmed up already). On failure the caller's stream is
    current again: torch.cuda.graph leaves its capture stream current when ending a failed capture raises."""
    previous = torch.cuda.current_stream()
    graph = torch.cuda.CUDAGraph()
    try:
        # thread_local: another thread's CUDA calls (a data loader, say) cannot invalidate the capture
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            outputs = fn()
    except Exception:
        torch.cuda.set_stream(previous)
        raise
    return graph, outputs


class _BuildError(Exception):
    """Building a bucket failed in `what` ("torch.compile" or "CUDA graphs"): that feature goes off."""

    def __init__(self, what: str, cause: Exception) -> None:
        super().__init__(f"{what}: {cause}")
        self.what, self.cause = what, cause


@dataclass
class _Entry:
    """One bucket: its callable, and on CUDA its graph with static input and output buffers."""

    fn: Callable[..., tuple[Tensor, ...]]
    hits: int = 0
    build_s: float = 0.0
    graph: torch.cuda.CUDAGraph | None = None
    inputs: tuple[Tensor, ...] = ()
    outputs: tuple[Tensor, ...] = ()


@dataclass
class RuntimeStats:
    calls: int = 0
    chunks: int = 0
    padded_rows: int = 0
    padded_tokens: int = 0
    new_shapes: list[tuple[int, int]] = field(default_factory=list)


class Runtime:
    """Runs `forward(*inputs) -> tuple of tensors` through buckets; dim 0 of every input and output is the batch.

    `inputs` say how each input is padded (`Arg`); `outputs[i]` is the dim of output i holding the text length
    (sliced back like the batch), or None. compile: whether `forward` runs compiled layers (False, True = inductor,
    or a backend), with `eager` the same function without them: used alone if compiling fails, and called once per
    bucket where `books(first input)` says kernels may serve (the op table keeps its books outside dynamo's
    guards). cuda_graphs: capture per bucket (CUDA only).
    """

    def __init__(
        self,
        forward: Callable[..., tuple[Tensor, ...]],
        inputs: Sequence[Arg],
        outputs: Sequence[int | None],
        buckets: Buckets,
        compile: bool | str | Callable = False,
        cuda_graphs: bool = False,
        name: str = "forward",
        eager: Callable[..., tuple[Tensor, ...]] | None = None,
        books: Callable[[Tensor], bool] = lambda x: True,
    ) -> None:
        self.forward = forward
        self.eager = eager or forward
        self.books = books
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.buckets = buckets
        self.compile = compile
        self.cuda_graphs = cuda_graphs
        self.name = name
        self.entries: dict[tuple[int, int], _Entry] = {}
        self.stats = RuntimeStats()
        self._pool = None
        self.disabled: list[str] = []  # what failed on this machine and was turned off, with why
        self._text_arg = next((i for i, a in enumerate(self.inputs) if a.text_dim is not None), None)

    @property
    def pads(self) -> bool:
        """Padding to buckets pays only when shapes are compiled or captured; eager runs exact shapes."""
        return bool(self.compile or self.cuda_graphs)

    def _callable(self) -> Callable:
        return self.forward if self.compile else self.eager

    def _length(self, args: Sequence[Tensor]) -> int:
        if self._text_arg is None:
            return 0
        return args[self._text_arg].shape[self.inputs[self._text_arg].text_dim]

    def _padded(self, key: tuple[int, int], args: Sequence[Tensor]) -> list[Tensor]:
        """Buffers of the bucket's shape filled with each input's pad value, the inputs copied in."""
        b, n = args[0].shape[0], self._length(args)
        out = []
        for arg, x in zip(self.inputs, args):
            shape = list(x.shape)
            shape[0] = key[0]
            if arg.text_dim is not None:
                shape[arg.text_dim] = key[1]
            buf = torch.full(shape, arg.pad, dtype=x.dtype, device=x.device)
            dst = buf[:b] if arg.text_dim is None else buf[:b].narrow(arg.text_dim, 0, n)
            dst.copy_(x)
            out.append(buf)
        return out

    # -- building a bucket ---------------------------------------------------------------------------

    def _build(self, key: tuple[int, int], like: Sequence[Tensor]) -> _Entry:
        """Compile / capture one bucket. If that fails here (a compiler or driver problem), turn the failing
        feature off for this model, say so, and serve the bucket without it: never a failed call."""
        try:
            return self._try_build(key, like)
        except _BuildError as e:
            detail = " ".join(str(e.cause).split())[:300]
            reason = f"{self.name}: {e.what} off: building bucket {key} failed ({type(e.cause).__name__}: {detail})"
            log.warning("btfast: %s", reason)
            self.disabled.append(reason)
            if e.what == "CUDA graphs":
                self.cuda_graphs = False
            else:
                self.compile = False
            return self._build(key, like) if self.pads else _Entry(self.eager)

    def _try_build(self, key: tuple[int, int], like: Sequence[Tensor]) -> _Entry:
        start = time.perf_counter()
        fn = self._callable()
        entry = _Entry(fn)
        # Built under torch.inference_mode (as the scoring jobs call), the buffers a graph keeps would be
        # inference tensors that a later call outside it cannot refill: make them ordinary tensors.
        with torch.inference_mode(False):
            sample = self._padded(key, [x[:1] for x in like])  # one real row, the rest padding
        if self.compile and self.books(like[0]):
            self.eager(*sample)  # once eagerly: the op table keeps its books (which backend serves what) here
        graphs = self.cuda_graphs and like[0].is_cuda
        try:
            if graphs:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(2):  # compile and autotune outside the capture
                        fn(*sample)
                torch.cuda.current_stream().wait_stream(stream)
            elif self.compile:
                fn(*sample)  # compile now, so the cost shows in warmup, not in a call
        except Exception as e:
            raise _BuildError("torch.compile" if self.compile else "CUDA graphs", e) from e
        if graphs:
            entry.graph, entry.outputs = self._capture(fn, sample)
            entry.inputs = tuple(sample)
        if like[0].is_cuda:
            torch.cuda.synchronize()
        entry.build_s = time.perf_counter() - start
        log.info("btfast %s: bucket %s built in %.2fs", self.name, key, entry.build_s)
        if self._text_arg is not None and key[1] not in self.buckets.text:
            self.stats.new_shapes.append(key)
            log.warning("btfast: text length %d is past the largest bucket: compiled an extra shape", key[1])
        return entry

    def _capture(self, fn: Callable, sample: Sequence[Tensor]) -> tuple[Any, tuple[Tensor, ...]]:
        """One CUDA graph of fn(*sample) in the shared pool (a fresh pool after a failure)."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            return capture_graph(lambda: tuple(fn(*sample)), self._pool)
        except Exception as e:
            self._pool = None
            raise _BuildError("CUDA graphs", e) from e

    def _entry(self, key: tuple[int, int], like: Sequence[Tensor]) -> _Entry:
        entry = self.entries.get(key)
        if entry is None:
            entry = self.entries[key] = self._build(key, like)
        return entry

    def _key(self, b: int, n: int) -> tuple[int, int]:
        return self.buckets.batch_for(b), (self.buckets.text_for(n) if self._text_arg is not None else 0)

    # -- calls ---------------------------------------------------------------------------------------

    def _run_chunk(self, args: Sequence[Tensor | None]) -> tuple[Tensor, ...]:
        if not self.pads:
            return tuple(self.eager(*args))
        b, n = args[0].shape[0], self._length(args)
        key = self._key(b, n)
        entry = self._entry(key, args)
        entry.hits += 1
        self.stats.padded_rows += key[0] - b
        if self._text_arg is not None:
            self.stats.padded_tokens += key[0] * key[1] - b * n
        if entry.graph is not None:
            for arg, buf, x in zip(self.inputs, entry.inputs, args):
                buf.fill_(arg.pad)
                dst = buf[:b] if arg.text_dim is None else buf[:b].narrow(arg.text_dim, 0, n)
                dst.copy_(x)
            entry.graph.replay()
            outs = entry.outputs
        else:
            outs = entry.fn(*self._padded(key, args))
        # copy out: graph outputs live in the shared pool and the next replay overwrites them
        return tuple((o[:b] if t is None else o[:b].narrow(t, 0, n)).clone() for o, t in zip(outs, self.outputs))

    def __call__(self, *args: Tensor | None) -> tuple[Tensor, ...]:
        """Run on inputs of any batch size (chunked past the largest bucket). An input may be None only
        when the runtime runs exact shapes (`pads` is False)."""
        self.stats.calls += 1
        step = self.buckets.max_batch
        parts = []
        for start in range(0, args[0].shape[0], step):
            parts.append(self._run_chunk([None if x is None else x[start : start + step] for x in args]))
            self.stats.chunks += 1
        if len(parts) == 1:
            return parts[0]
        return tuple(torch.cat(outs, dim=0) for outs in zip(*parts))

    def warmup(self, batch_sizes: Sequence[int], text_lengths: Sequence[int], like: Sequence[Tensor]) -> dict:
        """Build the buckets covering these sizes now (`like`: one example row per input), with a progress bar on
        stderr; returns seconds per bucket built."""
        if not self.pads:
            return {}
        lengths = text_lengths if self._text_arg is not None else [0]
        keys = {self._key(min(b, self.buckets.max_batch), n) for b in batch_sizes for n in lengths}
        todo = sorted(keys - set(self.entries))
        costs = {}
        with tqdm(todo, desc=f"btfast {self.name} buckets", unit="bucket", file=sys.stderr, disable=not todo) as bar:
            for key in bar:
                bar.set_postfix_str(f"batch {key[0]}" + (f" x text {key[1]}" if self._text_arg is not None else ""))
                self.entries[key] = self._build(key, like)
                costs[key] = self.entries[key].build_s
        return costs

    def describe(self) -> list[str]:
        """The bucket table with hits, build costs and captured graphs."""
        mode = []
        if self.compile:
            mode.append(f"torch.compile ({'inductor' if self.compile is True else self.compile})")
        if self.cuda_graphs:
            mode.append("CUDA graphs")
        lines = [
            f"{self.name}: {' + '.join(mode) if mode else 'eager, exact shapes (no padding)'}; "
            f"calls {self.stats.calls}, chunks {self.stats.chunks}, padded rows {self.stats.padded_rows}, "
            f"padded tokens {self.stats.padded_tokens}"
        ]
        lines += [f"  {reason}" for reason in self.disabled]
        for (b, n), e in sorted(self.entries.items()):
            graph = ", graph captured" if e.graph is not None else ""
            text = f" x text {n:>4}" if self._text_arg is not None else ""
            lines.append(f"  bucket batch {b:>4}{text}: {e.hits} hits, built in {e.build_s:.2f}s{graph}")
        return lines
