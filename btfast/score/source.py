"""Sources: where a job's records come from (`Row`s, see `btfast.score.rows`), cut into `Chunk`s whose index
depends only on the input and the job (`btfast.score.plan`), so that resumed and sharded runs cut the same chunks.
Every executor (local worker processes, Ray Data) and every sink takes chunks from a source, which has:

    def check(self) -> None: ...                    # InputError, before any model loads, for what spoils every row
    def chunks(self, wanted=None) -> Iterator[Chunk]: ...
    def total(self) -> int | None: ...              # rows, for the progress bar (None: unknown)

`wanted(index)` says which chunks this run will compute (its shard, not yet written): a source that can skip
reading the others (tar shards on an object store) yields them as empty placeholders.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from btfast.errors import InputError
from btfast.score import rows as inputs
from btfast.score.config import JobConfig
from btfast.score.plan import Chunk, plan
from btfast.score.rows import Row


class ListSource:
    """Input files chunked by the planner: a pairs file (`btfast score`), or an image collection (a folder or a list
    file) then a text list (`btfast embed` / `retrieve`): image rows and text rows never share a chunk; chunk numbers
    continue from the images to the texts."""

    def __init__(self, cfg: JobConfig) -> None:
        self.cfg = cfg
        self.paths = {"pair": cfg.pairs} if cfg.command == "score" else {"image": cfg.images, "text": cfg.texts}

    def rows(self, kind: str) -> Iterator[Row]:
        path, c = self.paths[kind], self.cfg.columns
        if path is None:
            return iter(())
        return inputs.read_rows(path, kind, c.image, c.text, c.id, self.cfg.image_root)

    def check(self) -> None:
        c, (pairs, images, texts) = self.cfg.columns, (self.paths.get(k) for k in ("pair", "image", "text"))
        if pairs is not None:
            inputs.check_columns(pairs, {"image": c.image, "text": c.text})
            inputs.check_image_paths(self.rows("pair"))
        if images is not None and Path(images).is_file() and _is_table(images):
            inputs.check_columns(images, {"image": c.image})
            inputs.check_image_paths(self.rows("image"))
        if texts is not None and _is_table(texts):
            inputs.check_columns(texts, {"text": c.text})

    def chunks(self, wanted: Callable[[int], bool] | None = None) -> Iterator[Chunk]:
        planned = (plan(self.rows(kind), self.cfg.limits) for kind in self.paths)
        for k, chunk in enumerate(itertools.chain.from_iterable(planned)):
            chunk.index = k
            yield chunk

    def total(self) -> int | None:
        pairs = self.paths.get("pair")
        return None if pairs is None else inputs.count_records(pairs)

    def lists(self) -> tuple[list[Row], list[Row]]:
        """(image rows, text rows): the gallery and the queries of `btfast retrieve`."""
        return list(self.rows("image")), list(self.rows("text"))


class ShardReadError(OSError):
    """Shards that could not be read (missing, unreachable, not a tar): the others are written, a rerun retries."""


class ShardsSource:
    """WebDataset tar shards (`btfast.io.webdataset`): one chunk per shard, index = the shard's position in the
    collection, so `--shard i/n` and Ray divide the work by shard files and a shard is written and resumed whole.

    Only the wanted shards are fetched, the next one while this one is used. A truncated shard gives its readable
    rows and is reported (`truncated`, and a warning); a shard that cannot be read at all is not written and
    makes the job fail at its end with `ShardReadError` naming it, after every other shard is written.
    """

    def __init__(self, cfg: JobConfig, kinds: tuple[str, ...] | None = None) -> None:
        from btfast.io.webdataset import ShardReader

        assert cfg.shards is not None
        self.reader = ShardReader(cfg.shards, kinds or cfg.shard_kinds(), cfg.caption_field)
        self.truncated: dict[str, str] = {}  # shard -> why, for the shards read by this run

    def check(self) -> None:
        try:
            self.reader.shards  # noqa: B018 - lists the collection (no shard is read)
        except (OSError, ValueError) as e:
            raise InputError(f"--shards: {e}") from None

    def chunks(self, wanted: Callable[[int], bool] | None = None) -> Iterator[Chunk]:
        want = {k for k in range(len(self.reader.shards)) if wanted is None or wanted(k)}
        read = self.reader.read(want.__contains__)
        failed: list[str] = []
        for k in range(len(self.reader.shards)):
            if k not in want:
                yield Chunk(k)  # not this run's: a placeholder, never computed
                continue
            shard = next(read)
            if shard.error is not None:
                failed.append(f"{shard.name}: {shard.error}")
                continue
            if shard.truncated is not None:
                self.truncated[shard.name] = shard.truncated
                why = f"{shard.truncated}); its {len(shard.rows)} readable rows are written"
                print(f"btfast: warning: shard {shard.name} is truncated ({why}", file=sys.stderr)
            name = shard.name.rpartition("/")[2]
            for r in shard.rows:
                r.image_name = f"{name}/{r.image_name}" if r.image_name else None
            yield Chunk(k, shard.rows)
        if failed:
            n, reasons = len(failed), "; ".join(failed)
            raise ShardReadError(f"{n} shard(s) could not be read; the others are written, rerun: {reasons}")

    def total(self) -> int | None:
        return None

    def lists(self) -> tuple[list[Row], list[Row]]:
        """(image rows, text rows) of the whole collection, each numbered from 0 in collection order: the gallery
        and the queries of `btfast retrieve`."""
        images: list[Row] = []
        texts: list[Row] = []
        for r in itertools.chain.from_iterable(c.rows for c in self.chunks()):
            side = images if r.kind == "image" else texts
            r.row = len(side)
            side.append(r)
        return images, texts


Source = ListSource | ShardsSource


def source_for(cfg: JobConfig) -> Source:
    """The source of job `cfg`: tar shards, a pairs file (score) or image / text lists (embed)."""
    return ShardsSource(cfg) if cfg.shards is not None else ListSource(cfg)


def _is_table(path: str) -> bool:
    try:
        return inputs.input_format(path) != "txt"
    except ValueError:
        return False
