"""Reading a collection from WebDataset tar shards vs a folder of the same images, and from an S3 server.

    python bench/shards_bench.py                       # ~1 minute on a 2-core CPU
    python bench/shards_bench.py --json out.json       # also write the figures as JSON

One process, one core's worth of work: each system reads the same N generated JPEGs (photo-like, quality 90,
`--size`) and turns every one into the uint8 canvas a decoding worker hands the model (`ImagePreprocessor.load`,
exact mode), as `btfast score` does per image:

    folder             one file per image, opened by path
    tar                `--per-shard` images per shard: the shard read whole, members grouped (btfast.io.tar), each
                       image decoded from memory
    s3, no read-ahead  the same shards GET from a local S3 server (moto, in its own process), one after another
    s3, read-ahead     the next shard's GET runs in a thread while this shard decodes (btfast.io.prefetch)

Figures: images/s per wall second and per CPU second of this process (the second is steadier on a shared
machine; for s3 it leaves out the server's own CPU), and the share of the wall time the decoding loop waited for
a shard's bytes (what read-ahead is for: near 0 means the decoder never starves). Best of `--repeats` passes
after a warm-up pass.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # fixtures_saved_model.photo: the picture generator the tests use


def _serve(queue: mp.Queue) -> None:
    """A moto S3 server in a process of its own; sends its port, then serves until terminated."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    queue.put(server.get_host_and_port()[1])
    while True:
        time.sleep(3600)


def _timed(fn: Callable[[], tuple[int, float]], repeats: int) -> dict[str, float]:
    fn()  # warm-up: page cache, server, imports
    wall = cpu = waited = float("inf")
    n = 0
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        n, w = fn()
        wall = min(wall, time.perf_counter() - t0)
        cpu = min(cpu, time.process_time() - c0)
        waited = min(waited, w)
    return {"images": n, "wall_img_s": n / wall, "cpu_img_s": n / cpu, "waited_share": waited / wall}


def main(argv: Iterable[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=256, help="images in the collection (default: 256)")
    p.add_argument("--per-shard", type=int, default=64, help="images per tar shard (default: 64)")
    p.add_argument("--size", default="640x480", help="image size WxH (default: 640x480)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-s3", action="store_true", help="skip the S3 server part")
    p.add_argument("--json", default=None, metavar="FILE")
    args = p.parse_args(list(argv) if argv is not None else None)

    import webdataset as wds
    from fixtures_saved_model import photo

    from btfast.io import fs
    from btfast.io.prefetch import read_ahead
    from btfast.io.tar import read_shard
    from btfast.preprocess import ImagePreprocessor

    w, h = (int(x) for x in args.size.split("x"))
    tmp = Path(tempfile.mkdtemp(prefix="btfast-shardbench-"))
    (tmp / "folder").mkdir()
    (tmp / "shards").mkdir()
    jpgs = []
    for i in range(args.images):
        buf = io.BytesIO()
        photo(w, h, i).save(buf, "JPEG", quality=90)
        jpgs.append(buf.getvalue())
        (tmp / "folder" / f"{i:09d}.jpg").write_bytes(jpgs[-1])
    shards = []
    for s in range(0, args.images, args.per_shard):
        path = tmp / "shards" / f"{s // args.per_shard:05d}.tar"
        with wds.TarWriter(str(path)) as sink:
            for i in range(s, min(s + args.per_shard, args.images)):
                sink.write({"__key__": f"{i:09d}", "jpg": jpgs[i], "txt": f"caption {i}"})
        shards.append(str(path))
    files = sorted(str(f) for f in (tmp / "folder").iterdir())
    pre = ImagePreprocessor(exact=True)
    res: dict = {
        "images": args.images,
        "size": args.size,
        "per_shard": args.per_shard,
        "jpeg_kb": sum(map(len, jpgs)) / len(jpgs) / 1024,
        "cpu": os.cpu_count(),
        "systems": {},
    }

    def folder() -> tuple[int, float]:
        for f in files:
            pre.load(f)
        return len(files), 0.0  # file reads are inside decoding

    def tar(names: list[str], depth: int | None) -> Callable[[], tuple[int, float]]:
        """Decode every image of `names`; also returns the seconds spent waiting for shard bytes."""

        def run() -> tuple[int, float]:
            n, waited = 0, 0.0
            if depth is None:
                fetched = ((name, lambda name=name: fs.read_bytes(name)) for name in names)
            else:
                fetched = ((name, fut.result) for name, fut in read_ahead(names, fs.read_bytes, depth=depth))
            for _, get in fetched:
                t0 = time.perf_counter()
                data = get()
                waited += time.perf_counter() - t0
                for sample in read_shard(data).samples:
                    pre.load(sample.image)
                    n += 1
            return n, waited

        return run

    systems: dict[str, Callable[[], tuple[int, float]]] = {
        "folder": folder,
        "tar": tar(shards, None),
        "tar, read-ahead": tar(shards, 1),
    }
    server = None
    if not args.no_s3:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        server = ctx.Process(target=_serve, args=(queue,), daemon=True)
        server.start()
        port = queue.get(timeout=60)
        os.environ.update(
            AWS_ACCESS_KEY_ID="bench",
            AWS_SECRET_ACCESS_KEY="bench",
            AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}",
            AWS_DEFAULT_REGION="us-east-1",
        )
        fs.filesystem("s3://btfast-bench")[0].mkdir("btfast-bench")
        urls = []
        for path in shards:
            url = f"s3://btfast-bench/shards/{os.path.basename(path)}"
            with fs.open_file(url, "wb") as f:
                f.write(Path(path).read_bytes())
            urls.append(url)
        systems["s3, no read-ahead"] = tar(urls, None)
        systems["s3, read-ahead"] = tar(urls, 1)
    try:
        for name, fn in systems.items():
            r = _timed(fn, args.repeats)
            assert r["images"] == args.images, (name, r)
            res["systems"][name] = r
            print(
                f"  {name:>18}: {r['wall_img_s']:7.1f} img/s wall, {r['cpu_img_s']:7.1f} img/s per CPU s, "
                f"{100 * r['waited_share']:4.1f} % of the time waiting for shard bytes",
                flush=True,
            )
    finally:
        if server is not None:
            server.terminate()
            server.join()
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return res


if __name__ == "__main__":
    main()
