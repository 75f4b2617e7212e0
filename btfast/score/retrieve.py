"""Retrieval as in the BridgeTower paper: ITC picks the top-k candidates per query, ITM re-ranks them.

1. Every image and every text gets its unimodal ITC embedding once (a BridgeTowerForContrastiveLearning
   model: no fusion needed).
2. Cosine similarities text × image, in blocks; the top-k images per text and top-k texts per image.
3. The union of those candidate pairs is scored by a BridgeTowerForImageAndTextRetrieval model, each
   unique image and text through its tower once (the `score` chunks), and each list is re-ranked by the
   ITM logit.

Two heads, two folders: `itm_model` (ITM weights) and `itc_model` (ITC weights; default: the same folder,
which then must hold both heads' weights; a folder missing a head's weights is refused, never filled with
random ones).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from btfast.score.plan import Limits, plan
from btfast.score.rows import Row

DIRECTIONS = ("text_to_image", "image_to_text")


@dataclass
class RetrieveSummary:
    out: str
    images: int = 0
    texts: int = 0
    errors: int = 0
    pairs_reranked: int = 0
    seconds: float = 0.0

    @property
    def exit_code(self) -> int:
        return 3 if self.errors else 0

    def line(self) -> str:
        return (
            f"{self.images:,} images, {self.texts:,} texts ({self.errors:,} errors); "
            f"{self.pairs_reranked:,} candidate pairs re-ranked by ITM; {self.seconds:.1f} s -> {self.out}"
        )


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


def _topk(sim: Any, k: int) -> tuple[Any, Any]:
    import torch

    k = min(k, sim.shape[1])
    if k == 0:
        return torch.zeros(sim.shape[0], 0), torch.zeros(sim.shape[0], 0, dtype=torch.long)
    return torch.topk(sim, k, dim=1)


def retrieve(
    itm_model: str | os.PathLike | None,
    images: str | os.PathLike,
    texts: str | os.PathLike,
    out: str | os.PathLike,
    *,
    itc_model: str | os.PathLike | None = None,
    top_k: int = 16,
    rerank: bool = True,
    image_root: str | os.PathLike | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    limits: Limits | None = None,
    exact: bool = True,
    max_pixels: int | None = None,
    progress: bool = True,
) -> RetrieveSummary:
    """Ranked lists in both directions; see the module doc. Output rows (.jsonl / .parquet), one per query:
    `direction`, `query_row`, `query_id`, `query` (the text, or the image path), `status`, `error`, `results`
    = [{rank, row, id, item, itc_cosine, itm_logit, itm_prob}] best first (by ITM; by ITC with rerank=False)."""
    import torch

    from btfast.preprocess import DEFAULT_MAX_PIXELS, ImagePreprocessor, TextPreprocessor
    from btfast.score.engine import Context, load_head, resolve_device, resolve_dtype, score_chunk
    from btfast.score.loader import ImageLoader, default_workers
    from btfast.score.rows import read_images, read_texts
    from btfast.score.sink import dumps, output_format

    t0 = time.perf_counter()
    if top_k < 1:
        raise ValueError("--top-k must be >= 1")
    fmt = output_format(out)
    itc_model = itc_model or itm_model
    if itc_model is None:
        raise ValueError("give --model (ITM) and/or --itc-model")
    if rerank and itm_model is None:
        raise ValueError("re-ranking needs --model (an ITM folder); or pass --no-rerank")
    limits = limits or Limits()
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    batch_size = batch_size or (64 if dev.type == "cuda" else 16)
    workers = default_workers() if workers is None else workers
    mp = max_pixels or DEFAULT_MAX_PIXELS

    image_rows = list(read_images(images, image_root))
    text_rows = list(read_texts(texts))
    summary = RetrieveSummary(out=str(out), images=len(image_rows), texts=len(text_rows))

    itc_pre = ImagePreprocessor.from_pretrained(itc_model, exact=exact, max_pixels=mp)
    itm_pre = ImagePreprocessor.from_pretrained(itm_model, exact=exact, max_pixels=mp) if rerank else None  # type: ignore[arg-type]
    shared = itm_pre is not None and itm_pre.config == itc_pre.config  # one worker pool serves both models
    loader = ImageLoader(itc_pre, workers)
    try:
        itc = Context(
            load_head(itc_model, "itc", dev, dt),
            "itc",
            itc_pre,
            TextPreprocessor.from_pretrained(itc_model),
            batch_size=batch_size,
        )
        with torch.inference_mode():
            i_emb, i_err = _embed_all(itc, image_rows, loader, limits, "itc images", progress)
            t_emb, t_err = _embed_all(itc, text_rows, loader, limits, "itc texts", progress)
    except BaseException:
        loader.close()
        raise
    if not shared:
        loader.close()
    del itc
    ok_i = [k for k, e in enumerate(i_err) if e is None]
    ok_t = [k for k, e in enumerate(t_err) if e is None]
    summary.errors = len(image_rows) + len(text_rows) - len(ok_i) - len(ok_t)

    # 2. ITC top-k in both directions (on the device, in blocks of queries)
    ti = torch.from_numpy(t_emb[ok_t]).to(dev)
    ii = torch.from_numpy(i_emb[ok_i]).to(dev)
    cand: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {d: [] for d in DIRECTIONS}
    block = 4096
    for q, g, d in ((ti, ii, "text_to_image"), (ii, ti, "image_to_text")):
        for s in range(0, q.shape[0], block):
            vals, idx = _topk(q[s : s + block] @ g.T, top_k)
            cand[d].append((vals.float().cpu().numpy(), idx.cpu().numpy()))
    t2i_v = np.concatenate([v for v, _ in cand["text_to_image"]]) if ok_t else np.zeros((0, 0), np.float32)
    t2i_i = np.concatenate([i for _, i in cand["text_to_image"]]) if ok_t else np.zeros((0, 0), np.int64)
    i2t_v = np.concatenate([v for v, _ in cand["image_to_text"]]) if ok_i else np.zeros((0, 0), np.float32)
    i2t_i = np.concatenate([i for _, i in cand["image_to_text"]]) if ok_i else np.zeros((0, 0), np.int64)

    # 3. ITM on the union of candidate pairs: (text row, image row) -> (logit, prob)
    pairs: dict[tuple[int, int], tuple[float, float] | None] = {}
    for a, t in enumerate(ok_t):
        for b in t2i_i[a]:
            pairs[(t, ok_i[b])] = None
    for a, i in enumerate(ok_i):
        for b in i2t_i[a]:
            pairs[(ok_t[b], i)] = None
    if rerank and pairs:
        summary.pairs_reranked = len(pairs)
        if not shared:
            loader = ImageLoader(itm_pre, workers)  # type: ignore[arg-type]
        try:
            itm = Context(
                load_head(itm_model, "itm", dev, dt),
                "itm",
                itm_pre,  # type: ignore[arg-type]
                TextPreprocessor.from_pretrained(itm_model),
                batch_size=batch_size,
            )  # type: ignore[arg-type]
            keys = list(pairs)
            prow = [
                Row(
                    row=n,
                    image=image_rows[i].image,
                    image_key=image_rows[i].image_key,
                    image_name=image_rows[i].image_name,
                    text=text_rows[t].text,
                )
                for n, (t, i) in enumerate(keys)
            ]
            from tqdm import tqdm

            from btfast.score.job import stream

            with (
                tqdm(total=len(prow), desc="itm rerank", unit="pair", disable=not progress, file=sys.stderr) as bar,
                torch.inference_mode(),
            ):
                chunks: Any = plan(prow, limits)
                for _, outs in stream(chunks, loader, lambda c, cv: score_chunk(itm, c.rows, cv)):
                    for o in outs:
                        pairs[keys[o["row"]]] = (o["itm_logit"], o["itm_prob"]) if o["status"] == "ok" else None
                    bar.update(len(outs))
        finally:
            loader.close()
    loader.close()  # (idempotent) the shared pool when nothing was re-ranked

    # 4. ranked lists
    def ranked(query_is_text: bool, a: int, vals: np.ndarray, idx: np.ndarray) -> list[dict[str, Any]]:
        res = []
        for v, b in zip(vals[a].tolist(), idx[a].tolist()):
            if query_is_text:
                t, i = ok_t[a], ok_i[b]
                other = image_rows[i]
                item = other.image_name
            else:
                t, i = ok_t[b], ok_i[a]
                other = text_rows[t]
                item = other.text
            s = pairs.get((t, i))
            res.append(
                {
                    "row": other.row,
                    "id": other.id,
                    "item": item,
                    "itc_cosine": v,
                    "itm_logit": None if s is None else s[0],
                    "itm_prob": None if s is None else s[1],
                }
            )
        if rerank:
            res.sort(key=lambda r: (-(r["itm_logit"] if r["itm_logit"] is not None else -np.inf), -r["itc_cosine"]))
        for n, r in enumerate(res, 1):
            r["rank"] = n
        return [{"rank": r.pop("rank"), **r} for r in res]

    rows_out: list[dict[str, Any]] = []
    pos_t = {t: a for a, t in enumerate(ok_t)}
    pos_i = {i: a for a, i in enumerate(ok_i)}
    for r in text_rows:
        o = {
            "direction": "text_to_image",
            "query_row": r.row,
            "query_id": str(r.id),
            "query": r.text,
            "status": "ok",
            "error": None,
            "results": [],
        }
        if r.row in pos_t:
            o["results"] = ranked(True, pos_t[r.row], t2i_v, t2i_i)
        else:
            o["status"], o["error"] = "error", t_err[r.row]
        rows_out.append(o)
    for r in image_rows:
        o = {
            "direction": "image_to_text",
            "query_row": r.row,
            "query_id": str(r.id),
            "query": r.image_name,
            "status": "ok",
            "error": None,
            "results": [],
        }
        if r.row in pos_i:
            o["results"] = ranked(False, pos_i[r.row], i2t_v, i2t_i)
        else:
            o["status"], o["error"] = "error", i_err[r.row]
        rows_out.append(o)

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(out) + ".tmp")
    if fmt == "jsonl":
        with open(tmp, "w", encoding="utf-8") as f:
            for o in rows_out:
                f.write(dumps(o) + "\n")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        res_t = pa.list_(
            pa.struct(
                [
                    ("rank", pa.int32()),
                    ("row", pa.int64()),
                    ("id", pa.string()),
                    ("item", pa.string()),
                    ("itc_cosine", pa.float32()),
                    ("itm_logit", pa.float32()),
                    ("itm_prob", pa.float32()),
                ]
            )
        )
        schema = pa.schema(
            [
                ("direction", pa.string()),
                ("query_row", pa.int64()),
                ("query_id", pa.string()),
                ("query", pa.string()),
                ("status", pa.string()),
                ("error", pa.string()),
                ("results", res_t),
            ]
        )
        for o in rows_out:
            for r in o["results"]:
                r["id"] = str(r["id"])
        pq.write_table(pa.Table.from_pylist(rows_out, schema=schema), tmp)
    os.replace(tmp, out)
    summary.seconds = time.perf_counter() - t0
    return summary
