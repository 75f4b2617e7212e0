"""Benchmark of the offline scorer's input pipeline against HF's image processor (dedup against pair by pair is
`btfast bench --mode all-pairs`).

    python bench/score_bench.py                    # images/s: HF BridgeTowerImageProcessor vs btfast.preprocess
    python bench/score_bench.py --json out.json    # also write the figures as JSON

Preprocessing: generated JPEGs of four sizes (photo-like, quality 90) are decoded and preprocessed to 288 px
tensors, one image a call as a scorer does: HF = `Image.open` + `BridgeTowerImageProcessor(do_convert_rgb=True)`
(the PIL backend: torchvision is absent); btfast exact = bit-identical tensors (the default); btfast --no-exact =
libjpeg decodes large JPEGs at reduced scale and downscales resample only the centre crop; "worker side" =
decode + resize + crop to a uint8 canvas (what the worker processes do; normalisation then runs on the
model's device). Steady state: one warm-up pass, then the best of `--repeats` passes; images/s per wall
second and per CPU second of the process (the latter is steadier on a shared machine).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # fixtures_saved_model: the picture generator


def _photo_jpeg(w: int, h: int, seed: int) -> bytes:
    from fixtures_saved_model import photo

    buf = io.BytesIO()
    photo(w, h, seed).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def bench_preprocess(repeats: int, n_per_size: int, workers: int) -> dict:
    import warnings

    from transformers import BridgeTowerImageProcessor
    from transformers.utils import logging as hf_logging

    from btfast.preprocess import ImagePreprocessor
    from btfast.score.loader import ImageLoader

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    sizes = [(640, 480), (1024, 768), (1600, 1200), (4000, 3000)]
    tmp = Path(tempfile.mkdtemp(prefix="btfast-prebench-"))
    files: dict[str, list[Path]] = {}
    for w, h in sizes:
        key = f"{w}x{h}"
        files[key] = []
        for i in range(n_per_size):
            p = tmp / f"{key}_{i}.jpg"
            p.write_bytes(_photo_jpeg(w, h, i))
            files[key].append(p)
    hf = BridgeTowerImageProcessor(do_convert_rgb=True)
    exact = ImagePreprocessor(exact=True)
    fast = ImagePreprocessor(exact=False)

    def hf_one(p: Path) -> np.ndarray:
        return hf(Image.open(p), return_tensors="np")["pixel_values"]

    systems = {
        "hf": hf_one,
        "btfast exact": lambda p: exact(p)["pixel_values"],
        "btfast --no-exact": lambda p: fast(p)["pixel_values"],
        "btfast --no-exact, worker side (uint8 canvas)": fast.load,
    }
    # correctness on these files: exact == HF bit for bit
    for key, paths in files.items():
        assert np.array_equal(hf_one(paths[0]), exact(paths[0])["pixel_values"]), key

    res: dict = {"sizes": {}, "workers": workers}
    for key, paths in files.items():
        row = {}
        for name, fn in systems.items():
            for p in paths[:1]:
                fn(p)  # warm-up
            best = cpu = float("inf")
            for _ in range(repeats):
                t0, c0 = time.perf_counter(), time.process_time()
                for p in paths:
                    fn(p)
                best = min(best, time.perf_counter() - t0)
                cpu = min(cpu, time.process_time() - c0)
            row[name] = {"wall": len(paths) / best, "cpu": len(paths) / cpu}
        res["sizes"][key] = row
        print(
            f"  {key:>10}: " + ", ".join(f"{k} {v['wall']:,.1f} ({v['cpu']:,.1f})" for k, v in row.items()),
            flush=True,
        )
    # mixed set through the worker pool (the scorer's path), vs HF in one process
    mixed = [p for ps in files.values() for p in ps]
    if workers > 0:
        with ImageLoader(fast, workers) as loader:
            loader.result(loader.submit(["w"], [mixed[0]]))  # pool started
            t0 = time.perf_counter()
            handle = loader.submit([str(p) for p in mixed], mixed)
            out = loader.result(handle)
            canv = np.stack(list(out.values()))
            fast.normalize(canv)
            res["pool"] = len(mixed) / (time.perf_counter() - t0)
        print(f"  mixed sizes through {workers} worker process(es) + normalisation: {res['pool']:,.1f} img/s")
    t0 = time.perf_counter()
    for p in mixed:
        hf_one(p)
    res["hf_mixed"] = len(mixed) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for p in mixed:
        fast(p)
    res["btfast_no_exact_mixed"] = len(mixed) / (time.perf_counter() - t0)
    print(
        f"  mixed sizes, one process: hf {res['hf_mixed']:,.1f} img/s, "
        f"btfast --no-exact {res['btfast_no_exact_mixed']:,.1f}"
    )
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3, help="preprocess: passes, best kept (default 3)")
    ap.add_argument("--per-size", type=int, default=8, help="preprocess: images per size (default 8)")
    ap.add_argument("--workers", type=int, default=1, help="worker processes (default 1: this box has 2 cores)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the worker has the other core)")
    ap.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    res: dict = {"cpu_count": os.cpu_count(), "torch_threads": args.threads}
    print("preprocessing (decode + preprocess to 288 px), images/s wall (per CPU-second):", flush=True)
    res["preprocess"] = bench_preprocess(args.repeats, args.per_size, args.workers)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
