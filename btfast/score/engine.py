"""The compute half of scoring: load a head from a folder, encode unique texts / images once, fuse pairs, score.

Everything here is a pure function of its inputs (a chunk of rows and their decoded image canvases), so it
can be mapped over any batching scheme: the local executor's chunks, Ray's actors, or `Scorer.__call__`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from btfast.preprocess import ImagePreprocessor, TextPreprocessor, TokenizedText
from btfast.score.rows import ImageResolver, Row, image_sources, parse_record
from btfast.score.schema import EMBED, id_value, score_columns

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # --dtype names
HEAD_CLASS = {"itm": "BridgeTowerForImageAndTextRetrieval", "itc": "BridgeTowerForContrastiveLearning"}


class ModelLoadError(RuntimeError):
    """The folder does not hold what the job needs (weights of the head, a tokenizer, a processor)."""


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if name in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    for short, dt in DTYPES.items():
        if name in (short, str(dt).removeprefix("torch.")):
            return dt
    raise ValueError(f"dtype must be auto, fp32, bf16 or fp16; got {name}")


@dataclass(frozen=True)
class Runtime:
    """What a local job's settings resolve to on this machine."""

    device: torch.device
    dtype: torch.dtype
    batch_size: int  # images / texts per tower call and pairs per fusion call: 64 on CUDA, 16 on CPU by default
    workers: int  # image decoding processes

    @classmethod
    def of(cls, cfg: Any) -> Runtime:
        """The runtime of the job `cfg` (a `JobConfig`)."""
        from btfast.score.job import default_batch_size
        from btfast.score.loader import default_workers

        dev = resolve_device(cfg.device)
        workers = default_workers() if cfg.workers is None else cfg.workers
        return cls(dev, resolve_dtype(cfg.dtype, dev), cfg.batch_size or default_batch_size(dev.type), workers)

    def header(self, cfg: Any) -> dict[str, Any]:
        """The job's resume header with what this runtime decided (dtype, batch size)."""
        return cfg.header(dtype=str(self.dtype), batch_size=self.batch_size)


def load_head(
    folder: str | os.PathLike, head: str, device: torch.device, dtype: torch.dtype, engine: str = "btfast"
) -> torch.nn.Module:
    """The `head` model ("itm" / "itc") of `folder`, every weight present (no random init), made fast.

    Weights must be safetensors (a pickle checkpoint could run code). `engine="hf"` keeps the transformers
    model (eager) for comparisons; it then has only the plain forward.
    """
    import transformers

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder}: no config.json (want a folder written by save_pretrained)")
    if not any(folder.glob("*.safetensors")):
        raise ModelLoadError(
            f"{folder}: no .safetensors weights. btfast loads only safetensors (a pickled checkpoint can run code); "
            "convert with model.save_pretrained(folder, safe_serialization=True)"
        )
    cls = getattr(transformers, HEAD_CLASS[head])
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model, info = cls.from_pretrained(
        str(folder), output_loading_info=True, use_safetensors=True, attn_implementation="eager"
    )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
        raise ModelLoadError(
            f"{folder} lacks weights of {HEAD_CLASS[head]} ({len(missing)} missing: {shown}); "
            f"--head {head} needs a checkpoint trained with that head"
        )
    model.eval()
    if engine == "hf":
        return model.to(device=device, dtype=dtype)
    import btfast

    return btfast.optimize(model, dtype=dtype, device=device)


@dataclass
class Context:
    """What computing a chunk needs: the model, the preprocessors, batch size and device."""

    model: Any  # btfast.OptimizedBridgeTower (or a transformers head with engine="hf": pair mode only)
    head: str
    images: ImagePreprocessor
    texts: TextPreprocessor
    batch_size: int = 32
    dedup: bool = True  # False: every pair runs the whole model (the pair-by-pair baseline)
    with_text: bool = False  # output rows carry the scored text
    stats: dict[str, int] = field(default_factory=lambda: {"images_encoded": 0, "texts_encoded": 0})

    @classmethod
    def load(
        cls, folder: str | os.PathLike, head: str, device: torch.device, dtype: torch.dtype, images: Any, **kw: Any
    ) -> Context:
        """The `head` model of `folder` (`load_head`; kw `engine` goes there) with its tokenizer; `kw`: the rest."""
        net = load_head(folder, head, device, dtype, engine=kw.pop("engine", "btfast"))
        return cls(net, head, images, TextPreprocessor.from_pretrained(folder), **kw)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def logit_scale(self) -> float:
        m = getattr(self.model, "model", self.model)
        return float(m.logit_scale.detach().float().exp())


