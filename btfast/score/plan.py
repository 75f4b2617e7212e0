"""Planning: input rows → chunks, the unit of work, of output, of resume and of sharding.

A chunk is a set of rows whose unique images and unique texts are encoded once and fused with all their
partners. Within a window of rows, rows are grouped by image (first appearance order) and groups are packed
greedily into chunks bounded by rows, unique images and unique texts. The plan depends only on the input and
these bounds, so every run (resumed, sharded or not) cuts the same chunks, and a chunk's numbers depend only on
the chunk: resumed and sharded runs give the same scores as one uninterrupted run, bit for bit on one device.
Shard i of n takes the chunks whose number is i mod n.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from btfast.preprocess import iter_chunks
from btfast.score.rows import Row, image_sources


@dataclass(frozen=True)
class Limits:
    rows: int = 16384  # rows per chunk
    images: int = 128  # unique images per chunk
    texts: int = 2048  # unique texts per chunk
    window: int = 200_000  # rows grouped together before packing (bounds memory)

    def __post_init__(self) -> None:
        for name in ("rows", "images", "texts", "window"):
            if getattr(self, name) < 1:
                raise ValueError(f"chunk limit {name} must be >= 1")


@dataclass
class Chunk:
    index: int
    rows: list[Row] = field(default_factory=list)

    @property
    def images(self) -> dict[str, Any]:
        """`image_sources` of the rows: key → source, once per image."""
        return image_sources(self.rows)


def parse_shard(spec: str | None) -> tuple[int, int]:
    """'i/n' → (i, n) with 0 <= i < n; None → (0, 1)."""
    if not spec:
        return 0, 1
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard wants i/n (e.g. 0/4), got {spec!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard {spec}: want 0 <= i < n")
    return i, n


def plan(rows: Iterable[Row], limits: Limits) -> Iterator[Chunk]:
    """Chunks of `rows` (see the module doc)."""
    index = 0
    for window in iter_chunks(rows, limits.window):
        for c in _pack(window, limits, index):
            yield c
        index = c.index + 1


def _pack(window: list[Row], limits: Limits, start: int) -> Iterator[Chunk]:
    groups: dict[object, list[Row]] = {}
    for r in window:
        key = ("img", r.image_key) if r.error is None and r.image_key is not None else ("row", r.row)
        groups.setdefault(key, []).append(r)
    cur, images, texts = Chunk(start), set[str](), set[object]()
    for (kind, _), group in groups.items():
        if kind == "img":
            new_texts = {r.text for r in group if r.text is not None}
            # Start a fresh chunk rather than split an image's rows, when the current one is at least half full.
            fits = (
                len(cur.rows) + len(group) <= limits.rows
                and len(images) + 1 <= limits.images
                and len(texts | new_texts) <= limits.texts
            )
            if not fits and cur.rows and len(cur.rows) * 2 >= limits.rows:
                yield cur
                cur, images, texts = Chunk(cur.index + 1), set(), set()
        for r in group:
            tk = r.text if r.error is None else None
            ik = r.image_key if r.error is None else None
            over = (
                len(cur.rows) + 1 > limits.rows
                or (ik is not None and ik not in images and len(images) + 1 > limits.images)
                or (tk is not None and tk not in texts and len(texts) + 1 > limits.texts)
            )
            if over and cur.rows:
                yield cur
                cur, images, texts = Chunk(cur.index + 1), set(), set()
            cur.rows.append(r)
            if ik is not None:
                images.add(ik)
            if tk is not None:
                texts.add(tk)
    if cur.rows:
        yield cur
