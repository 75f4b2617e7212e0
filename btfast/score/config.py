"""One frozen job configuration: built from the command line (or the Python API) and checked before torch is
imported, passed unchanged to the executors and their workers; the resume header is derived from it here only.

Nothing here imports torch, transformers or pyarrow: a bad argument is refused in a fraction of a second.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from btfast.io.fs import display, is_url
from btfast.io.shards import is_shard_spec
from btfast.score.plan import Limits, parse_shard
from btfast.score.rows import IMAGE_SUFFIXES, input_format
from btfast.score.sink import output_format

DEFAULT_MAX_PIXELS = 2 * 89_478_485  # PIL's decompression-bomb error threshold (as btfast.preprocess)
PYARROW_HINT = "pip install pyarrow"


class UsageError(ValueError):
    """A bad argument: the command exits with status 2 before anything heavy is imported or loaded."""


@dataclass(frozen=True)
class Columns:
    """Which input columns hold the image, the text and the row id (--image-column / --text-column / --id-column)."""

    image: str = "image"
    text: str = "text"
    id: str = "id"


@dataclass(frozen=True)
class JobConfig:
    """Everything a scoring / embedding job is: what it reads, how it computes, where it writes.

    `header()` is the part that decides the output's numbers and rows: a rerun resumes only when it is equal.
    """

    command: str  # "score", "embed" or "retrieve"
    model: str  # the model folder (score / embed; retrieve: the ITM folder, or None with --no-rerank)
    out: str
    head: str = "itm"
    pairs: str | None = None  # score
    images: str | None = None  # embed / retrieve
    texts: str | None = None  # embed / retrieve
    image_root: str | None = None
    columns: Columns = field(default_factory=Columns)
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int | None = None
    workers: int | None = None
    threads: int | None = None
    shard: tuple[int, int] = (0, 1)
    overwrite: bool = False
    limits: Limits = field(default_factory=Limits)
    exact: bool = True
    max_pixels: int = DEFAULT_MAX_PIXELS
    exif_orientation: bool = True
    dedup: bool = True
    engine: str = "btfast"
    with_text: bool = False
    progress: bool = True
    itc_model: str | None = None  # retrieve: the ITC folder (default: model)
    top_k: int = 16  # retrieve
    rerank: bool = True  # retrieve: re-rank the ITC candidates by ITM
    chunk_queries: int = 1024  # retrieve: queries per chunk
    interrupt: tuple[int, int] | None = None  # test hook (chunks, signal): see `interrupt_from_env`
    shards: str | None = None  # WebDataset tar shards (a folder, list file, brace pattern or glob; paths or URLs)
    caption_field: str | None = None  # shards: the text is this field of the json member (default: the txt member)
    embed_kinds: tuple[str, ...] = ("image", "text")  # embed --shards: what of each sample is embedded

    @property
    def input(self) -> str | None:
        if self.shards is not None:
            return self.shards
        return self.pairs if self.command == "score" else self.images

    def shard_kinds(self) -> tuple[str, ...]:
        """The rows each shard sample gives this job (`btfast.io.webdataset`): pairs, or images and/or texts."""
        return ("pair",) if self.command == "score" else self.embed_kinds

    def replace(self, **changes: Any) -> JobConfig:
        return dataclasses.replace(self, **changes)

    def header(self, **resolved: Any) -> dict[str, Any]:
        """The resume header: the job's identity (`resolved`: what the executor decided, e.g. dtype, batch size)."""

        def absolute(p: str | None) -> str | None:  # URLs without credentials (btfast.io.fs.display)
            return None if p is None else display(p)

        h: dict[str, Any] = {"command": self.command}
        if self.command == "score":
            h.update(head=self.head, model=absolute(self.model), pairs=absolute(self.pairs))
            h.update(fields=list(dataclasses.astuple(self.columns)), dedup=self.dedup, engine=self.engine)
            h.update(with_text=self.with_text)
        elif self.command == "embed":
            h.update(model=absolute(self.model), images=absolute(self.images), texts=absolute(self.texts))
        else:
            h.update(itm_model=absolute(self.model) if self.rerank else None)
            h.update(itc_model=absolute(self.itc_model or self.model))
            h.update(images=absolute(self.images), texts=absolute(self.texts))
            h.update(top_k=self.top_k, chunk_queries=self.chunk_queries)
        h.update(
            image_root=absolute(self.image_root),
            shard=f"{self.shard[0]}/{self.shard[1]}",
            limits=dataclasses.asdict(self.limits),
            exact=self.exact,
            max_pixels=self.max_pixels,
            exif_orientation=self.exif_orientation,
            **resolved,
        )
        if self.shards is not None:
            h.update(shards=display(self.shards), caption_field=self.caption_field, kinds=list(self.shard_kinds()))
        return json.loads(json.dumps(h))

    def image_preprocessor(self, folder: str | os.PathLike | None = None) -> Any:
        """The image preprocessor of `folder` (default: the model) with this job's decoding options."""
        from btfast.preprocess import ImagePreprocessor

        return ImagePreprocessor.from_pretrained(
            folder or self.model,
            exact=self.exact,
            max_pixels=self.max_pixels,
            exif_orientation=self.exif_orientation,
        )


