"""Retrieval as in the BridgeTower paper: ITC picks the top-k candidates per query, ITM re-ranks them.

1. Every image and every text gets its unimodal ITC embedding once (a BridgeTowerForContrastiveLearning
   model: no fusion needed): the gallery of both directions.
2. The queries (every text, then every image) are cut into chunks of `chunk_queries`: the unit written, resumed
   and sharded (the score job's `ChunkSink` and `run_chunks`). Per chunk: cosines of its queries against the
   whole other side, in blocks, and the top-k of each.
3. A chunk's candidate pairs are scored by a BridgeTowerForImageAndTextRetrieval model (`score` chunks: each
   unique image and text through its tower once) and each list is re-ranked by the ITM logit.

A chunk's numbers depend only on its queries and the gallery: a resumed run, or a sharded run's parts joined,
give the rows of one uninterrupted run. Each run embeds the whole gallery again unless an interrupted run left
its gallery file. Two folders: `itm_model` and `itc_model` (default: the same folder, which must then hold both
heads' weights; a folder missing a head's weights is refused, never filled with random ones).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from btfast.io.fs import write_atomic
from btfast.score.config import JobConfig
from btfast.score.job import LocalExecutor, Summary, _config, run_chunks, stream
from btfast.score.plan import Chunk, Limits, plan
from btfast.score.rows import Row
from btfast.score.schema import RESULT, RETRIEVE, id_value, retrieve_schema
from btfast.score.sink import ChunkSink, output_format

DIRECTION = {"text": "text_to_image", "image": "image_to_text"}  # query side -> direction
BLOCK = 1024  # queries per similarity matmul (bounds its memory: BLOCK x gallery floats)
GALLERY_SUFFIX = ".btfast-gallery.npz"  # the gallery's ITC embeddings, kept until the job finishes
SIDES = ("image", "text")
Side = tuple[np.ndarray, list[str | None]]  # a side of the gallery: ITC embeddings, and each row's error


def _embed_all(ctx: Any, rows: list[Row], loader: Any, limits: Limits, desc: str, progress: bool) -> Side:
    """(N, D) float32 ITC embeddings of `rows` (zeros where a row failed) and each row's error."""
    from tqdm import tqdm

    from btfast.score.engine import compute_chunk

    emb = np.zeros((len(rows), 1), np.float32)
    errors: list[str | None] = [None] * len(rows)
    embed = partial(compute_chunk, ctx, "embed", "keep")
    with tqdm(total=len(rows), desc=desc, unit="item", disable=not progress, file=sys.stderr) as bar:
        for _, outs in stream(plan(rows, limits), loader, lambda c, cv: embed(c.rows, cv)):
            for o in outs:
                if o["status"] != "ok":
                    errors[o["row"]] = o["error"]
                    continue
                if emb.shape[1] != len(o["embedding"]):  # the first embedding: now the width is known
                    emb = np.zeros((len(rows), len(o["embedding"])), dtype=np.float32)
                emb[o["row"]] = o["embedding"]
            bar.update(len(outs))
    return emb, errors


def _gallery(cfg: JobConfig, rows: dict[str, list[Row]], header: dict[str, Any], loader: Any, **load: Any) -> Any:
    """side -> (ITC embeddings, errors): from the file an interrupted run of this job left beside the output, else
    embedded now and saved there. Keyed by the header and the rows' names and texts (images whose content changed
    under the same names go unnoticed); the file is removed when the job finishes or with --overwrite."""
    from btfast.score.engine import Context

    path = Path(str(cfg.out) + GALLERY_SUFFIX)
    digest = hashlib.sha256(json.dumps(header, sort_keys=True, default=str).encode())
    for r in rows["image"] + rows["text"]:
        digest.update(json.dumps([r.kind, r.image_name, r.text, r.error], default=str).encode())
    key = digest.hexdigest()
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) == key:
                errors = json.loads(str(z["errors"]))
                gallery = {side: (z[side], errors[side]) for side in SIDES}
                print(f"retrieve: the gallery's ITC embeddings are reused from {path}", file=sys.stderr)
                return gallery
    except (OSError, KeyError, ValueError):  # none yet, or unreadable: embed again
        pass
    itc = Context.load(cfg.itc_model or cfg.model, "itc", images=loader.pre, **load)
    gallery = {s: _embed_all(itc, rows[s], loader, cfg.limits, f"itc {s}s", cfg.progress) for s in SIDES}
    errors = json.dumps({side: err for side, (_, err) in gallery.items()})
    buf = io.BytesIO()
    np.savez(buf, key=np.array(key), errors=np.array(errors), **{s: e for s, (e, _) in gallery.items()})
    write_atomic(path, buf.getvalue())
    return gallery