def _empty_out(r: Row, ctx: Context) -> dict[str, Any]:
    out = dict.fromkeys(score_columns(ctx.head, ctx.with_text))
    out.update(row=r.row, id=r.id, image=r.image_name)
    if ctx.with_text:
        out["text"] = r.text
    return out


# ---- stages ------------------------------------------------------------------------------------------------------


def pixels(ctx: Context, canvases: Sequence[np.ndarray]) -> torch.Tensor:
    """(N, 3, S, S) normalised pixels on the model's device from uint8 canvases (the table lookup runs there)."""
    batch = torch.from_numpy(np.stack(canvases)).to(ctx.device, non_blocking=True)
    return ctx.images.normalize_torch(batch)


def encode_images(ctx: Context, canvases: Sequence[np.ndarray]) -> Any:
    """ImageStates of the canvases, in order, encoded in batches."""
    from btfast.states import ImageStates

    parts = [
        ctx.model.encode_image(pixels(ctx, canvases[i : i + ctx.batch_size]))
        for i in range(0, len(canvases), ctx.batch_size)
    ]
    return ImageStates.concat(parts)


def encode_texts(ctx: Context, ids: Sequence[Sequence[int]]) -> Any:
    """TextStates of the token lists, in order (batches sorted by length, so little padding)."""
    from btfast.states import TextStates

    order = sorted(range(len(ids)), key=lambda i: (len(ids[i]), i))
    parts = []
    for s in range(0, len(order), ctx.batch_size):
        sel = order[s : s + ctx.batch_size]
        input_ids, mask = ctx.texts.collate([ids[i] for i in sel])
        parts.append(ctx.model.encode_text(input_ids.to(ctx.device), mask.to(ctx.device)))
    states = TextStates.concat(parts)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order, dtype=torch.long)] = torch.arange(len(order))
    return states.index(inverse.to(states.bridges.device))


def _trim(ts: Any, length: int) -> Any:
    from btfast.states import TextStates

    mask = None if ts.key_mask is None else ts.key_mask[:, :length]
    return TextStates(ts.bridges[:, :, :length], mask, ts.cls)


def fuse_scores(ctx: Context, ts: Any, im: Any, lengths: Sequence[int], ti: Sequence[int], ii: Sequence[int]) -> Any:
    """ITM (logit, prob) per pair (ti[k], ii[k]), fused in batches of pairs sorted by text length.

    Results stay on the device until the chunk is done: one transfer, no sync per batch."""
    n = len(ti)
    order = sorted(range(n), key=lambda k: (lengths[ti[k]], k))
    dev = ts.bridges.device
    t_all = torch.tensor([ti[k] for k in order], device=dev)
    i_all = torch.tensor([ii[k] for k in order], device=dev)
    parts = []
    for s in range(0, n, ctx.batch_size):
        length = max(lengths[ti[k]] for k in order[s : s + ctx.batch_size])
        t_idx, i_idx = t_all[s : s + ctx.batch_size], i_all[s : s + ctx.batch_size]
        parts.append(ctx.model.itm_logits(_trim(ts.index(t_idx), length), im.index(i_idx)).float())
    logits = torch.cat(parts).cpu()
    out = torch.empty_like(logits)
    out[torch.tensor(order)] = logits
    return out[:, 1], out.softmax(-1)[:, 1]


# ---- one chunk ---------------------------------------------------------------------------------------------------


def score_chunk(ctx: Context, rows: Sequence[Row], canvases: dict[str, np.ndarray | str]) -> list[dict[str, Any]]:
    """Output rows for `rows`, in order. `canvases` maps an image key to its uint8 canvas, or to the reason it
    could not be loaded. Bad rows get status "error" and the reason; the others are scored."""
    outs = [_empty_out(r, ctx) for r in rows]
    ok: list[int] = []
    for k, r in enumerate(rows):
        if r.error is None:
            c = canvases.get(r.image_key)  # type: ignore[arg-type]
            if c is None:
                r.error = "image: not loaded"
            elif isinstance(c, str):
                r.error = f"image: {c}"
        if r.error is None:
            ok.append(k)
    tok = ctx.texts.encode([rows[k].text for k in ok]) if ok else []  # type: ignore[misc]
    for k, t in zip(ok, tok):
        outs[k]["text_truncated"] = t.truncated
    if ok:
        if ctx.dedup:
            _score_dedup(ctx, [rows[k] for k in ok], tok, canvases, [outs[k] for k in ok])
        else:
            _score_pairs(ctx, [rows[k] for k in ok], tok, canvases, [outs[k] for k in ok])
    for r, o in zip(rows, outs):
        if r.error is not None:
            o["status"], o["error"] = "error", r.error
        else:
            o["status"] = "ok"
    return outs