# ---- checks (no heavy imports) -----------------------------------------------------------------------------------


def check_model_folder(folder: str | os.PathLike | None, flag: str = "--model") -> None:
    """Refuse a model folder that cannot serve, saying what is actually wrong with it."""
    if folder is None:
        return
    p = Path(folder)
    if not p.exists():
        raise UsageError(f"{flag} {folder}: no such folder")
    if not p.is_dir():
        raise UsageError(f"{flag} {folder}: a file, not a model folder (give the folder save_pretrained wrote)")
    cfg = p / "config.json"
    if not cfg.is_file():
        raise UsageError(f"{flag} {folder}: not a model folder (no config.json; give the folder save_pretrained wrote)")
    try:
        model_type = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, OSError, AttributeError) as e:
        raise UsageError(f"{flag} {folder}: config.json is not readable JSON ({e})") from None
    if model_type != "bridgetower":
        raise UsageError(f"{flag} {folder}: a {model_type or 'unknown'} model, not BridgeTower (model_type)")
    if not ((p / "preprocessor_config.json").is_file() or (p / "processor_config.json").is_file()):
        raise UsageError(
            f"{flag} {folder}: a BridgeTower model without its processor (no preprocessor_config.json); save it "
            "next to the weights: BridgeTowerProcessor.from_pretrained(checkpoint).save_pretrained(folder)"
        )


def check_parquet(*paths: str | None) -> None:
    """Parquet input or output needs pyarrow: say how to install it now, not after the model has loaded."""
    for p in paths:
        if p is None or Path(p).is_dir():
            continue
        try:
            fmt = input_format(p)
        except ValueError:
            continue
        if fmt == "parquet" and importlib.util.find_spec("pyarrow") is None:
            raise UsageError(f"{p}: Parquet needs pyarrow, which is not installed: {PYARROW_HINT}")


EMBED_KINDS = {"both": ("image", "text"), "images": ("image",), "texts": ("text",)}


def _shards(command: str, args: argparse.Namespace) -> tuple[str | None, str | None, str | None, str | None]:
    """(shards, pairs, images, texts): --shards, or a --pairs value that names tar shards (`x.tar`,
    `{00000..00099}.tar`, `*.tar`), replaces the other inputs."""
    shards = getattr(args, "shards", None)
    pairs, images, texts = (getattr(args, k, None) for k in ("pairs", "images", "texts"))
    if shards is None and pairs is not None and is_shard_spec(pairs):
        shards, pairs = pairs, None
    if shards is None:
        if command == "score" and pairs is None:
            raise UsageError("give --pairs FILE or --shards SHARDS")
        return None, pairs, images, texts
    given = [f for f, v in (("--pairs", pairs), ("--images", images), ("--texts", texts)) if v is not None]
    if given:
        raise UsageError(f"--shards is the whole input: leave out {', '.join(given)}")
    return shards, None, None, None


def _input_file(path: str | None, flag: str, *, may_be_dir: bool = False) -> None:
    if path is None:
        return
    if is_url(path):  # read when the job starts (a missing object is reported then, before the model loads)
        return
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{flag} {path}: no such file")
    if p.is_dir():
        if may_be_dir:
            return
        raise UsageError(f"{flag} {path}: a folder, not a file")
    if may_be_dir and p.suffix.lower() in IMAGE_SUFFIXES:
        return
    try:
        input_format(p)
    except ValueError as e:
        raise UsageError(f"{flag} {e}") from None


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {v}")


