"""btfast on Ray Data: score or embed a `ray.data.Dataset` on a cluster of GPUs (`pip install 'btfast[ray]'`).

    import ray, btfast.ray

    ds = ray.data.read_parquet("s3://bucket/pairs/")       # columns image (path or bytes), text, id
    scores = btfast.ray.score(ds, "/models/bridgetower-base-itm-mlm", head="itm")
    scores.write_parquet("s3://bucket/scores/")           # columns of `btfast score`

    emb = btfast.ray.embed(ray.data.read_parquet("images.parquet"), "/models/bridgetower-large-itc", kind="image")

Images are decoded and preprocessed in CPU tasks; the model runs in an actor pool, one model per actor (loaded
with `from_pretrained`, optimized and warmed up once), sized from the cluster (one actor per GPU by default,
leaving CPUs for decoding). The returned Dataset is lazy, like any Ray Data pipeline.

For runs that must survive a dead driver, use `btfast score --ray` / `btfast embed --ray` (`btfast.ray.cli`):
the input is cut into deterministic parts, each written atomically to a folder; a rerun skips finished parts.

Inside this package `import ray` is the top-level Ray package (absolute imports): `btfast.ray` never shadows it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("btfast")

INSTALL_HINT = "pip install 'btfast[ray]'  (Ray Data and pyarrow)"

__all__ = ["INSTALL_HINT", "RayMissingError", "embed", "require_ray", "score"]


class RayMissingError(ImportError):
    """Ray (with Ray Data) is not installed."""


def require_ray() -> Any:
    """The top-level `ray` module with Ray Data, or RayMissingError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise RayMissingError(f"this needs Ray, which is not installed ({e}); install it with: {INSTALL_HINT}") from e
    return ray


def _ensure_init(ray: Any) -> None:
    if not ray.is_initialized():
        ray.init()  # RAY_ADDRESS, or a local instance: what Ray Data itself would do


def _schema(ds: Any) -> Any:
    try:
        return ds.schema()
    except Exception:  # pragma: no cover - a source that cannot tell before running
        return None


def _id_type(schema: Any, id_field: str) -> str:
    """'int' when the dataset's id column is integer (or absent: ids are row numbers), else 'string'."""
    import pyarrow as pa

    if schema is None:
        return "string"
    names = list(schema.names)
    if id_field not in names:
        return "int"
    t = schema.types[names.index(id_field)]
    try:
        return "int" if pa.types.is_integer(t) else "string"
    except TypeError:  # a non-arrow type (e.g. numpy dtype)
        return "int" if getattr(t, "kind", "") in ("i", "u") else "string"


def _check_columns(schema: Any, needed: Sequence[str], keep: Sequence[str], outputs: Sequence[str]) -> None:
    clash = [c for c in keep if c in outputs]
    if clash:
        raise ValueError(f"keep={list(keep)}: {', '.join(map(repr, clash))} is already an output column")
    if schema is None:
        return
    cols = list(schema.names)
    absent = [c for c in (*needed, *keep) if c not in cols]
    if absent:
        raise ValueError(f"the dataset has no column {', '.join(map(repr, absent))} (it has {cols})")


