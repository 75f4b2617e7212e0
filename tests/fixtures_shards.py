"""WebDataset collections written by the real `webdataset.TarWriter` in img2dataset's layout, and a local S3 server.

img2dataset's layout: shard `00003.tar` holds, per sample, `000030007.jpg`, `000030007.txt` (the caption) and
`000030007.json` (caption, key, url, size), with `00003_stats.json` beside the shard.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator

from fixtures_saved_model import photo, sentences

from btfast.io import fs


def sample_key(shard: int, i: int) -> str:
    return f"{shard:05d}{i:04d}"


def write_collection(
    folder: str, shards: int = 3, per_shard: int = 4, seed: int = 0, stats: bool = True
) -> list[dict[str, object]]:
    """Write `shards` tars of `per_shard` samples under `folder` (a path or URL); returns every sample written,
    in collection order: {key, shard, jpg (bytes), caption}. Images repeat every 5 samples (dedup has work)."""
    import webdataset as wds

    caps = sentences(shards * per_shard, seed=seed + 7)
    jpgs = []
    for j in range(5):
        buf = io.BytesIO()
        photo(40 + 8 * j, 56 - 4 * j, seed + j).save(buf, "JPEG", quality=90)
        jpgs.append(buf.getvalue())
    if not fs.is_url(folder):
        os.makedirs(folder, exist_ok=True)
    written: list[dict[str, object]] = []
    for s in range(shards):
        with fs.open_file(fs.join(folder, f"{s:05d}.tar"), "wb") as f:
            sink = wds.TarWriter(f)
            for i in range(per_shard):
                n = s * per_shard + i
                rec = {"key": sample_key(s, i), "shard": s, "jpg": jpgs[n % 5], "caption": caps[n]}
                meta = {"caption": rec["caption"], "key": rec["key"], "url": f"http://example.com/{n}.jpg"}
                sink.write({"__key__": rec["key"], "jpg": rec["jpg"], "txt": rec["caption"], "json": meta})
                written.append(rec)
            sink.close()
        if stats:
            with fs.open_file(fs.join(folder, f"{s:05d}_stats.json"), "wb") as f:
                f.write(json.dumps({"count": per_shard, "successes": per_shard}).encode())
    return written


def tar_bytes(samples: list[dict[str, object]]) -> bytes:
    """One tar in memory from WebDataset sample dicts ({"__key__": ..., "jpg": ..., "txt": ...})."""
    import webdataset as wds

    buf = io.BytesIO()
    sink = wds.TarWriter(buf)
    for s in samples:
        sink.write(s)
    sink.close()
    return buf.getvalue()


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 (any free port), reachable by plain `s3://` URLs in this process and its
    children through the environment (as a user's credentials would be); yields its endpoint URL."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
