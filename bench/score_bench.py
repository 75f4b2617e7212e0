"""Benchmarks of the offline scorer: the input pipeline against HF's image processor, and dedup against pair-by-pair.

    python bench/score_bench.py                    # both parts, a few minutes on a 2-core CPU
    python bench/score_bench.py --part preprocess  # images/s: HF BridgeTowerImageProcessor vs btfast.preprocess
    python bench/score_bench.py --part dedup       # all-pairs: each unique image/text encoded once vs every pair
    python bench/score_bench.py --json out.json    # also write the figures as JSON

Preprocessing: generated JPEGs of four sizes (photo-like, quality 90) are decoded and preprocessed to 288 px
tensors, one image a call as a scorer does: HF = `Image.open` + `BridgeTowerImageProcessor(do_convert_rgb=True)`
(the PIL backend: torchvision is absent); btfast exact = bit-identical tensors (the default); btfast --no-exact =
libjpeg decodes large JPEGs at reduced scale and downscales resample only the centre crop; "worker side" =
decode + resize + crop to a uint8 canvas (what the worker processes do; normalisation then runs on the
model's device). Steady state: one warm-up pass, then the best of `--repeats` passes; images/s per wall
second and per CPU second of the process (the latter is steadier on a shared machine).

Dedup: `btfast.score.job.score` end to end (reading, workers, model, writing) on an all-pairs workload of
N images × M texts, with a saved random model of bridgetower-base's shape (12 + 12 layers, 6 cross, 288 px /
16 px = 325 image tokens) but narrower (`--hidden`, default 256, head dim 64) so a CPU finishes; FLOPs per
tower keep base's proportions. The same job with `--no-dedup` runs the model's whole forward per pair.
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
sys.path.insert(0, str(REPO / "tests"))  # fixtures_saved_model: the tiny BPE tokenizer and picture generator


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


def bench_dedup(
    n_images: int, n_texts: int, hidden: int, batch: int, workers: int, hf_baseline: bool, repeats: int
) -> dict:
    import torch
    from fixtures_saved_model import photo, save_tokenizer, sentences
    from transformers import (
        BridgeTowerForImageAndTextRetrieval,
        BridgeTowerImageProcessor,
        BridgeTowerProcessor,
        RobertaTokenizerFast,
    )
    from transformers.utils import logging as hf_logging

    from btfast.score.job import score
    from btfast.testing import base_config, build

    hf_logging.set_verbosity_error()
    tmp = Path(tempfile.mkdtemp(prefix="btfast-dedupbench-"))
    folder = tmp / "model"
    cfg = base_config(
        text_config=dict(
            hidden_size=hidden, num_attention_heads=hidden // 64, intermediate_size=4 * hidden, vocab_size=320
        ),
        vision_config=dict(hidden_size=hidden),
        hidden_size=hidden,
        num_attention_heads=hidden // 64,
    )
    model = build(BridgeTowerForImageAndTextRetrieval, cfg)
    model.save_pretrained(str(folder))
    save_tokenizer(folder)
    BridgeTowerProcessor(
        BridgeTowerImageProcessor(), RobertaTokenizerFast.from_pretrained(str(folder))
    ).save_pretrained(str(folder))
    imgs = tmp / "imgs"
    imgs.mkdir()
    for i in range(n_images):
        photo(640, 480, i).save(imgs / f"{i}.jpg", quality=90)
    texts = sentences(n_texts, seed=7, min_words=8, max_words=14)  # ~20-40 tokens with the tiny BPE
    pairs = tmp / "pairs.jsonl"
    with open(pairs, "w") as f:
        for t in texts:  # text-major order: the planner regroups rows by image
            for i in range(n_images):
                f.write(json.dumps({"image": f"{i}.jpg", "text": t}) + "\n")
    n = n_images * n_texts
    res = {"images": n_images, "texts": n_texts, "pairs": n, "hidden": hidden, "threads": torch.get_num_threads()}
    runs = {"dedup": {}, "pair-by-pair": {"dedup": False}}
    if hf_baseline:
        runs["hf eager pair-by-pair"] = {"engine": "hf", "dedup": False}
    outs = {}
    # warm-up: start the worker pool's server and touch every code path once (not timed)
    warm = tmp / "warm.jsonl"
    with open(warm, "w") as f:
        f.write(json.dumps({"image": "0.jpg", "text": texts[0]}) + "\n")
    for kw in runs.values():
        score(
            folder,
            warm,
            tmp / "warm_out.jsonl",
            image_root=imgs,
            device="cpu",
            batch_size=batch,
            workers=workers,
            overwrite=True,
            progress=False,
            **kw,
        )
    # systems alternate run by run (the best of `repeats` kept), so load from other processes hits all alike;
    # CPU seconds of this process (the model's thread; decoding runs in the workers) are reported too
    for _ in range(repeats):
        for name, kw in runs.items():
            out = tmp / f"{name.replace(' ', '_')}.jsonl"
            c0 = time.process_time()
            s = score(
                folder,
                pairs,
                out,
                image_root=imgs,
                device="cpu",
                batch_size=batch,
                workers=workers,
                overwrite=True,
                progress=False,
                **kw,
            )
            cpu = time.process_time() - c0
            prev = res.get(name)
            if prev is None or s.seconds < prev["seconds"]:
                res[name] = {"seconds": s.seconds, "pairs_per_s": n / s.seconds, **s.stats}
            res[name]["cpu_seconds"] = min(cpu, (prev or {}).get("cpu_seconds", cpu))
            outs[name] = {r["row"]: r["itm_logit"] for r in map(json.loads, open(out))}
    for name in runs:
        r = res[name]
        print(
            f"  {name}: {r['seconds']:.1f} s wall ({n / r['seconds']:,.2f} pairs/s), {r['cpu_seconds']:.1f} s CPU; "
            f"encoded {r['images_encoded']} images, {r['texts_encoded']} texts",
            flush=True,
        )
    res["speedup"] = res["pair-by-pair"]["seconds"] / res["dedup"]["seconds"]
    res["speedup_cpu"] = res["pair-by-pair"]["cpu_seconds"] / res["dedup"]["cpu_seconds"]
    res["max_abs_diff"] = max(abs(outs["dedup"][k] - outs["pair-by-pair"][k]) for k in outs["dedup"])
    print(
        f"  dedup speed-up over pair-by-pair: {res['speedup']:.2f}x wall, {res['speedup_cpu']:.2f}x CPU "
        f"(max |logit diff| {res['max_abs_diff']:.2e})"
    )
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["all", "preprocess", "dedup"], default="all")
    ap.add_argument("--repeats", type=int, default=3, help="preprocess: passes, best kept (default 3)")
    ap.add_argument("--per-size", type=int, default=8, help="preprocess: images per size (default 8)")
    ap.add_argument("--workers", type=int, default=1, help="worker processes (default 1: this box has 2 cores)")
    ap.add_argument("--images", type=int, default=8, help="dedup: images (default 8)")
    ap.add_argument("--texts", type=int, default=8, help="dedup: texts (default 8); pairs = images × texts")
    ap.add_argument("--hidden", type=int, default=256, help="dedup: hidden size, a multiple of 64 (default 256)")
    ap.add_argument("--batch-size", type=int, default=16, help="dedup: batch size (default 16)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the worker has the other core)")
    ap.add_argument("--dedup-repeats", type=int, default=2, help="dedup: runs per system, best kept (default 2)")
    ap.add_argument("--hf-baseline", action="store_true", help="dedup: also time HF eager pair by pair")
    ap.add_argument("--json", default=None, help="write the figures to this JSON file")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    res: dict = {"cpu_count": os.cpu_count(), "torch_threads": args.threads}
    if args.part in ("all", "preprocess"):
        print("preprocessing (decode + preprocess to 288 px), images/s wall (per CPU-second):", flush=True)
        res["preprocess"] = bench_preprocess(args.repeats, args.per_size, args.workers)
    if args.part in ("all", "dedup"):
        print(
            f"all-pairs scoring, {args.images} images x {args.texts} texts, base-shaped model at hidden "
            f"{args.hidden}, CPU:",
            flush=True,
        )
        res["dedup"] = bench_dedup(
            args.images, args.texts, args.hidden, args.batch_size, args.workers, args.hf_baseline, args.dedup_repeats
        )
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
