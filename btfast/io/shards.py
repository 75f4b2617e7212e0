"""Which shards make a collection: a brace pattern, a glob, a list file, a folder or one tar; paths or URLs.

    shards/{00000..00123}.tar       numeric range (zero padded to the wider end), as WebDataset and img2dataset
    s3://b/{train,val}-{0..9}.tar   alternatives; several braces multiply
    s3://b/shards/*.tar             a glob (listed from the store)
    shards/                         every *.tar directly in the folder (img2dataset's `00000_stats.json`,
                                    `.parquet` and other files beside them are not input)
    shards.txt                      one shard a line (blank lines and `#` comments skipped); relative entries
                                    are relative to the list file's folder

A brace pattern is expanded without listing the store (img2dataset collections hold 10,000s of shards): a
shard that is not there is reported when it is read. The order is the pattern's / the list's / sorted by name,
and it is the collection's order: shard numbers index it.
"""

from __future__ import annotations

import os
import re

from btfast.io import fs

TAR_SUFFIX = ".tar"
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_GLOB = re.compile(r"[*?\[]")


def expand_braces(pattern: str) -> list[str]:
    """Every name a brace pattern stands for, in order: `{3..5}` → 3 4 5, `{008..010}` → 008 009 010,
    `{a,b}` → a b. Braces holding neither a range nor a comma are kept as written."""
    for m in _BRACE.finditer(pattern):
        body = m.group(1)
        r = _RANGE.match(body)
        if r:
            lo, hi = int(r.group(1)), int(r.group(2))
            step = 1 if hi >= lo else -1
            padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-").startswith("0") for x in r.groups())
            width = max(len(x) for x in r.groups()) if padded else 0
            options = [str(v).zfill(width) for v in range(lo, hi + step, step)]
        elif "," in body:
            options = body.split(",")
        else:
            continue
        head, tail = pattern[: m.start()], pattern[m.end() :]
        return [name for opt in options for name in expand_braces(head + opt + tail)]
    return [pattern]


def is_shard_spec(spec: str | os.PathLike) -> bool:
    """True when `spec` names tar shards by its form alone (a .tar name, pattern or glob), without I/O."""
    s = os.fspath(spec)
    return s.lower().endswith(TAR_SUFFIX) or any(n.lower().endswith(TAR_SUFFIX) for n in expand_braces(s)[:1])


def list_shards(spec: str | os.PathLike) -> list[str]:
    """The shards of a collection (see the module doc), as paths or URLs; ValueError if it names none."""
    s = os.fspath(spec)
    names = expand_braces(s)
    if len(names) > 1:
        shards = names
    elif _GLOB.search(fs.basename(s)) or (not fs.is_url(s) and _GLOB.search(s)):
        shards = fs.glob(s)
    elif s.lower().endswith(TAR_SUFFIX):
        shards = [s]
    elif fs.isdir(s):
        shards = [n for n in fs.listdir(s) if n.lower().endswith(TAR_SUFFIX)]
    elif fs.isfile(s):
        shards = _read_list(s)
    else:
        raise FileNotFoundError(f"no shards: {fs.display(s)} is not a folder, a list file, a .tar or a pattern")
    if not shards:
        raise ValueError(f"no .tar shards in {fs.display(s)}")
    return shards


def _read_list(path: str) -> list[str]:
    base = fs.parent(path)
    with fs.open_file(path, "rb") as f:
        text = f.read().decode("utf-8")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(fs.join(base, line))
    return out
