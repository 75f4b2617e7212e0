"""`btfast score --ray` / `btfast embed --ray`: the same jobs on Ray Data, written as a resumable folder of Parquet.

The driver reads the input and cuts it into parts with the single-process planner (deterministic: the same
input and chunk limits give the same parts), skips the parts already in the output folder, and hands the rest
to Ray Data: images are decoded in CPU tasks, the model runs in an actor pool (`btfast.ray.stages`). Output rows
come back in any order; each part is written atomically once all its rows are in (`btfast.ray.parts`). Kill the
driver or an actor at any moment and run the same command again: every input row ends up in the output once.

Ray flags (no Ray import here, so `--help` and the install hint work without it):
    --ray                   run on Ray (without --address: a local Ray instance, with: join that cluster)
    --address ADDR          the cluster to join (`ray start --head` prints it; `auto` finds a local one)
    --gpus-per-worker G     GPUs per model actor (default 1 when the cluster has GPUs, else 0)
    --workers N             (the existing flag) with --ray: model actors (default: what the cluster has)
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the Ray group to `btfast score` / `btfast embed` (idempotent)."""
    if any(a.option_strings and a.option_strings[0] == "--ray" for a in parser._actions):
        return
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


def _fail(command: str, msg: str) -> int:
    print(f"btfast {command} --ray: error: {msg}", file=sys.stderr)
    return 1


def run(args: argparse.Namespace, command: str) -> int:
    """Entry point from `btfast score` / `btfast embed` when --ray is given."""
    from btfast.ray import RayMissingError, require_ray

    try:
        require_ray()
    except RayMissingError as e:
        return _fail(command, str(e))
    from btfast.score.cli_common import known_errors

    try:
        summary = (run_score if command == "score" else run_embed)(args)
    except KeyboardInterrupt:
        print(f"btfast {command} --ray: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except known_errors() as e:
        return _fail(command, str(e))
    except PipelineError as e:
        return _fail(command, str(e))
    print(f"btfast {command} --ray: {summary.line('pairs' if command == 'score' else 'items')}", file=sys.stderr)
    return summary.exit_code


class PipelineError(RuntimeError):
    """The Ray pipeline failed (an actor could not load the model, a task kept failing, the cluster went away)."""


# ---- connecting --------------------------------------------------------------------------------------------------


class Cluster:
    """Connect to the cluster at `address`, or start a local instance; shut down only what we started."""

    def __init__(self, address: str | None, progress: bool) -> None:
        import ray

        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            kw: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": True}
            if address:
                ray.init(address=address, **kw)
            elif os.environ.get("RAY_ADDRESS"):
                ray.init(**kw)
            else:
                ray.init(include_dashboard=False, **kw)
            self.started = True
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the driver shows one bar: rows written
        if hasattr(ctx, "enable_operator_progress_bars"):
            ctx.enable_operator_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.INFO if progress else logging.WARNING)

    def resources(self) -> dict[str, float]:
        return dict(self.ray.cluster_resources())

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


# ---- the driver loop ---------------------------------------------------------------------------------------------


