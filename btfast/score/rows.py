"""Reading inputs: pairs, image lists and text lists from JSONL, CSV, Parquet or plain text; never pickle.

Every input row keeps its 0-based position in the file (`row`), the key that resume, sharding and joining
rely on. A row that cannot be used (malformed JSON, wrong field count, missing or empty field, wrong type)
becomes a `Row` with `error` set: it is written out with an error status and the run goes on.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import posixpath
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from btfast.io import fs

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".jfif"}


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
    out: dict[str, Any] = {}
    for r in rows:
        if r.error is None and r.image_key is not None and r.image_key not in out:
            out[r.image_key] = r.image
    return out


def input_format(path: str | os.PathLike) -> str:
    """'jsonl', 'csv', 'parquet' or 'txt', from the file name."""
    name = str(path).lower()
    for suffix, fmt in (
        (".jsonl", "jsonl"),
        (".ndjson", "jsonl"),
        (".json", "jsonl"),
        (".csv", "csv"),
        (".tsv", "tsv"),
        (".parquet", "parquet"),
        (".pq", "parquet"),
        (".txt", "txt"),
    ):
        if name.endswith(suffix):
            return fmt
    raise ValueError(f"{path}: unknown input format (want .jsonl, .csv, .tsv, .parquet or .txt)")


def iter_records(
    path: str | os.PathLike, text_field: str = "text"
) -> Iterator[tuple[dict[str, Any] | None, str | None]]:
    """(record, None) per row, or (None, reason) for a row that cannot be parsed. Order = file order."""
    fmt = input_format(path)
    if fmt == "jsonl":
        with fs.open_file(path, "rb") as f:
            for raw in f:
                line = raw.strip()
                if not line:
                    continue  # blank lines are not rows
                try:
                    rec = json.loads(line)
                except (ValueError, UnicodeDecodeError) as e:
                    yield None, f"malformed JSON: {e}"
                    continue
                if not isinstance(rec, dict):
                    yield None, f"malformed row: a JSON {type(rec).__name__}, not an object"
                    continue
                yield rec, None
    elif fmt in ("csv", "tsv"):
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        with _text(path, newline="") as f:
            reader = csv.reader(f, delimiter="\t" if fmt == "tsv" else ",")
            header = next(reader, None)
            if header is None:
                return
            header = [h.strip() for h in header]
            for fields in reader:
                if not fields:
                    continue
                if len(fields) != len(header):
                    yield None, f"malformed row: {len(fields)} fields, the header has {len(header)}"
                    continue
                yield dict(zip(header, fields)), None
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        with fs.open_file(path, "rb") as raw:
            for batch in pq.ParquetFile(raw).iter_batches(batch_size=8192):
                yield from ((rec, None) for rec in batch.to_pylist())
    else:  # txt: one value per line, for image lists and text lists
        with _text(path) as f:
            for line in f:
                line = line.rstrip("\n").rstrip("\r")
                if line.strip():
                    yield {text_field: line}, None


def _text(path: str | os.PathLike, newline: str | None = None) -> io.TextIOWrapper:
    """`path` (a path or a URL) as UTF-8 text; undecodable bytes replaced."""
    return io.TextIOWrapper(fs.open_file(path, "rb"), encoding="utf-8", errors="replace", newline=newline)


def count_records(path: str | os.PathLike) -> int:
    """Rows in the file (cheap: Parquet metadata, or a line count), for progress bars and ETAs."""
    fmt = input_format(path)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with fs.open_file(path, "rb") as raw:
            return pq.ParquetFile(raw).metadata.num_rows
    n = 0
    with fs.open_file(path, "rb") as f:
        for line in f:
            if line.strip():
                n += 1
    return n - 1 if fmt in ("csv", "tsv") and n else n


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
        if isinstance(value, (bytes, bytearray, memoryview)):
            data = bytes(value)
            if not data:
                raise ValueError("empty image bytes")
            key = "sha1:" + hashlib.sha1(data).hexdigest()
            return data, key, key
        if isinstance(value, dict) and isinstance(value.get("bytes"), (bytes, bytearray)):  # HF datasets Image()
            return self(value["bytes"])
        if isinstance(value, dict) and isinstance(value.get("path"), str):
            value = value["path"]
        if not isinstance(value, str):
            raise ValueError(f"image must be a path string or bytes, got {type(value).__name__}")
        name = value.strip()
        if not name:
            raise ValueError("empty image path")
        if "\x00" in name:
            raise ValueError("image path contains a NUL byte")
        if fs.is_url(name) or self.url:
            return self._url(name, value)
        path = os.path.abspath(os.path.join(self.root, name))
        if self.confine and not (path == self.root or path.startswith(self.root.rstrip(os.sep) + os.sep)):
            raise ValueError(f"image path leaves --image-root: {name}")
        return path, path, value

    def _url(self, name: str, value: str) -> tuple[str, str, str]:
        """An image named by a URL, or by a relative name under a root (or list) that is a URL: read via fsspec."""
        if fs.is_url(name) or name.startswith("/"):
            if self.confine:
                raise ValueError(f"image path leaves --image-root: {name}")
            where = name if fs.is_url(name) else os.path.abspath(name)
            return where, where, value
        scheme, _, folder = self.root.partition("://")
        folder = "/" + folder.strip("/")
        joined = posixpath.normpath(posixpath.join(folder, name))
        if self.confine and not joined.startswith(folder.rstrip("/") + "/"):
            raise ValueError(f"image path leaves --image-root: {name}")
        url = f"{scheme}://{joined.lstrip('/')}"
        return url, url, value


def _id_of(rec: dict[str, Any], id_field: str, row: int | None) -> Any:
    v = rec.get(id_field)
    if v is None or v == "":
        return row
    if isinstance(v, (str, int, float, bool)):
        return v
    return json.dumps(v, default=str)


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
    if kind in ("pair", "image"):
        r.error = _set_image(r, rec, image_field, resolver)
    if kind in ("pair", "text"):
        r.error = r.error or _set_text(r, rec, text_field)
        if r.text is None and isinstance(rec.get(text_field), str):
            r.text = rec[text_field]
    return r


def read_rows(
    path: str | os.PathLike,
    resolver: ImageResolver,
    kind: str = "pair",
    image_field: str = "image",
    text_field: str = "text",
    id_field: str = "id",
) -> Iterator[Row]:
    """Rows of a pairs file (`kind` "pair"), an image list ("image") or a text list ("text"), each valid or
    carrying its error. In a .txt list each line is the image or the text."""
    value = image_field if kind == "image" else text_field
    for i, (rec, err) in enumerate(iter_records(path, text_field=value)):
        yield parse_record(rec, i, resolver, kind, image_field, text_field, id_field, err)


def read_images(
    path_or_dir: str | os.PathLike,
    resolver_root: str | os.PathLike | None = None,
    image_field: str = "image",
    id_field: str = "id",
) -> Iterator[Row]:
    """Image rows from a folder (every image file below it, sorted) or a list file (.txt / JSONL / CSV / Parquet);
    a list may be a URL (its relative names are then under the list's folder URL, or under `resolver_root`)."""
    p = Path(path_or_dir)
    if fs.is_url(path_or_dir) or not (p.is_dir() or p.suffix.lower() in IMAGE_SUFFIXES):
        resolver = ImageResolver(resolver_root, fs.parent(path_or_dir))
        yield from read_rows(path_or_dir, resolver, "image", image_field, id_field=id_field)
        return
    if p.is_dir():
        root = Path(resolver_root) if resolver_root is not None else p
        resolver = ImageResolver(root)
        files = sorted(
            str(f.relative_to(root)) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
        )
    else:  # a single image file
        resolver, files = ImageResolver(None, p.parent), [p.name]
    for i, name in enumerate(files):
        r = Row(row=i, id=name, kind="image")
        r.error = _set_image(r, {image_field: name}, image_field, resolver)
        yield r


def read_texts(path: str | os.PathLike, text_field: str = "text", id_field: str = "id") -> Iterator[Row]:
    """Text rows from a .txt file (one per line) or a JSONL / CSV / Parquet file with a `text` column."""
    return read_rows(path, ImageResolver(None), "text", text_field=text_field, id_field=id_field)


def _set_image(r: Row, rec: dict[str, Any], field: str, resolver: ImageResolver) -> str | None:
    if field not in rec or rec[field] is None:
        return f"row: missing field '{field}'"
    try:
        r.image, r.image_key, r.image_name = resolver(rec[field])
    except ValueError as e:
        r.image_name = rec[field] if isinstance(rec[field], str) else None
        return f"image: {e}"
    return None


def _set_text(r: Row, rec: dict[str, Any], field: str) -> str | None:
    if field not in rec or rec[field] is None:
        return f"row: missing field '{field}'"
    t = rec[field]
    if not isinstance(t, str):
        return f"text: must be a string, got {type(t).__name__}"
    if not t.strip():
        return "text: empty"
    r.text = t
    return None


# ---- whole-input checks, before any model loads ------------------------------------------------------------------

COLUMN_FLAGS = {"image": "--image-column", "text": "--text-column", "id": "--id-column"}


def columns_of(path: str | os.PathLike, sample: int = 1000) -> list[str] | None:
    """The columns of a table input (CSV header, Parquet schema, keys of the first `sample` JSONL records);
    None for a .txt list (one value a line: no columns)."""
    fmt = input_format(path)
    if fmt == "txt":
        return None
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with fs.open_file(path, "rb") as raw:
            return list(pq.read_schema(raw).names)
    seen: dict[str, None] = {}
    for k, (rec, _) in enumerate(iter_records(path)):
        if k >= sample:
            break
        if rec is not None:
            seen.update(dict.fromkeys(rec))
    return list(seen)


def check_columns(path: str | os.PathLike, needed: dict[str, str]) -> None:
    """InputError unless the input has every needed column (`needed`: role -> column name, e.g. "text" -> "caption").

    A missing column is fatal (every row would be an error): it names the columns seen and the flag to pick one."""
    from btfast.errors import InputError

    cols = columns_of(path)
    if cols is None or not cols:
        return
    for role, name in needed.items():
        if name not in cols:
            flag = COLUMN_FLAGS[role]
            raise InputError(
                f"{path} has no column '{name}' for the {role} (columns: {', '.join(cols)}); pick one with {flag}"
            )


def check_image_paths(rows: Iterator[Row], sample: int = 64) -> None:
    """InputError when none of the first `sample` image paths exists: a wrong --image-root, found before the model
    loads rather than as a job of error rows."""
    from btfast.errors import InputError

    paths = []
    for r in rows:
        if r.error is None and isinstance(r.image, str):
            paths.append(r)
            if len(paths) >= sample:
                break
    if paths and not any(fs.exists(r.image) for r in paths):  # type: ignore[arg-type]
        r = paths[0]
        raise InputError(
            f"none of the first {len(paths)} images exists (e.g. {r.image_name!r} -> {r.image}): "
            "give the folder the paths are relative to with --image-root"
        )
