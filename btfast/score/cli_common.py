"""Flags shared by `btfast score`, `btfast embed` and `btfast retrieve` (no heavy imports here)."""

from __future__ import annotations

import argparse
import sys
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


def set_threads(args: argparse.Namespace) -> None:
    """On CPU, leave the image workers their cores: oversubscribed OpenMP threads wait on each other."""
    import torch

    from btfast.score.engine import resolve_device
    from btfast.score.loader import cpu_count, default_workers

    if resolve_device(args.device).type != "cpu":
        return
    workers = default_workers() if args.workers is None else args.workers
    n = args.threads or max(1, cpu_count() - workers)
    torch.set_num_threads(n)


def limits(args: argparse.Namespace) -> Any:
    from btfast.score.plan import Limits

    return Limits(rows=args.chunk_rows, images=args.chunk_images, texts=args.chunk_texts)


def fail(command: str, e: BaseException) -> int:
    print(f"btfast {command}: error: {e}", file=sys.stderr)
    return 1


def known_errors() -> tuple[type[BaseException], ...]:
    from btfast.errors import BtfastError
    from btfast.score.engine import ModelLoadError
    from btfast.score.sink import ResumeError

    return (ResumeError, ModelLoadError, BtfastError, FileNotFoundError, ValueError, OSError)
