"""Retrieval as in the BridgeTower paper: ITC picks the top-k candidates per query, ITM re-ranks them.

1. Every image and every text gets its unimodal ITC embedding once (a BridgeTowerForContrastiveLearning
   model: no fusion needed): the gallery of both directions.
2. The queries (every text, then every image) are cut into chunks of `chunk_queries`: the unit written,
   resumed and sharded, through the score job's `ChunkSink` and `run_chunks`. Per chunk: cosines of its
   queries against the whole other side, in blocks, and the top-k of each.
3. The chunk's candidate pairs are scored by a BridgeTowerForImageAndTextRetrieval model, each unique image
   and text through its tower once per query chunk (the `score` chunks), and each list is re-ranked by the
   ITM logit.

A chunk's numbers depend only on its queries and the gallery, so a resumed run, or the shards of a run
joined, give the rows of one uninterrupted run. Every run (each shard, each resume) embeds the whole gallery
again before ranking the queries it has left.

Two heads, two folders: `itm_model` (ITM weights) and `itc_model` (ITC weights; default: the same folder,
which then must hold both heads' weights; a folder missing a head's weights is refused, never filled with
random ones).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from btfast.score.config import JobConfig
from btfast.score.job import LocalExecutor, Summary, run_chunks
from btfast.score.plan import Chunk, Limits, plan
from btfast.score.rows import Row
from btfast.score.schema import id_value, retrieve_schema
from btfast.score.sink import ChunkSink, output_format

DIRECTION = {"text": "text_to_image", "image": "image_to_text"}  # query side -> direction
BLOCK = 1024  # queries per similarity matmul (bounds its memory: BLOCK x gallery floats)
GALLERY_SUFFIX = ".btfast-gallery.npz"  # the gallery's ITC embeddings, kept until the job finishes


def _embed_all(
    ctx: Any, rows: list[Row], loader: Any, limits: Limits, desc: str, progress: bool
) -> tuple[np.ndarray, list[str | None]]:
    """(N, D) float32 ITC embeddings of `rows` (zeros where a row failed) and each row's error."""
    from tqdm import tqdm

    from btfast.score.engine import embed_chunk
    from btfast.score.job import stream

    emb: np.ndarray | None = None
    errors: list[str | None] = [None] * len(rows)
    with tqdm(total=len(rows), desc=desc, unit="item", disable=not progress, file=sys.stderr) as bar:
        for _, outs in stream(plan(rows, limits), loader, lambda c, cv: embed_chunk(ctx, c.rows, cv)):
            for o in outs:
                if o["status"] != "ok":
                    errors[o["row"]] = o["error"]
                    continue
                if emb is None:
                    emb = np.zeros((len(rows), len(o["embedding"])), dtype=np.float32)
                emb[o["row"]] = o["embedding"]
            bar.update(len(outs))
    return (emb if emb is not None else np.zeros((len(rows), 1), np.float32)), errors


