"""`btfast embed`: normalised ITC image and text embeddings, written once for indexing."""

from __future__ import annotations

import argparse
import sys

from btfast.ray.cli import add_arguments as add_ray_arguments
from btfast.score.cli_common import add_job, add_runtime, fail, known_errors, limits, set_threads

EPILOG = """\
output (.jsonl or .parquet), one row per image and per text: kind (image / text), row (position in its list),
id (the input's id, else the image's path or the row), image, text, status (ok / error), error, text_truncated,
embedding (the L2-normalised ITC embedding: image_embeds / text_embeds of BridgeTowerForContrastiveLearning;
cosine = dot product). Resumable and shardable like `btfast score`.

exit status: 0 all rows embedded, 3 done but some rows have status error, 1 fatal error, 2 bad arguments.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    g = parser.add_argument_group("what to embed")
    g.add_argument(
        "--model",
        required=True,
        metavar="DIR",
        help="a BridgeTowerForContrastiveLearning folder (save_pretrained) with tokenizer and processor",
    )
    g.add_argument(
        "--images",
        default=None,
        metavar="DIR_OR_FILE",
        help="a folder (every image below it, sorted), one image, or a list: .txt (a path a line), "
        ".jsonl / .csv / .parquet with an image column",
    )
    g.add_argument(
        "--texts",
        default=None,
        metavar="FILE",
        help=".txt (a text a line) or .jsonl / .csv / .parquet with a text column (and optionally id)",
    )
    g.add_argument("--out", required=True, metavar="FILE", help="output file: .jsonl or .parquet")
    g.add_argument(
        "--image-root",
        default=None,
        metavar="DIR",
        help="paths in an image list are relative to DIR and may not leave it (default: the list's folder)",
    )
    add_runtime(parser)
    add_job(parser, "images or texts")
    add_ray_arguments(parser)  # --ray, --address, --gpus-per-worker: btfast.ray.cli


def run(args: argparse.Namespace) -> int:
    if getattr(args, "ray", False):  # the same job on Ray Data, written as a folder of Parquet parts
        from btfast.ray.cli import run as run_ray

        return run_ray(args, "embed")
    if args.images is None and args.texts is None:
        return fail("embed", ValueError("give --images, --texts or both"))
    try:
        set_threads(args)
        from btfast.score.job import embed

        summary = embed(
            args.model,
            args.out,
            images=args.images,
            texts=args.texts,
            image_root=args.image_root,
            device=args.device,
            dtype=args.dtype,
            batch_size=args.batch_size,
            workers=args.workers,
            shard=args.shard,
            overwrite=args.overwrite,
            limits=limits(args),
            exact=args.exact,
            max_pixels=args.max_pixels,
            progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        print("btfast embed: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except known_errors() as e:
        return fail("embed", e)
    print(f"btfast embed: {summary.line('items')}", file=sys.stderr)
    return summary.exit_code
