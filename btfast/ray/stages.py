"""The two Ray Data stages, on pyarrow Tables (nothing here imports Ray), and how to size the actor pool.

`decode_batch` decodes each unique image of a batch once; its canvas rides on the image's first row only, later rows
carry the image's source (they may land in another model batch), a failed image its reason on every row.
`ModelWorker` keeps recent canvases and decodes one it never saw.
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
from btfast.score.schema import DECODED, ROWS, arrow_schema, id_value


def row_record(r: Row, id_type: str, **extra: Any) -> dict[str, Any]:
    """A `btfast.score.rows.Row` as a prepared input record (the `ROWS` of `btfast.score.schema`)."""
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
    fields = {"row": "row", "id": "id", "image_key": "_key", "image_name": "image", "text": "text", "error": "_error"}
    return Row(**{f: rec[c] for f, c in fields.items()}, kind=rec["kind"] or "pair")


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
    for rec in recs:  # (the columns of DECODED a record lacks are null in the table)
        key = rec["_key"]
        first = key is not None and key not in canvases
        if first:
            canvases[key] = pre.load_or_reason(rec["_path"] if rec["_path"] is not None else rec["_bytes"])
        c = canvases.get(key)
        rec["_decode_error"] = c if isinstance(c, str) else None
        if first or isinstance(c, str):  # a row with the canvas or the reason needs the source no more
            rec.update(_path=None, _bytes=None)
        if first and not isinstance(c, str):
            rec.update(_canvas=c.tobytes(), _h=c.shape[0], _w=c.shape[1])
    table = pa.Table.from_pylist(recs, schema=arrow_schema(DECODED, id_type))
    for name in keep:
        table = table.append_column(name, batch.column(name))
    return table


class ModelWorker:
    """Stage 2, one per actor: `__call__(decoded rows) -> output rows` of `mode` ("score" or "embed", as the CLI's);
    `threads`: torch CPU threads of this actor (what its CPU reservation allows)."""

    CACHE_BYTES = 256 << 20  # recent canvases kept: later rows of an image may come in a later batch

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
    ) -> None:
        import torch

        from btfast.score.engine import Context, resolve_device, resolve_dtype
        from btfast.score.job import output_schema

        if threads >= 1:
            torch.set_num_threads(int(threads))
        dev = resolve_device(device)
        cfg = cfg.replace(command=mode, head="itc" if mode == "embed" else cfg.head)
        self.mode, self.id_type, self.keep = mode, "string" if mode == "embed" else id_type, tuple(keep)
        self.pre = cfg.image_preprocessor()
        dt = resolve_dtype(dtype, dev)
        self.ctx = Context.load(cfg.model, cfg.head, dev, dt, self.pre, **cfg.compute(batch_size))
        self.schema = output_schema(cfg, id_type)
        self.cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.cached = self.redecoded = 0
        if warmup and dev.type == "cuda" and hasattr(self.ctx.model, "warmup"):
            self.ctx.model.warmup(batch_sizes=(batch_size,), text_lengths=(16, 40, 64))

    def _canvases(self, t: Any) -> dict[str, np.ndarray | str]:
        """Each image's canvas (shipped in `t`, else in the cache, else decoded here) or why it failed."""
        keys, errors = t.column("_key").to_pylist(), t.column("_decode_error").to_pylist()
        hs, ws = t.column("_h").to_pylist(), t.column("_w").to_pylist()
        out: dict[str, np.ndarray | str] = {}
        for i, k in enumerate(keys):
            if errors[i] is not None:
                out[k] = errors[i]
            elif hs[i] is not None:
                buf = t.column("_canvas")[i].as_buffer()
                out[k] = self._remember(k, np.frombuffer(buf, dtype=np.uint8).reshape(hs[i], ws[i], 3))
        missing = [i for i, k in enumerate(keys) if k is not None and k not in out]
        paths, blobs = (t.column(c).to_pylist() if missing else None for c in ("_path", "_bytes"))
        for i in (i for i in missing if keys[i] not in out):
            c = self.cache.get(keys[i])
            if c is None:  # the canvas went to another batch or actor: decode it here
                c = self.pre.load_or_reason(paths[i] if paths[i] is not None else blobs[i])
                self.redecoded += 1
            out[keys[i]] = self._remember(keys[i], c) if isinstance(c, np.ndarray) else c
        return out

    def _remember(self, key: str, canvas: np.ndarray) -> np.ndarray:
        """Keep `canvas` as the most recent (up to `CACHE_BYTES` in all); returns it."""
        self.cached += 0 if key in self.cache else canvas.nbytes
        self.cache[key] = canvas
        self.cache.move_to_end(key)
        while self.cached > self.CACHE_BYTES and len(self.cache) > 1:
            self.cached -= self.cache.popitem(last=False)[1].nbytes
        return canvas

    def __call__(self, t: Any) -> Any:
        import pyarrow as pa

        from btfast.score.engine import compute_chunk

        rows = list(map(record_row, t.select(["row", "id", "kind", "image", "text", "_error", "_key"]).to_pylist()))
        outs = compute_chunk(self.ctx, self.mode, self.id_type, rows, self._canvases(t))
        table = pa.Table.from_pylist(outs, schema=self.schema)
        for name in self.keep:
            table = table.append_column(name, t.column(name))
        return table


@dataclass(frozen=True)
class Placement:
    """How many model actors, on what, with what reservations (the rest of the CPUs decode images), and the model's
    batch size (a runtime bucket) and precision (resolved on the driver, which may have no GPU)."""

    device: str  # "cuda" or "cpu"
    actors: int
    actor_cpus: float
    actor_gpus: float
    threads: int  # torch threads per actor
    cluster_cpus: float
    batch_size: int  # pairs / images / texts per model call
    dtype: str  # a `btfast.score.engine.DTYPES` name

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
    batch_size: int | None = None,
    dtype: str | None = None,
) -> Placement:
    """Size the actor pool from the cluster's resources (`ray.cluster_resources()`).

    GPUs: one actor per `gpus_per_worker` GPUs (default 1), 1 CPU each while that leaves a CPU per actor for
    decoding, less otherwise. CPUs only: one actor per 4 CPUs; the actors together never reserve more than
    CPUs - 1, so decoding always has a CPU (an actor pool that takes every CPU stalls the pipeline).
    """
    import torch

    from btfast.runtime import Buckets
    from btfast.score.engine import DTYPES, resolve_dtype
    from btfast.score.job import default_batch_size

    cpus, gpus = (float(resources.get(k, 0) or 0) for k in ("CPU", "GPU"))
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
    else:
        if gpus_per_worker:
            raise ValueError("--gpus-per-worker needs --device cuda (or auto on a cluster with GPUs)")
        gpw, n = 0.0, workers or max(1, int(cpus // 4))
        share = max(1.0, float(int(cpus // (2 * n))))
        cap = max(0.0, (cpus - 1) / n)  # leave at least one CPU to decoding
        actor_cpus = share if share <= cap else math.floor(cap * 100) / 100
    b = batch_size or default_batch_size(device)
    if b < 1:
        raise ValueError(f"--batch-size must be >= 1, got {b}")
    b = Buckets().batch_for(b) if b <= Buckets().max_batch else b
    dt = resolve_dtype(dtype, torch.device(device))
    name = next(k for k, v in DTYPES.items() if v == dt)
    return Placement(device, n, actor_cpus, gpw, max(1, int(actor_cpus)), cpus, b, name)


def batch_rows(batch_size: int) -> tuple[int, int]:
    """(rows per model call, rows per decode task) for a model batch size.

    A model call takes 4 batches' worth of rows (dedup finds shared images and texts within a call); a decode task
    a multiple of that, at least 256 rows (scheduling a task costs more than decoding a small image): its model
    calls run one after the other on one actor, so an image's canvas, sent on its first row, is in that actor's
    cache for its later rows."""
    model = 4 * batch_size
    return model, model * max(1, -(-256 // model))
