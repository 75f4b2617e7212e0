"""`btfast score --ray` / `btfast embed --ray`: `btfast.score.job.run_job` with Ray Data as the executor, into a
resumable folder of Parquet parts (`btfast.score.parts`).

The driver plans the parts as the single-process job does, skips those already written and hands the rest to Ray
Data (`btfast.ray.stages`); each part is written atomically once all its rows are back, in any order. Kill the
driver or an actor at any moment and rerun the same command: every input row ends up once in the output. The flags
are declared in `btfast.score.cli`; `python -m btfast.ray.cli score ...` is `btfast score --ray ...`.
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


def run_on_ray(chunks: Iterable[Chunk], cfg: JobConfig, where: Any, id_type: str) -> Iterator[tuple[int, Any]]:
    """The Ray executor: the chunks' rows become blocks through `pipeline`'s stages (placed by `where`); each chunk
    is yielded (a pyarrow Table sorted by `row`) once all its rows are back. Blocks hold `batch_rows`' decode rows,
    fewer when the work is small, so that every actor gets blocks and parts are written as the job goes (an actor
    returns a block's rows when it has done the whole block)."""
    import pyarrow as pa
    import ray

    from btfast.ray import pipeline
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
    yield from ((k, []) for k, n in todo.items() if n == 0)  # a shard without a readable sample: written empty
    todo = {k: n for k, n in todo.items() if n}
    if todo:
        model_rows, block_rows = batch_rows(where.batch_size)
        whole = pa.Table.from_pylist(recs, schema=arrow_schema((*ROWS, "part"), id_type))
        per = -(-whole.num_rows // (8 * where.actors))
        if per < block_rows:  # little work: smaller blocks (a multiple of a model call)
            block_rows = max(model_rows, -(-per // model_rows) * model_rows)
        tables = [whole.slice(i, block_rows) for i in range(0, whole.num_rows, block_rows)]
        kw = {"keep": ("part",), "placement": where, "decode_rows": block_rows}
        out = pipeline(ray.data.from_arrow(tables), cfg, prepared=True, id_type=id_type, **kw)
        asm = Assembler(todo)
        try:
            # prefetch_batches=0: take each block as soon as it is done (prefetching holds blocks back until the
            # next ones are ready, and a part is written only once all its rows are here)
            for batch in out.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0):
                yield from asm.add(batch)
        except Exception as e:
            if isinstance(e, OSError) and not type(e).__module__.startswith("ray"):
                raise
            done = asm.pending < len(todo)
            kept = "; the parts written so far are kept: rerun the same command to resume" if done else ""
            raise PipelineError(_reason(e) + kept) from e
        if asm.pending:
            raise PipelineError(f"{asm.pending} parts came back incomplete")
    if failure is not None:
        raise failure


class Assembler:
    """Gathers output batches (any order, any split) into whole parts; a row seen twice is kept once. `expected`:
    part still to do -> its number of rows. `add(table)` yields the parts it completed, sorted by `row`, without
    the `part` column."""

    def __init__(self, expected: dict[int, int]) -> None:
        self.expected = dict(expected)
        self.pieces: dict[int, list[Any]] = defaultdict(list)
        self.seen: dict[int, set[int]] = defaultdict(set)
        self.duplicates = 0

    @property
    def pending(self) -> int:
        return len(self.expected)

    def add(self, table: Any) -> Iterator[tuple[int, Any]]:
        import pyarrow as pa

        picked: dict[int, list[int]] = defaultdict(list)  # part -> indices in `table` of each new row's first copy
        for i, (k, row) in enumerate(zip(table.column("part").to_pylist(), table.column("row").to_pylist())):
            if k in self.expected and row not in self.seen[k]:  # else a duplicate, or a part already written
                self.seen[k].add(row)
                picked[k].append(i)
            else:
                self.duplicates += 1
        for k in sorted(picked):
            self.pieces[k].append(table.take(pa.array(picked[k], type=pa.int64())))
            if len(self.seen[k]) >= self.expected[k]:
                del self.expected[k], self.seen[k]
                yield k, pa.concat_tables(self.pieces.pop(k)).sort_by("row").drop_columns(["part"])


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
    from btfast.ray import connect, require_ray
    from btfast.ray.stages import place
    from btfast.score.job import run_job

    ray = require_ray()
    cfg = cfg.replace(limits=part_limits(cfg.limits))

    def start(stack: ExitStack) -> Any:
        kw = {} if address or os.environ.get("RAY_ADDRESS") else {"include_dashboard": False}
        if connect(address, logging_level=logging.WARNING, log_to_driver=True, **kw):
            stack.callback(ray.shutdown)  # only what we started
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = ctx.enable_operator_progress_bars = False  # the driver shows one bar: rows written
        logging.getLogger("ray.data").setLevel(logging.INFO if cfg.progress else logging.WARNING)
        where = place(ray.cluster_resources(), cfg.device, gpus_per_worker, cfg.workers, cfg.batch_size, cfg.dtype)
        if cfg.threads:  # --threads: torch threads per actor
            where = dataclasses.replace(where, threads=int(cfg.threads))
        header = cfg.header(command=f"{cfg.command} --ray", dtype=where.dtype, batch_size=where.batch_size)
        if cfg.progress:
            print(f"btfast {cfg.command} --ray: {where.describe()}; batch {where.batch_size}", file=sys.stderr)
        return header, lambda id_type: (functools.partial(run_on_ray, cfg=cfg, where=where, id_type=id_type), {})

    return run_job(cfg, start, desc=f"score {cfg.head} (ray)" if cfg.command == "score" else "embed (ray)", parts=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m btfast.ray.cli score ...`: `btfast score --ray ...`."""
    from btfast.cli import main as btfast_main

    args = list(sys.argv[1:] if argv is None else argv)
    return btfast_main([*args, "--ray"] if "--ray" not in args else args)


if __name__ == "__main__":
    sys.exit(main())