def pipeline(
    ds: Any,
    model_dir: str | os.PathLike,
    *,
    mode: str,
    head: str,
    kind: str = "pair",
    prepared: bool = False,
    image_root: str | os.PathLike | None = None,
    fields: tuple[str, str, str] = ("image", "text", "id"),
    device: str | None = "auto",
    dtype: str | None = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    exact: bool = True,
    max_pixels: int | None = None,
    keep: Sequence[str] = (),
    id_type: str | None = None,
    warmup: bool = True,
    dedup: bool = True,
    engine: str = "btfast",
    placement: Any = None,
    decode_rows: int | None = None,
) -> tuple[Any, Any]:
    """(output Dataset, Placement): the decode stage and the model stage appended to `ds`."""
    ray = require_ray()
    from btfast.preprocess import DEFAULT_MAX_PIXELS, ImagePreprocessor
    from btfast.ray.stages import ModelWorker, batch_rows, decode_batch, default_batch_size, dtype_name, place

    model_dir = os.path.abspath(model_dir)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model folder not found: {model_dir}")
    if placement is None:
        _ensure_init(ray)
        placement = place(ray.cluster_resources(), device, gpus_per_worker, workers)
    where = placement
    bs = default_batch_size(where.device, batch_size)
    rows_per_call, default_decode_rows = batch_rows(bs)
    decode_rows = decode_rows or default_decode_rows
    pre = ImagePreprocessor.from_pretrained(model_dir, exact=exact, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
    id_type = id_type or ("string" if mode == "embed" else _id_type(_schema(ds), fields[2]))
    # Each stage gets its own worker environment (BTFAST_STAGE differs): Ray Data fuses a task stage into the
    # actor stage after it when their remote arguments are equal, and then the model would wait on Pillow.
    decode_env = {
        "env_vars": {
            "BTFAST_STAGE": "decode",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    }
    model_env = {
        "env_vars": {
            "BTFAST_STAGE": "model",
            "OMP_NUM_THREADS": str(where.threads),
            "MKL_NUM_THREADS": str(where.threads),
            "TOKENIZERS_PARALLELISM": "false",
        }
    }
    decoded = ds.map_batches(
        decode_batch,
        batch_size=decode_rows,
        batch_format="pyarrow",
        num_cpus=1,
        zero_copy_batch=True,
        fn_kwargs={
            "pre": pre,
            "kind": kind,
            "prepared": prepared,
            "fields": tuple(fields),
            "image_root": None if image_root is None else os.path.abspath(image_root),
            "base": os.getcwd(),
            "id_type": id_type,
            "keep": tuple(keep),
        },
        runtime_env=decode_env,
    )
    out = decoded.map_batches(
        ModelWorker,
        batch_size=rows_per_call,
        batch_format="pyarrow",
        zero_copy_batch=True,
        compute=ray.data.ActorPoolStrategy(size=where.actors),
        num_cpus=where.actor_cpus,
        num_gpus=where.actor_gpus or None,
        fn_constructor_kwargs={
            "model_dir": model_dir,
            "head": head,
            "mode": mode,
            "device": where.device,
            "dtype": dtype_name(dtype, where.device),
            "batch_size": bs,
            "pre": pre,
            "id_type": id_type,
            "keep": tuple(keep),
            "threads": where.threads,
            "warmup": warmup,
            "dedup": dedup,
            "engine": engine,
        },
        runtime_env=model_env,
    )
    log.info("btfast.ray: %s; batch %d, %d rows per call", where.describe(), bs, rows_per_call)
    return out, where


def score(
    ds: Any,
    model_dir: str | os.PathLike,
    head: str = "itm",
    *,
    image_root: str | os.PathLike | None = None,
    image_field: str = "image",
    text_field: str = "text",
    id_field: str = "id",
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    exact: bool = True,
    max_pixels: int | None = None,
    keep: Sequence[str] = (),
    warmup: bool = True,
) -> Any:
    """Score every (image, text) row of `ds` with the `head` ("itm" or "itc") model in `model_dir`.

    `ds` rows: `image` (a path, relative to `image_root` or else to the current folder, or bytes), `text`,
    optionally `id` and `row`. Returns a lazy Dataset with the columns of `btfast score`: row (the input's
    `row` column, else null), id (the input's, else row), image, status ("ok" / "error"), error (the reason,
    as `btfast score` words it), text_truncated, and itm_logit, itm_prob (ITM) or itc_cosine, itc_logit (ITC);
    plus the input columns named in `keep`. Bad rows become error rows; nothing is dropped. Output order is
    not input order (join on id or row).

    workers: model actors (default: the cluster's GPUs / gpus_per_worker; without GPUs, CPUs // 4);
    gpus_per_worker: GPUs per actor (default 1 when the cluster has GPUs, else 0: CPU actors);
    batch_size: images / texts per tower call and pairs per fusion call, a runtime bucket (default 64 on
    CUDA, 16 on CPU); exact (default True) preprocesses as BridgeTowerProcessor, bit for bit; False opts into
    the faster reduced-scale JPEG decode of `btfast score --no-exact` (pixels differ by a few levels).
    """
    from btfast.ray.stages import score_schema

    if head not in ("itm", "itc"):
        raise ValueError(f"head must be itm or itc, got {head}")
    schema = _schema(ds)
    _check_columns(schema, (image_field, text_field), keep, score_schema(head, "string").names)
    out, _ = pipeline(
        ds,
        model_dir,
        mode="score",
        head=head,
        kind="pair",
        image_root=image_root,
        fields=(image_field, text_field, id_field),
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        exact=exact,
        max_pixels=max_pixels,
        keep=keep,
        id_type=_id_type(schema, id_field),
        warmup=warmup,
    )
    return out


def embed(
    ds: Any,
    model_dir: str | os.PathLike,
    kind: str | None = None,
    *,
    image_root: str | os.PathLike | None = None,
    image_field: str = "image",
    text_field: str = "text",
    id_field: str = "id",
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    exact: bool = True,
    max_pixels: int | None = None,
    keep: Sequence[str] = (),
    warmup: bool = True,
) -> Any:
    """Normalised ITC embeddings of the images (kind="image") or texts (kind="text") of `ds`.

    `model_dir` holds a BridgeTowerForContrastiveLearning. kind defaults to the one column `ds` has (an
    `image` or a `text` column). Returns a lazy Dataset with the columns of `btfast embed`: kind, row, id
    (a string), image, text, status, error, text_truncated, embedding (list of float32; cosine = dot product).
    Embed the image collection once, write it, index it: the first stage of retrieval.
    """
    from btfast.ray.stages import embed_schema

    schema = _schema(ds)
    cols = None if schema is None else list(schema.names)
    if kind is None:
        has_i = cols is not None and image_field in cols
        has_t = cols is not None and text_field in cols
        if has_i == has_t:
            raise ValueError(f"pass kind='image' or kind='text' (the dataset has columns {cols})")
        kind = "image" if has_i else "text"
    if kind not in ("image", "text"):
        raise ValueError(f"kind must be image or text, got {kind}")
    _check_columns(schema, (image_field,) if kind == "image" else (text_field,), keep, embed_schema().names)
    out, _ = pipeline(
        ds,
        model_dir,
        mode="embed",
        head="itc",
        kind=kind,
        image_root=image_root,
        fields=(image_field, text_field, id_field),
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        exact=exact,
        max_pixels=max_pixels,
        keep=keep,
        warmup=warmup,
    )
    return out