class _Ranker:
    """The `_gallery` of `rows` (side -> rows) and the ITM model (none with `cfg.rerank=False`: ITC only); ranks one
    chunk of queries a call. `id_type`: of the results' ids, "string" (Parquet) or "keep"."""

    def __init__(self, cfg: JobConfig, rows: dict[str, list[Row]], rt: Any, id_type: str) -> None:
        import torch

        from btfast.score.engine import Context
        from btfast.score.loader import ImageLoader

        itc_pre = cfg.image_preprocessor(cfg.itc_model or cfg.model)
        itm_pre = cfg.image_preprocessor(cfg.model) if cfg.rerank else None
        self.top_k, self.limits, self.id_type, self.pairs_reranked = cfg.top_k, cfg.limits, id_type, 0
        self.loader: Any = ImageLoader(itc_pre, rt.workers)  # workers start while the model loads
        load = {"device": rt.device, "dtype": rt.dtype, "batch_size": rt.batch_size}
        try:
            gallery = _gallery(cfg, rows, rt.header(cfg), self.loader, **load)  # its ITC model is freed on return
            if itm_pre is None or itm_pre.config != itc_pre.config:  # else one worker pool serves both models
                self.loader.close()
                self.loader = None if itm_pre is None else ImageLoader(itm_pre, rt.workers)
            self.itm = None if itm_pre is None else Context.load(cfg.model, "itm", images=itm_pre, **load)
        except BaseException:
            self.close()
            raise
        self.gallery: dict[str, tuple[Any, list[Row], dict[int, int], list[str | None]]] = {}
        for s, (emb, err) in gallery.items():  # (embeddings of the usable rows, those rows, row -> position, errors)
            ok = [k for k, e in enumerate(err) if e is None]
            pos = {k: a for a, k in enumerate(ok)}
            self.gallery[s] = (torch.from_numpy(emb[ok]).to(rt.device), [rows[s][k] for k in ok], pos, err)

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()

    def __call__(self, chunk: Chunk, canvases: dict[str, Any]) -> list[dict[str, Any]]:
        """One output row per query of `chunk`, in order (a `run_chunks` compute; the ITM images load here)."""
        import torch

        side = chunk.rows[0].kind
        other = "image" if side == "text" else "text"
        queries, _, pos, errors = self.gallery[side]
        targets, target_rows, _, _ = self.gallery[other]
        ok = [r for r in chunk.rows if r.row in pos]
        cands: dict[int, list[tuple[float, Row]]] = {r.row: [] for r in ok}  # query row -> (cosine, target) best first
        with torch.inference_mode():
            if len(target_rows):
                at = torch.tensor([pos[r.row] for r in ok], dtype=torch.long, device=queries.device)
                k = min(self.top_k, len(target_rows))
                for s in range(0, len(ok), BLOCK):
                    vals, idx = torch.topk(queries[at[s : s + BLOCK]] @ targets.T, k, dim=1)
                    for q, v, b in zip(ok[s : s + BLOCK], vals.float().cpu().tolist(), idx.cpu().tolist()):
                        cands[q.row] = [(x, target_rows[j]) for x, j in zip(v, b)]
            scores = iter(self._itm(side, ok, cands)) if self.itm is not None else itertools.repeat((None, None))
        outs = []
        for q in chunk.rows:  # a result: (row, id, item, itc_cosine, itm_logit, itm_prob)
            res = [
                (t.row, id_value(t.id, self.id_type), t.text if other == "text" else t.image_name, cos, *next(scores))
                for cos, t in cands.get(q.row, [])
            ]
            if self.itm is not None:  # by ITM logit (a failed pair last), then by cosine
                res.sort(key=lambda r: (-(r[4] if r[4] is not None else -np.inf), -r[3]))
            status = ("ok", None) if q.row in cands else ("error", errors[q.row])
            query = (DIRECTION[side], q.row, id_value(q.id, "string"), q.text if side == "text" else q.image_name)
            results = [dict(zip(RESULT, (rank, *r))) for rank, r in enumerate(res, 1)]
            outs.append(dict(zip(RETRIEVE, (*query, *status, results))))
        return outs

    def _itm(self, side: str, queries: list[Row], cands: dict[int, list[tuple[float, Row]]]) -> list[tuple[Any, Any]]:
        """ITM (logit, prob) of every candidate pair, in order ((None, None) where it failed), by `score` chunks."""
        from btfast.score.engine import score_chunk

        pairs = []
        for q in queries:
            for _, t in cands[q.row]:
                text, image = (q, t) if side == "text" else (t, q)
                pairs.append(replace(image, row=len(pairs), id=None, text=text.text, kind="pair"))
        scores: list[tuple[Any, Any]] = [(None, None)] * len(pairs)
        for _, outs in stream(plan(pairs, self.limits), self.loader, lambda c, cv: score_chunk(self.itm, c.rows, cv)):
            for o in outs:
                if o["status"] == "ok":
                    scores[o["row"]] = (o["itm_logit"], o["itm_prob"])
        self.pairs_reranked += len(pairs)
        return scores


