"""Samples of one WebDataset tar shard, read from its bytes; what could not be read is said, never dropped.

WebDataset's grouping: a member `dir/0001.seg.jpg` belongs to sample key `dir/0001` (the path up to the first dot
of the file name) with suffix `seg.jpg`; consecutive members with the same key form one sample. Members without
a dot and non-files are skipped, as WebDataset does. The image is the first member whose last extension is
jpg, jpeg, png or webp (in that order of preference); the text is the first `txt` member, or a field of the first
`json` member when `text_field` names one (img2dataset writes both: `caption` in the json). Extensions are
matched lower-cased.

Nothing here decodes an image: a corrupt JPEG is the image loader's to report, as for loose files. What this
module reports: a sample without an image or without a text (`image_error` / `text_error`), a text that is not
UTF-8, a json member that does not parse or lacks the field, two members with the same suffix in one sample,
and a shard that ends early (`Shard.truncated`: the samples before the cut are returned, the one cut is
returned with whatever it had, so a cut between `key.jpg` and `key.txt` gives a row with an error, not a
silently shorter shard).
"""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import dataclass, field

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
BLOCK = 512


@dataclass
class Sample:
    """One sample: `key` (its id), the image's bytes and member name, the text, and why either is missing."""

    key: str
    image: bytes | None = None
    image_member: str | None = None
    text: str | None = None
    image_error: str | None = None
    text_error: str | None = None
    error: str | None = None  # the whole sample is unusable (duplicate members)


@dataclass
class Shard:
    """The samples read from one shard; `truncated` says why the tar ended early (None: read to its end)."""

    samples: list[Sample] = field(default_factory=list)
    truncated: str | None = None


def _split(name: str) -> tuple[str, str] | None:
    """(key, suffix) as WebDataset splits a member path; None for a name without a dot in its file name."""
    folder, _, base = name.rpartition("/")
    stem, dot, suffix = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{folder}/{stem}" if folder else stem), suffix.lower()


def read_shard(data: bytes, text_field: str | None = None) -> Shard:
    """The samples of a tar held in `data` (see the module doc); tarfile.ReadError if it is not a tar at all."""
    members, truncated = _members(data)
    groups: list[tuple[str, dict[str, bytes | None]]] = []  # (key, suffix -> bytes; None: cut), in tar order
    duplicate: set[int] = set()
    for name, blob in members:
        split = _split(name)
        if split is None:
            continue
        key, suffix = split
        if not groups or groups[-1][0] != key:
            groups.append((key, {}))
        if suffix in groups[-1][1]:
            duplicate.add(len(groups) - 1)
        groups[-1][1].setdefault(suffix, blob)
    shard = Shard(truncated=truncated)
    for i, (key, group) in enumerate(groups):
        whole = {k: v for k, v in group.items() if v is not None}
        s = _sample(key, whole, text_field)
        if i in duplicate:
            s.error = "sample: two members with the same suffix"
        elif truncated and i == len(groups) - 1 and (len(whole) < len(group) or s.image_error or s.text_error):
            s.error = f"sample: cut where the shard is truncated ({truncated})"
        shard.samples.append(s)
    return shard


def _members(data: bytes) -> tuple[list[tuple[str, bytes | None]], str | None]:
    """(name, bytes) of every regular file in tar order, a cut last member as (name, None); and why the tar
    ended early, or None if it ends with its end-of-archive marker."""
    if data[:2] == b"\x1f\x8b":
        raise tarfile.ReadError("a gzip file: compressed shards are not supported, give uncompressed .tar")
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:")  # reads the first member's headers
    except tarfile.ReadError as e:
        if not _is_header(data[:BLOCK]):
            raise  # empty, or not a tar at all
        return [], f"the first member is cut: {e}"
    out: list[tuple[str, bytes | None]] = []
    try:
        for m in tar:
            if not m.isfile():
                continue
            end = m.offset_data + m.size
            if end > len(data):
                out.append((m.name, None))
                return out, f"member {m.name} is cut: {max(0, len(data) - m.offset_data)} of its {m.size} bytes"
            out.append((m.name, data[m.offset_data : end]))
    except tarfile.ReadError as e:  # the header after the last whole member is cut or damaged
        return out, f"unreadable after byte {tar.offset}: {e}"
    if data[tar.offset : tar.offset + BLOCK] == bytes(BLOCK):
        return out, None
    if tar.offset > len(data) - BLOCK:
        return out, f"ends at byte {len(data)} without the end-of-archive marker"
    return out, f"damaged header at byte {tar.offset}"


def _is_header(block: bytes) -> bool:
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def _sample(key: str, members: dict[str, bytes], text_field: str | None) -> Sample:
    s = Sample(key=key)
    by_ext: dict[str, str] = {}
    for suffix in members:
        by_ext.setdefault(suffix.rpartition(".")[2], suffix)
    image = next((by_ext[e] for e in IMAGE_EXTENSIONS if e in by_ext), None)
    if image is None:
        s.image_error = f"image: no {'/'.join(IMAGE_EXTENSIONS)} member in sample (has: {', '.join(members)})"
    else:
        s.image, s.image_member = members[image], f"{key}.{image}"
    s.text, s.text_error = _text(members, by_ext, text_field)
    return s


def _text(members: dict[str, bytes], by_ext: dict[str, str], text_field: str | None) -> tuple[str | None, str | None]:
    """(text, None) or (None, why)."""
    suffix = "txt" if text_field is None else "json"
    raw = members[by_ext[suffix]] if suffix in by_ext else None
    if raw is None:
        return None, f"text: no {suffix} member in sample"
    try:
        s = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"text: {suffix} member is not UTF-8 ({e.reason} at byte {e.start})"
    if text_field is None:
        return s, None
    try:
        rec = json.loads(s)
    except ValueError as e:
        return None, f"text: malformed json member: {e}"
    if not isinstance(rec, dict) or rec.get(text_field) is None:
        return None, f"text: json member has no field '{text_field}'"
    value = rec[text_field]
    if not isinstance(value, str):
        return None, f"text: json field '{text_field}' is a {type(value).__name__}, not a string"
    return value, None
