"""One frozen job configuration: built from the command line (or the Python API), checked before torch is imported
(nothing here imports torch, transformers or pyarrow, so a bad argument is refused in a fraction of a second), passed
unchanged to the executors and their workers; the resume header is derived from it here only.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from btfast.io.fs import display, is_url
from btfast.io.shards import is_shard_spec
from btfast.preprocess import DEFAULT_MAX_PIXELS, ImagePreprocessor
from btfast.score.plan import Limits, parse_shard
from btfast.score.rows import IMAGE_SUFFIXES, input_format
from btfast.score.schema import id_type_of
from btfast.score.sink import output_format


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
    """Everything a job is: what it reads, how it computes, where it writes. `header()` is the part that decides the
    output's numbers and rows: a rerun resumes only when it is equal."""

    command: str  # "score", "embed" or "retrieve"
    model: str | None  # the model folder (score / embed; retrieve: the ITM folder, or None with --no-rerank)
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

    def shard_kinds(self) -> tuple[str, ...]:
        """The rows each shard sample gives this job (`btfast.io.webdataset`): pairs, or images and/or texts."""
        return ("pair",) if self.command == "score" else self.embed_kinds

    def id_type(self, parquet: bool = True) -> str:
        """How output ids are typed (`btfast.score.schema`): 'keep' (JSONL score output), 'int' or 'string'."""
        if self.command != "score":
            return "string"
        return id_type_of(self.pairs, self.columns.id) if parquet else "keep"

    def check(self, ray: bool = False) -> None:
        """UsageError for an argument that cannot work, found without importing anything heavy."""
        try:
            fmt: str | None = output_format(self.out)
        except ValueError:
            fmt = None
        if ray and fmt == "jsonl":
            raise UsageError(f"--out {self.out}: with --ray the output is a folder of Parquet files; name a folder")
        if is_url(self.out) and fmt is not None:
            raise UsageError(
                f"--out {display(self.out)}: an object store cannot be appended to; name a folder URL (a folder of "
                "Parquet parts is written, one per chunk or shard)"
            )
        if not ray and fmt is None and not is_url(self.out):
            raise UsageError(f"--out {self.out}: output must be .jsonl or .parquet")
        for flag, v in (("batch-size", self.batch_size), ("top-k", self.top_k), ("chunk-queries", self.chunk_queries)):
            if v is not None and v < 1:
                raise UsageError(f"--{flag} must be >= 1, got {v}")
        if self.max_pixels < 1 or (self.workers is not None and self.workers < 0):
            raise UsageError(f"want --max-pixels >= 1 and --workers >= 0, got {self.max_pixels}, {self.workers}")
        if self.image_root is not None and not is_url(self.image_root) and not Path(self.image_root).is_dir():
            raise UsageError(f"--image-root {self.image_root}: no such folder")
        if self.head not in ("itm", "itc"):
            raise UsageError(f"head must be itm or itc, got {self.head}")
        files = {"--pairs": self.pairs, "--images": self.images, "--texts": self.texts}
        given = [f for f, v in files.items() if v]
        if self.shards is not None and given:
            raise UsageError(f"--shards is the whole input: leave out {', '.join(given)}")
        missing, needs = {
            "score": (self.pairs is None, "give --pairs FILE or --shards SHARDS"),
            "embed": (self.images is None and self.texts is None, "give --images, --texts or both, or --shards"),
            "retrieve": (self.images is None or self.texts is None, "give --images and --texts, or --shards"),
        }[self.command]
        if self.shards is None and missing:
            raise UsageError(needs)
        for f, v in files.items():
            _input_file(v, f, may_be_dir=f == "--images")
        if self.command == "retrieve":
            if self.model is None and self.itc_model is None:
                raise UsageError("give --model (ITM) and/or --itc-model")
            if self.rerank and self.model is None:
                raise UsageError("re-ranking needs --model (an ITM folder); or pass --no-rerank")
            check_model_folder(self.itc_model, "--itc-model")
        check_model_folder(self.model)

    def replace(self, **changes: Any) -> JobConfig:
        return dataclasses.replace(self, **changes)

    def header(self, **resolved: Any) -> dict[str, Any]:
        """The resume header: the job's identity (`resolved`: what the executor decided, e.g. dtype, batch size)."""

        def shown(p: str | None) -> str | None:  # absolute; URLs without credentials (btfast.io.fs.display)
            return None if p is None else display(p)

        h: dict[str, Any] = {"command": self.command}
        if self.command == "score":
            h.update(head=self.head, model=shown(self.model), pairs=shown(self.pairs))
            h.update(fields=list(dataclasses.astuple(self.columns)), dedup=self.dedup, engine=self.engine)
            h.update(with_text=self.with_text)
        elif self.command == "embed":
            h.update(model=shown(self.model), images=shown(self.images), texts=shown(self.texts))
        else:
            h.update(itm_model=shown(self.model) if self.rerank else None)
            h.update(itc_model=shown(self.itc_model or self.model), images=shown(self.images), texts=shown(self.texts))
            h.update(top_k=self.top_k, chunk_queries=self.chunk_queries)
        h.update(image_root=shown(self.image_root), shard=f"{self.shard[0]}/{self.shard[1]}")
        h.update(limits=dataclasses.asdict(self.limits), exact=self.exact, max_pixels=self.max_pixels)
        h.update(exif_orientation=self.exif_orientation, **resolved)
        if self.shards is not None:
            h.update(shards=display(self.shards), caption_field=self.caption_field, kinds=list(self.shard_kinds()))
        return json.loads(json.dumps(h))

    def compute(self, batch_size: int) -> dict[str, Any]:
        """`engine.Context.load`'s options of this job (score / embed)."""
        return {"batch_size": batch_size, "engine": self.engine, "dedup": self.dedup, "with_text": self.with_text}

    def image_preprocessor(self, folder: str | os.PathLike | None = None) -> Any:
        """The image preprocessor of `folder` (default: the model) with this job's decoding options."""
        return ImagePreprocessor.from_pretrained(
            folder or self.model, exact=self.exact, max_pixels=self.max_pixels, exif_orientation=self.exif_orientation
        )