def _score_dedup(
    ctx: Context, rows: list[Row], tok: list[TokenizedText], canvases: dict[str, Any], outs: list[dict[str, Any]]
) -> None:
    img_index: dict[str, int] = {}
    txt_index: dict[tuple[int, ...], int] = {}
    ii, ti = [], []
    for r, t in zip(rows, tok):
        ii.append(img_index.setdefault(r.image_key, len(img_index)))  # type: ignore[arg-type]
        ti.append(txt_index.setdefault(tuple(t.ids), len(txt_index)))
    uniq_ids = list(txt_index)
    im = encode_images(ctx, [canvases[k] for k in img_index])
    ts = encode_texts(ctx, uniq_ids)
    if ctx.head == "itm":
        lengths = [len(x) for x in uniq_ids]
        logit, prob = fuse_scores(ctx, ts, im, lengths, ti, ii)
        for o, a, b in zip(outs, logit.tolist(), prob.tolist()):
            o["itm_logit"], o["itm_prob"] = a, b
    else:
        t_emb, _ = ctx.model.itc_embeddings(text=ts)
        _, i_emb = ctx.model.itc_embeddings(image=im)
        cos = _row_cosine(t_emb, i_emb, ti, ii)
        _set_itc(ctx, outs, cos)
    ctx.stats["images_encoded"] += len(img_index)
    ctx.stats["texts_encoded"] += len(txt_index)


def _row_cosine(t_emb: torch.Tensor, i_emb: torch.Tensor, ti: Sequence[int], ii: Sequence[int]) -> torch.Tensor:
    t = t_emb.float()[torch.tensor(ti, device=t_emb.device)]
    v = i_emb.float()[torch.tensor(ii, device=i_emb.device)]
    return (t * v).sum(-1).cpu()


def _set_itc(ctx: Context, outs: list[dict[str, Any]], cos: torch.Tensor) -> None:
    scale = ctx.logit_scale()
    for o, c in zip(outs, cos.tolist()):
        o["itc_cosine"], o["itc_logit"] = c, c * scale


def _score_pairs(
    ctx: Context, rows: list[Row], tok: list[TokenizedText], canvases: dict[str, Any], outs: list[dict[str, Any]]
) -> None:
    """The baseline: every pair runs both towers and fusion (the model's plain forward)."""
    for s in range(0, len(rows), ctx.batch_size):
        sel = range(s, min(s + ctx.batch_size, len(rows)))
        input_ids, mask = ctx.texts.collate([tok[k].ids for k in sel])
        pv = pixels(ctx, [canvases[rows[k].image_key] for k in sel])  # type: ignore[index]
        model_dtype = getattr(ctx.model, "dtype", pv.dtype)
        with torch.no_grad():
            out = ctx.model(
                input_ids=input_ids.to(ctx.device), attention_mask=mask.to(ctx.device), pixel_values=pv.to(model_dtype)
            )
        if ctx.head == "itm":
            logits = out.logits.float()
            for k, a, b in zip(sel, logits[:, 1].tolist(), logits.softmax(-1)[:, 1].tolist()):
                outs[k]["itm_logit"], outs[k]["itm_prob"] = a, b
        else:
            cos = (out.text_embeds.float() * out.image_embeds.float()).sum(-1).cpu()
            _set_itc(ctx, [outs[k] for k in sel], cos)
    ctx.stats["images_encoded"] += len(rows)
    ctx.stats["texts_encoded"] += len(rows)


# ---- ITC embeddings (embed, and the first stage of retrieve) -----------------------------------------------------


