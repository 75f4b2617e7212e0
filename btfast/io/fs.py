"""Paths and fsspec URLs behind one small interface: open, read, list, test, join, and a name safe to log.

Anything with a scheme (`s3://`, `gs://`, `memory://`, `file://`, `https://`, ...) goes through fsspec; plain
paths stay plain. Credentials come only from the environment, as fsspec and its backends read them
(`AWS_ACCESS_KEY_ID`, `AWS_ENDPOINT_URL`, `GOOGLE_APPLICATION_CREDENTIALS`, ...): btfast never takes them as
arguments. A URL that carries them anyway (`s3://key:secret@bucket/...`, a presigned `?X-Amz-Signature=...`) is
used as given but only ever shown, logged or written into a resume header through `display()`, which blanks
them out.
"""

from __future__ import annotations

import os
import re
from typing import IO, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_SECRET_QUERY = re.compile(r"(sig|signature|token|secret|password|credential|key)", re.IGNORECASE)
REDACTED = "REDACTED"


def is_url(path: str | os.PathLike) -> bool:
    """True for `scheme://...` (fsspec), False for a plain path."""
    return bool(_SCHEME.match(os.fspath(path)))


def display(path: str | os.PathLike) -> str:
    """The name to show and to record: plain paths made absolute; a URL without userinfo or secret query values.

    `file://` URLs and plain paths of the same file give the same name, so a resume header does not depend on
    how the path was spelled.
    """
    s = os.fspath(path)
    if not is_url(s):
        return os.path.abspath(s)
    parts = urlsplit(s)
    if parts.scheme == "file":
        return os.path.abspath(parts.path)
    netloc = parts.netloc.rpartition("@")[2]
    if "@" in parts.netloc:
        netloc = f"{REDACTED}@{netloc}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, REDACTED if _SECRET_QUERY.search(k) else v) for k, v in pairs])
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def filesystem(path: str | os.PathLike) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a URL or a plain path."""
    import fsspec.core

    return fsspec.core.url_to_fs(os.fspath(path))


def _fresh(path: str | os.PathLike) -> tuple[Any, str]:
    """`filesystem(path)` with its listing cache dropped: another process (an earlier run, a worker) may have
    written there since this process last looked (s3fs caches listings)."""
    fs, p = filesystem(path)
    fs.invalidate_cache()
    return fs, p


def open_file(path: str | os.PathLike, mode: str = "rb") -> IO[Any]:
    """An open file object (plain `open` for paths: no fsspec import on the local fast path). Writing creates
    the missing folders above it (object stores have none to create)."""
    writing = any(c in mode for c in "wax")
    if not is_url(path):
        if writing:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return open(path, mode)  # noqa: SIM115 - the caller closes it
    fs, p = filesystem(path)
    if writing:
        fs.makedirs(fs._parent(p), exist_ok=True)
    return fs.open(p, mode)


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole object: one GET on an object store."""
    if not is_url(path):
        with open(path, "rb") as f:
            return f.read()
    fs, p = filesystem(path)
    return fs.cat_file(p)


def exists(path: str | os.PathLike) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    fs, p = _fresh(path)
    return fs.exists(p)


def isdir(path: str | os.PathLike) -> bool:
    if not is_url(path):
        return os.path.isdir(path)
    fs, p = _fresh(path)
    return fs.isdir(p)


def isfile(path: str | os.PathLike) -> bool:
    if not is_url(path):
        return os.path.isfile(path)
    fs, p = _fresh(path)
    return fs.isfile(p)


def listdir(path: str | os.PathLike) -> list[str]:
    """Full names (paths, or URLs with their scheme) of the files directly in folder `path`, sorted."""
    s = os.fspath(path)
    if not is_url(s):
        return sorted(os.path.join(s, n) for n in os.listdir(s) if os.path.isfile(os.path.join(s, n)))
    fs, p = _fresh(s)
    infos = fs.ls(p, detail=True)
    return sorted(_unstrip(s, fs, i["name"]) for i in infos if i.get("type") == "file")


def glob(pattern: str | os.PathLike) -> list[str]:
    """Full names of the files matching a glob pattern (`*`, `?`, `[...]`), sorted."""
    s = os.fspath(pattern)
    fs, p = _fresh(s)
    names = fs.glob(p)
    if not is_url(s):
        return sorted(n for n in names if os.path.isfile(n))
    return sorted(_unstrip(s, fs, n) for n in names if fs.isfile(n))


def join(base: str | os.PathLike, name: str) -> str:
    """`name` relative to folder `base` (a path or a URL); an absolute path or a URL `name` is kept as is."""
    b = os.fspath(base)
    if is_url(name) or os.path.isabs(name) or not b:
        return name
    if not is_url(b):
        return os.path.join(b, name)
    return b.rstrip("/") + "/" + name


def parent(path: str | os.PathLike) -> str:
    """The folder holding `path` (a path or a URL)."""
    s = os.fspath(path)
    if not is_url(s):
        return os.path.dirname(os.path.abspath(s))
    head, _, _ = s.rstrip("/").rpartition("/")
    return head


def basename(path: str | os.PathLike) -> str:
    return os.fspath(path).rstrip("/").rpartition("/")[2]


def _unstrip(original: str, fs: Any, name: str) -> str:
    """A listed name back as a URL of the same scheme as the URL it was listed from."""
    if urlsplit(original).scheme == "file":
        return name  # a local path: plain, as every other local path
    return fs.unstrip_protocol(name)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename in local folder `path` durable (where the platform has directory fds)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


_ATOMIC_PUT = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "memory"}  # one PUT: the whole object or none


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` so that a reader (or a rerun after kill -9) sees the whole file or no file, never a part.

    Local files: `.NAME.tmp` in the same folder, fsynced, renamed over `path`, folder fsynced (a `.tmp` left by
    a kill is the caller's to delete on restart). Object stores: one PUT (atomic by the store). Other fsspec
    backends: a temporary name, then a move.
    """
    s = os.fspath(path)
    if is_url(s) and urlsplit(s).scheme == "file":
        s = urlsplit(s).path
    if not is_url(s):
        folder, name = os.path.split(os.path.abspath(s))
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{name}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, s)
        fsync_dir(folder)
        return
    fs, p = filesystem(s)
    if urlsplit(s).scheme in _ATOMIC_PUT:
        fs.pipe_file(p, data)
        return
    tmp = f"{fs._parent(p)}/.{basename(p)}.tmp"
    fs.pipe_file(tmp, data)
    fs.mv(tmp, p)
