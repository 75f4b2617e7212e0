"""Reading inputs: pairs, image lists and text lists from JSONL, CSV, Parquet or plain text; never pickle.

Every input row keeps its 0-based position in the file (`row`), the key that resume, sharding and joining
rely on. A row that cannot be used (malformed JSON, wrong field count, missing or empty field, wrong type)
becomes a `Row` with `error` set: it is written out with an error status and the run goes on.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import os
import posixpath
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from btfast.errors import InputError
from btfast.io import fs

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".jfif"}
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}
FORMATS.update({".parquet": "parquet", ".pq": "parquet", ".txt": "txt"})
Record = tuple[dict[str, Any] | None, str | None]  # an input's columns, or None and why the row could not be read


@dataclass
class Row:
    """One input row. `image` is a resolved path or raw bytes; `image_key` identifies it for dedup."""

    row: int | None
    id: Any = None
    image: str | bytes | None = None
    image_key: str | None = None
    image_name: str | None = None  # as written in the input (path) or "sha1:..." for bytes
    text: str | None = None
    error: str | None = None
    kind: str = "pair"  # "pair", "image" (an image list) or "text" (a text list)


def image_sources(rows: Iterable[Row]) -> dict[str, Any]:
    """Image key → source (a path or bytes) of the valid rows, once per image, in first-appearance order."""
    return {r.image_key: r.image for r in rows if r.error is None and r.image_key is not None}  # same key: same image


def input_format(path: str | os.PathLike) -> str:
    """'jsonl', 'csv', 'tsv', 'parquet' or 'txt', from the file name."""
    name = str(path).lower()
    fmt = FORMATS.get(name[name.rfind(".") :])  # from the last dot (no dot: the last character, never a suffix)
    if fmt is not None:
        return fmt
    raise ValueError(f"{path}: unknown input format (want .jsonl, .csv, .tsv, .parquet or .txt)")


def iter_records(path: str | os.PathLike, text_field: str = "text") -> Iterator[Record]:
    """(record, None) per row, or (None, reason) for a row that cannot be parsed. Order = file order."""
    fmt = input_format(path)
    if fmt == "jsonl":
        with fs.open_file(path, "rb") as f:
            for line in filter(None, (raw.strip() for raw in f)):  # blank lines are not rows
                try:
                    rec = json.loads(line)
                except (ValueError, UnicodeDecodeError) as e:
                    yield None, f"malformed JSON: {e}"
                    continue
                bad = f"malformed row: a JSON {type(rec).__name__}, not an object"
                yield (rec, None) if isinstance(rec, dict) else (None, bad)
    elif fmt in ("csv", "tsv"):
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        with _text(path, newline="") as f:
            reader = csv.reader(f, delimiter="\t" if fmt == "tsv" else ",")
            header = [h.strip() for h in next(reader, [])]
            for fields in filter(None, reader):
                if len(fields) == len(header):
                    yield dict(zip(header, fields)), None
                else:
                    yield None, f"malformed row: {len(fields)} fields, the header has {len(header)}"
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        with fs.open_file(path, "rb") as raw:
            for batch in pq.ParquetFile(raw).iter_batches(batch_size=8192):
                yield from ((rec, None) for rec in batch.to_pylist())
    else:  # txt: one value per line, for image lists and text lists
        with _text(path) as f:
            yield from (({text_field: line.rstrip("\n").rstrip("\r")}, None) for line in f if line.strip())


def _text(path: str | os.PathLike, newline: str | None = None) -> io.TextIOWrapper:
    """`path` (a path or a URL) as UTF-8 text; undecodable bytes replaced."""
    return io.TextIOWrapper(fs.open_file(path, "rb"), encoding="utf-8", errors="replace", newline=newline)


def count_records(path: str | os.PathLike) -> int:
    """Rows in the file (cheap: Parquet metadata, or a line count), for progress bars and ETAs."""
    fmt = input_format(path)
    if fmt == "parquet":
        return parquet_metadata(path).num_rows
    with fs.open_file(path, "rb") as f:
        n = sum(1 for line in f if line.strip())
    return n - 1 if fmt in ("csv", "tsv") and n else n


def parquet_metadata(path: str | os.PathLike) -> Any:
    """The metadata (rows, schema) of a Parquet file (a path or a URL)."""
    import pyarrow.parquet as pq

    with fs.open_file(path, "rb") as raw:
        return pq.read_metadata(raw)


class ImageResolver:
    """Turns an input's image field into (source, dedup key, display name), or raises ValueError with a reason.

    With an explicit `root`, paths are relative to it and may not leave it (`..` or absolute paths are errors).
    Without, relative paths are relative to `base` (the input file's folder) and absolute paths are used as is.
    Bytes (a Parquet binary column) are decoded from memory and keyed by their SHA-1.
    """

    def __init__(self, root: str | os.PathLike | None, base: str | os.PathLike | None = None) -> None:
        self.confine = root is not None
        where = os.fspath(root if root is not None else (base or "."))
        self.url = fs.is_url(where)  # a folder URL (s3://bucket/images): names join under it
        self.root = where.rstrip("/") if self.url else os.path.abspath(where)

    def __call__(self, value: Any) -> tuple[str | bytes, str, str]:
        if isinstance(value, dict):  # HF datasets Image(): {"bytes": ..., "path": ...}
            if isinstance(value.get("bytes"), (bytes, bytearray)):
                value = value["bytes"]
            elif isinstance(value.get("path"), str):
                value = value["path"]
        if isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
            if not data:
                raise ValueError("empty image bytes")
            key = "sha1:" + hashlib.sha1(data).hexdigest()
            return data, key, key
        if not isinstance(value, str):
            raise ValueError(f"image must be a path string or bytes, got {type(value).__name__}")
        name = value.strip()
        if not name:
            raise ValueError("empty image path")
        if "\x00" in name:
            raise ValueError("image path contains a NUL byte")
        if fs.is_url(name) or (self.url and name.startswith("/")):  # a URL, or a path with a URL root: outside it
            where, inside = (name if fs.is_url(name) else os.path.abspath(name)), False
        elif self.url:  # a relative name under a root (or list) that is a URL: read via fsspec
            scheme, _, folder = self.root.partition("://")
            folder = "/" + folder.strip("/")
            joined = posixpath.normpath(posixpath.join(folder, name))
            where, inside = f"{scheme}://{joined.lstrip('/')}", joined.startswith(folder.rstrip("/") + "/")
        else:
            where = os.path.abspath(os.path.join(self.root, name))
            inside = where == self.root or where.startswith(self.root.rstrip(os.sep) + os.sep)
        if self.confine and not inside:
            raise ValueError(f"image path leaves --image-root: {name}")
        return where, where, value


def _id_of(rec: dict[str, Any], id_field: str, row: int | None) -> Any:
    v = rec.get(id_field)
    if v is None or v == "":
        return row
    return v if isinstance(v, (str, int, float, bool)) else json.dumps(v, default=str)


def parse_record(
    rec: dict[str, Any] | None,
    row: int | None,
    resolver: ImageResolver,
    kind: str = "pair",
    image_field: str = "image",
    text_field: str = "text",
    id_field: str = "id",
    error: str | None = None,
) -> Row:
    """The one record parser: a record (a dict of an input's columns, or None with the reason it could not be
    read) → a `Row` with its id, image source and text, or the reason it is unusable. `kind`: "pair" needs an
    image and a text, "image" an image, "text" a text. An error row still carries the text it held."""
    if rec is None:
        return Row(row=row, id=row, error=f"row: {error}", kind=kind)
    r = Row(row=row, id=_id_of(rec, id_field, row), kind=kind)
    image, text = rec.get(image_field), rec.get(text_field)
    if kind in ("pair", "image") and image is None:
        r.error = f"row: missing field '{image_field}'"
    elif kind in ("pair", "image"):
        try:
            r.image, r.image_key, r.image_name = resolver(image)
        except ValueError as e:
            r.image_name = image if isinstance(image, str) else None
            r.error = f"image: {e}"
    if kind in ("pair", "text"):
        r.text = text if isinstance(text, str) else None
        if r.error is None and text is None:
            r.error = f"row: missing field '{text_field}'"
        elif r.error is None and not isinstance(text, str):
            r.error = f"text: must be a string, got {type(text).__name__}"
        elif r.error is None and not text.strip():
            r.error = "text: empty"
    return r


def read_rows(
    path: str | os.PathLike,
    kind: str = "pair",
    image_field: str = "image",
    text_field: str = "text",
    id_field: str = "id",
    image_root: str | os.PathLike | None = None,
) -> Iterator[Row]:
    """Rows of a pairs file (`kind` "pair"), an image collection ("image") or a text list ("text"), each valid or
    carrying its error. In a .txt list each line is the image or the text. An image collection is a folder (every
    image file below it, sorted), an image file or a list (a URL list: relative names are under its folder URL).
    Relative image names are under `image_root` (and may not leave it), else the list's folder."""
    p = Path(path)
    if kind == "image" and not fs.is_url(path) and (p.is_dir() or p.suffix.lower() in IMAGE_SUFFIXES):
        if p.is_dir():
            root = Path(image_root) if image_root is not None else p
            resolver = ImageResolver(root)
            files = sorted(
                str(f.relative_to(root)) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
            )
        else:  # a single image file
            resolver, files = ImageResolver(None, p.parent), [p.name]
        records: Iterable[Record] = (({image_field: f, id_field: f}, None) for f in files)
    else:
        resolver = ImageResolver(image_root, fs.parent(path))
        records = iter_records(path, text_field=image_field if kind == "image" else text_field)
    for i, (rec, err) in enumerate(records):
        yield parse_record(rec, i, resolver, kind, image_field, text_field, id_field, err)


def check_columns(path: str | os.PathLike, needed: dict[str, str], sample: int = 1000) -> None:
    """InputError unless a table input has every needed column (`needed`: role -> column name, e.g. "text" ->
    "caption"): a missing one is fatal (every row would be an error), named with the columns seen (CSV header,
    Parquet schema, keys of the first `sample` JSONL records) and the flag to pick one. A .txt list has no columns."""
    fmt = input_format(path)
    if fmt == "parquet":
        cols = list(parquet_metadata(path).schema.to_arrow_schema().names)
    elif fmt == "txt":
        return
    else:
        records = itertools.islice(iter_records(path), sample)
        cols = list(dict.fromkeys(k for rec, _ in records if rec is not None for k in rec))
    for role, name in needed.items():
        if cols and name not in cols:
            raise InputError(
                f"{path} has no column '{name}' for the {role} (columns: {', '.join(cols)}); "
                f"pick one with --{role}-column"
            )


def check_image_paths(rows: Iterator[Row], sample: int = 64) -> None:
    """InputError when none of the first `sample` image paths exists: a wrong --image-root, found before the model
    loads rather than as a job of error rows."""
    paths = list(itertools.islice((r for r in rows if r.error is None and isinstance(r.image, str)), sample))
    if paths and not any(fs.exists(r.image) for r in paths):  # type: ignore[arg-type]
        raise InputError(
            f"none of the first {len(paths)} images exists (e.g. {paths[0].image_name!r} -> {paths[0].image}): "
            "give the folder the paths are relative to with --image-root"
        )
