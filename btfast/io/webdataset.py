"""A WebDataset collection as input rows: one `ShardRows` per tar shard, read ahead, each a unit of resume.

Row fields (`btfast.score.rows.Row`): `row` = the sample's position in its shard, `id` = the sample key,
`image` = the image member's bytes (deduplicated by their SHA-1, as Parquet image bytes are), `image_name` =
the member's name (`000030007.jpg`), `text` = its caption. What a sample lacks for the job becomes the row's
error, exactly as a malformed row of a pairs file does:

    kind "pair"   (score)            needs an image and a text
    kind "image"  (embed --images)   needs an image; its text is not read
    kind "text"   (embed --texts)    needs a text
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from btfast.io import fs
from btfast.io.prefetch import read_ahead
from btfast.io.shards import list_shards
from btfast.io.tar import Sample, read_shard
from btfast.score.rows import Row

KINDS = ("pair", "image", "text")


@dataclass
class ShardRows:
    """The rows of shard `index` of the collection. `truncated`: why the tar ended early (its readable rows are
    here); `error`: why the shard could not be read at all (no rows: a rerun tries it again)."""

    index: int
    name: str
    rows: list[Row] = field(default_factory=list)
    truncated: str | None = None
    error: str | None = None


def sample_rows(samples: Sequence[Sample], kinds: Sequence[str]) -> list[Row]:
    """Rows of `samples` for each kind in `kinds`, sample by sample (see the module doc)."""
    rows: list[Row] = []
    for i, s in enumerate(samples):
        for kind in kinds:
            r = Row(row=i, id=s.key, kind=kind, image_name=None if kind == "text" else s.image_member)
            if kind != "text" and s.image is not None:
                r.image, r.image_key = s.image, "sha1:" + hashlib.sha1(s.image).hexdigest()
            if kind != "image":
                r.text = s.text
            r.error = s.error or _missing(s, kind)
            if r.error is None and r.text is not None and not r.text.strip():
                r.error = "text: empty"
            rows.append(r)
    return rows


def _missing(s: Sample, kind: str) -> str | None:
    if kind == "pair":
        return s.image_error or s.text_error
    return s.image_error if kind == "image" else s.text_error


class ShardReader:
    """The shards named by `spec` (a folder, list file, brace pattern or glob; paths or URLs), as `ShardRows`.

    `kinds`: which rows each sample gives (see the module doc); `text_field`: take the text from this field of
    the `json` member instead of the `txt` member; `prefetch`: shards read ahead while one is being used.
    """

    def __init__(
        self, spec: str, kinds: Sequence[str] = ("pair",), text_field: str | None = None, prefetch: int = 1
    ) -> None:
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise ValueError(f"kinds must be among {KINDS}, got {list(kinds)}")
        self.spec = spec
        self.kinds = tuple(kinds)
        self.text_field = text_field
        self.prefetch = prefetch
        self._shards: list[str] | None = None

    @property
    def shards(self) -> list[str]:
        """The shard paths / URLs in collection order (listed once)."""
        if self._shards is None:
            self._shards = list_shards(self.spec)
        return self._shards

    def read(self, wanted: Callable[[int], bool] | None = None) -> Iterator[ShardRows]:
        """`ShardRows` of every wanted shard index, in order; only those are fetched, the next one read ahead."""
        todo = [k for k in range(len(self.shards)) if wanted is None or wanted(k)]
        fetch = lambda k: fs.read_bytes(self.shards[k])  # noqa: E731
        for k, fut in read_ahead(todo, fetch, depth=self.prefetch):
            out = ShardRows(index=k, name=fs.display(self.shards[k]))
            try:
                shard = read_shard(fut.result(), self.text_field)
            except (OSError, tarfile.ReadError) as e:  # missing, unreachable, or not a tar
                out.error = f"{type(e).__name__}: {e}"
            else:
                out.truncated = shard.truncated
                out.rows = sample_rows(shard.samples, self.kinds)
            yield out