EMBED_KINDS = {"both": ("image", "text"), "images": ("image",), "texts": ("text",)}
JOB_FIELDS = {f.name for f in dataclasses.fields(JobConfig)}
INTERRUPT_ENV = "BTFAST_TEST_INTERRUPT"


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


def _input_file(path: str | None, flag: str, *, may_be_dir: bool = False) -> None:
    if path is None or is_url(path):  # a URL is read when the job starts (before the model loads)
        return
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{flag} {path}: no such file")
    if may_be_dir and (p.is_dir() or p.suffix.lower() in IMAGE_SUFFIXES):
        return
    if p.is_dir():
        raise UsageError(f"{flag} {path}: a folder, not a file")
    try:
        input_format(p)
    except ValueError as e:
        raise UsageError(f"{flag} {e}") from None


def from_args(command: str, args: argparse.Namespace) -> JobConfig:
    """The checked job of a parsed `btfast score|embed|retrieve` command line; UsageError on a bad argument."""
    get = functools.partial(getattr, args)
    shards, pairs, images, texts = (get(k, None) for k in ("shards", "pairs", "images", "texts"))
    kinds = EMBED_KINDS[get("embed", "both")]
    if shards is None and pairs is not None and is_shard_spec(pairs):
        shards, pairs = pairs, None  # `--pairs shards/{00000..00099}.tar`: tar shards
    tars = {k: v for k, v in (("image", images), ("text", texts)) if v is not None and is_shard_spec(v)}
    if shards is None and tars and command != "score":  # `--images shards/{00000..00099}.tar`: their images
        if len(set(tars.values())) > 1 or len(tars) < sum(v is not None for v in (images, texts)):
            raise UsageError("--images and --texts name tar shards: give one collection to both, or use --shards")
        shards, images, texts, kinds = next(iter(tars.values())), None, None, tuple(tars)
    same = {k: v for k, v in vars(args).items() if k in JOB_FIELDS}  # flags named as the field they set
    try:
        fields = dict(same, command=command, head={"score": get("head", "itm"), "embed": "itc"}.get(command, "itm"))
        fields.update(pairs=pairs, shards=shards, embed_kinds=kinds, images=images, texts=texts)
        fields.update(columns=Columns(get("image_field", "image"), get("text_field", "text"), get("id_field", "id")))
        fields.update(shard=parse_shard(args.shard), max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS)
        limits = Limits(rows=get("chunk_rows", Limits.rows), images=args.chunk_images, texts=args.chunk_texts)
        fields.update(limits=limits, dedup=not (get("no_dedup", False) or get("engine", "btfast") == "hf"))
        fields.update(progress=not args.no_progress, rerank=not get("no_rerank", False), interrupt=interrupt_from_env())
        cfg = JobConfig(**fields)
    except ValueError as e:  # --shard, chunk limits
        raise UsageError(str(e)) from None
    cfg.check(ray=get("ray", False))
    return cfg


def interrupt_from_env() -> tuple[int, int] | None:
    """Test hook: BTFAST_TEST_INTERRUPT=N:KILL (or N:STOP, for the test to `kill -9` it) makes the job signal itself
    once N chunks of this run are durable: a kill -9 test interrupts at a known point on any machine, however fast."""
    v = os.environ.get(INTERRUPT_ENV)
    if not v:
        return None
    n, _, name = v.partition(":")
    return int(n), int(getattr(signal, f"SIG{name or 'KILL'}"))
