"""`btfast score`: score (image, text) pairs offline with the ITM or ITC head, resumable and shardable."""

from __future__ import annotations

import argparse

from btfast.score import cli_common
from btfast.score.cli_common import add_columns, add_job, add_ray, add_runtime, add_shards

EPILOG = """\
input: JSONL, CSV/TSV or Parquet with columns image (a path, or bytes in Parquet), text and optionally id (other
names: --image-column, --text-column, --id-column; a missing column stops the job before the model loads).
output (.jsonl or .parquet), one row per input row: row (0-based input position), id (the input's, else row),
image, text (with --with-text), status (ok / error), error (the reason), text_truncated, and
  --head itm: itm_logit (logit of "match"), itm_prob (its softmax probability);
  --head itc: itc_cosine (cosine of the unimodal ITC embeddings), itc_logit (exp(logit_scale) * cosine).
Rows are written chunk by chunk, grouped by image; sort by `row` for input order.

Every unique image and text in a chunk runs through its tower once and is fused with all its partners.
Bad rows (missing / corrupt / truncated / huge images, empty texts, malformed rows) get status error and the run
goes on. Over-long texts are truncated to the model's limit and flagged. Kill it at any moment and rerun the same
command: it resumes, and the output holds every input row exactly once.

exit status: 0 all rows scored, 3 done but some rows have status error, 1 fatal error, 2 bad arguments.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    g = parser.add_argument_group("what to score")
    g.add_argument(
        "--model",
        required=True,
        metavar="DIR",
        help="model folder (save_pretrained): weights (.safetensors), config, tokenizer and "
        "BridgeTowerProcessor config (preprocessor_config.json / processor_config.json)",
    )
    g.add_argument(
        "--pairs",
        default=None,
        metavar="FILE",
        help="pairs file: .jsonl, .csv, .tsv or .parquet (a .tar name or pattern is taken as --shards)",
    )
    add_shards(g)
    g.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="output file: .jsonl or .parquet; or a folder URL (s3://bucket/scores/): a folder of Parquet parts",
    )
    g.add_argument(
        "--image-root",
        default=None,
        metavar="DIR",
        help="image paths are relative to DIR and may not leave it (default: relative to the pairs "
        "file's folder; absolute paths allowed)",
    )
    g.add_argument(
        "--head",
        choices=["itm", "itc"],
        default="itm",
        help="itm: match probability and logit (BridgeTowerForImageAndTextRetrieval); itc: cosine "
        "similarity (BridgeTowerForContrastiveLearning) (default: itm)",
    )
    add_columns(g)
    g.add_argument(
        "--with-text",
        action="store_true",
        help="output rows carry the scored text (column text), so no join back to the input is needed",
    )
    add_runtime(parser)
    add_job(parser, "pairs")
    x = parser.add_argument_group("comparison")
    x.add_argument(
        "--no-dedup",
        action="store_true",
        help="run the whole model per pair (the pair-by-pair baseline) instead of encoding each unique "
        "image and text once",
    )
    x.add_argument(
        "--engine",
        choices=["btfast", "hf"],
        default="btfast",
        help="btfast (default) or hf: the transformers model in eager mode (implies --no-dedup)",
    )
    add_ray(parser)


def run(args: argparse.Namespace) -> int:
    from btfast.score.job import local_job

    return cli_common.run(args, "score", local_job, "pairs")