def from_args(command: str, args: argparse.Namespace) -> JobConfig:
    """The job of a parsed `btfast score|embed|retrieve` command line; UsageError on a bad argument."""
    try:
        shard = parse_shard(args.shard)
    except ValueError as e:
        raise UsageError(str(e)) from None
    ray = bool(getattr(args, "ray", False))
    if ray:
        if output_format_or_none(args.out) == "jsonl":
            raise UsageError(f"--out {args.out}: with --ray the output is a folder of Parquet files; name a folder")
    elif is_url(args.out):
        if output_format_or_none(args.out) is not None:
            raise UsageError(
                f"--out {display(args.out)}: an object store cannot be appended to; name a folder URL (a folder of "
                "Parquet parts is written, one per chunk or shard)"
            )
    else:
        try:
            output_format(args.out)
        except ValueError as e:
            raise UsageError(f"--out {e}") from None
    _positive(args, "batch_size", "chunk_rows", "chunk_images", "chunk_texts", "chunk_queries", "top_k", "max_pixels")
    if getattr(args, "workers", None) is not None and args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    if args.image_root is not None and not is_url(args.image_root) and not Path(args.image_root).is_dir():
        raise UsageError(f"--image-root {args.image_root}: no such folder")
    columns = Columns(
        getattr(args, "image_field", "image"), getattr(args, "text_field", "text"), getattr(args, "id_field", "id")
    )
    shards, pairs, images, texts = _shards(command, args)
    if command == "score":
        check_model_folder(args.model)
        _input_file(pairs, "--pairs")
        inputs = [pairs]
        model, head = args.model, args.head
        limits = Limits(rows=args.chunk_rows, images=args.chunk_images, texts=args.chunk_texts)
    elif command == "embed":
        if images is None and texts is None and shards is None:
            raise UsageError("give --images, --texts or both, or --shards")
        check_model_folder(args.model)
        _input_file(images, "--images", may_be_dir=True)
        _input_file(texts, "--texts")
        inputs = [images, texts]
        model, head = args.model, "itc"
        limits = Limits(rows=args.chunk_rows, images=args.chunk_images, texts=args.chunk_texts)
    else:  # retrieve
        if args.model is None and args.itc_model is None:
            raise UsageError("give --model (ITM) and/or --itc-model")
        if not args.no_rerank and args.model is None:
            raise UsageError("re-ranking needs --model (an ITM folder); or pass --no-rerank")
        check_model_folder(args.model)
        check_model_folder(args.itc_model, "--itc-model")
        if shards is None and (images is None or texts is None):
            raise UsageError("give --images and --texts, or --shards")
        _input_file(images, "--images", may_be_dir=True)
        _input_file(texts, "--texts")
        inputs = [images, texts]
        model, head = args.model, "itm"
        limits = Limits(images=args.chunk_images, texts=args.chunk_texts)
    check_parquet(*inputs, None if ray else args.out)
    engine = getattr(args, "engine", "btfast")
    return JobConfig(
        command=command,
        model=model,
        out=args.out,
        head=head,
        pairs=pairs,
        images=images,
        texts=texts,
        shards=shards,
        caption_field=getattr(args, "caption_field", None),
        embed_kinds=EMBED_KINDS[getattr(args, "embed", "both")],
        image_root=args.image_root,
        columns=columns,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        workers=args.workers,
        threads=args.threads,
        shard=shard,
        overwrite=args.overwrite,
        limits=limits,
        exact=args.exact,
        max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
        exif_orientation=args.exif_orientation,
        dedup=not (getattr(args, "no_dedup", False) or engine == "hf"),
        engine=engine,
        with_text=getattr(args, "with_text", False),
        progress=not args.no_progress,
        itc_model=getattr(args, "itc_model", None),
        top_k=getattr(args, "top_k", 16),
        rerank=not getattr(args, "no_rerank", False),
        chunk_queries=getattr(args, "chunk_queries", 1024),
        interrupt=interrupt_from_env(),
    )


def output_format_or_none(path: str) -> str | None:
    try:
        return output_format(path)
    except ValueError:
        return None


INTERRUPT_ENV = "BTFAST_TEST_INTERRUPT"


def interrupt_from_env() -> tuple[int, int] | None:
    """The test-only interruption hook, read from the command's environment: BTFAST_TEST_INTERRUPT=N:KILL makes the
    job SIGKILL itself once N chunks of this run are durable; N:STOP makes it SIGSTOP itself there, for the test to
    `kill -9` it from outside. A kill -9 test then interrupts at a known point on any machine, however fast."""
    v = os.environ.get(INTERRUPT_ENV)
    if not v:
        return None
    n, _, name = v.partition(":")
    return int(n), int(getattr(signal, f"SIG{name or 'KILL'}"))
