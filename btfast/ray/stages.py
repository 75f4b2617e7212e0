"""The two Ray Data stages, on pyarrow Tables (nothing here imports Ray), and how to size the actor pool.

`decode_batch` (CPU tasks) parses input records as `btfast score` does and decodes each unique image of the batch
once into a uint8 canvas, shipped on the image's first row only: later rows carry the image's source instead (they
may land in another model batch); a failed image carries its reason on every row. `ModelWorker` (one per actor)
loads the head once and maps decoded rows to output rows with `btfast.score.engine.compute_chunk`, keeping recent
canvases; a canvas it never saw is decoded there.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from btfast.score.config import Columns, JobConfig
from btfast.score.rows import ImageResolver, Row, parse_record
from btfast.score.schema import DECODED, ROWS, arrow_schema, arrow_type, embed_schema, id_value, score_schema


def rows_schema(id_type: str, keep: Sequence[tuple[str, Any]] = ()) -> Any:
    """Schema of prepared input rows (what the CLI's driver builds from the source's rows)."""
    import pyarrow as pa

    base = arrow_schema(ROWS, id_type)
    return pa.schema([*base, *[pa.field(n, t) for n, t in keep]])


def row_record(r: Row, id_type: str, **extra: Any) -> dict[str, Any]:
    """A `btfast.score.rows.Row` as a prepared input record (see `rows_schema`)."""
    src = r.image if r.error is None else None
    return {
        "row": r.row,
        "id": id_value(r.id, id_type),
        "kind": r.kind,
        "image": r.image_name,
        "text": r.text,
        "_error": r.error,
        "_key": r.image_key if r.error is None else None,
        "_path": src if isinstance(src, str) else None,
        "_bytes": bytes(src) if isinstance(src, (bytes, bytearray, memoryview)) else None,
        **extra,
    }


def record_row(rec: dict[str, Any]) -> Row:
    """The `Row` of a prepared record, without its image source (the canvas comes beside it)."""
    return Row(
        row=rec["row"],
        id=rec["id"],
        image_key=rec["_key"],
        image_name=rec["image"],
        text=rec["text"],
        error=rec["_error"],
        kind=rec["kind"] or "pair",
    )


def decode_batch(
    batch: Any,
    *,
    pre: Any,
    kind: str = "pair",
    prepared: bool = False,
    columns: Columns | None = None,
    image_root: str | None = None,
    base: str | None = None,
    id_type: str = "string",
    keep: Sequence[str] = (),
) -> Any:
    """Stage 1: input records (an `image` path or bytes, a `text`, optionally `id` and `row`; or, `prepared`, the
    records of `row_record`) → rows with decoded canvases (see the module doc)."""
    import pyarrow as pa

    if prepared:
        recs = batch.select(list(ROWS)).to_pylist()
    else:
        c = columns or Columns()
        resolver = ImageResolver(image_root, base or os.getcwd())
        recs = []
        for rec in batch.to_pylist():
            row = rec.get("row")
            row = int(row) if isinstance(row, (int, np.integer)) else None
            recs.append(row_record(parse_record(rec, row, resolver, kind, c.image, c.text, c.id), id_type))
    canvases: dict[str, np.ndarray | str] = {}
    cols: dict[str, list[Any]] = {c: [] for c in DECODED}
    for rec in recs:
        key = rec["_key"]
        first = key is not None and key not in canvases
        if first:
            canvases[key] = pre.load_or_reason(rec["_path"] if rec["_path"] is not None else rec["_bytes"])
        c = canvases.get(key) if key is not None else None
        canvas = c if isinstance(c, np.ndarray) else None
        for name in ROWS:
            cols[name].append(rec[name])
        shipped = first and canvas is not None
        cols["_canvas"].append(canvas.tobytes() if shipped else None)
        cols["_h"].append(canvas.shape[0] if shipped else None)
        cols["_w"].append(canvas.shape[1] if shipped else None)
        cols["_decode_error"].append(c if isinstance(c, str) else None)
        if shipped or isinstance(c, str):  # the source is needed only by rows without a canvas
            cols["_path"][-1] = cols["_bytes"][-1] = None
    arrays = {c: pa.array(v, type=arrow_type(c, id_type)) for c, v in cols.items()}
    for name in keep:
        arrays[name] = batch.column(name)
    return pa.table(arrays)


class ModelWorker:
    """One per actor: the model loaded once, then `__call__(decoded rows) -> output rows` (pyarrow Tables).

    mode "score": ITM / ITC scores of pairs (`btfast score`); "embed": ITC embeddings of image and text rows
    (`btfast embed`). `threads`: torch CPU threads of this actor (what its CPU reservation allows).
    """

    def __init__(
        self,
        cfg: JobConfig,
        mode: str,
        device: str,
        dtype: str,
        batch_size: int,
        id_type: str = "string",
        keep: Sequence[str] = (),
        threads: int = 1,
        warmup: bool = True,
        cache_bytes: int = 256 << 20,
    ) -> None:
        import torch

        from btfast.score.engine import Context, resolve_device, resolve_dtype

        if threads >= 1:
            torch.set_num_threads(int(threads))
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        head = "itc" if mode == "embed" else cfg.head
        self.mode, self.id_type, self.keep = mode, id_type, tuple(keep)
        self.pre = cfg.image_preprocessor()
        self.ctx = Context.load(cfg.model, head, dev, dt, self.pre, **cfg.compute(batch_size))
        self.schema = embed_schema() if mode == "embed" else score_schema(head, id_type, cfg.with_text)
        self.cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.cache_bytes, self.cached = cache_bytes, 0
        self.redecoded = 0
        self.warmup_s = 0.0
        net = self.ctx.model
        if warmup and dev.type == "cuda" and hasattr(net, "warmup"):
            self.warmup_s = sum(net.warmup(batch_sizes=(batch_size,), text_lengths=(16, 40, 64)).values())

    def _canvases(self, t: Any) -> dict[str, np.ndarray | str]:
        keys = t.column("_key").to_pylist()
        derr = t.column("_decode_error").to_pylist()
        hs, ws = t.column("_h").to_pylist(), t.column("_w").to_pylist()
        canvas_col = t.column("_canvas")
        out: dict[str, np.ndarray | str] = {}
        for i, k in enumerate(keys):
            if k is None or k in out:
                continue
            if derr[i] is not None:
                out[k] = derr[i]
            elif hs[i] is not None:
                buf = canvas_col[i].as_buffer()
                out[k] = np.frombuffer(buf, dtype=np.uint8).reshape(hs[i], ws[i], 3)
                self._remember(k, out[k])
            elif k in self.cache:
                out[k] = self.cache[k]
                self.cache.move_to_end(k)
        missing = [i for i, k in enumerate(keys) if k is not None and k not in out]
        if missing:  # the canvas went to another batch or actor: decode it here
            paths, blobs = t.column("_path").to_pylist(), t.column("_bytes").to_pylist()
            for i in missing:
                k = keys[i]
                if k not in out:
                    out[k] = self.pre.load_or_reason(paths[i] if paths[i] is not None else blobs[i])
                    self.redecoded += 1
                    if isinstance(out[k], np.ndarray):
                        self._remember(k, out[k])
        return out

    def _remember(self, key: str, canvas: np.ndarray) -> None:
        """Keep recent canvases (up to `cache_bytes`): later rows of an image may come in a later batch."""
        if key in self.cache:
            self.cache.move_to_end(key)
            return
        self.cache[key] = canvas
        self.cached += canvas.nbytes
        while self.cached > self.cache_bytes and len(self.cache) > 1:
            self.cached -= self.cache.popitem(last=False)[1].nbytes

    def __call__(self, t: Any) -> Any:
        import pyarrow as pa

        from btfast.score.engine import compute_chunk

        canvases = self._canvases(t)
        rows = [
            record_row(rec) for rec in t.select(["row", "id", "kind", "image", "text", "_error", "_key"]).to_pylist()
        ]
        outs = compute_chunk(self.ctx, self.mode, "string" if self.mode == "embed" else self.id_type, rows, canvases)
        table = pa.Table.from_pylist(outs, schema=self.schema)
        for name in self.keep:
            table = table.append_column(name, t.column(name))
        return table


# ---- placement ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """How many model actors, on what, with what reservations; the rest of the CPUs decode images."""

    device: str  # "cuda" or "cpu"
    actors: int
    actor_cpus: float
    actor_gpus: float
    threads: int  # torch threads per actor
    cluster_cpus: float
    cluster_gpus: float

    def describe(self) -> str:
        gpus = f", {self.actor_gpus:g} GPU" if self.actor_gpus else ""
        left = self.cluster_cpus - self.actors * self.actor_cpus
        return (
            f"{self.actors} model actor(s) on {self.device} ({self.actor_cpus:g} CPU{gpus} each, "
            f"{self.threads} torch thread(s)); {left:g} of {self.cluster_cpus:g} CPUs left for decoding"
        )


def place(
    resources: dict[str, float],
    device: str | None = "auto",
    gpus_per_worker: float | None = None,
    workers: int | None = None,
) -> Placement:
    """Size the actor pool from the cluster's resources (`ray.cluster_resources()`).

    GPUs: one actor per `gpus_per_worker` GPUs (default 1), 1 CPU each while that leaves a CPU per actor for
    decoding, less otherwise. CPUs only: one actor per 4 CPUs; the actors together never reserve more than
    CPUs - 1, so decoding always has a CPU (an actor pool that takes every CPU stalls the pipeline).
    """
    cpus = float(resources.get("CPU", 0) or 0)
    gpus = float(resources.get("GPU", 0) or 0)
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be >= 1 with --ray, got {workers}")
    if gpus_per_worker is not None and gpus_per_worker < 0:
        raise ValueError(f"--gpus-per-worker must be >= 0, got {gpus_per_worker}")
    device = (device or "auto").lower()
    if device == "auto":
        device = "cuda" if gpus > 0 and gpus_per_worker != 0 else "cpu"
    elif device.startswith("cuda"):
        device = "cuda"
    if device not in ("cuda", "cpu"):
        raise ValueError(f"--device with --ray must be auto, cpu or cuda, got {device}")
    if device == "cuda":
        if gpus <= 0:
            raise ValueError("--device cuda: the Ray cluster has no GPUs")
        gpw = gpus_per_worker or 1.0
        if gpw > gpus:
            raise ValueError(f"--gpus-per-worker {gpw:g}: the Ray cluster has {gpus:g} GPUs")
        n = workers or max(1, int(math.floor(gpus / gpw + 1e-9)))
        actor_cpus = 1.0 if cpus - n >= n else max(0.0, math.floor((cpus - 1) / n * 100) / 100)
        return Placement("cuda", n, actor_cpus, gpw, max(1, int(actor_cpus)), cpus, gpus)
    if gpus_per_worker:
        raise ValueError("--gpus-per-worker needs --device cuda (or auto on a cluster with GPUs)")
    n = workers or max(1, int(cpus // 4))
    share = max(1.0, float(int(cpus // (2 * n))))
    cap = max(0.0, (cpus - 1) / n)  # leave at least one CPU to decoding
    actor_cpus = share if share <= cap else math.floor(cap * 100) / 100
    return Placement("cpu", n, actor_cpus, 0.0, max(1, int(actor_cpus)), cpus, gpus)


def actor_batch_size(device: str, batch_size: int | None) -> int:
    """Pairs / images / texts per model call (`btfast.score.job.default_batch_size`), up to a runtime bucket."""
    from btfast.runtime import Buckets
    from btfast.score.job import default_batch_size

    b = batch_size or default_batch_size(device)
    if b < 1:
        raise ValueError(f"--batch-size must be >= 1, got {b}")
    steps = Buckets()
    return steps.batch_for(b) if b <= steps.max_batch else b


def batch_rows(batch_size: int) -> tuple[int, int]:
    """(rows per model call, rows per decode task) for a model batch size.

    A model call takes 4 batches' worth of rows (dedup finds shared images and texts within a call). A decode task
    takes a multiple of that, at least 256 rows: a Ray task costs milliseconds to schedule, decoding a small image
    less. Its output block is then cut into model calls that run one after the other on one actor, so the canvas
    sent on an image's first row is in that actor's cache for the image's later rows.
    """
    model = 4 * batch_size
    return model, model * max(1, -(-256 // model))


def dtype_name(dtype: str | None, device: str) -> str:
    """The precision the actors will use (resolved where the driver may have no GPU)."""
    import torch

    from btfast.score.engine import DTYPES, resolve_dtype

    dt = resolve_dtype(dtype, torch.device(device))
    return next(k for k, v in DTYPES.items() if v == dt)