def retrieve_job(cfg: JobConfig) -> Summary:
    """Ranked lists in both directions; see the module doc and `retrieve`."""
    from btfast.score.engine import Runtime
    from btfast.score.source import ListSource, ShardsSource

    t0 = time.perf_counter()
    rt = Runtime.of(cfg)
    source = ShardsSource(cfg, SIDES) if cfg.shards is not None else ListSource(cfg)
    source.check()  # a missing column or a wrong image root: fatal, before any model loads
    rows = dict(zip(SIDES, source.lists()))
    schema = retrieve_schema() if output_format(cfg.out) == "parquet" else None
    sink = ChunkSink(cfg.out, rt.header(cfg), overwrite=cfg.overwrite, schema=schema)
    gallery = Path(str(cfg.out) + GALLERY_SUFFIX)
    if cfg.overwrite:
        gallery.unlink(missing_ok=True)
    # texts then images, `chunk_queries` queries a chunk; a chunk holds one direction only (numbers run on)
    size = cfg.chunk_queries
    queries = [r[s : s + size] for r in (rows["text"], rows["image"]) for s in range(0, len(r), size)]
    chunks = [Chunk(i, q) for i, q in enumerate(queries)]
    mine = [c for c in chunks if c.index % cfg.shard[1] == cfg.shard[0]]
    ranker = None
    try:
        if not sink.finished and any(c.index not in sink.done for c in mine):
            ranker = _Ranker(cfg, rows, rt, "string" if sink.fmt == "parquet" else "keep")
        # without a ranker every chunk of this shard is done: this only marks the job finished
        executor = LocalExecutor(None, ranker or (lambda c, x: []))
        total = sum(len(c.rows) for c in mine)
        job = run_chunks(cfg, chunks, sink, executor, total_rows=total, desc="retrieve", progress=ranker is not None)
    finally:
        if ranker is not None:
            ranker.close()
        sink.close()
    if sink.finished:
        gallery.unlink(missing_ok=True)
    job.seconds = time.perf_counter() - t0
    job.stats = {"images": len(rows["image"]), "texts": len(rows["text"])}
    job.stats["candidate pairs re-ranked by ITM"] = ranker.pairs_reranked if ranker is not None else 0
    return job


def retrieve(
    itm_model: str | os.PathLike | None,
    images: str | os.PathLike,
    texts: str | os.PathLike,
    out: str | os.PathLike,
    *,
    itc_model: str | os.PathLike | None = None,
    shard: str | None = None,
    limits: Limits | None = None,
    **options: Any,
) -> Summary:
    """Ranked lists in both directions; see the module doc. Output rows (.jsonl / .parquet), one per query:
    `direction`, `query_row`, `query_id`, `query` (the text, or the image path), `status`, `error`, `results`
    = [{rank, row, id, item, itc_cosine, itm_logit, itm_prob}] best first (by ITM; by ITC with rerank=False).

    Written `chunk_queries` queries at a time; resumes an interrupted run of the same job. `shard="i/n"` ranks
    the query chunks numbered i mod n, against the whole gallery. `limits` bound the embedding and ITM chunks.
    `options`: top_k, rerank, chunk_queries and the other fields of `JobConfig`.
    """
    kw = dict(model=itm_model, itc_model=itc_model, images=images, texts=texts, out=out)
    return retrieve_job(_config("retrieve", shard, limits, **kw, **options))
