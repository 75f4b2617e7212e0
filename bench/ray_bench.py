"""The Ray path (`btfast score --ray`) against the single-process scorer (`btfast score`), same input, same machine.

    python bench/ray_bench.py                      # tiny and narrow-base models, CPU (a few minutes on 2 cores)
    python bench/ray_bench.py --model narrow       # one model
    python bench/ray_bench.py --pairs 512          # input size (the large run uses 3x)

What it measures: the overhead of running the same job through Ray Data (decode tasks + one model actor + the
driver writing parts) instead of one process (decode worker processes + the model in the main process). Both
run end to end from a pairs file to Parquet output, on a fresh output, with the same model, device, batch size
and chunk limits (3N / 24 rows per chunk or part, at most 256). Each system runs on N and 3N pairs (after one
untimed pass at N).
Figures: end-to-end rows/s (wall clock of the whole command); the steady rate, rows/s between the first and the
last chunk / part file landing on disk (watched every 10 ms: the single-process scorer renames chunks into
OUT.btfast-parts/, `--ray` renames parts into OUT/), so fixed costs drop out (for Ray: scheduling, starting the
actor, importing torch there, loading the model; for the single process: starting its workers, loading the
model); `fixed_s` = wall - rows / steady rate, of the 3N run. The local Ray instance is started once
(`ray_init_s`), as a user's cluster would be.

Models (random weights, saved with `save_pretrained` and loaded by both systems with `from_pretrained`):
  tiny    the test suite's tiny model (32 px images, 2 layers): nearly all overhead, the worst case for Ray
  narrow  bridgetower-base's shape (12 + 12 layers, 6 cross, 288 px / 16 px) at hidden 256: the model does
          real work per pair, as on a GPU with the real model
Inputs: N pairs over N/4 photo-like 640x480 JPEGs, 4 texts each, rows in text-major order (3N: 3N/4 images).

With a GPU (`--device auto` finds it) both systems use it: the Ray path with one GPU actor. Writes
bench/results/<date>-<cpu|gpu>-ray-<model>.json with versions, commit, rows/s of both and their ratio.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # fixtures_saved_model: the tiny BPE tokenizer and picture generator
RESULTS = REPO / "bench" / "results"


def make_model(kind: str, folder: Path) -> dict:
    from fixtures_saved_model import save_model_folder, save_tokenizer
    from transformers import (
        BridgeTowerForImageAndTextRetrieval,
        BridgeTowerImageProcessor,
        BridgeTowerProcessor,
        RobertaTokenizerFast,
    )
    from transformers.utils import logging as hf_logging

    from btfast.testing import base_config, build

    hf_logging.set_verbosity_error()
    if kind == "tiny":
        save_model_folder(folder, head="itm")
        return {"model": "tiny", "image_size": 32}
    hidden = 256
    cfg = base_config(
        text_config=dict(
            hidden_size=hidden, num_attention_heads=hidden // 64, intermediate_size=4 * hidden, vocab_size=320
        ),
        vision_config=dict(hidden_size=hidden),
        hidden_size=hidden,
        num_attention_heads=hidden // 64,
    )
    build(BridgeTowerForImageAndTextRetrieval, cfg).save_pretrained(str(folder))
    save_tokenizer(folder)
    BridgeTowerProcessor(
        BridgeTowerImageProcessor(), RobertaTokenizerFast.from_pretrained(str(folder))
    ).save_pretrained(str(folder))
    return {"model": "narrow", "hidden": hidden, "layers": "12 text + 12 vision, 6 cross", "image_size": 288}


def make_pairs(root: Path, n_pairs: int, n_images: int) -> Path:
    from fixtures_saved_model import photo, sentences

    imgs = root / "imgs"
    imgs.mkdir(exist_ok=True)
    for i in range(n_images):
        p = imgs / f"{i}.jpg"
        if not p.exists():
            photo(640, 480, i).save(p, quality=90)
    texts = sentences(n_pairs // n_images + 1, seed=7, min_words=8, max_words=14)
    path = root / f"pairs_{n_pairs}.jsonl"
    with open(path, "w") as f:
        k = 0
        for t in texts:
            for i in range(n_images):
                if k == n_pairs:
                    break
                f.write(json.dumps({"image": f"{i}.jpg", "text": t, "id": k}) + "\n")
                k += 1
    return path


class Watcher:
    """Notes when each chunk / part file of a running job appears (polled every 10 ms) and its rows, for the
    steady rate: rows after the first file / time from the first file to the last. The single-process scorer
    renames its Parquet chunks into OUT.btfast-parts/ (joined and removed at the end); `--ray` renames its
    parts into the output folder. Both are complete when they appear."""

    def __init__(self, pattern: str) -> None:
        import threading

        self.pattern, self.seen, self.stop = pattern, {}, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import glob

        import pyarrow.parquet as pq

        while not self.stop.is_set():
            for p in glob.glob(self.pattern):
                if p not in self.seen:
                    try:
                        self.seen[p] = (time.perf_counter(), pq.read_metadata(p).num_rows)
                    except OSError:  # removed by the join at the end
                        pass
            time.sleep(0.01)

    def rate(self) -> tuple[float, float]:
        """(steady rows/s, time of the first file): the rows landing more than 0.25 s after the first file, over
        the time from the first file to the last."""
        self.stop.set()
        self.thread.join()
        marks = sorted(self.seen.values())
        if len(marks) < 2:
            return float("nan"), float("nan")
        # Ray returns a block's rows together: files landing within 0.25 s of the first are its first burst
        t0 = marks[0][0]
        later = [(t, n) for t, n in marks if t > t0 + 0.25]
        if not later:
            return float("nan"), t0
        return sum(n for _, n in later) / (later[-1][0] - t0), t0


def timed(job: Any, argv: list[str], pattern: str) -> dict:
    t0 = time.perf_counter()
    w = Watcher(pattern)
    rc = job(argv)
    took = time.perf_counter() - t0
    steady, first = w.rate()
    if rc not in (0, 3):
        raise SystemExit(f"{' '.join(argv)} failed with {rc}")
    return {"wall_s": took, "steady_rows_per_s": steady, "first_file_s": first - t0}


def single_job(argv: list[str]) -> int:
    from btfast.cli import main

    return main(argv)


def ray_job(argv: list[str]) -> int:
    from btfast.ray.cli import main as ray_main

    return ray_main(argv)


def versions() -> dict:
    import pyarrow
    import ray
    import torch
    import transformers

    import btfast

    try:
        git = ["git", "-C", str(REPO)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        changed = subprocess.run(
            [*git, "status", "--porcelain", "--", "btfast", "bench/ray_bench.py"], capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit, changed = None, None
    return {
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "ray": ray.__version__,
            "pyarrow": pyarrow.__version__,
            "btfast": btfast.__version__,
        },
        "commit": commit,
        "uncommitted_changes": None if changed is None else bool(changed),
        "host": {
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
    }


def bench_model(kind: str, n: int, work: Path, batch: int | None, repeats: int) -> dict:
    import torch

    folder = work / f"model_{kind}"
    info = make_model(kind, folder)
    n_images = max(1, n // 4)
    chunk_rows = max(8, min(256, 3 * n // 24))  # at least ~24 chunks / parts in the 3N run: a steady rate to measure
    small, large = make_pairs(work, n, n_images), make_pairs(work, 3 * n, 3 * n_images)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    common = [
        "--no-progress",
        "--model",
        str(folder),
        "--image-root",
        str(work / "imgs"),
        "--chunk-rows",
        str(chunk_rows),
        "--chunk-images",
        str(chunk_rows // 4),
        "--device",
        device,
    ]
    if batch:
        common += ["--batch-size", str(batch)]
    systems = {"single-process": single_job, "ray": ray_job}
    runs: dict[str, dict[int, dict]] = {s: {} for s in systems}
    # one untimed pass at N (file caches, the Ray instance's first worker processes), then `repeats` timed passes
    plan = [(0, n, small)]
    plan += [(rep, size, pairs) for rep in range(1, repeats + 1) for size, pairs in ((n, small), (3 * n, large))]
    for rep, size, pairs in plan:
        for name, job in systems.items():
            out = work / f"out_{name}_{size}"
            shutil.rmtree(out, ignore_errors=True)
            if name == "ray":
                target, pattern = str(out), str(out / "part-*.parquet")
            else:
                target, pattern = f"{out}.parquet", f"{out}.parquet.btfast-parts/part-*.parquet"
            r = timed(job, ["score", *common, "--pairs", str(pairs), "--out", target, "--overwrite"], pattern)
            note = "  (warm-up)" if rep == 0 else ""
            print(
                f"  {kind:6s} {name:15s} {size:5d} pairs: {r['wall_s']:6.2f} s, steady "
                f"{r['steady_rows_per_s']:8.1f} rows/s, first file at {r['first_file_s']:5.2f} s{note}",
                file=sys.stderr,
            )
            if rep > 0 and (size not in runs[name] or r["wall_s"] < runs[name][size]["wall_s"]):
                runs[name][size] = r
    res: dict = {
        **info,
        "device": device,
        "pairs": [n, 3 * n],
        "images": [n_images, 3 * n_images],
        "texts_per_image": 4,
        "batch_size": batch or (64 if device == "cuda" else 16),
        "chunk_rows": chunk_rows,
        "repeats": repeats,
    }
    for name, by_size in runs.items():
        big = by_size[3 * n]
        res[name] = {
            "wall_s": {str(k): round(v["wall_s"], 3) for k, v in by_size.items()},
            "rows_per_s_end_to_end": {str(k): round(k / v["wall_s"], 2) for k, v in by_size.items()},
            "rows_per_s_steady": round(big["steady_rows_per_s"], 2),
            "first_file_s": round(big["first_file_s"], 2),
            "fixed_s": round(big["wall_s"] - 3 * n / big["steady_rows_per_s"], 2),
        }
    sp, ry = res["single-process"], res["ray"]
    res["ratio_ray_over_single"] = {
        "end_to_end": round(ry["rows_per_s_end_to_end"][str(3 * n)] / sp["rows_per_s_end_to_end"][str(3 * n)], 3),
        "steady": round(ry["rows_per_s_steady"] / sp["rows_per_s_steady"], 3),
    }
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["tiny", "narrow", "both"], default="both")
    ap.add_argument("--pairs", type=int, default=None, help="N (default: 2048 tiny, 192 narrow on CPU)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=1, help="timed passes per system and size (best kept)")
    ap.add_argument("--out-dir", default=str(RESULTS))
    args = ap.parse_args()

    import logging

    import ray
    import torch

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t0 = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    ray_init_s = time.perf_counter() - t0
    device = "gpu" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="btfast-raybench-"))
    date = dt.date.today().isoformat()
    written = []
    try:
        for kind in ["tiny", "narrow"] if args.model == "both" else [args.model]:
            n = args.pairs or {"tiny": 2048, "narrow": 192 if device == "cpu" else 1024}[kind]
            load_before = round(os.getloadavg()[0], 2)  # other processes on a shared machine skew both systems
            res = bench_model(kind, n, work, args.batch_size, args.repeats)
            doc = {
                "what": "btfast score --ray (Ray Data: decode tasks + model actor pool + part writer) vs "
                "btfast score (one process + decode workers), same input, end to end",
                "note": "steady = rows/s between the first and last chunk/part file of the 3N run. Ray's decode "
                "tasks start with the job and run ahead while the actor starts, so on a small input its steady "
                "rate is the model actor's; end_to_end includes every fixed cost. Other processes on a shared "
                "machine slow both systems: see load_average_1m_before_after.",
                "date": date,
                **versions(),
                "ray_init_s": round(ray_init_s, 2),
                "load_average_1m_before_after": [load_before, round(os.getloadavg()[0], 2)],
                "ray_cluster": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")},
                **res,
            }
            path = Path(args.out_dir) / f"{date}-{device}-ray-{kind}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(doc, indent=1) + "\n")
            written.append(path)
            sp, ry = res["single-process"], res["ray"]
            print(
                f"{kind}: single-process {sp['rows_per_s_steady']} rows/s steady (fixed {sp['fixed_s']} s), "
                f"ray {ry['rows_per_s_steady']} rows/s steady (fixed {ry['fixed_s']} s); ratio "
                f"{res['ratio_ray_over_single']} -> {path}"
            )
    finally:
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
