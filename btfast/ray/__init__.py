"""btfast on Ray Data: score or embed a `ray.data.Dataset` on a cluster of GPUs (`pip install 'btfast[ray]'`).

    import ray, btfast.ray

    ds = ray.data.read_parquet("s3://bucket/pairs/")       # columns image (path or bytes), text, id
    scores = btfast.ray.score(ds, "/models/bridgetower-base-itm-mlm", head="itm")
    scores.write_parquet("s3://bucket/scores/")           # columns of `btfast score`

    emb = btfast.ray.embed(ray.data.read_parquet("images.parquet"), "/models/bridgetower-large-itc", kind="image")

Images are decoded in CPU tasks; the model runs in an actor pool (loaded, optimized and warmed up once per actor)
sized from the cluster, one actor per GPU by default. The Dataset returned is lazy. For runs that must survive a
dead driver: `btfast score --ray` / `btfast embed --ray` (`btfast.ray.cli`), resumable folders of Parquet parts.
Inside this package `import ray` is the top-level Ray package (absolute imports): `btfast.ray` never shadows it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

from btfast.score.config import Columns, JobConfig
from btfast.score.job import _config
from btfast.score.schema import EMBED, id_type_of, score_columns

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


def connect(address: str | None = None, **kw: Any) -> bool:
    """`ray.init(address, **kw)` unless connected already (as Ray Data would); True if this call started Ray."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    ray.init(address=address, **kw)
    return True


def pipeline(
    ds: Any,
    cfg: JobConfig,
    *,
    kind: str = "pair",
    prepared: bool = False,
    keep: Sequence[str] = (),
    id_type: str = "string",
    gpus_per_worker: float | None = None,
    warmup: bool = True,
    placement: Any = None,
    decode_rows: int | None = None,
) -> Any:
    """The decode stage (CPU tasks) and the model stage (an actor pool, placed by `placement`, else sized from the
    cluster) appended to `ds`, both configured by the job `cfg` (`cfg.command`: score or embed)."""
    ray = require_ray()
    from btfast.ray.stages import ModelWorker, batch_rows, decode_batch, place

    if not os.path.isdir(cfg.model):
        raise FileNotFoundError(f"model folder not found: {cfg.model}")
    cfg = cfg.replace(model=os.path.abspath(cfg.model))
    if placement is None:
        connect()
    where = placement or place(
        ray.cluster_resources(), cfg.device, gpus_per_worker, cfg.workers, cfg.batch_size, cfg.dtype
    )
    rows_per_call, default_decode_rows = batch_rows(where.batch_size)
    root = None if cfg.image_root is None else os.path.abspath(cfg.image_root)
    decode_kw = dict(pre=cfg.image_preprocessor(), kind=kind, prepared=prepared, columns=cfg.columns, keep=keep)
    decode_kw.update(image_root=root, base=os.getcwd(), id_type=id_type)

    # Each stage gets its own worker environment (BTFAST_STAGE differs): Ray Data fuses a task stage into the
    # actor stage after it when their remote arguments are equal, and then the model would wait on Pillow.
    def stage(ds: Any, fn: Any, name: str, threads: int, **kw: Any) -> Any:
        n = str(threads)
        env = dict(BTFAST_STAGE=name, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, TOKENIZERS_PARALLELISM="false")
        return ds.map_batches(fn, batch_format="pyarrow", zero_copy_batch=True, runtime_env={"env_vars": env}, **kw)

    ds = stage(
        ds, decode_batch, "decode", 1, batch_size=decode_rows or default_decode_rows, num_cpus=1, fn_kwargs=decode_kw
    )
    ds = stage(
        ds,
        ModelWorker,
        "model",
        where.threads,
        batch_size=rows_per_call,
        compute=ray.data.ActorPoolStrategy(size=where.actors),
        num_cpus=where.actor_cpus,
        num_gpus=where.actor_gpus or None,
        fn_constructor_args=(cfg, cfg.command, where.device, where.dtype, where.batch_size, id_type, keep),
        fn_constructor_kwargs={"threads": where.threads, "warmup": warmup},
    )
    log.info("btfast.ray: %s; batch %d, %d rows per call", where.describe(), where.batch_size, rows_per_call)
    return ds


