"""`btfast retrieve`: ITC top-k candidates per query, re-ranked by ITM, in both directions (the paper's protocol)."""

from __future__ import annotations

import argparse
import sys

from btfast.score.cli_common import add_runtime, fail, known_errors, set_threads

EPILOG = """\
models: BridgeTower's ITC and ITM heads are different checkpoints (BridgeTowerForContrastiveLearning,
BridgeTowerForImageAndTextRetrieval). --model is the ITM folder, --itc-model the ITC folder; if --itc-model is
left out, --model must hold both heads' weights. A folder without a head's weights is refused (transformers
would fill them with random numbers).

output (.jsonl or .parquet), one row per query, texts then images: direction (text_to_image / image_to_text),
query_row, query_id, query (the text, or the image path), status, error, results: a list best first of
{rank, row, id, item, itc_cosine, itm_logit, itm_prob}; item is the image path or the text.

exit status: 0 ok, 3 done but some images or texts could not be used (their rows say why), 1 fatal, 2 arguments.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    g = parser.add_argument_group("what to retrieve")
    g.add_argument(
        "--model",
        default=None,
        metavar="DIR",
        help="ITM folder (BridgeTowerForImageAndTextRetrieval) that re-ranks the candidates",
    )
    g.add_argument(
        "--itc-model",
        default=None,
        metavar="DIR",
        help="ITC folder (BridgeTowerForContrastiveLearning) that picks the candidates (default: --model)",
    )
    g.add_argument(
        "--images",
        required=True,
        metavar="DIR_OR_FILE",
        help="a folder (every image below it, sorted) or a list: .txt / .jsonl / .csv / .parquet",
    )
    g.add_argument(
        "--texts",
        required=True,
        metavar="FILE",
        help=".txt (a text a line) or .jsonl / .csv / .parquet with a text column",
    )
    g.add_argument("--out", required=True, metavar="FILE", help="output file: .jsonl or .parquet")
    g.add_argument(
        "--top-k",
        type=int,
        default=16,
        metavar="K",
        help="ITC candidates per query, all re-ranked by ITM (the paper used 128 or 256; default: 16)",
    )
    g.add_argument("--no-rerank", action="store_true", help="ITC ranking only (no ITM model needed)")
    g.add_argument(
        "--image-root",
        default=None,
        metavar="DIR",
        help="paths in an image list are relative to DIR and may not leave it (default: the list's folder)",
    )
    add_runtime(parser)
    g2 = parser.add_argument_group("chunking")
    g2.add_argument(
        "--chunk-images",
        type=int,
        default=128,
        metavar="N",
        help="unique images whose tower states are held at once (default: 128)",
    )
    g2.add_argument(
        "--chunk-texts", type=int, default=2048, metavar="N", help="unique texts held at once (default: 2048)"
    )


def run(args: argparse.Namespace) -> int:
    try:
        set_threads(args)
        from btfast.score.plan import Limits
        from btfast.score.retrieve import retrieve

        summary = retrieve(
            args.model,
            args.images,
            args.texts,
            args.out,
            itc_model=args.itc_model,
            top_k=args.top_k,
            rerank=not args.no_rerank,
            image_root=args.image_root,
            device=args.device,
            dtype=args.dtype,
            batch_size=args.batch_size,
            workers=args.workers,
            limits=Limits(images=args.chunk_images, texts=args.chunk_texts),
            exact=args.exact,
            max_pixels=args.max_pixels,
            progress=not args.no_progress,
        )
    except KeyboardInterrupt:
        print("btfast retrieve: interrupted", file=sys.stderr)
        return 130
    except known_errors() as e:
        return fail("retrieve", e)
    print(f"btfast retrieve: {summary.line()}", file=sys.stderr)
    return summary.exit_code
