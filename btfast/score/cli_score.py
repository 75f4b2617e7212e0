"""`btfast score`: score (image, text) pairs offline with the ITM or ITC head, resumable and shardable."""

from __future__ import annotations

import argparse
import sys

from btfast.ray.cli import add_arguments as add_ray_arguments
from btfast.score.cli_common import add_job, add_runtime, fail, known_errors, limits, set_threads

EPILOG = """\
input: JSONL, CSV/TSV or Parquet with columns image (a path, or bytes in Parquet), text and optionally id.
output (.jsonl or .parquet), one row per input row: row (0-based input position), id (the input's, else row),
image, status (ok / error), error (the reason), text_truncated, and
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
    g.add_argument("--pairs", required=True, metavar="FILE", help="pairs file: .jsonl, .csv, .tsv or .parquet")
    g.add_argument("--out", required=True, metavar="FILE", help="output file: .jsonl or .parquet")
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
    g.add_argument("--image-field", default="image", help="column holding the image (default: image)")
    g.add_argument("--text-field", default="text", help="column holding the text (default: text)")
    g.add_argument("--id-field", default="id", help="column holding the row id (default: id)")
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
    add_ray_arguments(parser)  # --ray, --address, --gpus-per-worker: btfast.ray.cli


def run(args: argparse.Namespace) -> int:
    if getattr(args, "ray", False):  # the same job on Ray Data, written as a folder of Parquet parts
        from btfast.ray.cli import run as run_ray

        return run_ray(args, "score")
    try:
        set_threads(args)
        from btfast.score.job import score

        summary = score(
            args.model,
            args.pairs,
            args.out,
            head=args.head,
            image_root=args.image_root,
            device=args.device,
            dtype=args.dtype,
            batch_size=args.batch_size,
            workers=args.workers,
            shard=args.shard,
            overwrite=args.overwrite,
            limits=limits(args),
            dedup=not (args.no_dedup or args.engine == "hf"),
            exact=args.exact,
            max_pixels=args.max_pixels,
            progress=not args.no_progress,
            engine=args.engine,
            fields=(args.image_field, args.text_field, args.id_field),
        )
    except KeyboardInterrupt:
        print("btfast score: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except known_errors() as e:
        return fail("score", e)
    print(f"btfast score: {summary.line('pairs')}", file=sys.stderr)
    return summary.exit_code
