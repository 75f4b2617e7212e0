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

from btfast.preprocess import ImagePreprocessor, TextPreprocessor
from btfast.runtime import DTYPES  # the --dtype names
from btfast.score.rows import ImageResolver, Row, image_sources, parse_record
from btfast.score.schema import EMBED, SCORES, id_value, score_columns


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
    """The `head` model ("itm" / "itc") of `folder`, every weight present (no random init), made fast; `engine="hf"`:
    the eager transformers model, for comparisons (plain forward only). Safetensors only: a pickle could run code."""
    import transformers

    from btfast.optimize import _HEAD_CLASS, optimize

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"{folder}: no config.json (want a folder written by save_pretrained)")
    if not any(folder.glob("*.safetensors")):
        raise ModelLoadError(
            f"{folder}: no .safetensors weights. btfast loads only safetensors (a pickled checkpoint can run code); "
            "convert with model.save_pretrained(folder, safe_serialization=True)"
        )
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    model, info = getattr(transformers, _HEAD_CLASS[head]).from_pretrained(
        str(folder), output_loading_info=True, use_safetensors=True, attn_implementation="eager"
    )
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        shown = ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
        raise ModelLoadError(
            f"{folder} lacks weights of {_HEAD_CLASS[head]} ({len(missing)} missing: {shown}); "
            f"--head {head} needs a checkpoint trained with that head"
        )
    model.eval()
    if engine == "hf":
        return model.to(device=device, dtype=dtype)
    return optimize(model, dtype=dtype, device=device)


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


def pixels(ctx: Context, canvases: Sequence[np.ndarray]) -> torch.Tensor:
    """(N, 3, S, S) normalised pixels on the model's device from uint8 canvases (the table lookup runs there)."""
    return ctx.images.normalize_torch(torch.from_numpy(np.stack(canvases)).to(ctx.device, non_blocking=True))


def fuse_scores(ctx: Context, ts: Any, im: Any, lengths: Sequence[int], ti: Sequence[int], ii: Sequence[int]) -> Any:
    """(N, 2) ITM logits, on the CPU, of the pairs (text ti[k] of `lengths[k]` tokens, image ii[k]), fused in
    batches of pairs sorted by text length. Results stay on the device until all are done: one transfer."""
    from btfast.states import TextStates

    order = sorted(range(len(ti)), key=lambda k: (lengths[k], k))
    dev, b = ts.bridges.device, ctx.batch_size
    t_all = torch.tensor([ti[k] for k in order], device=dev)
    i_all = torch.tensor([ii[k] for k in order], device=dev)
    parts = []
    for s in range(0, len(order), b):
        n = max(lengths[k] for k in order[s : s + b])  # the batch's longest text: the others' padding is cut there
        t = ts.index(t_all[s : s + b])
        t = TextStates(t.bridges[:, :, :n], None if t.key_mask is None else t.key_mask[:, :n], t.cls)
        parts.append(ctx.model.itm_logits(t, im.index(i_all[s : s + b])).float())
    return torch.cat(parts).cpu()[torch.argsort(torch.tensor(order))]


def _encode(ctx: Context, side: str, keys: list[Any], canvases: dict[str, Any]) -> tuple[Any, list[int]]:
    """States of the distinct `keys` (image keys, or token id tuples: batched sorted by length, so little padding),
    each encoded once, and each key's position among them."""
    from btfast.states import ImageStates, TextStates

    index: dict[Any, int] = {}
    at = [index.setdefault(k, len(index)) for k in keys]
    ctx.stats[side + "s_encoded"] += len(index)
    uniq, b = list(index), ctx.batch_size
    if side == "image":
        pics = [canvases[k] for k in uniq]
        parts = [ctx.model.encode_image(pixels(ctx, pics[i : i + b])) for i in range(0, len(pics), b)]
        return ImageStates.concat(parts), at
    order = sorted(range(len(uniq)), key=lambda i: (len(uniq[i]), i))
    parts = []
    for s in range(0, len(order), b):
        input_ids, mask = ctx.texts.collate([uniq[i] for i in order[s : s + b]])
        parts.append(ctx.model.encode_text(input_ids.to(ctx.device), mask.to(ctx.device)))
    states = TextStates.concat(parts)
    return states.index(torch.argsort(torch.tensor(order, dtype=torch.long)).to(states.bridges.device)), at


def _put(ctx: Context, outs: list[dict[str, Any]], x: Any) -> None:
    """Fill the head's two score columns of `outs` from (N, 2) ITM logits or (text, image) ITC embeddings."""
    if ctx.head == "itm":
        vals = zip(x[:, 1].tolist(), x.softmax(-1)[:, 1].tolist())
    else:
        scale = float(getattr(ctx.model, "model", ctx.model).logit_scale.detach().float().exp())
        vals = ((c, c * scale) for c in (x[0].float() * x[1].float()).sum(-1).cpu().tolist())
    for o, v in zip(outs, vals):
        o.update(zip(SCORES[ctx.head], v))


