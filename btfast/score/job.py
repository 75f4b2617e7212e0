"""Jobs: plan chunks → decode images in workers (a few chunks ahead) → compute → write, resumable and shardable.

`score(...)` and `embed(...)` are the Python API behind `btfast score` and `btfast embed`.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from btfast.score.config import Columns, JobConfig
from btfast.score.plan import Chunk, Limits, parse_shard
from btfast.score.schema import embed_schema, id_type_of, id_value, score_schema
from btfast.score.sink import ChunkSink, Sink, output_format

EXIT_OK = 0
EXIT_FATAL = 1
EXIT_ROW_ERRORS = 3


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
        return EXIT_ROW_ERRORS if self.errors else EXIT_OK

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


class Executor(Protocol):
    """Computes chunks: `run(chunks)` yields (chunk index, output rows) as each chunk completes, in any order.

    Output rows are a list of dicts or a pyarrow Table, as the sink takes them. Two executors: `LocalExecutor`
    (decode in worker processes, compute here) and `btfast.ray.cli.RayExecutor` (Ray Data, an actor pool)."""

    def run(self, chunks: Iterable[Chunk]) -> Iterator[tuple[int, Any]]: ...


def stream(
    chunks: Iterable[Chunk],
    loader: Any,
    compute: Callable[[Chunk, dict[str, Any]], list[dict[str, Any]]],
    prefetch: int = 2,
) -> Iterator[tuple[Chunk, list[dict[str, Any]]]]:
    """(chunk, output rows) in order; the images of the next `prefetch` chunks decode while one computes.

    With `loader=None` nothing is decoded ahead: `compute` gets no images (it fetches what it needs itself).
    """
    if loader is None:
        for c in chunks:
            yield c, compute(c, {})
        return
    it = iter(chunks)
    pending: deque[tuple[Chunk, Any]] = deque()

    def fill() -> None:
        while len(pending) <= prefetch:
            c = next(it, None)
            if c is None:
                return
            first: dict[str, Any] = {}
            for r in c.rows:
                if r.error is None and r.image_key is not None and r.image_key not in first:
                    first[r.image_key] = r.image
            pending.append((c, loader.submit(list(first), list(first.values()))))

    fill()
    while pending:
        c, handle = pending.popleft()
        fill()  # the workers start on the next chunks before this one is computed
        yield c, compute(c, loader.result(handle))


@dataclass
class LocalExecutor:
    """This process computes; `loader`'s worker processes decode the images of the next chunks meanwhile."""

    loader: Any
    compute: Callable[[Chunk, dict[str, Any]], list[dict[str, Any]]]
    prefetch: int = 2

    def run(self, chunks: Iterable[Chunk]) -> Iterator[tuple[int, list[dict[str, Any]]]]:
        for c, outs in stream(chunks, self.loader, self.compute, self.prefetch):
            yield c.index, outs


def run_chunks(
    chunks: Iterable[Chunk],
    sink: Sink,
    executor: Executor,
    *,
    shard: tuple[int, int] = (0, 1),
    total_rows: int | None = None,
    desc: str = "btfast",
    unit: str = "pair",
    progress: bool = True,
    interrupt: tuple[int, int] | None = None,
) -> Summary:
    """The one driver loop: run every chunk of this shard that the sink has not recorded, write each as it
    completes, then mark the job finished.

    `interrupt` (tests only, `JobConfig.interrupt`): (n, signal) sends this process the signal once n chunks of this
    run are durable."""
    from tqdm import tqdm

    summary = Summary(out=str(sink.out), resumed_rows=sink.rows_done)
    t0 = time.perf_counter()
    i, n = shard
    if not sink.finished:
        indices: list[int] = []

        def todo() -> Iterable[Chunk]:
            for c in chunks:
                if c.index % n != i:
                    continue
                indices.append(c.index)
                if c.index not in sink.done:
                    yield c

        bar = tqdm(
            total=total_rows,
            initial=sink.rows_done,
            unit=unit,
            desc=desc,
            disable=not progress,
            dynamic_ncols=True,
            smoothing=0.05,
            file=sys.stderr,
        )
        errors = sink.errors_done
        written = 0
        try:
            for index, outs in executor.run(todo()):
                rec = sink.write(index, outs)
                written += 1
                if interrupt is not None and written == interrupt[0]:
                    os.kill(os.getpid(), interrupt[1])
                summary.new_rows += rec["rows"]
                errors += rec["errors"]
                bar.update(rec["rows"])
                bar.set_postfix(errors=errors, refresh=False)
        finally:
            bar.close()
        sink.finish(indices)
    summary.seconds = time.perf_counter() - t0
    summary.rows = sink.rows_done
    summary.errors = sink.errors_done
    summary.chunks = len(sink.done)
    return summary


