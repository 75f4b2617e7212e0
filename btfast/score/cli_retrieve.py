"""`btfast retrieve`: ITC top-k candidates per query, re-ranked by ITM, in both directions (the paper's protocol).

Resumable and shardable over the queries, like `btfast score`.
"""

from __future__ import annotations

import argparse

from btfast.score import cli_common
from btfast.score.cli_common import add_columns, add_inputs, add_resume, add_runtime, add_shards

EPILOG = """\
models: BridgeTower's ITC and ITM heads are different checkpoints (BridgeTowerForContrastiveLearning,
BridgeTowerForImageAndTextRetrieval). --model is the ITM folder, --itc-model the ITC folder; if --itc-model is
left out, --model must hold both heads' weights. A folder without a head's weights is refused (transformers
would fill them with random numbers).

output (.jsonl or .parquet), one row per query, texts then images: direction (text_to_image / image_to_text),
query_row, query_id, query (the text, or the image path), status, error, results: a list best first of
{rank, row, id, item, itc_cosine, itm_logit, itm_prob}; item is the image path or the text.

Rows are written --chunk-queries queries at a time. Kill it at any moment and rerun the same command: it
resumes, and the output holds every query exactly once, with the results of an uninterrupted run (a rerun
with other settings is refused). --shard I/N ranks 1/N of the queries of both directions against the whole
gallery; the N outputs joined are the unsharded output. Every shard first embeds the whole gallery (all images
and texts) with ITC; only the ranking (top-k and ITM) is split. Those embeddings are kept beside the output
(OUT.btfast-gallery.npz) until the job finishes, so a resumed run does not embed the gallery again.

exit status: 0 ok, 3 done but some queries have status error (an image or text that could not be used; its
row says why), 1 fatal, 2 arguments.
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
    add_inputs(g, required=False)
    add_columns(g)
    add_shards(g)
    g.add_argument("--out", required=True, metavar="FILE", help="output file: .jsonl or .parquet")
    g.add_argument(
        "--top-k",
        type=int,
        default=16,
        metavar="K",
        help="ITC candidates per query, all re-ranked by ITM (the paper used 128 or 256; default: 16)",
    )
    g.add_argument("--no-rerank", action="store_true", help="ITC ranking only (no ITM model needed)")
    add_runtime(parser)
    g2 = add_resume(parser, "the queries")
    g2.add_argument(
        "--chunk-queries",
        type=int,
        default=1024,
        metavar="N",
        help="queries per chunk, the unit written (and resumed) at once; the ITM images are encoded once per "
        "chunk, so larger chunks re-encode less (default: 1024)",
    )
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
    from btfast.score.retrieve import retrieve_job

    return cli_common.run(args, "retrieve", retrieve_job, "queries")
