"""Is torch.compile worth turning on by default off CUDA? Times btfast eager vs btfast + inductor on CPU.

Writes a JSON to --out with versions, commit, the compile cost and median latencies from one run.
Run: .venv/bin/python bench/cpu_compile_check.py --out bench/results/<date>-cpu-compile-check.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time

import torch
import transformers
from transformers import BridgeTowerForImageAndTextRetrieval

import btfast
from btfast.testing import base_config, build, random_inputs, tiny_config


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", choices=["tiny", "base"], default="base")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--text-len", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cfg = base_config() if args.model == "base" else tiny_config()
    x = random_inputs(cfg, batch=args.batch, seq_len=args.text_len)
    result = {
        "what": "btfast eager vs btfast + torch.compile (inductor) on CPU, same inputs, one run",
        "device": platform.processor() or platform.machine(),
        "cpus": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "model": args.model,
        "batch": args.batch,
        "text_len": args.text_len,
        "repeats": args.repeats,
    }
    systems = {"btfast-eager": dict(compile=False), "btfast-inductor": dict(compile=True)}
    for name, opts in systems.items():
        fast = btfast.optimize(build(BridgeTowerForImageAndTextRetrieval, cfg), **opts)
        start = time.perf_counter()
        fast(**x)
        result[f"{name}_first_call_s"] = round(time.perf_counter() - start, 2)
        result[f"{name}_median_ms"] = round(_median_ms(lambda f=fast: f(**x), args.repeats), 2)
        print(name, result[f"{name}_first_call_s"], result[f"{name}_median_ms"], flush=True)
    result["speedup_inductor_over_eager"] = round(
        result["btfast-eager_median_ms"] / result["btfast-inductor_median_ms"], 3
    )
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
