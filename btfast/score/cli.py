"""`btfast score`, `btfast embed` and `btfast retrieve`: one table of flags (no heavy imports here) and one run.

`btfast/cli.py` takes `score`, `embed` and `retrieve` (each a `Command`) from here; `--ray` goes to `btfast.ray.cli`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from btfast.cli import add_flags, flag

EPILOGS = {
    "score": """\
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
""",
    "embed": """\
output (.jsonl or .parquet), one row per image and per text: kind (image / text), row (position in its list),
id (the input's id, else the image's path or the row), image, text, status (ok / error), error, text_truncated,
embedding (the L2-normalised ITC embedding: image_embeds / text_embeds of BridgeTowerForContrastiveLearning;
cosine = dot product). Resumable and shardable like `btfast score`.

exit status: 0 all rows embedded, 3 done but some rows have status error, 1 fatal error, 2 bad arguments.
""",
    "retrieve": """\
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
""",
}

WHAT, RUN, RESUME = "what to {command}", "runtime", "resume, sharding, chunking"
RAY = "distributed (Ray Data; pip install 'btfast[ray]')"
RAY_ABOUT = """\
With --ray, --out is a folder of Parquet files (one per part, plus _btfast_job.json and _SUCCESS);
--workers is the number of model actors (default: one per GPU of the cluster, or CPUs // 4 without
GPUs); --threads the torch threads of a CPU actor; --chunk-rows bounds a part, the unit written (and
resumed) at once (--chunk-images / --chunk-texts too, only when given). Images are decoded in CPU tasks
on the cluster: image paths and the model folder must be readable at the same path on every node."""
WORDS = {  # per command, the {fields} of the helps below
    "score": dict(of="the input", rows="pairs", url="scores"),
    "embed": dict(of="the input", rows="images or texts", url="emb", single=", one image,"),
    "retrieve": dict(of="the queries", single=""),
}
COLUMNS = {"image": "the image (a path, or bytes in Parquet)", "text": "the text", "id": "the row id"}

# One row a flag, in help order: group, option strings, on= the commands that have it (default all), add_argument's
# keywords. Laid out by hand, a flag a row (ruff format would give every keyword its own line).
# fmt: off
FLAGS = [
    flag(WHAT, "--model", on="score", required=True, metavar="DIR", help="model folder (save_pretrained): weights "
         "(.safetensors), config, tokenizer and BridgeTowerProcessor config (preprocessor_config.json / "
         "processor_config.json)"),
    flag(WHAT, "--model", on="embed", required=True, metavar="DIR",
         help="a BridgeTowerForContrastiveLearning folder (save_pretrained) with tokenizer and processor"),
    flag(WHAT, "--model", on="retrieve", metavar="DIR",
         help="ITM folder (BridgeTowerForImageAndTextRetrieval) that re-ranks the candidates"),
    flag(WHAT, "--itc-model", on="retrieve", metavar="DIR",
         help="ITC folder (BridgeTowerForContrastiveLearning) that picks the candidates (default: --model)"),
    flag(WHAT, "--pairs", on="score", metavar="FILE",
         help="pairs file: .jsonl, .csv, .tsv or .parquet (a .tar name or pattern is taken as --shards)"),
    flag(WHAT, "--images", on="embed retrieve", metavar="DIR_OR_FILE", help="a folder (every image below it, "
         "sorted){single} or a list: .txt (a path a line), .jsonl / .csv / .parquet with an image column"),
    flag(WHAT, "--texts", on="embed retrieve", metavar="FILE",
         help=".txt (a text a line) or .jsonl / .csv / .parquet with a text column (and optionally id)"),
    flag(WHAT, "--image-root", on="embed retrieve", metavar="DIR",
         help="paths in an image list are relative to DIR and may not leave it (default: the list's folder)"),
    flag(WHAT, "--shards", metavar="SHARDS", help="WebDataset tar shards instead of the other inputs: a folder (its "
         "*.tar), a list file (a shard a line), a brace pattern (shards/{{00000..00123}}.tar) or a glob; paths or "
         "URLs (s3://, gs://, ...). Each sample's image is its jpg/jpeg/png/webp member, its text the txt member, "
         "its id the sample key. Written and resumed a shard at a time; --shard I/N divides the shard files"),
    flag(WHAT, "--caption-field", metavar="FIELD", help="with --shards: take each sample's text from this field of "
         "its json member (img2dataset: caption) instead of its txt member"),
    flag(WHAT, "--embed", on="embed", choices=["both", "images", "texts"], default="both",
         help="with --shards: embed each sample's image, text or both (default: both)"),
    flag(WHAT, "--out", on="score embed", required=True, metavar="FILE", help="output file: .jsonl or .parquet; or "
         "a folder URL (s3://bucket/{url}/): a folder of Parquet parts"),
    flag(WHAT, "--out", on="retrieve", required=True, metavar="FILE", help="output file: .jsonl or .parquet"),
    flag(WHAT, "--image-root", on="score", metavar="DIR", help="image paths are relative to DIR and may not leave "
         "it (default: relative to the pairs file's folder; absolute paths allowed)"),
    flag(WHAT, "--head", on="score", choices=["itm", "itc"], default="itm", help="itm: match probability and logit "
         "(BridgeTowerForImageAndTextRetrieval); itc: cosine similarity (BridgeTowerForContrastiveLearning) "
         "(default: itm)"),
    *[flag(WHAT, f"--{role}-column", f"--{role}-field", dest=f"{role}_field", default=role, metavar="NAME",
           help=f"input column holding {what} (default: {role})") for role, what in COLUMNS.items()],
    flag(WHAT, "--with-text", on="score", action="store_true",
         help="output rows carry the scored text (column text), so no join back to the input is needed"),
    flag(WHAT, "--top-k", on="retrieve", type=int, default=16, metavar="K",
         help="ITC candidates per query, all re-ranked by ITM (the paper used 128 or 256; default: 16)"),
    flag(WHAT, "--no-rerank", on="retrieve", action="store_true", help="ITC ranking only (no ITM model needed)"),
    flag(RUN, "--device", default="auto",
         help="where the model runs: auto (cuda if available, else cpu), cpu, cuda, cuda:1 (default: auto)"),
    flag(RUN, "--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
         help="model precision: auto = bf16 on cuda, fp32 on cpu (default: auto)"),
    flag(RUN, "--batch-size", type=int, metavar="N",
         help="images / texts per tower call and pairs per fusion call (default: 64 on cuda, 16 on cpu)"),
    flag(RUN, "--workers", type=int, metavar="N", help="processes decoding and preprocessing images ahead of the "
         "model; 0 = in the main process (default: min(8, CPUs - 1))"),
    flag(RUN, "--exact", action=argparse.BooleanOptionalAction, default=True, help="preprocess exactly as "
         "BridgeTowerProcessor, bit for bit (default). --no-exact: large JPEGs decode at 1/2-1/8 scale via "
         "Image.draft (still >= 2x the resize target) and downscales resample only the centre crop: 2-4x faster on "
         "large photos, pixels differ by a few levels, so scores differ slightly from the reference"),
    flag(RUN, "--max-pixels", type=int, metavar="N", help="refuse images with more pixels than this, as an error "
         "row (default: 178956970, Pillow's decompression-bomb limit)"),
    flag(RUN, "--threads", type=int, metavar="N", help="torch CPU threads when --device is cpu (default: CPUs - "
         "workers, at least 1: the decoding workers need their cores)"),
    flag(RUN, "--exif-orientation", action=argparse.BooleanOptionalAction, default=True, help="turn photos upright "
         "by their EXIF orientation tag, as transformers' load_image does for a path (default). "
         "--no-exif-orientation: use the pixels as stored (what BridgeTowerProcessor sees given an image opened "
         "with Image.open)"),
    flag(RUN, "--no-progress", action="store_true", help="no progress bar (the summary is still printed)"),
    flag(RESUME, "--overwrite", action="store_true", help="start afresh, deleting an existing output (default: "
         "resume it; a different job's output is refused)"),
    flag(RESUME, "--shard", metavar="I/N", help="process only shard I of N (0-based) of {of}, e.g. 0/4 on one GPU, "
         "1/4 on the next; the N outputs together hold exactly the unsharded result, the same numbers bit for bit "
         "on one kind of device. Chunks are dealt round robin, so a shard of {of} smaller than N chunks may be "
         "empty (default: all)"),
    flag(RESUME, "--chunk-queries", on="retrieve", type=int, default=1024, metavar="N", help="queries per chunk, "
         "the unit written (and resumed) at once; the ITM images are encoded once per chunk, so larger chunks "
         "re-encode less (default: 1024)"),
    flag(RESUME, "--chunk-rows", on="score embed", type=int, default=16384, metavar="N",
         help="at most N {rows} per chunk, the unit written (and resumed) at once (default: 16384)"),
    flag(RESUME, "--chunk-images", type=int, default=128, metavar="N",
         help="at most N unique images per chunk (their tower states stay in memory; default: 128)"),
    flag(RESUME, "--chunk-texts", type=int, default=2048, metavar="N",
         help="at most N unique texts per chunk (default: 2048)"),
    flag("comparison", "--no-dedup", on="score", action="store_true", help="run the whole model per pair (the "
         "pair-by-pair baseline) instead of encoding each unique image and text once"),
    flag("comparison", "--engine", on="score", choices=["btfast", "hf"], default="btfast",
         help="btfast (default) or hf: the transformers model in eager mode (implies --no-dedup)"),
    flag(RAY, "--ray", on="score embed", action="store_true",
         help="run on Ray Data: without --address a local Ray instance is started (default: off)"),
    flag(RAY, "--address", on="score embed", metavar="ADDR", help="join this Ray cluster, e.g. 10.0.0.1:6379 or "
         "auto (default: RAY_ADDRESS if set, else a new local instance)"),
    flag(RAY, "--gpus-per-worker", on="score embed", type=float, metavar="G", help="GPUs per model actor; "
         "fractions share a GPU (default: 1 when the cluster has GPUs, else 0: the model runs on CPUs)"),
]
# fmt: on


@dataclass(frozen=True)
class Command:
    """One subcommand, as `btfast/cli.py` wants it: `add_arguments(parser)` and `run(args) -> exit status`."""

    name: str
    unit: str  # what the summary line counts

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The flags of `btfast COMMAND`: what to read and write, runtime, resume and (score, embed) Ray."""
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
        parser.epilog = EPILOGS[self.name]
        add_flags(parser, FLAGS, self.name, {RAY: RAY_ABOUT}, **WORDS[self.name])

    def run(self, args: argparse.Namespace) -> int:
        if self.name == "retrieve":
            from btfast.score.retrieve import retrieve_job as job
        else:
            from btfast.score.job import local_job as job
        return run(args, self.name, job, self.unit)


score = Command("score", "pairs")
embed = Command("embed", "items")
retrieve = Command("retrieve", "queries")


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
    from btfast.score.sink import ResumeError

    label = label or command
    try:
        cfg = from_args(command, args)
    except UsageError as e:
        print(f"btfast {label}: error: {e}", file=sys.stderr)
        return 2
    try:
        import torch  # only now: bad arguments are refused without it

        from btfast.score.engine import ModelLoadError, Runtime
        from btfast.score.loader import cpu_count

        rt = Runtime.of(cfg)
        if rt.device.type == "cpu":  # leave the image workers their cores: oversubscribed OpenMP threads wait
            torch.set_num_threads(cfg.threads or max(1, cpu_count() - rt.workers))
        summary = job(cfg)
    except KeyboardInterrupt:
        print(f"btfast {label}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except (ResumeError, ModelLoadError, OSError, ValueError, *errors) as e:  # BtfastError is a ValueError
        print(f"btfast {label}: error: {e}", file=sys.stderr)
        return 1
    print(f"btfast {label}: {summary.line(unit)}", file=sys.stderr)
    return summary.exit_code
