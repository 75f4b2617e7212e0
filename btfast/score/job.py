"""Jobs: plan chunks → decode images in workers (a few chunks ahead) → compute → write, resumable and shardable.

`score(...)` and `embed(...)` are the Python API behind `btfast score` and `btfast embed`.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from btfast.score.plan import Chunk, Limits, parse_shard, plan
from btfast.score.sink import ChunkSink, output_format

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


def run_chunks(
    chunks: Iterable[Chunk],
    sink: ChunkSink,
    loader: Any,
    compute: Callable[[Chunk, dict[str, Any]], list[dict[str, Any]]],
    *,
    shard: tuple[int, int] = (0, 1),
    total_rows: int | None = None,
    desc: str = "btfast",
    unit: str = "pair",
    progress: bool = True,
    prefetch: int = 2,
) -> Summary:
    """Run every chunk of this shard that the sink has not recorded; decode `prefetch` chunks ahead."""
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
        try:
            for c, outs in stream(todo(), loader, compute, prefetch=prefetch):
                sink.write(c.index, outs)
                summary.new_rows += len(outs)
                errors += sum(o.get("status") != "ok" for o in outs)
                bar.update(len(outs))
                bar.set_postfix(errors=errors, refresh=False)
        finally:
            bar.close()
        sink.finish(indices)
    summary.seconds = time.perf_counter() - t0
    summary.rows = sink.rows_done
    summary.errors = sink.errors_done
    summary.chunks = len(sink.done)
    return summary


def _header(command: str, **kw: Any) -> dict[str, Any]:
    return {"command": command, **{k: (str(v) if isinstance(v, Path) else v) for k, v in kw.items()}}


def _abs(p: str | os.PathLike | None) -> str | None:
    return None if p is None else os.path.abspath(p)


def score(
    model: str | os.PathLike,
    pairs: str | os.PathLike,
    out: str | os.PathLike,
    *,
    head: str = "itm",
    image_root: str | os.PathLike | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    shard: str | None = None,
    overwrite: bool = False,
    limits: Limits | None = None,
    dedup: bool = True,
    exact: bool = True,
    max_pixels: int | None = None,
    progress: bool = True,
    engine: str = "btfast",
    fields: tuple[str, str, str] = ("image", "text", "id"),
) -> Summary:
    """Score every (image, text) row of `pairs` with the `head` ("itm" or "itc") model in folder `model`.

    Writes `out` (.jsonl or .parquet): per input row its `row` number, `id`, `image`, `status` ("ok" or
    "error"), `error` (the reason), `text_truncated`, and the scores (ITM: `itm_logit`, `itm_prob`; ITC:
    `itc_cosine`, `itc_logit` = exp(logit_scale) · cosine). Resumes an interrupted run of the same job.
    """
    import torch

    from btfast.preprocess import DEFAULT_MAX_PIXELS, ImagePreprocessor, TextPreprocessor
    from btfast.score.engine import Context, load_head, resolve_device, resolve_dtype, score_chunk
    from btfast.score.loader import ImageLoader, default_workers
    from btfast.score.rows import ImageResolver, count_records, input_format, read_pairs

    if head not in ("itm", "itc"):
        raise ValueError(f"head must be itm or itc, got {head}")
    limits = limits or Limits()
    shard_i, shard_n = parse_shard(shard)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    batch_size = batch_size or (64 if dev.type == "cuda" else 16)
    workers = default_workers() if workers is None else workers
    if not Path(pairs).is_file():
        raise FileNotFoundError(f"pairs file not found: {pairs}")
    input_format(pairs)
    output_format(out)
    header = _header(
        "score",
        head=head,
        model=_abs(model),
        pairs=_abs(pairs),
        image_root=_abs(image_root),
        shard=f"{shard_i}/{shard_n}",
        limits=asdict(limits),
        dedup=dedup,
        exact=exact,
        dtype=str(dt),
        batch_size=batch_size,
        fields=list(fields),
        engine=engine,
    )
    images = ImagePreprocessor.from_pretrained(model, exact=exact, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
    texts = TextPreprocessor.from_pretrained(model)
    sink = ChunkSink(out, header, overwrite=overwrite, schema=_score_schema(head, pairs, fields[2], out))
    loader = None
    try:
        if sink.finished:
            return run_chunks([], sink, None, lambda c, x: [], shard=(shard_i, shard_n), progress=False)
        loader = ImageLoader(images, workers)  # workers start while the model loads
        net = load_head(model, head, dev, dt, engine=engine)
        ctx = Context(net, head, images, texts, batch_size=batch_size, dedup=dedup)
        resolver = ImageResolver(image_root, base=Path(pairs).parent)
        rows = read_pairs(pairs, resolver, image_field=fields[0], text_field=fields[1], id_field=fields[2])
        total = count_records(pairs)
        total = -(-total // shard_n) if shard_n > 1 else total
        id_str = sink.fmt == "parquet" and str(sink.schema.field("id").type) == "string"

        def compute(c: Chunk, canvases: dict[str, Any]) -> list[dict[str, Any]]:
            with torch.inference_mode():
                outs = score_chunk(ctx, c.rows, canvases)
            if id_str:
                for o in outs:
                    o["id"] = None if o["id"] is None else str(o["id"])
            return outs

        with loader:
            summary = run_chunks(
                plan(rows, limits),
                sink,
                loader,
                compute,
                shard=(shard_i, shard_n),
                total_rows=total,
                desc=f"score {head}",
                progress=progress,
            )
        summary.stats = dict(ctx.stats)
        return summary
    finally:
        if loader is not None:
            loader.close()
        sink.close()


def _score_schema(head: str, pairs: str | os.PathLike, id_field: str, out: str | os.PathLike) -> Any:
    if output_format(out) != "parquet":
        return None
    import pyarrow as pa

    id_type = pa.string()
    if str(pairs).lower().endswith((".parquet", ".pq")):
        import pyarrow.parquet as pq

        schema = pq.read_schema(pairs)
        if id_field not in schema.names or pa.types.is_integer(schema.field(id_field).type):
            id_type = pa.int64()
    f32 = pa.float32()
    cols = [
        ("row", pa.int64()),
        ("id", id_type),
        ("image", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("text_truncated", pa.bool_()),
    ]
    cols += [("itm_logit", f32), ("itm_prob", f32)] if head == "itm" else [("itc_cosine", f32), ("itc_logit", f32)]
    return pa.schema(cols)


def embed(
    model: str | os.PathLike,
    out: str | os.PathLike,
    *,
    images: str | os.PathLike | None = None,
    texts: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    shard: str | None = None,
    overwrite: bool = False,
    limits: Limits | None = None,
    exact: bool = True,
    max_pixels: int | None = None,
    progress: bool = True,
) -> Summary:
    """Normalised ITC embeddings of every image and/or text, one output row each (`kind` = image / text).

    Images first (rows 0..), then texts (their own row numbers; `kind` tells them apart). Resumable and
    shardable like `score`.
    """
    import torch

    from btfast.preprocess import DEFAULT_MAX_PIXELS, ImagePreprocessor, TextPreprocessor
    from btfast.score.engine import Context, embed_chunk, load_head, resolve_device, resolve_dtype
    from btfast.score.loader import ImageLoader, default_workers
    from btfast.score.rows import read_images, read_texts

    if images is None and texts is None:
        raise ValueError("give images, texts or both")
    limits = limits or Limits()
    shard_i, shard_n = parse_shard(shard)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    batch_size = batch_size or (64 if dev.type == "cuda" else 16)
    workers = default_workers() if workers is None else workers
    output_format(out)
    header = _header(
        "embed",
        model=_abs(model),
        images=_abs(images),
        texts=_abs(texts),
        image_root=_abs(image_root),
        shard=f"{shard_i}/{shard_n}",
        limits=asdict(limits),
        exact=exact,
        dtype=str(dt),
        batch_size=batch_size,
    )
    ipre = ImagePreprocessor.from_pretrained(model, exact=exact, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
    tpre = TextPreprocessor.from_pretrained(model)
    sink = ChunkSink(out, header, overwrite=overwrite, schema=_embed_schema(out))
    loader = None
    try:
        if sink.finished:
            return run_chunks([], sink, None, lambda c, x: [], shard=(shard_i, shard_n), progress=False)
        loader = ImageLoader(ipre, workers)
        net = load_head(model, "itc", dev, dt)
        ctx = Context(net, "itc", ipre, tpre, batch_size=batch_size)

        # image rows and text rows never share a chunk: plan them apart (chunk numbers continue)
        def chunks() -> Iterable[Chunk]:
            k = 0
            for source in (
                read_images(images, image_root) if images is not None else [],
                read_texts(texts) if texts is not None else [],
            ):
                for c in plan(source, limits):
                    c.index = k
                    k += 1
                    yield c

        def compute(c: Chunk, canvases: dict[str, Any]) -> list[dict[str, Any]]:
            with torch.inference_mode():
                outs = embed_chunk(ctx, c.rows, canvases)
            for o in outs:
                o["id"] = None if o["id"] is None else str(o["id"])
            return outs

        with loader:
            summary = run_chunks(
                chunks(), sink, loader, compute, shard=(shard_i, shard_n), desc="embed", unit="item", progress=progress
            )
        summary.stats = dict(ctx.stats)
        return summary
    finally:
        if loader is not None:
            loader.close()
        sink.close()


def _embed_schema(out: str | os.PathLike) -> Any:
    if output_format(out) != "parquet":
        return None
    import pyarrow as pa

    return pa.schema(
        [
            ("kind", pa.string()),
            ("row", pa.int64()),
            ("id", pa.string()),
            ("image", pa.string()),
            ("text", pa.string()),
            ("status", pa.string()),
            ("error", pa.string()),
            ("text_truncated", pa.bool_()),
            ("embedding", pa.list_(pa.float32())),
        ]
    )