class _GalleryCache:
    """The gallery's ITC embeddings beside the output, so a resumed run skips the ITC model altogether.

    Keyed by the job (its header) and the input rows' names and texts: a file whose images changed content under
    the same names is not detected. Written atomically; removed when the job finishes or with --overwrite.
    """

    def __init__(self, out: str | os.PathLike, header: dict[str, Any], rows: list[Row]) -> None:
        self.path = Path(str(out) + GALLERY_SUFFIX)
        digest = hashlib.sha256(json.dumps(header, sort_keys=True, default=str).encode())
        for r in rows:
            digest.update(json.dumps([r.kind, r.image_name, r.text, r.error], default=str).encode())
        self.key = digest.hexdigest()

    def load(self) -> dict[str, tuple[np.ndarray, list[str | None]]] | None:
        """side -> (embeddings, errors) from an earlier run of this job, or None."""
        try:
            with np.load(self.path, allow_pickle=False) as z:
                if str(z["key"]) != self.key:
                    return None
                errors = json.loads(str(z["errors"]))
                return {side: (z[side], errors[side]) for side in ("image", "text")}
        except (OSError, KeyError, ValueError):  # none yet, or unreadable: embed again
            return None

    def save(self, gallery: dict[str, tuple[np.ndarray, list[str | None]]]) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        errors = json.dumps({side: err for side, (_, err) in gallery.items()})
        with open(tmp, "wb") as f:
            np.savez(f, key=np.array(self.key), errors=np.array(errors), **{s: e for s, (e, _) in gallery.items()})
        os.replace(tmp, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _query_chunks(text_rows: list[Row], image_rows: list[Row], size: int) -> list[Chunk]:
    """Texts then images, `size` queries a chunk; a chunk holds one direction only (numbers run on)."""
    chunks: list[Chunk] = []
    for rows in (text_rows, image_rows):
        for s in range(0, len(rows), size):
            chunks.append(Chunk(len(chunks), rows[s : s + size]))
    return chunks


class _Ranker:
    """The gallery (ITC embeddings of every image and text) and the ITM model; ranks one chunk of queries."""

    def __init__(
        self,
        cfg: JobConfig,
        image_rows: list[Row],
        text_rows: list[Row],
        *,
        rt: Any,
        id_type: str,
        cache: _GalleryCache,
    ) -> None:
        """Embed the gallery (or take it from `cache`) and load the ITM model (`cfg.rerank=False`: ITC only)."""
        import torch

        from btfast.score.engine import Context
        from btfast.score.loader import ImageLoader

        itc_model = cfg.itc_model or cfg.model
        itm_model = cfg.model if cfg.rerank else None
        limits, progress = cfg.limits, cfg.progress
        self.rows = {"image": image_rows, "text": text_rows}
        self.top_k = cfg.top_k
        self.limits = limits
        self.id_type = id_type  # of the results' ids: 'string' (Parquet) or 'keep'
        self.itm: Any = None
        self.pairs_reranked = 0
        itc_pre = cfg.image_preprocessor(itc_model)
        itm_pre = None if itm_model is None else cfg.image_preprocessor(itm_model)
        device, dtype, batch_size, workers = rt.device, rt.dtype, rt.batch_size, rt.workers
        self.loader: Any = ImageLoader(itc_pre, workers)  # workers start while the model loads
        try:
            gallery = cache.load()
            if gallery is not None:
                print(f"retrieve: the gallery's ITC embeddings are reused from {cache.path}", file=sys.stderr)
            else:
                itc = Context.load(itc_model, "itc", device, dtype, itc_pre, batch_size=batch_size)
                with torch.inference_mode():
                    gallery = {
                        "image": _embed_all(itc, image_rows, self.loader, limits, "itc images", progress),
                        "text": _embed_all(itc, text_rows, self.loader, limits, "itc texts", progress),
                    }
                del itc
                cache.save(gallery)
            (i_emb, i_err), (t_emb, t_err) = gallery["image"], gallery["text"]
            if itm_pre is None or itm_pre.config != itc_pre.config:  # else one worker pool serves both models
                self.loader.close()
                self.loader = None if itm_pre is None else ImageLoader(itm_pre, workers)
            if itm_model is not None:
                self.itm = Context.load(itm_model, "itm", device, dtype, itm_pre, batch_size=batch_size)
        except BaseException:
            self.close()
            raise
        self.errors = {"image": i_err, "text": t_err}
        self.gallery: dict[str, tuple[Any, list[Row]]] = {}  # side -> (embeddings of its usable rows, those rows)
        self.pos: dict[str, dict[int, int]] = {}  # side -> row number -> position in its gallery
        for side, emb, err in (("image", i_emb, i_err), ("text", t_emb, t_err)):
            ok = [k for k, e in enumerate(err) if e is None]
            self.gallery[side] = (torch.from_numpy(emb[ok]).to(device), [self.rows[side][k] for k in ok])
            self.pos[side] = {k: a for a, k in enumerate(ok)}

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()

    def __call__(self, chunk: Chunk, canvases: dict[str, Any]) -> list[dict[str, Any]]:
        """One output row per query of `chunk`, in order (a `run_chunks` compute; the ITM images load here)."""
        import torch

        side = chunk.rows[0].kind
        other = "image" if side == "text" else "text"
        queries, _ = self.gallery[side]
        targets, target_rows = self.gallery[other]
        ok = [r for r in chunk.rows if r.row in self.pos[side]]
        cands: list[list[tuple[float, Row]]] = [[] for _ in ok]  # per usable query: (cosine, target) best first
        with torch.inference_mode():
            if len(target_rows):
                at = torch.tensor([self.pos[side][r.row] for r in ok], dtype=torch.long, device=queries.device)
                k = min(self.top_k, len(target_rows))
                for s in range(0, len(ok), BLOCK):
                    vals, idx = torch.topk(queries[at[s : s + BLOCK]] @ targets.T, k, dim=1)
                    for a, (v, b) in enumerate(zip(vals.float().cpu().tolist(), idx.cpu().tolist()), s):
                        cands[a] = [(x, target_rows[j]) for x, j in zip(v, b)]
            itm = self._itm(side, ok, cands) if self.itm is not None else None
        results: dict[int, list[dict[str, Any]]] = {}
        n = 0
        for q, cs in zip(ok, cands):
            res = []
            for cos, t in cs:
                score = itm[n] if itm is not None else None
                n += 1
                res.append(
                    {
                        "row": t.row,
                        "id": id_value(t.id, self.id_type),
                        "item": t.image_name if other == "image" else t.text,
                        "itc_cosine": cos,
                        "itm_logit": None if score is None else score[0],
                        "itm_prob": None if score is None else score[1],
                    }
                )
            if itm is not None:
                res.sort(key=lambda r: (-(r["itm_logit"] if r["itm_logit"] is not None else -np.inf), -r["itc_cosine"]))
            results[q.row] = [{"rank": rank, **r} for rank, r in enumerate(res, 1)]
        outs = []
        for q in chunk.rows:
            o = {
                "direction": DIRECTION[side],
                "query_row": q.row,
                "query_id": id_value(q.id, "string"),
                "query": q.text if side == "text" else q.image_name,
                "status": "ok",
                "error": None,
                "results": results.get(q.row, []),
            }
            if q.row not in results:
                o["status"], o["error"] = "error", self.errors[side][q.row]
            outs.append(o)
        return outs

    def _itm(
        self, side: str, queries: list[Row], cands: list[list[tuple[float, Row]]]
    ) -> list[tuple[float, float] | None]:
        """ITM (logit, prob) of every candidate pair, in order (None where it failed), one `score` chunk at a time."""
        from btfast.score.engine import score_chunk
        from btfast.score.job import stream

        pairs = []
        for q, cs in zip(queries, cands):
            for _, t in cs:
                text, image = (q, t) if side == "text" else (t, q)
                pairs.append(
                    Row(
                        row=len(pairs),
                        image=image.image,
                        image_key=image.image_key,
                        image_name=image.image_name,
                        text=text.text,
                    )
                )
        scores: list[tuple[float, float] | None] = [None] * len(pairs)
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
    shard_i, shard_n = cfg.shard
    rt = Runtime.of(cfg)

    source = ShardsSource(cfg, ("image", "text")) if cfg.shards is not None else ListSource(cfg)
    source.check()  # a missing column or a wrong image root: fatal, before any model loads
    image_rows, text_rows = source.lists()
    header = rt.header(cfg)
    schema = retrieve_schema() if output_format(cfg.out) == "parquet" else None
    sink = ChunkSink(cfg.out, header, overwrite=cfg.overwrite, schema=schema)
    cache = _GalleryCache(cfg.out, header, image_rows + text_rows)
    if cfg.overwrite:
        cache.remove()
    chunks = _query_chunks(text_rows, image_rows, cfg.chunk_queries)
    mine = [c for c in chunks if c.index % shard_n == shard_i]
    ranker = None
    try:
        if not sink.finished and any(c.index not in sink.done for c in mine):
            ranker = _Ranker(
                cfg,
                image_rows,
                text_rows,
                rt=rt,
                id_type="string" if sink.fmt == "parquet" else "keep",
                cache=cache,
            )
        job = run_chunks(  # without a ranker every chunk of this shard is done: this only marks the job finished
            cfg,
            chunks,
            sink,
            LocalExecutor(None, ranker or (lambda c, x: [])),
            total_rows=sum(len(c.rows) for c in mine),
            desc="retrieve",
            progress=ranker is not None,
        )
    finally:
        if ranker is not None:
            ranker.close()
        sink.close()
    if sink.finished:
        cache.remove()
    job.seconds = time.perf_counter() - t0
    job.stats = {"images": len(image_rows), "texts": len(text_rows)}
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
    from btfast.score.job import _config

    cfg = _config(
        "retrieve", shard, limits, model=itm_model, itc_model=itc_model, images=images, texts=texts, out=out, **options
    )
    return retrieve_job(cfg)
