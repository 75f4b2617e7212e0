"""Flags shared by `btfast score`, `btfast embed` and `btfast retrieve` (no heavy imports here)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any


def add_runtime(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument(
        "--device",
        default="auto",
        help="where the model runs: auto (cuda if available, else cpu), cpu, cuda, cuda:1 (default: auto)",
    )
    g.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="model precision: auto = bf16 on cuda, fp32 on cpu (default: auto)",
    )
    g.add_argument(
        "--batch-size",
        type=int,
        default=None,
        metavar="N",
        help="images / texts per tower call and pairs per fusion call (default: 64 on cuda, 16 on cpu)",
    )
    g.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="processes decoding and preprocessing images ahead of the model; 0 = in the main process "
        "(default: min(8, CPUs - 1))",
    )
    g.add_argument(
        "--exact",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="preprocess exactly as BridgeTowerProcessor, bit for bit (default). --no-exact: large JPEGs "
        "decode at 1/2-1/8 scale via Image.draft (still >= 2x the resize target) and downscales resample "
        "only the centre crop: 2-4x faster on large photos, pixels differ by a few levels, so scores differ "
        "slightly from the reference",
    )
    g.add_argument(
        "--max-pixels",
        type=int,
        default=None,
        metavar="N",
        help="refuse images with more pixels than this, as an error row (default: 178956970, "
        "Pillow's decompression-bomb limit)",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch CPU threads when --device is cpu (default: CPUs - workers, at least 1: the decoding "
        "workers need their cores)",
    )
    g.add_argument(
        "--exif-orientation",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="turn photos upright by their EXIF orientation tag, as transformers' load_image does for a path "
        "(default). --no-exif-orientation: use the pixels as stored (what BridgeTowerProcessor sees given an "
        "image opened with Image.open)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bar (the summary is still printed)")


def add_resume(p: argparse.ArgumentParser, of: str = "the input") -> argparse._ArgumentGroup:
    """--overwrite and --shard, in a group the caller adds its chunk flags to."""
    g = p.add_argument_group("resume, sharding, chunking")
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh, deleting an existing output (default: resume it; a different job's output is refused)",
    )
    g.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help=f"process only shard I of N (0-based) of {of}, e.g. 0/4 on one GPU, 1/4 on the next; "
        "the N outputs together hold exactly the unsharded result, the same numbers bit for bit on one kind of "
        f"device. Chunks are dealt round robin, so a shard of {of} smaller than N chunks may be empty "
        "(default: all)",
    )
    return g


def add_job(p: argparse.ArgumentParser, what: str = "rows") -> None:
    g = add_resume(p)
    g.add_argument(
        "--chunk-rows",
        type=int,
        default=16384,
        metavar="N",
        help=f"at most N {what} per chunk, the unit written (and resumed) at once (default: 16384)",
    )
    g.add_argument(
        "--chunk-images",
        type=int,
        default=128,
        metavar="N",
        help="at most N unique images per chunk (their tower states stay in memory; default: 128)",
    )
    g.add_argument(
        "--chunk-texts", type=int, default=2048, metavar="N", help="at most N unique texts per chunk (default: 2048)"
    )


def add_inputs(g: argparse._ArgumentGroup, required: bool, single: str = "") -> None:
    """--images, --texts and --image-root of `btfast embed` / `btfast retrieve`."""
    g.add_argument(
        "--images",
        required=required,
        default=None,
        metavar="DIR_OR_FILE",
        help=f"a folder (every image below it, sorted){single} or a list: .txt (a path a line), "
        ".jsonl / .csv / .parquet with an image column",
    )
    g.add_argument(
        "--texts",
        required=required,
        default=None,
        metavar="FILE",
        help=".txt (a text a line) or .jsonl / .csv / .parquet with a text column (and optionally id)",
    )
    g.add_argument(
        "--image-root",
        default=None,
        metavar="DIR",
        help="paths in an image list are relative to DIR and may not leave it (default: the list's folder)",
    )


def add_columns(g: argparse._ArgumentGroup, roles: tuple[str, ...] = ("image", "text", "id")) -> None:
    """--image-column / --text-column / --id-column (also spelt --image-field ...): which input columns to read."""
    what = {"image": "the image (a path, or bytes in Parquet)", "text": "the text", "id": "the row id"}
    for role in roles:
        g.add_argument(
            f"--{role}-column",
            f"--{role}-field",
            dest=f"{role}_field",
            default=role,
            metavar="NAME",
            help=f"input column holding {what[role]} (default: {role})",
        )


def add_shards(g: argparse._ArgumentGroup, embed: bool = False) -> None:
    """--shards, --caption-field (and for embed, --embed): WebDataset tar shards as the input (`btfast.io`)."""
    g.add_argument(
        "--shards",
        default=None,
        metavar="SHARDS",
        help="WebDataset tar shards instead of the other inputs: a folder (its *.tar), a list file (a shard a "
        "line), a brace pattern (shards/{00000..00123}.tar) or a glob; paths or URLs (s3://, gs://, ...). "
        "Each sample's image is its jpg/jpeg/png/webp member, its text the txt member, its id the sample key. "
        "Written and resumed a shard at a time; --shard I/N divides the shard files",
    )
    g.add_argument(
        "--caption-field",
        default=None,
        metavar="FIELD",
        help="with --shards: take each sample's text from this field of its json member (img2dataset: caption) "
        "instead of its txt member",
    )
    if embed:
        g.add_argument(
            "--embed",
            choices=["both", "images", "texts"],
            default="both",
            help="with --shards: embed each sample's image, text or both (default: both)",
        )


def add_ray(parser: argparse.ArgumentParser) -> None:
    """--ray, --address, --gpus-per-worker: the same job on Ray Data (`btfast.ray.cli`; no Ray import here)."""
    g = parser.add_argument_group(
        "distributed (Ray Data; pip install 'btfast[ray]')",
        "With --ray, --out is a folder of Parquet files (one per part, plus _btfast_job.json and _SUCCESS);\n"
        "--workers is the number of model actors (default: one per GPU of the cluster, or CPUs // 4 without\n"
        "GPUs); --threads the torch threads of a CPU actor; --chunk-rows bounds a part, the unit written (and\n"
        "resumed) at once (--chunk-images / --chunk-texts too, only when given). Images are decoded in CPU tasks\n"
        "on the cluster: image paths and the model folder must be readable at the same path on every node.",
    )
    g.add_argument(
        "--ray",
        action="store_true",
        help="run on Ray Data: without --address a local Ray instance is started (default: off)",
    )
    g.add_argument(
        "--address",
        default=None,
        metavar="ADDR",
        help="join this Ray cluster, e.g. 10.0.0.1:6379 or auto (default: RAY_ADDRESS if set, else a new "
        "local instance)",
    )
    g.add_argument(
        "--gpus-per-worker",
        type=float,
        default=None,
        metavar="G",
        help="GPUs per model actor; fractions share a GPU (default: 1 when the cluster has GPUs, else 0: "
        "the model runs on CPUs)",
    )


def set_threads(cfg: Any) -> None:
    """On CPU, leave the image workers their cores: oversubscribed OpenMP threads wait on each other."""
    import torch

    from btfast.score.engine import resolve_device
    from btfast.score.loader import cpu_count, default_workers

    if resolve_device(cfg.device).type != "cpu":
        return
    workers = default_workers() if cfg.workers is None else cfg.workers
    torch.set_num_threads(cfg.threads or max(1, cpu_count() - workers))


def run(
    args: argparse.Namespace,
    command: str,
    job: Callable[[Any], Any],
    unit: str,
    label: str | None = None,
    errors: tuple[type[BaseException], ...] = (),
) -> int:
    """Check the arguments (exit 2, before torch is imported), then run `job(config)` and print its summary.

    Exit status: 0 all rows ok, 3 done with error rows, 1 fatal, 2 bad arguments, 130 interrupted."""
    from btfast.score.config import UsageError, from_args

    label = label or command
    try:
        cfg = from_args(command, args)
    except UsageError as e:
        print(f"btfast {label}: error: {e}", file=sys.stderr)
        return 2
    try:
        set_threads(cfg)
        summary = job(cfg)
    except KeyboardInterrupt:
        print(f"btfast {label}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (*known_errors(), *errors) as e:
        print(f"btfast {label}: error: {e}", file=sys.stderr)
        return 1
    print(f"btfast {label}: {summary.line(unit)}", file=sys.stderr)
    return summary.exit_code


def known_errors() -> tuple[type[BaseException], ...]:
    from btfast.errors import BtfastError
    from btfast.score.engine import ModelLoadError
    from btfast.score.sink import ResumeError

    return (ResumeError, ModelLoadError, BtfastError, FileNotFoundError, ValueError, OSError)
