"""Jobs: plan chunks → decode images in workers (a few chunks ahead) → compute → write, resumable and shardable.

`score(...)` and `embed(...)` are the Python API behind `btfast score` and `btfast embed`.
"""

from __future__ import annotations

import functools
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from btfast.io.fs import is_url
from btfast.score.config import Columns, JobConfig
from btfast.score.plan import Chunk, Limits, parse_shard, plan
from btfast.score.schema import EMBED, arrow_schema, score_columns
from btfast.score.sink import ChunkSink, Sink, output_format


@dataclass
class Summary:
    """What a job did. `rows`/`errors` count the whole output of this shard, resumed chunks included."""

    out: str
    rows: int = 0
    errors: int = 0
    resumed_rows: int = 0
    new_rows: int = 0
    seconds: float = 0.0
    chunks: int = 0
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return 3 if self.errors or self.stats.get("shards_truncated") else 0  # 3: done, with error rows

    def line(self, unit: str = "pairs") -> str:
        rate = self.new_rows / self.seconds if self.seconds > 0 else 0.0
        parts = [
            f"{self.rows:,} rows ({self.rows - self.errors:,} ok, {self.errors:,} errors)",
            f"{self.new_rows:,} new in {self.seconds:.1f} s ({rate:,.1f} {unit}/s)",
        ]
        if self.resumed_rows:
            parts.append(f"{self.resumed_rows:,} resumed from an earlier run")
        if self.stats:
            parts.append(", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in self.stats.items()))
        return "; ".join(parts) + f" -> {self.out}"


# An executor (`LocalExecutor`, `btfast.ray.cli.run_on_ray`): chunks -> (index, rows: dicts or Arrow table), any order
Run = Callable[[Iterable[Chunk]], Iterator[tuple[int, Any]]]


def stream(
    chunks: Iterable[Chunk],
    loader: Any,
    compute: Callable[[Chunk, dict[str, Any]], list[dict[str, Any]]],
    limits: Limits | None = None,
) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """(chunk index, output rows) in order; the images of the next pieces decode while one computes.

    A chunk larger than `limits` (a tar shard of 10,000 samples: the unit written and resumed) is decoded and
    computed in pieces planned within `limits` (the unit held in memory); its rows come out together. An error
    from `chunks` (a shard that cannot be read) is raised after the chunks already taken are computed.
    With `loader=None` nothing is decoded: `compute` gets no images (it fetches what it needs itself)."""
    pieces = _pieces(chunks, limits)
    pending: deque[tuple[Chunk, Chunk, bool, Any]] = deque()
    failure: BaseException | None = None

    def fill() -> None:
        nonlocal failure
        while failure is None and len(pending) <= 2:  # up to three pieces queued ahead of the one computing
            try:
                item = next(pieces, None)
            except Exception as e:  # raised once the pieces taken so far are done
                failure = e
                return
            if item is None:
                return
            c, piece, last = item
            images = piece.images if loader else {}
            pending.append((c, piece, last, loader and loader.submit(list(images), list(images.values()))))

    fill()
    outs: list[dict[str, Any]] = []
    while pending:
        c, piece, last, handle = pending.popleft()
        fill()  # the workers start on the next pieces before this one is computed
        outs += compute(piece, loader.result(handle) if loader else {}) if piece.rows else []
        if last:
            yield c.index, outs
            outs = []
    if failure is not None:
        raise failure


def _pieces(chunks: Iterable[Chunk], limits: Limits | None) -> Iterator[tuple[Chunk, Chunk, bool]]:
    """(chunk, piece, last piece of the chunk); a chunk within `limits` is its own single piece."""
    for c in chunks:
        over = limits is not None and (
            len(c.rows) > limits.rows
            or len(c.images) > limits.images
            or len({r.text for r in c.rows if r.error is None}) > limits.texts
        )
        ps = list(plan(c.rows, limits)) if over else [c]
        for j, p in enumerate(ps):
            yield c, p, j == len(ps) - 1


def LocalExecutor(  # the name retrieve.py knows; an executor is a function now
    loader: Any, compute: Callable[[Chunk, dict[str, Any]], list[dict[str, Any]]], limits: Limits | None = None
) -> Run:
    """This process computes; `loader`'s worker processes decode the images of the next chunks meanwhile."""
    return lambda chunks: stream(chunks, loader, compute, limits=limits)


UNITS = {"score": "pair", "embed": "item", "retrieve": "query"}


def run_chunks(
    cfg: JobConfig,
    chunks: Iterable[Chunk],
    sink: Sink,
    executor: Run,
    *,
    total_rows: int | None = None,
    desc: str = "btfast",
    progress: bool = True,
) -> Summary:
    """Run every chunk of `cfg`'s shard not yet in `sink`, write each as it completes, then finish the sink.
    `cfg.interrupt` (tests only): (n, signal) sends this process the signal once n chunks of this run are durable."""
    from tqdm import tqdm

    t0, resumed = time.perf_counter(), sink.rows_done
    i, n = cfg.shard
    if not sink.finished:
        indices: list[int] = []

        def todo() -> Iterable[Chunk]:
            for c in chunks:
                if c.index % n == i:
                    indices.append(c.index)
                    if c.index not in sink.done:
                        yield c

        bar = tqdm(
            total=total_rows,
            initial=sink.rows_done,
            unit=UNITS[cfg.command],
            desc=desc,
            disable=not (progress and cfg.progress),
            dynamic_ncols=True,
            smoothing=0.05,
        )
        errors = sink.errors_done
        try:
            for written, (index, outs) in enumerate(executor(todo()), 1):
                rec = sink.write(index, outs)
                if cfg.interrupt is not None and written == cfg.interrupt[0]:
                    os.kill(os.getpid(), cfg.interrupt[1])
                errors += rec["errors"]
                bar.update(rec["rows"])
                bar.set_postfix(errors=errors, refresh=False)
        finally:
            bar.close()
        sink.finish(indices)
    seconds = time.perf_counter() - t0
    new_rows = sink.rows_done - resumed
    return Summary(str(sink.out), sink.rows_done, sink.errors_done, resumed, new_rows, seconds, len(sink.done))


def run_job(cfg: JobConfig, start: Callable[[ExitStack], Any], *, desc: str, parts: bool = False) -> Summary:
    """The job `cfg` (`btfast score` / `embed`) on any executor, after checking its input. `start(stack)` readies
    the executor (cleanup on `stack`), returning the resume header and `begin(id_type) -> (executor, stats)`, called
    unless the sink is finished (it may load a model). `parts` (`--ray`) or a folder URL (s3://bucket/scores/): a
    folder of Parquet parts; else a `.jsonl` / `.parquet` `ChunkSink`."""
    from btfast.score.parts import PartStore
    from btfast.score.source import source_for

    source = source_for(cfg)
    source.check()  # a missing column or a wrong image root: fatal, before the model loads or Ray starts
    with ExitStack() as stack:
        header, begin = start(stack)
        parts = parts or is_url(cfg.out)
        parquet = parts or output_format(cfg.out) == "parquet"
        id_type = cfg.id_type(parquet)
        schema = output_schema(cfg, id_type) if parquet else None
        store = PartStore if parts else ChunkSink
        sink = stack.enter_context(store(cfg.out, header, overwrite=cfg.overwrite, schema=schema))
        if sink.finished:
            return run_chunks(cfg, [], sink, LocalExecutor(None, lambda c, x: []))
        executor, stats = begin(id_type)
        i, n = cfg.shard
        chunks = source.chunks(lambda k: k % n == i and k not in sink.done)  # those this run computes
        total = source.total() if cfg.progress else None
        total = None if total is None else -(-total // n)
        summary = run_chunks(cfg, chunks, sink, executor, total_rows=total, desc=desc)
        truncated = getattr(source, "truncated", None)  # tar shards that ended early: their readable rows were written
        summary.stats = {**stats, **({"shards_truncated": len(truncated)} if truncated else {})}
        return summary


def local_job(cfg: JobConfig) -> Summary:
    """The job `cfg` in this process: worker processes decode images, this process computes."""
    from btfast.score.engine import Context, Runtime, compute_chunk
    from btfast.score.loader import ImageLoader

    def start(stack: ExitStack) -> Any:
        rt = Runtime.of(cfg)

        def begin(id_type: str) -> tuple[Run, dict[str, int]]:
            images = cfg.image_preprocessor()
            loader = stack.enter_context(ImageLoader(images, rt.workers))  # the workers start while the model loads
            ctx = Context.load(cfg.model, cfg.head, rt.device, rt.dtype, images, **cfg.compute(rt.batch_size))

            compute = functools.partial(compute_chunk, ctx, cfg.command, id_type)
            return LocalExecutor(loader, lambda c, cv: compute(c.rows, cv), cfg.limits), ctx.stats  # tar: in pieces

        return rt.header(cfg), begin

    return run_job(cfg, start, desc="embed" if cfg.command == "embed" else f"score {cfg.head}")


def output_schema(cfg: JobConfig, id_type: str) -> Any:
    """The Arrow schema of the job's output rows (embed ids: always strings)."""
    if cfg.command == "embed":
        return arrow_schema(EMBED)
    return arrow_schema(score_columns(cfg.head, cfg.with_text), id_type)


def default_batch_size(device_type: str) -> int:
    """Images / texts per tower call and pairs per fusion call: 64 on CUDA, 16 on CPU."""
    return 64 if device_type == "cuda" else 16


def _config(command: str, shard: str | None, limits: Limits | None, check: bool = True, **kw: Any) -> JobConfig:
    """The job of a Python API call (`score`, `embed`, `retrieve`, `btfast.ray`'s): paths as strings, checked."""
    kw = {k: (None if v is None else os.fspath(v)) if k in PATHS else v for k, v in kw.items()}
    kw = {k: v for k, v in kw.items() if k != "max_pixels" or v is not None}  # None: JobConfig's default
    cfg = JobConfig(command=command, shard=parse_shard(shard), limits=limits or Limits(), **kw)
    if check:
        cfg.check()
    return cfg


PATHS = ("model", "itc_model", "out", "pairs", "images", "texts", "image_root")


def score(
    model: str | os.PathLike,
    pairs: str | os.PathLike | None,
    out: str | os.PathLike,
    *,
    shard: str | None = None,
    limits: Limits | None = None,
    fields: tuple[str, str, str] = ("image", "text", "id"),
    **options: Any,
) -> Summary:
    """Score every (image, text) row of `pairs` with the `head` ("itm" or "itc") model in folder `model`; or,
    with `pairs=None, shards="shards/{00000..00099}.tar"`, every sample of WebDataset tar shards.

    Writes `out` (.jsonl or .parquet): per input row its `row` number, `id`, `image`, `status` ("ok" or
    "error"), `error` (the reason), `text_truncated`, and the scores (ITM: `itm_logit`, `itm_prob`; ITC:
    `itc_cosine`, `itc_logit` = exp(logit_scale) · cosine). Resumes an interrupted run of the same job.
    `options`: the other fields of `JobConfig` (head, image_root, device, dtype, batch_size, workers, overwrite,
    dedup, exact, max_pixels, exif_orientation, with_text, progress, engine).
    """
    return local_job(
        _config("score", shard, limits, model=model, pairs=pairs, out=out, columns=Columns(*fields), **options)
    )


def embed(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    shard: str | None = None,
    limits: Limits | None = None,
    **options: Any,
) -> Summary:
    """Normalised ITC embeddings of every image and/or text (`images=`, `texts=`), one output row each (`kind` =
    image / text). Images first (rows 0..), then texts (their own row numbers). Resumable and shardable like
    `score`; `options` as there."""
    return local_job(_config("embed", shard, limits, model=model, out=out, head="itc", **options))