def drive(
    store: Any,
    chunks: Iterable[Any],
    make_output: Any,
    *,
    shard: tuple[int, int],
    id_type: str,
    batch_size: int,
    actors: int,
    progress: bool,
    unit: str,
    desc: str,
) -> Any:
    """Run the parts of this shard that `store` lacks; returns a `btfast.score.job.Summary`.

    `make_output(ds, decode_rows)` appends the stages to the dataset of rows to do. Blocks hold `batch_rows(...)`'s
    decode rows, fewer when the work is small, so that every actor gets blocks and parts are written as the job
    goes (an actor returns a block's rows when it has done the whole block).
    """
    import pyarrow as pa
    from tqdm import tqdm

    from btfast.ray.parts import Assembler
    from btfast.ray.stages import batch_rows, row_record, rows_schema
    from btfast.score.job import Summary

    t0 = time.perf_counter()
    model_rows, block_rows = batch_rows(batch_size)
    schema = rows_schema(id_type, keep=[("part", pa.int64())])
    si, sn = shard
    expected: dict[int, int] = {}
    tables: list[Any] = []
    buf: list[dict[str, Any]] = []
    resumed = 0
    for c in chunks:
        if c.index % sn != si:
            continue
        expected[c.index] = len(c.rows)
        if c.index in store.done:
            if store.done[c.index]["rows"] == len(c.rows):
                resumed += len(c.rows)
                continue
            store.discard(c.index)  # not the part the plan cuts now: redo it
        buf.extend(row_record(r, id_type, part=c.index) for r in c.rows)
        while len(buf) >= block_rows:
            tables.append(pa.Table.from_pylist(buf[:block_rows], schema=schema))
            del buf[:block_rows]
    if buf:
        tables.append(pa.Table.from_pylist(buf, schema=schema))
    want = 8 * actors
    if 0 < len(tables) < want:  # little work: smaller blocks (a multiple of a model call)
        whole = pa.concat_tables(tables)
        per = -(-whole.num_rows // want)
        block_rows = max(model_rows, -(-per // model_rows) * model_rows)
        tables = [whole.slice(i, block_rows) for i in range(0, whole.num_rows, block_rows)]
    for k in [k for k in store.done if k not in expected]:  # written by a plan that no longer has it
        store.discard(k)
    summary = Summary(out=str(store.folder), resumed_rows=resumed)
    todo = {k: n for k, n in expected.items() if k not in store.done}
    if todo:
        import ray

        total = sum(expected.values())
        ds = ray.data.from_arrow(tables)
        out = make_output(ds, block_rows)
        asm = Assembler(todo)
        errors = store.errors_done
        bar = tqdm(
            total=total,
            initial=resumed,
            unit=unit,
            desc=desc,
            disable=not progress,
            dynamic_ncols=True,
            smoothing=0.05,
            file=sys.stderr,
        )
        try:
            # prefetch_batches=0: take each block as soon as it is done (prefetching holds blocks back until the
            # next ones are ready, and a part is written only once all its rows are here)
            for batch in out.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0):
                for k, table in asm.add(batch):
                    store.write(k, table)
                    summary.new_rows += table.num_rows
                    errors += store.done[k]["errors"]
                    bar.update(table.num_rows)
                    bar.set_postfix(errors=errors, refresh=False)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:
            if isinstance(e, OSError) and not type(e).__module__.startswith("ray"):
                raise
            kept = "; the parts written so far are kept: rerun the same command to resume" if store.done else ""
            raise PipelineError(_reason(e) + kept) from e
        finally:
            bar.close()
        if asm.pending:
            raise PipelineError(f"{asm.pending} parts came back incomplete")
    store.finish(expected)
    summary.seconds = time.perf_counter() - t0
    summary.rows = sum(store.done[k]["rows"] for k in expected)
    summary.errors = sum(store.done[k]["errors"] for k in expected)
    summary.chunks = len(expected)
    return summary


def _reason(e: BaseException) -> str:
    """The last line of a Ray error that names the Python exception at its root (a readable cause)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    named = [
        ln
        for ln in lines
        if ln.split(":")[0].replace(".", "").isidentifier()
        and ln.split(":")[0][:1].isupper()
        and ":" in ln
        and not ln.startswith(("File ", "ray::"))
    ]
    text = named[-1] if named else (lines[-1] if lines else type(e).__name__)
    return f"the Ray pipeline failed: {text}"


def _id_type_of_input(path: str | os.PathLike, id_field: str) -> str:
    """As `btfast score` with Parquet output: int64 ids for Parquet input with an integer id (or none)."""
    if str(path).lower().endswith((".parquet", ".pq")):
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pq.read_schema(path)
        if id_field not in schema.names or pa.types.is_integer(schema.field(id_field).type):
            return "int"
    return "string"


def part_limits(args: argparse.Namespace) -> Any:
    """The bounds of a part. A part is only the unit written and resumed (the actors batch rows on their own), so
    with --ray only --chunk-rows bounds it unless --chunk-images / --chunk-texts are given: 128-image parts would
    make a large collection hundreds of thousands of files."""
    from btfast.score.plan import Limits

    images, texts = args.chunk_images, args.chunk_texts
    defaults = _job_defaults()
    if images == defaults.get("chunk_images"):
        images = args.chunk_rows
    if texts == defaults.get("chunk_texts"):
        texts = args.chunk_rows
    return Limits(rows=args.chunk_rows, images=images, texts=texts)


def _job_defaults() -> dict[str, Any]:
    from btfast.score.cli_common import add_job

    p = argparse.ArgumentParser(add_help=False)
    add_job(p)
    return {a.dest: a.default for a in p._actions}


def _exact(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "exact", True))  # --exact (the default) / --no-exact


def _check_out(out: str) -> None:
    if str(out).lower().endswith((".jsonl", ".ndjson", ".json")):
        raise ValueError(f"--out {out}: with --ray the output is a folder of Parquet files; give a folder name")


def _setup(args: argparse.Namespace, command: str) -> tuple[Any, Any, int, str, dict[str, Any]]:
    """(cluster, placement, batch size, dtype name, common header fields)."""
    from btfast.ray.stages import default_batch_size, dtype_name, place
    from btfast.score.plan import parse_shard

    parse_shard(args.shard)
    if not Path(args.model).is_dir():
        raise FileNotFoundError(f"model folder not found: {args.model}")
    cluster = Cluster(args.address, progress=not args.no_progress)
    try:
        where = place(cluster.resources(), args.device, args.gpus_per_worker, args.workers)
        if getattr(args, "threads", None):  # --threads: torch threads per actor
            where = dataclasses.replace(where, threads=int(args.threads))
        bs = default_batch_size(where.device, args.batch_size)
        dt = dtype_name(args.dtype, where.device)
    except BaseException:
        cluster.close()
        raise
    if not args.no_progress:
        print(f"btfast {command} --ray: {where.describe()}; batch {bs}", file=sys.stderr)
    lim = part_limits(args)
    common = {
        "model": os.path.abspath(args.model),
        "shard": args.shard or "0/1",
        "limits": {"rows": lim.rows, "images": lim.images, "texts": lim.texts, "window": lim.window},
        "exact": _exact(args),
        "max_pixels": args.max_pixels,
        "dtype": dt,
        "batch_size": bs,
    }
    return cluster, where, bs, dt, common


def run_score(args: argparse.Namespace) -> Any:
    from btfast.ray import pipeline
    from btfast.ray.parts import PartStore
    from btfast.score.plan import parse_shard, plan
    from btfast.score.rows import ImageResolver, input_format, read_pairs

    if not Path(args.pairs).is_file():
        raise FileNotFoundError(f"pairs file not found: {args.pairs}")
    input_format(args.pairs)
    _check_out(args.out)
    engine = getattr(args, "engine", "btfast")
    dedup = not (getattr(args, "no_dedup", False) or engine == "hf")
    fields = (args.image_field, args.text_field, args.id_field)
    id_type = _id_type_of_input(args.pairs, args.id_field)
    cluster, where, bs, dt, common = _setup(args, "score")
    try:
        header = {
            "command": "score --ray",
            "head": args.head,
            "pairs": os.path.abspath(args.pairs),
            "image_root": None if args.image_root is None else os.path.abspath(args.image_root),
            "fields": list(fields),
            "dedup": dedup,
            "engine": engine,
            **common,
        }
        with PartStore(args.out, header, overwrite=args.overwrite) as store:
            resolver = ImageResolver(args.image_root, base=Path(args.pairs).parent)
            rows = read_pairs(args.pairs, resolver, image_field=fields[0], text_field=fields[1], id_field=fields[2])

            def make_output(ds: Any, decode_rows: int) -> Any:
                out, _ = pipeline(
                    ds,
                    args.model,
                    mode="score",
                    decode_rows=decode_rows,
                    head=args.head,
                    prepared=True,
                    dtype=args.dtype,
                    batch_size=bs,
                    exact=_exact(args),
                    max_pixels=args.max_pixels,
                    keep=("part",),
                    id_type=id_type,
                    dedup=dedup,
                    engine=engine,
                    placement=where,
                )
                return out

            return drive(
                store,
                plan(rows, part_limits(args)),
                make_output,
                shard=parse_shard(args.shard),
                id_type=id_type,
                batch_size=bs,
                actors=where.actors,
                progress=not args.no_progress,
                unit="pair",
                desc=f"score {args.head} (ray)",
            )
    finally:
        cluster.close()


def run_embed(args: argparse.Namespace) -> Any:
    from btfast.ray import pipeline
    from btfast.ray.parts import PartStore
    from btfast.score.plan import parse_shard, plan
    from btfast.score.rows import read_images, read_texts

    if args.images is None and args.texts is None:
        raise ValueError("give --images, --texts or both")
    _check_out(args.out)
    cluster, where, bs, dt, common = _setup(args, "embed")
    try:
        header = {
            "command": "embed --ray",
            "images": None if args.images is None else os.path.abspath(args.images),
            "texts": None if args.texts is None else os.path.abspath(args.texts),
            "image_root": None if args.image_root is None else os.path.abspath(args.image_root),
            **common,
        }
        lim = part_limits(args)
        with PartStore(args.out, header, overwrite=args.overwrite) as store:

            def chunks() -> Iterable[Any]:  # image parts, then text parts (numbers continue), as `btfast embed`
                k = 0
                for source in (
                    read_images(args.images, args.image_root) if args.images is not None else [],
                    read_texts(args.texts) if args.texts is not None else [],
                ):
                    for c in plan(source, lim):
                        c.index = k
                        k += 1
                        yield c

            def make_output(ds: Any, decode_rows: int) -> Any:
                out, _ = pipeline(
                    ds,
                    args.model,
                    mode="embed",
                    decode_rows=decode_rows,
                    head="itc",
                    prepared=True,
                    dtype=args.dtype,
                    batch_size=bs,
                    exact=_exact(args),
                    max_pixels=args.max_pixels,
                    keep=("part",),
                    id_type="string",
                    placement=where,
                )
                return out

            return drive(
                store,
                chunks(),
                make_output,
                shard=parse_shard(args.shard),
                id_type="string",
                batch_size=bs,
                actors=where.actors,
                progress=not args.no_progress,
                unit="item",
                desc="embed (ray)",
            )
    finally:
        cluster.close()


# ---- standalone entry point (`python -m btfast.ray.cli score ...`) -----------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from btfast.score import cli_embed, cli_score

    parser = argparse.ArgumentParser(
        prog="python -m btfast.ray.cli", description="btfast score / embed on Ray Data (as `btfast score --ray`)."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in (("score", cli_score), ("embed", cli_embed)):
        p = sub.add_parser(name, help=f"btfast {name} --ray")
        module.add_arguments(p)
        add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    args.ray = True
    return run(args, args.command)


if __name__ == "__main__":
    sys.exit(main())