def embed_chunk(ctx: Context, rows: Sequence[Row], canvases: dict[str, np.ndarray | str]) -> list[dict[str, Any]]:
    """Output rows with the normalised ITC embedding of each image row (image set) or text row (text set)."""
    outs: list[dict[str, Any]] = []
    img_rows, txt_rows = [], []
    for r in rows:
        o = dict.fromkeys(EMBED)
        o.update(kind="text" if r.kind == "text" else "image", row=r.row, id=r.id, image=r.image_name, text=r.text)
        if r.error is None and r.image_key is not None:
            c = canvases.get(r.image_key)
            if c is None or isinstance(c, str):
                r.error = f"image: {c or 'not loaded'}"
        if r.error is None:
            (img_rows if o["kind"] == "image" else txt_rows).append((r, o))
        outs.append(o)
    if img_rows:
        keys = list(dict.fromkeys(r.image_key for r, _ in img_rows))
        pos = {k: i for i, k in enumerate(keys)}
        _, emb = ctx.model.itc_embeddings(image=encode_images(ctx, [canvases[k] for k in keys]))
        ctx.stats["images_encoded"] += len(keys)
        emb = emb.float().cpu().numpy()
        for r, o in img_rows:
            o["embedding"] = emb[pos[r.image_key]].tolist()
    if txt_rows:
        tok = ctx.texts.encode([r.text for r, _ in txt_rows])
        uniq = list(dict.fromkeys(tuple(t.ids) for t in tok))
        pos = {k: i for i, k in enumerate(uniq)}
        emb, _ = ctx.model.itc_embeddings(text=encode_texts(ctx, uniq))
        ctx.stats["texts_encoded"] += len(uniq)
        emb = emb.float().cpu().numpy()
        for (_, o), t in zip(txt_rows, tok):
            o["embedding"] = emb[pos[tuple(t.ids)]].tolist()
            o["text_truncated"] = t.truncated
    for r, o in zip(rows, outs):
        o["status"], o["error"] = ("ok", None) if r.error is None else ("error", r.error)
    return outs


def compute_chunk(
    ctx: Context, command: str, id_type: str, rows: Sequence[Row], canvases: dict[str, np.ndarray | str]
) -> list[dict[str, Any]]:
    """Output rows of one chunk of a `score` or `embed` job (`command`), ids typed as `id_type`: what every
    executor's compute step runs."""
    with torch.inference_mode():
        outs = embed_chunk(ctx, rows, canvases) if command == "embed" else score_chunk(ctx, rows, canvases)
    for o in outs:
        o["id"] = id_value(o["id"], id_type)
    return outs


# ---- in-process (no worker pool): the Python API ---------------------------------------------------------------


class Scorer:
    """Score (image, text) records in-process: `Scorer(model_dir)(records) -> output records`.

    A pure "batch of rows → output rows" function with the model loaded once, as Ray Data's `map_batches`
    wants (pass the class and `fn_constructor_kwargs`). Records are dicts with `image` (a path, relative to
    `image_root`, or bytes), `text` and optionally `id`; `row` numbers continue from `row_offset`.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike,
        head: str = "itm",
        device: str | None = "auto",
        dtype: str | None = "auto",
        batch_size: int = 32,
        image_root: str | os.PathLike | None = None,
        exact: bool = True,
        dedup: bool = True,
    ) -> None:
        dev = resolve_device(device)
        images = ImagePreprocessor.from_pretrained(model_dir, exact=exact)
        dt = resolve_dtype(dtype, dev)
        self.ctx = Context.load(model_dir, head, dev, dt, images, batch_size=batch_size, dedup=dedup)
        self.resolver = ImageResolver(image_root, os.getcwd())

    def rows(self, records: Sequence[dict[str, Any]], row_offset: int = 0) -> list[Row]:
        return [parse_record(rec, row_offset + i, self.resolver) for i, rec in enumerate(records)]

    def __call__(self, records: Sequence[dict[str, Any]] | dict[str, Any], row_offset: int = 0) -> Any:
        columnar = isinstance(records, dict)
        if columnar:  # Ray Data's default batch format: a dict of columns
            cols = records
            n = len(next(iter(cols.values()))) if cols else 0
            records = [{k: _py(v[i]) for k, v in cols.items()} for i in range(n)]
        rows = self.rows(records, row_offset)  # type: ignore[arg-type]
        canvases = {k: self.ctx.images.load_or_reason(src) for k, src in image_sources(rows).items()}
        outs = compute_chunk(self.ctx, "score", "keep", rows, canvases)
        if columnar:
            return {k: [o[k] for o in outs] for k in score_columns(self.ctx.head)}
        return outs


def _py(v: Any) -> Any:
    return v.item() if hasattr(v, "item") and getattr(v, "ndim", 1) == 0 else v
