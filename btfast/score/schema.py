"""The output columns of every job, their Arrow types, and the id rule, declared once for every executor and sink.

Id rule: an output `id` is the input's id (the row number when it has none). In Parquet it is int64 when the
input's id column is integer (or absent: ids are row numbers), else a string; JSONL keeps the input's value.
`btfast embed` and `btfast retrieve` ids are always strings.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from btfast.score.rows import parquet_metadata

BASE = ("row", "id", "image", "status", "error", "text_truncated")
SCORES = {"itm": ("itm_logit", "itm_prob"), "itc": ("itc_cosine", "itc_logit")}
EMBED = ("kind", "row", "id", "image", "text", "status", "error", "text_truncated", "embedding")
RESULT = ("rank", "row", "id", "item", "itc_cosine", "itm_logit", "itm_prob")
RETRIEVE = ("direction", "query_row", "query_id", "query", "status", "error", "results")
# Between Ray's decode and model stages (names starting with "_" never reach the output)
ROWS = ("row", "id", "kind", "image", "text", "_error", "_key", "_path", "_bytes")
DECODED = ROWS + ("_canvas", "_h", "_w", "_decode_error")

# column -> pyarrow type factory (others: string); `_canvas` has 64-bit offsets: a block of canvases may pass 2 GiB
_TYPES = dict.fromkeys(("itm_logit", "itm_prob", "itc_cosine", "itc_logit"), "float32")
_TYPES |= dict.fromkeys(("rank", "_h", "_w"), "int32") | dict.fromkeys(("row", "query_row", "part"), "int64")
_TYPES |= {"text_truncated": "bool_", "_bytes": "binary", "_canvas": "large_binary"}


def score_columns(head: str, with_text: bool = False) -> tuple[str, ...]:
    """Columns of `btfast score`'s output rows (`with_text`: the scored text after `image`)."""
    base = BASE[:3] + ("text",) + BASE[3:] if with_text else BASE
    return base + SCORES[head]


def arrow_type(name: str, id_type: str = "string") -> Any:
    """The Arrow type of column `name` (ids: int64 or string, as `id_type` says)."""
    import pyarrow as pa

    if name == "id":
        return pa.int64() if id_type == "int" else pa.string()
    if name == "embedding":
        return pa.list_(pa.float32())
    if name == "results":
        return pa.list_(pa.struct([(c, arrow_type(c)) for c in RESULT]))
    return getattr(pa, _TYPES.get(name, "string"))()


def arrow_schema(columns: tuple[str, ...], id_type: str = "string") -> Any:
    """The pyarrow schema of output rows with these columns."""
    import pyarrow as pa

    return pa.schema([(c, arrow_type(c, id_type)) for c in columns])


retrieve_schema = functools.partial(arrow_schema, RETRIEVE)


def id_type_of(path: str | os.PathLike | None, id_column: str = "id", schema: Any = None) -> str:
    """'int' when the input's id column is integer, or absent from a typed input (ids are row numbers); else
    'string'. `schema`: an Arrow schema (a Ray Dataset's); else `path`'s Parquet schema; other inputs: 'string'."""
    import pyarrow as pa

    if schema is None:
        if path is None or not str(path).lower().endswith((".parquet", ".pq")):
            return "string"
        schema = parquet_metadata(path).schema.to_arrow_schema()
    if id_column not in schema.names:
        return "int"
    t = schema.types[list(schema.names).index(id_column)]
    try:
        return "int" if pa.types.is_integer(t) else "string"
    except TypeError:  # a non-Arrow type (a numpy dtype)
        return "int" if getattr(t, "kind", "") in ("i", "u") else "string"


def id_value(v: Any, id_type: str) -> Any:
    """An id as its output column holds it ('keep': JSONL, unchanged)."""
    if v is None or id_type == "keep":
        return v
    return int(v) if id_type == "int" else str(v)
