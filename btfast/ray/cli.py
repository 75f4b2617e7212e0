"""`btfast score --ray` / `btfast embed --ray`: the same jobs on Ray Data, written as a resumable folder of Parquet.

The driver reads the input and cuts it into parts with the single-process planner (deterministic: the same
input and chunk limits give the same parts), skips the parts already in the output folder, and hands the rest
to Ray Data: images are decoded in CPU tasks, the model runs in an actor pool (`btfast.ray.stages`). Output rows
come back in any order; each part is written atomically once all its rows are in (`btfast.score.parts`). Kill the
driver or an actor at any moment and run the same command again: every input row ends up in the output once.

The job, its checks and its driver loop are the single-process ones (`btfast.score.config`, `.source`,
`.job.run_chunks`); what is Ray's is here: connecting to the cluster, placing the actor pool (`stages.place`) and
the executor that runs chunks on Ray Data. `btfast/cli.py` sends `--ray` here; the flags are declared in
`btfast.score.cli.add_ray`. `python -m btfast.ray.cli score ...` is `btfast score --ray ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from typing import Any

from btfast.score.config import JobConfig
from btfast.score.plan import Chunk, Limits


def run(args: argparse.Namespace) -> int:
    """`btfast score|embed ... --ray` (dispatched by `btfast/cli.py`)."""
    from btfast.ray import RayMissingError
    from btfast.score import cli

    job = functools.partial(ray_job, address=args.address, gpus_per_worker=args.gpus_per_worker)
    unit = getattr(cli, args.command).unit
    errors = (PipelineError, RayMissingError)
    return cli.run(args, args.command, job, unit, label=f"{args.command} --ray", errors=errors)


class PipelineError(RuntimeError):
    """The Ray pipeline failed (an actor could not load the model, a task kept failing, the cluster went away)."""


def run_on_ray(
    chunks: Iterable[Chunk], output: Any, id_type: str, batch_size: int, actors: int
) -> Iterator[tuple[int, Any]]:
    """The Ray executor: the chunks' rows become blocks, `output(ds, decode_rows)` appends the decode and model
    stages, and each chunk is yielded (a pyarrow Table sorted by `row`) once all its rows are back.

    Blocks hold `batch_rows(...)`'s decode rows, fewer when the work is small, so that every actor gets blocks and
    parts are written as the job goes (an actor returns a block's rows when it has done the whole block)."""
    import pyarrow as pa
    import ray

    from btfast.ray.stages import batch_rows, row_record
    from btfast.score.schema import ROWS, arrow_schema

    todo: dict[int, int] = {}
    recs: list[dict[str, Any]] = []
    failure: Exception | None = None
    try:
        for c in chunks:
            todo[c.index] = len(c.rows)
            recs.extend(row_record(r, id_type, part=c.index) for r in c.rows)
    except Exception as e:  # a shard that cannot be read: the others are run first, then this is raised
        failure = e
    for k in [k for k, n in todo.items() if n == 0]:  # a shard without a readable sample: written empty
        del todo[k]
        yield k, []
    if todo:
        model_rows, block_rows = batch_rows(batch_size)
        whole = pa.Table.from_pylist(recs, schema=arrow_schema(ROWS, id_type).append(pa.field("part", pa.int64())))
        per = -(-whole.num_rows // (8 * actors))
        if per < block_rows:  # little work: smaller blocks (a multiple of a model call)
            block_rows = max(model_rows, -(-per // model_rows) * model_rows)
        tables = [whole.slice(i, block_rows) for i in range(0, whole.num_rows, block_rows)]
        out = output(ray.data.from_arrow(tables), block_rows)
        asm = Assembler(todo)
        done = 0
        try:
            # prefetch_batches=0: take each block as soon as it is done (prefetching holds blocks back until the
            # next ones are ready, and a part is written only once all its rows are here)
            for batch in out.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0):
                for k, table in asm.add(batch):
                    done += 1
                    yield k, table
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except Exception as e:
            if isinstance(e, OSError) and not type(e).__module__.startswith("ray"):
                raise
            kept = "; the parts written so far are kept: rerun the same command to resume" if done else ""
            raise PipelineError(_reason(e) + kept) from e
        if asm.pending:
            raise PipelineError(f"{asm.pending} parts came back incomplete")
    if failure is not None:
        raise failure


class Assembler:
    """Gathers output batches (any order, any split) into whole parts; a row seen twice is kept once.

    `expected` maps each part still to do to its number of rows. `add(table)` returns the parts it completed,
    each as a table sorted by `row`, without the `part` column.
    """

    def __init__(self, expected: dict[int, int]) -> None:
        self.expected = dict(expected)
        self.pieces: dict[int, list[Any]] = defaultdict(list)
        self.seen: dict[int, set[int]] = defaultdict(set)
        self.duplicates = 0

    @property
    def pending(self) -> int:
        return len(self.expected)

    def add(self, table: Any) -> Iterator[tuple[int, Any]]:
        import numpy as np
        import pyarrow as pa

        if table.num_rows == 0:
            return
        parts = table.column("part").to_numpy(zero_copy_only=False)
        rows = table.column("row").to_numpy(zero_copy_only=False)
        for k in np.unique(parts).tolist():
            if k not in self.expected:  # a part already written (a retried task's output): drop it
                self.duplicates += int((parts == k).sum())
                continue
            idx = np.flatnonzero(parts == k)
            seen = self.seen[k]
            keep = []
            for i in idx.tolist():
                r = int(rows[i])
                if r in seen:
                    self.duplicates += 1
                else:
                    seen.add(r)
                    keep.append(i)
            if keep:
                self.pieces[k].append(table.take(pa.array(keep, type=pa.int64())))
            if len(seen) >= self.expected[k]:
                whole = pa.concat_tables(self.pieces.pop(k))
                whole = whole.take(np.argsort(whole.column("row").to_numpy(zero_copy_only=False), kind="stable"))
                del self.expected[k], self.seen[k]
                yield k, whole.drop_columns(["part"])


def _reason(e: BaseException) -> str:
    """The last line of a Ray error that names the Python exception at its root (a readable cause)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    named = [ln for ln in lines if ln[:1].isupper() and ":" in ln and ln.split(":")[0].replace(".", "").isidentifier()]
    return f"the Ray pipeline failed: {named[-1] if named else (lines[-1] if lines else type(e).__name__)}"


def part_limits(limits: Limits) -> Limits:
    """The bounds of a part. A part is only the unit written and resumed (the actors batch rows on their own), so
    with --ray only --chunk-rows bounds it unless --chunk-images / --chunk-texts differ from their defaults:
    128-image parts would make a large collection hundreds of thousands of files."""
    default = Limits()
    images = limits.rows if limits.images == default.images else limits.images
    texts = limits.rows if limits.texts == default.texts else limits.texts
    return dataclasses.replace(limits, images=images, texts=texts)


def ray_job(cfg: JobConfig, *, address: str | None = None, gpus_per_worker: float | None = None) -> Any:
    """The job `cfg` on Ray Data into a folder of Parquet parts: connect, place the actor pool, run the chunks."""
    from btfast.ray import connect, pipeline, require_ray
    from btfast.ray.stages import actor_batch_size, dtype_name, place
    from btfast.score.job import run_job

    ray = require_ray()
    cfg = cfg.replace(limits=part_limits(cfg.limits))

    def start(stack: ExitStack) -> Any:
        kw = {} if address or os.environ.get("RAY_ADDRESS") else {"include_dashboard": False}
        if connect(address, logging_level=logging.WARNING, log_to_driver=True, **kw):
            stack.callback(ray.shutdown)  # only what we started
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # the driver shows one bar: rows written
        if hasattr(ctx, "enable_operator_progress_bars"):
            ctx.enable_operator_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.INFO if cfg.progress else logging.WARNING)
        where = place(ray.cluster_resources(), cfg.device, gpus_per_worker, cfg.workers)
        if cfg.threads:  # --threads: torch threads per actor
            where = dataclasses.replace(where, threads=int(cfg.threads))
        job = cfg.replace(batch_size=actor_batch_size(where.device, cfg.batch_size))
        bs = job.batch_size
        header = cfg.header(command=f"{cfg.command} --ray", dtype=dtype_name(cfg.dtype, where.device), batch_size=bs)
        if cfg.progress:
            print(f"btfast {cfg.command} --ray: {where.describe()}; batch {bs}", file=sys.stderr)

        def begin(id_type: str) -> Any:
            def output(ds: Any, decode_rows: int) -> Any:
                kw = {"keep": ("part",), "placement": where, "decode_rows": decode_rows}
                return pipeline(ds, job, prepared=True, id_type=id_type, **kw)[0]

            return (lambda chunks: run_on_ray(chunks, output, id_type, bs, where.actors)), {}

        return header, begin

    desc = f"score {cfg.head} (ray)" if cfg.command == "score" else "embed (ray)"
    return run_job(cfg, start, desc=desc, parts=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m btfast.ray.cli score ...`: `btfast score --ray ...`."""
    from btfast.cli import main as btfast_main

    args = list(sys.argv[1:] if argv is None else argv)
    return btfast_main([*args, "--ray"] if "--ray" not in args else args)


if __name__ == "__main__":
    sys.exit(main())