def _start(rows: Sequence[Row], canvases: dict[str, Any], columns: Sequence[str]) -> list[dict[str, Any]]:
    """Output rows of `columns`, input fields and status filled in (a missing or unreadable image is an error)."""
    outs = []
    for r in rows:
        if r.error is None and r.kind != "text":
            cv = canvases.get(r.image_key)  # type: ignore[arg-type]
            if cv is None or isinstance(cv, str):
                r.error = f"image: {cv or 'not loaded'}"
        f = dict(kind="text" if r.kind == "text" else "image", row=r.row, id=r.id, image=r.image_name, text=r.text)
        outs.append({c: f.get(c) for c in columns} | {"status": "ok" if r.error is None else "error", "error": r.error})
    return outs


def score_chunk(ctx: Context, rows: Sequence[Row], canvases: dict[str, np.ndarray | str]) -> list[dict[str, Any]]:
    """Output rows for `rows`, in order. `canvases` maps an image key to its uint8 canvas, or to the reason it
    could not be loaded. Bad rows get status "error" and the reason; the others are scored."""
    outs = _start(rows, canvases, score_columns(ctx.head, ctx.with_text))
    ok = [k for k, r in enumerate(rows) if r.error is None]
    good, good_outs = [rows[k] for k in ok], [outs[k] for k in ok]
    tok = ctx.texts.encode([r.text for r in good]) if ok else []
    for o, t in zip(good_outs, tok):
        o["text_truncated"] = t.truncated
    if ok and not ctx.dedup:  # the baseline: every pair runs both towers and fusion (the model's plain forward)
        for s in range(0, len(good), ctx.batch_size):
            sel = slice(s, s + ctx.batch_size)
            input_ids, mask = ctx.texts.collate([t.ids for t in tok[sel]])
            pv = pixels(ctx, [canvases[r.image_key] for r in good[sel]])  # type: ignore[index]
            pv = pv.to(getattr(ctx.model, "dtype", pv.dtype))
            out = ctx.model(input_ids=input_ids.to(ctx.device), attention_mask=mask.to(ctx.device), pixel_values=pv)
            _put(ctx, good_outs[sel], out.logits.float() if ctx.head == "itm" else (out.text_embeds, out.image_embeds))
        ctx.stats["images_encoded"] += len(good)
        ctx.stats["texts_encoded"] += len(good)
    elif ok:  # each unique image and text through its tower once
        im, ii = _encode(ctx, "image", [r.image_key for r in good], canvases)
        ts, ti = _encode(ctx, "text", [tuple(t.ids) for t in tok], canvases)
        if ctx.head == "itm":
            _put(ctx, good_outs, fuse_scores(ctx, ts, im, [len(t.ids) for t in tok], ti, ii))
        else:
            t_emb, i_emb = ctx.model.itc_embeddings(text=ts, image=im)
            _put(ctx, good_outs, (t_emb[ti], i_emb[ii]))
    return outs


def embed_chunk(ctx: Context, rows: Sequence[Row], canvases: dict[str, np.ndarray | str]) -> list[dict[str, Any]]:
    """Output rows with the normalised ITC embedding of each image row (image set) or text row (text set)."""
    outs = _start(rows, canvases, EMBED)
    for side in ("image", "text"):
        ks = [k for k, r in enumerate(rows) if r.error is None and outs[k]["kind"] == side]
        if not ks:
            continue
        keys: list[Any] = [rows[k].image_key for k in ks]
        if side == "text":
            tok = ctx.texts.encode([rows[k].text for k in ks])
            for k, t in zip(ks, tok):
                outs[k]["text_truncated"] = t.truncated
            keys = [tuple(t.ids) for t in tok]
        states, at = _encode(ctx, side, keys, canvases)
        emb = ctx.model.itc_embeddings(**{side: states})[side == "image"].float().cpu().numpy()
        for k, a in zip(ks, at):
            outs[k]["embedding"] = emb[a].tolist()
    return outs


def compute_chunk(
    ctx: Context, command: str, id_type: str, rows: Sequence[Row], canvases: dict[str, np.ndarray | str]
) -> list[dict[str, Any]]:
    """Output rows of one chunk of a `score` or `embed` job, ids typed as `id_type`: every executor's compute step."""
    with torch.inference_mode():
        outs = embed_chunk(ctx, rows, canvases) if command == "embed" else score_chunk(ctx, rows, canvases)
    for o in outs:
        o["id"] = id_value(o["id"], id_type)
    return outs


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

    def __call__(self, records: Sequence[dict[str, Any]] | dict[str, Any], row_offset: int = 0) -> Any:
        columnar = isinstance(records, dict)
        if columnar:  # Ray Data's default batch format: a dict of columns (numpy scalars become Python values)
            records = [{k: _py(v) for k, v in zip(records, vals)} for vals in zip(*records.values())]
        rows = [parse_record(rec, row_offset + i, self.resolver) for i, rec in enumerate(records)]  # type: ignore[arg-type]
        canvases = {k: self.ctx.images.load_or_reason(src) for k, src in image_sources(rows).items()}
        outs = compute_chunk(self.ctx, "score", "keep", rows, canvases)
        return {k: [o[k] for o in outs] for k in score_columns(self.ctx.head)} if columnar else outs


def _py(v: Any) -> Any:
    return v.item() if hasattr(v, "item") and getattr(v, "ndim", 1) == 0 else v
