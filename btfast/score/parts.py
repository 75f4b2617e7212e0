"""Resumable folder output (`--ray` runs, runs whose `--out` is a folder URL such as s3://bucket/scores/, and the
hidden parts of a `.parquet` file): deterministic parts (cut by `btfast.score.plan`, or one per tar shard, the same
in every run), each written whole once it holds all its rows; a rerun skips the parts present.

    OUT/part-00000042.parquet      one file per part, rows sorted by `row`; present means complete
    OUT/_btfast_job.json           the job's header (command, model, input, options); `finished` once done
    OUT/_SUCCESS                   written last, when every part is there
    OUT/.btfast-lock               (local folders) held (flock) by the running driver; released if it dies

OUT is a path or an fsspec URL. Parts go through `btfast.io.fs.write_atomic`: a kill leaves complete parts and at
most a temporary file (deleted on restart). Parquet readers (pyarrow, pandas, Spark, Ray) skip `_` and `.` names.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from btfast.io import fs
from btfast.score.sink import ResumeError, Sink, same_job

JOB_FILE = "_btfast_job.json"
SUCCESS_FILE = "_SUCCESS"
LOCK_FILE = ".btfast-lock"
PART_RE = re.compile(r"^part-(\d{8,})\.parquet$")
TMP_RE = re.compile(r"^\.(part-\d{8,}\.parquet|_btfast_job\.json|_SUCCESS)\.tmp$")  # left by a kill
META_KEY = b"btfast"


class PartStore(Sink):
    """The output folder of one job (a path, or a folder URL on any fsspec store): which parts are done (with their
    row / error counts), and writing new ones. A local folder is locked against a second writer; an object store
    has no locks: do not point two runs at one folder URL."""

    def __init__(
        self, folder: str | os.PathLike, header: dict[str, Any], overwrite: bool = False, schema: Any = None
    ) -> None:
        self.url = os.fspath(folder)
        self.out = fs.display(self.url) if fs.is_url(self.url) else Path(self.url)
        self.header = header
        self.schema = schema  # pyarrow schema for parts given as rows (None: they come as tables)
        self.done: dict[int, dict[str, int]] = {}
        self.finished = False
        self._lock_fd: int | None = None
        if fs.isfile(self.url):
            raise ResumeError(f"{self.out} is a file: --out is a folder of Parquet files here")
        try:
            if not fs.is_url(self.url):
                import fcntl

                os.makedirs(self.url, exist_ok=True)
                self._lock_fd = os.open(os.path.join(self.url, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    raise ResumeError(f"{self.out}: another btfast run is writing this folder") from None
            self._open(overwrite)
        except BaseException:
            self.close()
            raise

    def _remove(self, name: str) -> None:
        filesystem, p = fs.filesystem(fs.join(self.url, name))
        filesystem.rm_file(p)

    def _open(self, overwrite: bool) -> None:
        names = [fs.basename(n) for n in fs.listdir(self.url)] if fs.exists(self.url) else []
        foreign = [
            n for n in names if not (PART_RE.match(n) or TMP_RE.match(n) or n in (JOB_FILE, SUCCESS_FILE, LOCK_FILE))
        ]
        if foreign:
            shown = ", ".join(foreign[:3]) + (" ..." if len(foreign) > 3 else "")
            raise ResumeError(
                f"{self.out} holds files btfast did not write ({shown}): give an empty or new folder for --out"
            )
        # no part yet (a run that failed at its start): no output to protect, start afresh
        if JOB_FILE in names and any(PART_RE.match(n) for n in names) and not overwrite:
            try:
                record = json.loads(fs.read_bytes(fs.join(self.url, JOB_FILE)))
                old = record["header"]
            except (ValueError, KeyError, TypeError):
                raise ResumeError(f"{self.out}/{JOB_FILE}: damaged; pass --overwrite to start again") from None
            same_job(old, self.header, self.out)
            self.finished = bool(record.get("finished"))
            for n in names:
                m = PART_RE.match(n)
                info = self._read_meta(fs.join(self.url, n)) if m else None
                if info is not None:
                    self.done[int(m.group(1))] = info
                elif m or TMP_RE.match(n):  # an unreadable part (cannot be ours and complete: redo it), or one cut
                    self._remove(n)
        else:  # a fresh job (or --overwrite): clear what an earlier job left, then record the header
            for n in names:
                if n != LOCK_FILE:
                    self._remove(n)
            self._write_job()

    @staticmethod
    def _read_meta(path: str) -> dict[str, int] | None:
        import pyarrow.parquet as pq

        try:
            with fs.open_file(path, "rb") as f:
                md = pq.read_metadata(f)
            info = json.loads((md.metadata or {})[META_KEY])
            rows, errors = int(info["rows"]), int(info["errors"])
        except Exception:
            return None
        return {"rows": rows, "errors": errors} if rows == md.num_rows else None

    def path(self, k: int) -> str:
        return fs.join(self.url, f"part-{k:08d}.parquet")

    def write(self, k: int, table: Any) -> dict[str, int]:
        """Write part k (a pyarrow Table, or rows as dicts with `schema`) whole; its row and error counts go into
        the file's metadata, so that a present part is a complete one and resuming reads only footers."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not isinstance(table, pa.Table):
            table = pa.Table.from_pylist(list(table), schema=self.schema)
        info = {"rows": table.num_rows, "errors": table.num_rows - table.column("status").to_pylist().count("ok")}
        meta = {**(table.schema.metadata or {}), META_KEY: json.dumps({"part": k, **info}).encode()}
        buf = pa.BufferOutputStream()
        pq.write_table(table.replace_schema_metadata(meta), buf)
        fs.write_atomic(self.path(k), buf.getvalue().to_pybytes())
        self.done[k] = info
        return info

    def finish(self, parts: Iterable[int]) -> None:
        parts = sorted(parts)
        missing = [k for k in parts if k not in self.done]
        if missing:
            raise RuntimeError(f"cannot finish {self.out}: {len(missing)} parts missing (first {missing[0]})")
        if not self.finished:
            self._write_job(finished=True, parts=len(parts), rows=self.rows_done, errors=self.errors_done)
            fs.write_atomic(fs.join(self.url, SUCCESS_FILE), b"")
            self.finished = True

    def _write_job(self, **record: Any) -> None:
        data = json.dumps({"header": self.header, **record}, indent=1) + "\n"
        fs.write_atomic(fs.join(self.url, JOB_FILE), data.encode())

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
