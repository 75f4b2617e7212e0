"""`btfast embed`: normalised ITC image and text embeddings, written once for indexing."""

from __future__ import annotations

import argparse

from btfast.score import cli_common
from btfast.score.cli_common import add_columns, add_inputs, add_job, add_ray, add_runtime, add_shards

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
    add_inputs(g, required=False, single=", one image,")
    add_shards(g, embed=True)
    g.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="output file: .jsonl or .parquet; or a folder URL (s3://bucket/emb/): a folder of Parquet parts",
    )
    add_columns(g)
    add_runtime(parser)
    add_job(parser, "images or texts")
    add_ray(parser)


def run(args: argparse.Namespace) -> int:
    from btfast.score.job import local_job

    return cli_common.run(args, "embed", local_job, "items")