def _run(
    ds: Any,
    model_dir: str | os.PathLike,
    kind: str | None,
    outputs: Sequence[str],
    *,
    image_field: str = "image",
    text_field: str = "text",
    id_field: str = "id",
    keep: Sequence[str] = (),
    **job: Any,
) -> Any:
    """The pipeline of `score` (kind "pair") or `embed` (kind "image" / "text"; None: the one column `ds` has);
    `job`: `pipeline`'s gpus_per_worker and warmup, and other `JobConfig` fields."""
    placing = {k: job.pop(k) for k in ("gpus_per_worker", "warmup") if k in job}
    columns = Columns(image_field, text_field, id_field)
    try:
        schema = ds.schema()
    except Exception:  # pragma: no cover - a source that cannot tell before running
        schema = None
    cols = None if schema is None else list(schema.names)
    if kind is None:
        has_i, has_t = (cols is not None and c in cols for c in (image_field, text_field))
        if has_i == has_t:
            raise ValueError(f"pass kind='image' or kind='text' (the dataset has columns {cols})")
        kind = "image" if has_i else "text"
    clash = [c for c in keep if c in outputs]
    if clash:
        raise ValueError(f"keep={list(keep)}: {', '.join(map(repr, clash))} is already an output column")
    needed = [getattr(columns, role) for role in (("image", "text") if kind == "pair" else (kind,))]
    absent = [c for c in (*needed, *keep) if cols is not None and c not in cols]
    if absent:
        raise ValueError(f"the dataset has no column {', '.join(map(repr, absent))} (it has {cols})")
    mode = "score" if kind == "pair" else "embed"
    id_type = "string" if mode == "embed" or not schema else id_type_of(None, id_field, schema=schema)
    cfg = _config(mode, None, None, check=False, model=model_dir, out="", columns=columns, **job)
    return pipeline(ds, cfg, kind=kind, keep=keep, id_type=id_type, **placing)


def score(ds: Any, model_dir: str | os.PathLike, head: str = "itm", **options: Any) -> Any:
    """Score every (image, text) row of `ds` with the `head` ("itm" or "itc") model in `model_dir`.

    `ds` rows: `image` (a path, relative to `image_root` or else to the current folder, or bytes), `text`,
    optionally `id` and `row`. Returns a lazy Dataset with the columns of `btfast score`: row (the input's
    `row` column, else null), id (the input's, else row), image, status ("ok" / "error"), error (the reason,
    as `btfast score` words it), text_truncated, and itm_logit, itm_prob (ITM) or itc_cosine, itc_logit (ITC);
    plus the input columns named in `keep`. Bad rows become error rows; nothing is dropped. Output order is
    not input order (join on id or row).

    options: image_root, image_field / text_field / id_field (the input's column names), device, dtype,
    batch_size (images / texts per tower call and pairs per fusion call, a runtime bucket; default 64 on CUDA, 16
    on CPU), workers (model actors; default: the cluster's GPUs / gpus_per_worker, without GPUs CPUs // 4),
    gpus_per_worker (default 1 when the cluster has GPUs, else 0: CPU actors), exact (default True: preprocess as
    BridgeTowerProcessor, bit for bit; False: the faster reduced-scale JPEG decode of `btfast score --no-exact`),
    max_pixels, exif_orientation, keep, warmup.
    """
    if head not in ("itm", "itc"):
        raise ValueError(f"head must be itm or itc, got {head}")
    return _run(ds, model_dir, "pair", score_columns(head), head=head, **options)


def embed(ds: Any, model_dir: str | os.PathLike, kind: str | None = None, **options: Any) -> Any:
    """Normalised ITC embeddings of the images (kind="image") or texts (kind="text") of `ds`.

    `model_dir` holds a BridgeTowerForContrastiveLearning. kind defaults to the one column `ds` has (an
    `image` or a `text` column). Returns a lazy Dataset with the columns of `btfast embed`: kind, row, id
    (a string), image, text, status, error, text_truncated, embedding (list of float32; cosine = dot product).
    Embed the image collection once, write it, index it: the first stage of retrieval. `options` as `score`'s.
    """
    if kind not in (None, "image", "text"):
        raise ValueError(f"kind must be image or text, got {kind}")
    return _run(ds, model_dir, kind, EMBED, head="itc", **options)