def score_job(cfg: JobConfig) -> Summary:
    """Run the `btfast score` job `cfg` (see `score`)."""
    import torch

    from btfast.preprocess import TextPreprocessor
    from btfast.score.engine import Context, load_head, resolve_device, resolve_dtype, score_chunk
    from btfast.score.loader import ImageLoader, default_workers
    from btfast.score.source import PairsSource

    if cfg.head not in ("itm", "itc"):
        raise ValueError(f"head must be itm or itc, got {cfg.head}")
    source = PairsSource(cfg)
    source.check()  # a missing column or a wrong image root: fatal, before the model loads
    dev = resolve_device(cfg.device)
    dt = resolve_dtype(cfg.dtype, dev)
    batch_size = cfg.batch_size or default_batch_size(dev.type)
    workers = default_workers() if cfg.workers is None else cfg.workers
    header = cfg.header(dtype=str(dt), batch_size=batch_size)
    images = cfg.image_preprocessor()
    texts = TextPreprocessor.from_pretrained(cfg.model)
    id_type = id_type_of(cfg.pairs, cfg.columns.id) if output_format(cfg.out) == "parquet" else "keep"
    schema = score_schema(cfg.head, id_type, cfg.with_text) if id_type != "keep" else None
    sink = ChunkSink(cfg.out, header, overwrite=cfg.overwrite, schema=schema)
    loader = None
    try:
        if sink.finished:
            return run_chunks([], sink, LocalExecutor(None, lambda c, x: []), shard=cfg.shard, progress=False)
        loader = ImageLoader(images, workers)  # workers start while the model loads
        net = load_head(cfg.model, cfg.head, dev, dt, engine=cfg.engine)
        ctx = Context(net, cfg.head, images, texts, batch_size=batch_size, dedup=cfg.dedup, with_text=cfg.with_text)
        total = source.total() or 0
        total = -(-total // cfg.shard[1]) if cfg.shard[1] > 1 else total

        def compute(c: Chunk, canvases: dict[str, Any]) -> list[dict[str, Any]]:
            with torch.inference_mode():
                outs = score_chunk(ctx, c.rows, canvases)
            for o in outs:
                o["id"] = id_value(o["id"], id_type)
            return outs

        with loader:
            summary = run_chunks(
                source.chunks(),
                sink,
                LocalExecutor(loader, compute),
                shard=cfg.shard,
                total_rows=total,
                desc=f"score {cfg.head}",
                progress=cfg.progress,
                interrupt=cfg.interrupt,
            )
        summary.stats = dict(ctx.stats)
        return summary
    finally:
        if loader is not None:
            loader.close()
        sink.close()


def embed_job(cfg: JobConfig) -> Summary:
    """Run the `btfast embed` job `cfg` (see `embed`)."""
    import torch

    from btfast.preprocess import TextPreprocessor
    from btfast.score.engine import Context, embed_chunk, load_head, resolve_device, resolve_dtype
    from btfast.score.loader import ImageLoader, default_workers
    from btfast.score.source import ListSource

    if cfg.images is None and cfg.texts is None:
        raise ValueError("give images, texts or both")
    source = ListSource(cfg)
    source.check()
    dev = resolve_device(cfg.device)
    dt = resolve_dtype(cfg.dtype, dev)
    batch_size = cfg.batch_size or default_batch_size(dev.type)
    workers = default_workers() if cfg.workers is None else cfg.workers
    header = cfg.header(dtype=str(dt), batch_size=batch_size)
    ipre = cfg.image_preprocessor()
    tpre = TextPreprocessor.from_pretrained(cfg.model)
    schema = embed_schema() if output_format(cfg.out) == "parquet" else None
    sink = ChunkSink(cfg.out, header, overwrite=cfg.overwrite, schema=schema)
    loader = None
    try:
        if sink.finished:
            return run_chunks([], sink, LocalExecutor(None, lambda c, x: []), shard=cfg.shard, progress=False)
        loader = ImageLoader(ipre, workers)
        net = load_head(cfg.model, "itc", dev, dt)
        ctx = Context(net, "itc", ipre, tpre, batch_size=batch_size)

        def compute(c: Chunk, canvases: dict[str, Any]) -> list[dict[str, Any]]:
            with torch.inference_mode():
                outs = embed_chunk(ctx, c.rows, canvases)
            for o in outs:
                o["id"] = id_value(o["id"], "string")
            return outs

        with loader:
            summary = run_chunks(
                source.chunks(),
                sink,
                LocalExecutor(loader, compute),
                shard=cfg.shard,
                desc="embed",
                unit="item",
                progress=cfg.progress,
                interrupt=cfg.interrupt,
            )
        summary.stats = dict(ctx.stats)
        return summary
    finally:
        if loader is not None:
            loader.close()
        sink.close()


def default_batch_size(device_type: str) -> int:
    """Images / texts per tower call and pairs per fusion call: 64 on CUDA, 16 on CPU."""
    return 64 if device_type == "cuda" else 16


def _config(command: str, shard: str | None, limits: Limits | None, **kw: Any) -> JobConfig:
    kw = {k: (None if v is None else os.fspath(v)) if k in PATHS else v for k, v in kw.items()}
    if kw.get("max_pixels") is None:
        kw.pop("max_pixels", None)
    return JobConfig(command=command, shard=parse_shard(shard), limits=limits or Limits(), **kw)


PATHS = ("model", "itc_model", "out", "pairs", "images", "texts", "image_root")


def score(
    model: str | os.PathLike,
    pairs: str | os.PathLike,
    out: str | os.PathLike,
    *,
    shard: str | None = None,
    limits: Limits | None = None,
    fields: tuple[str, str, str] = ("image", "text", "id"),
    **options: Any,
) -> Summary:
    """Score every (image, text) row of `pairs` with the `head` ("itm" or "itc") model in folder `model`.

    Writes `out` (.jsonl or .parquet): per input row its `row` number, `id`, `image`, `status` ("ok" or
    "error"), `error` (the reason), `text_truncated`, and the scores (ITM: `itm_logit`, `itm_prob`; ITC:
    `itc_cosine`, `itc_logit` = exp(logit_scale) · cosine). Resumes an interrupted run of the same job.
    `options`: the other fields of `JobConfig` (head, image_root, device, dtype, batch_size, workers, overwrite,
    dedup, exact, max_pixels, exif_orientation, with_text, progress, engine).
    """
    if not Path(pairs).is_file():
        raise FileNotFoundError(f"pairs file not found: {pairs}")
    cfg = _config("score", shard, limits, model=model, pairs=pairs, out=out, columns=Columns(*fields), **options)
    output_format(cfg.out)
    return score_job(cfg)


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
    cfg = _config("embed", shard, limits, model=model, out=out, head="itc", **options)
    output_format(cfg.out)
    return embed_job(cfg)
