"""Output that survives `kill -9`: chunks are written whole, then recorded; a rerun resumes after the last record.

JSONL: rows are appended to OUT, fsynced, then a line `{"chunk": k, "end": byte offset, ...}` is appended
to `OUT.btfast-progress` and fsynced. On restart OUT is cut back to the last recorded offset (dropping a chunk
that was being written when the process died) and recorded chunks are skipped.

Parquet cannot be appended: each chunk goes to `OUT.btfast-parts/chunk-XXXXXXXX.parquet` (written to a temporary
name, then renamed: present means complete), and when every chunk is done the parts are joined into OUT
(again through a temporary name) and removed.

The progress file starts with a header naming the job (command, model, input, shard, options): resuming with
different settings is refused, rather than mixing outputs; `overwrite=True` starts afresh.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from btfast.io.fs import write_atomic

PROGRESS_SUFFIX = ".btfast-progress"
PARTS_SUFFIX = ".btfast-parts"


class ResumeError(RuntimeError):
    """The existing output belongs to a different job, or is damaged."""


def same_job(old: dict[str, Any], new: dict[str, Any], out: Any) -> None:
    """ResumeError unless output `out`, written under header `old`, belongs to the job of header `new`."""
    new = json.loads(json.dumps(new))
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        raise ResumeError(
            f"{out} was written by a different job (differs in: {', '.join(diff)}); "
            "rerun with the same settings to resume, or pass --overwrite"
        )


def output_format(path: str | os.PathLike) -> str:
    name = str(path).lower()
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    raise ValueError(f"{path}: output must be .jsonl or .parquet")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, (bytes, bytearray)):
        return None
    return str(o)


def _clean(v: Any) -> Any:
    # JSON has no NaN/inf: write null (a NaN score would only come from a broken model).
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def dumps(row: dict[str, Any]) -> str:
    return json.dumps({k: _clean(v) for k, v in row.items()}, ensure_ascii=False, default=_json_default)


def _fsync(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


def write_parquet_atomic(table: Any, path: str | os.PathLike) -> None:
    """Write `table` as Parquet at `path` (a path or URL) whole: present means complete (`btfast.io.fs`)."""
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_atomic(path, buf.getvalue())


class Sink(Protocol):
    """Where a job's output goes, chunk by chunk, so that it survives `kill -9`.

    `write(index, rows)` makes chunk `index` durable atomically (all its rows or none) and returns its record
    (`rows`, `errors`); `done` maps every durable chunk to its record, read back on open: a rerun skips them;
    `finish(indices)` marks the job complete (a completion marker) once every chunk of `indices` is durable;
    `finished` says a previous run completed it. Opening output written by a different job (another header) is
    refused with ResumeError. Implementations: `ChunkSink` (one JSONL or Parquet file),
    `btfast.score.parts.PartStore` (a folder of Parquet parts); an fsspec location is one more.
    """

    out: Any
    done: dict[int, dict[str, Any]]
    finished: bool

    def write(self, index: int, rows: Any) -> dict[str, Any]: ...

    def finish(self, indices: Sequence[int]) -> None: ...

    def close(self) -> None: ...

    @property
    def rows_done(self) -> int: ...

    @property
    def errors_done(self) -> int: ...


class Written:
    """What both sinks count from `done` (chunk -> its record), and closing by `with`."""

    done: dict[int, dict[str, Any]]

    def close(self) -> None: ...

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def rows_done(self) -> int:
        return sum(int(r.get("rows", 0)) for r in self.done.values())

    @property
    def errors_done(self) -> int:
        return sum(int(r.get("errors", 0)) for r in self.done.values())


class ChunkSink(Written):
    """Writes chunks of output rows; knows which chunks a previous run finished and how many errors they held."""

    def __init__(
        self, out: str | os.PathLike, header: dict[str, Any], overwrite: bool = False, schema: Any = None
    ) -> None:
        self.out = Path(out)
        self.fmt = output_format(out)
        self.header = header
        self.schema = schema  # pyarrow schema for Parquet (None: inferred per chunk)
        self.progress_path = Path(str(out) + PROGRESS_SUFFIX)
        self.parts = Path(str(out) + PARTS_SUFFIX)
        self.done: dict[int, dict[str, Any]] = {}  # chunk -> its record (rows, errors, ...)
        self.finished = False  # a previous run completed the job
        if overwrite:
            self._reset()
        self._open()

    # ---- start / resume ------------------------------------------------------------------------------------
    def _reset(self) -> None:
        for p in (self.out, self.progress_path):
            if p.exists():
                p.unlink()
        if self.parts.exists():
            shutil.rmtree(self.parts)

    def _open(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        records = self._read_progress()
        if records is None:  # a fresh job
            if self.out.exists():
                raise ResumeError(
                    f"{self.out} exists but has no {self.progress_path.name}: not a btfast output to resume; "
                    "pass --overwrite to replace it"
                )
            if self.parts.exists():
                shutil.rmtree(self.parts)
            with open(self.progress_path, "w", encoding="utf-8") as f:
                f.write(json.dumps({"header": self.header}) + "\n")
                _fsync(f)
            if self.fmt == "jsonl":
                with open(self.out, "wb") as f:
                    _fsync(f)
        else:
            for rec in records:
                if "chunk" in rec:
                    self.done[int(rec["chunk"])] = rec
                elif rec.get("finished"):
                    self.finished = True
        if self.fmt == "jsonl":
            end = max((int(r["end"]) for r in self.done.values()), default=0)
            size = self.out.stat().st_size if self.out.exists() else -1
            if size < end:
                raise ResumeError(
                    f"{self.out} is shorter ({size} bytes) than its progress record ({end}): damaged; "
                    "pass --overwrite to start again"
                )
            if size > end:  # the chunk being written when the last run died: drop it, it will be redone
                with open(self.out, "r+b") as f:
                    f.truncate(end)
                    _fsync(f)
            self._f = open(self.out, "ab")
            self._offset = end
        else:
            self.parts.mkdir(exist_ok=True)
            for p in self.parts.glob("*.tmp"):
                p.unlink()
            if not self.finished:
                present = {int(p.stem.split("-")[1]) for p in self.parts.glob("chunk-*.parquet")}
                # a part renamed into place but not yet recorded is complete: count it
                for k in present - set(self.done):
                    self.done[k] = self._part_record(k)
                self.done = {k: v for k, v in self.done.items() if k in present}
        self._progress = open(self.progress_path, "a", encoding="utf-8")

    def _read_progress(self) -> list[dict[str, Any]] | None:
        if not self.progress_path.exists():
            return None
        data = self.progress_path.read_bytes()
        records = []
        good_end = 0  # bytes of whole, parsable lines
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            line = data[pos : (len(data) if nl < 0 else nl)]
            try:
                rec = json.loads(line) if line.strip() else None
            except ValueError:
                rec = False
            if nl < 0 or rec is False:
                if nl < 0 or data.find(b"\n", nl + 1) < 0 and not data[nl + 1 :].strip():
                    break  # the last record, cut by the kill: that chunk is not done
                raise ResumeError(f"{self.progress_path}: damaged record at byte {pos}; pass --overwrite")
            if rec is not None:
                records.append(rec)
            pos = good_end = nl + 1
        if good_end < len(data):  # drop the torn tail, so new records start on a line of their own
            with open(self.progress_path, "r+b") as f:
                f.truncate(good_end)
                _fsync(f)
        if not records or "header" not in records[0]:
            raise ResumeError(f"{self.progress_path}: no header; pass --overwrite")
        same_job(records[0]["header"], self.header, self.out)
        return records[1:]

    def _part_record(self, k: int) -> dict[str, Any]:
        import pyarrow.parquet as pq

        t = pq.read_table(self._part(k), columns=["status"])
        statuses = t.column("status").to_pylist()
        return {"chunk": k, "rows": len(statuses), "errors": sum(s != "ok" for s in statuses)}

    def _part(self, k: int) -> Path:
        return self.parts / f"chunk-{k:08d}.parquet"

    # ---- write ---------------------------------------------------------------------------------------------
    def write(self, chunk: int, rows: Any, **extra: Any) -> dict[str, Any]:
        """Write chunk `chunk`'s rows (dicts, or a pyarrow Table) and record it; returns the record."""
        if hasattr(rows, "to_pylist"):
            rows = rows.to_pylist()
        errors = sum(r.get("status") != "ok" for r in rows)
        rec: dict[str, Any] = {"chunk": chunk, "rows": len(rows), "errors": errors, **extra}
        if self.fmt == "jsonl":
            data = "".join(dumps(r) + "\n" for r in rows).encode("utf-8")
            self._f.write(data)
            _fsync(self._f)
            self._offset += len(data)
            rec["end"] = self._offset
        else:
            import pyarrow as pa

            table = pa.Table.from_pylist(list(rows), schema=self.schema)
            write_parquet_atomic(table, self._part(chunk))
        self._progress.write(json.dumps(rec) + "\n")
        _fsync(self._progress)
        self.done[chunk] = rec
        return rec

    def finish(self, all_chunks: Sequence[int]) -> None:
        """Mark the job complete (Parquet: join the parts into OUT). Call once every chunk is done."""
        if self.fmt == "parquet" and not self.finished:
            import pyarrow.parquet as pq

            tmp = Path(str(self.out) + ".tmp")
            writer = None
            try:
                for k in sorted(all_chunks):
                    t = pq.read_table(self._part(k))
                    if writer is None:
                        writer = pq.ParquetWriter(tmp, self.schema or t.schema)
                    writer.write_table(t.cast(writer.schema) if t.schema != writer.schema else t)
                if writer is None:  # no rows at all
                    import pyarrow as pa

                    pq.write_table(pa.Table.from_pylist([], schema=self.schema) if self.schema else pa.table({}), tmp)
            finally:
                if writer is not None:
                    writer.close()
            os.replace(tmp, self.out)
            shutil.rmtree(self.parts, ignore_errors=True)
        if not self.finished:
            self._progress.write(json.dumps({"finished": True}) + "\n")
            _fsync(self._progress)
            self.finished = True

    def close(self) -> None:
        if self.fmt == "jsonl":
            self._f.close()
        self._progress.close()
