"""Output that survives `kill -9`: chunks are written whole, then recorded; a rerun resumes after the last record.

`OUT.btfast-progress` starts with the job's header (command, model, input, shard, options): resuming with other
settings is refused. JSONL: a chunk's rows are appended to OUT and fsynced, then `{"chunk": k, "end": offset, ...}`
is appended to the progress file and fsynced; a restart cuts OUT back to the last recorded end. Parquet: chunks are
the parts of a hidden `btfast.score.parts.PartStore` folder, `OUT.btfast-parts`, joined into OUT at the end; then
their records and `finished` go to the progress file and the folder is removed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from btfast.io.fs import write_atomic


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


def dumps(row: dict[str, Any]) -> str:
    # JSON has no NaN/inf: write null (a NaN score would only come from a broken model).
    row = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
    return json.dumps(row, ensure_ascii=False, default=_json_default)


def _fsync(f: Any) -> None:
    f.flush()
    os.fsync(f.fileno())


class Sink:
    """Where a job's output goes, chunk by chunk, surviving `kill -9`: `ChunkSink` (a file) or `PartStore` (a folder).

    `write(index, rows)` makes chunk `index` durable, whole, and returns its record (`rows`, `errors`); `done` maps
    every durable chunk to its record (a rerun skips them); `finish(indices)` marks the job complete once all of
    `indices` are durable; `finished`: a previous run completed it. Another job's output is refused (ResumeError).
    """

    out: Any
    done: dict[int, dict[str, Any]]
    finished: bool

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


class ChunkSink(Sink):
    """One output file, `.jsonl` or `.parquet`, written a chunk at a time (see the module doc)."""

    def __init__(
        self, out: str | os.PathLike, header: dict[str, Any], overwrite: bool = False, schema: Any = None
    ) -> None:
        self.out = Path(out)
        self.fmt = output_format(out)
        self.header = header
        self.progress_path = Path(str(out) + ".btfast-progress")
        self.parts = Path(str(out) + ".btfast-parts")
        self._f = self._store = None  # JSONL: OUT open for appending; Parquet: the PartStore of the parts
        if overwrite:
            self.out.unlink(missing_ok=True)
            self.progress_path.unlink(missing_ok=True)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        records = self._read_progress()
        if records is None and self.out.exists():
            raise ResumeError(
                f"{self.out} exists but has no {self.progress_path.name}: not a btfast output to resume; "
                "pass --overwrite to replace it"
            )
        self.done: dict[int, dict[str, Any]] = {int(r["chunk"]): r for r in records or [] if "chunk" in r}
        self.finished = any(r.get("finished") for r in records or [] if "chunk" not in r)  # a previous run completed it
        if records is None or self.finished:  # parts of an earlier job, or left by a kill after `finished`
            shutil.rmtree(self.parts, ignore_errors=True)
        if records is None:  # written whole: a kill leaves a header or no progress file
            write_atomic(self.progress_path, (json.dumps({"header": header}) + "\n").encode())
        if self.fmt == "parquet" and not self.finished:
            from btfast.score.parts import PartStore

            self._store = PartStore(self.parts, header, schema=schema)
            self.done = self._store.done
        elif self.fmt == "jsonl":
            end = max((int(r["end"]) for r in self.done.values()), default=0)
            size = self.out.stat().st_size if self.out.exists() else -1 if end else 0  # -1: OUT lost
            if size < end:
                raise ResumeError(
                    f"{self.out} is shorter ({size} bytes) than its progress record ({end}): damaged; "
                    "pass --overwrite to start again"
                )
            self._f = open(self.out, "ab")  # created by a fresh job (or one killed before it created OUT)
            if size > end:  # the chunk being written when the last run died: drop it, it will be redone
                self._f.truncate(end)
                _fsync(self._f)
        self._progress = open(self.progress_path, "a", encoding="utf-8")

    def _read_progress(self) -> list[dict[str, Any]] | None:
        """The records after the header (None: no progress file); a last line torn by a kill is dropped."""
        if not self.progress_path.exists():
            return None
        data = self.progress_path.read_bytes()
        *lines, tail = data.split(b"\n")  # tail: after the last newline (torn by a kill, or empty)
        records = []
        for i, line in enumerate(lines):
            try:
                records += [json.loads(line)] if line.strip() else []
            except ValueError:
                if i < len(lines) - 1 or tail.strip():
                    at = sum(len(x) + 1 for x in lines[:i])
                    raise ResumeError(f"{self.progress_path}: damaged record at byte {at}; pass --overwrite") from None
                lines.pop()  # the last record, cut by the kill: that chunk is not done
        good_end = sum(len(x) + 1 for x in lines)  # bytes of whole, parsable lines
        if good_end < len(data):  # drop the torn tail: new records start on a new line
            with open(self.progress_path, "r+b") as f:
                f.truncate(good_end)
                _fsync(f)
        if not records or "header" not in records[0]:
            raise ResumeError(f"{self.progress_path}: no header; pass --overwrite")
        same_job(records[0]["header"], self.header, self.out)
        return records[1:]

    def _record(self, *records: dict[str, Any]) -> None:
        self._progress.write("".join(json.dumps(r) + "\n" for r in records))
        _fsync(self._progress)

    def write(self, chunk: int, rows: Any) -> dict[str, Any]:
        """`rows`: dicts, or a pyarrow Table."""
        if self._store is not None:
            return self._store.write(chunk, rows)
        if hasattr(rows, "to_pylist"):
            rows = rows.to_pylist()
        self._f.write("".join(dumps(r) + "\n" for r in rows).encode("utf-8"))
        _fsync(self._f)
        errors = sum(r.get("status") != "ok" for r in rows)
        self.done[chunk] = {"chunk": chunk, "rows": len(rows), "errors": errors, "end": self._f.tell()}  # appended
        self._record(self.done[chunk])
        return self.done[chunk]

    def finish(self, all_chunks: Sequence[int]) -> None:
        """Parquet: the parts are first joined, in order, into OUT (through OUT.tmp) and recorded."""
        if self.finished:
            return
        records = []
        if self._store is not None:
            import pyarrow as pa
            import pyarrow.parquet as pq

            paths = [self._store.path(k) for k in sorted(all_chunks)]
            schema = self._store.schema or (pq.read_schema(paths[0]).remove_metadata() if paths else pa.schema([]))
            tmp = Path(str(self.out) + ".tmp")
            with pq.ParquetWriter(tmp, schema) as writer:
                for p in paths:
                    writer.write_table(pq.read_table(p).cast(schema))
                if not paths:  # no rows at all
                    writer.write_table(schema.empty_table())
            os.replace(tmp, self.out)
            records = [{"chunk": k, **r} for k, r in self.done.items()]
        self._record(*records, {"finished": True})
        self.finished = True
        shutil.rmtree(self.parts, ignore_errors=True)

    def close(self) -> None:
        for f in (self._f, self._progress, self._store):
            if f is not None:
                f.close()
