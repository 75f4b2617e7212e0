"""`btfast bench`: throughput, latency, memory, MFU and accuracy of btfast against transformers, in one run.

With no arguments: the main job, the real bridgetower-base architecture (random weights), HF eager and btfast
on the same batch on the local device, printing pairs/s of both, the ratio and the ITM logits' max relative
difference. `--quick` and `--preset gpu` run the full comparison and write JSON / Markdown / PNG reports.
Heavy imports (torch, transformers) happen inside `run`, so `btfast --help` stays fast.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Any

from btfast.cli import add_flags, flag

DEFAULT_OUT = "bench/results"

EPILOG = """\
systems (--systems, comma list): hf-eager-<dtype> (transformers, eager attention), hf-compile-<dtype>
(torch.compile(hf_model, mode=max-autotune, dynamic=False)), btfast-<dtype> (btfast.optimize with its
defaults), btfast-torch-<dtype> (kernels=False), btfast-triton-<dtype> (kernels="all"); <dtype> is fp32, bf16 or
fp16. A bare hf-eager / hf-compile / btfast means <dtype> = --dtype;
`all` = hf-eager-fp32, hf-eager-D, btfast-fp32, btfast-D, hf-compile-D (D = --dtype).
hf-eager-fp32 is the accuracy reference (computed untimed when not among the systems).

presets (explicit options override them):
  (none)      base; hf-eager and btfast in --dtype (default fp32 on CPU, bf16 on CUDA); CPU: batch 2, 3 timed
              calls; CUDA: batch 64, 20 calls; text 40. Prints the figures; writes files only with --out.
  --quick     base; all systems; CPU: batch 1,2, text 40, 2 calls, budget 270 s (hf-compile skipped on CPU:
              max-autotune compiles for minutes there); CUDA: batch 1,8,32,128, text 16/40/64.
              Writes bench/results/<date>-<device>-quick.{json,md,png}.
  --preset headline  the first GPU call (bench/gpu.sh): smoke checks, then base, --dtype (bf16), text 40, batch
              128 and 1: hf-eager, hf-compile (batch 128 only), btfast, btfast-torch, btfast-triton; a profiler
              split of btfast at batch 128; each btfast system's kernel race. Writes <date>-<device>-headline.*
  --preset gpu  base and large; all systems; text 40 at batch 1..256, text 16 / 64 at a few batches, 512
              as a stress case; hf-compile at a few cells only; all pairs 64 x 64 (base, text 40, 64 per call,
              75 s of the budget kept for it); budget 290 s. Writes <date>-<device>-gpu.*
  --quick also runs all pairs, 2 x 2 on CPU (150 s of its budget kept for it) and 16 x 16 on CUDA (30 s), base.

all pairs (--all-pairs N,M): N images x M texts, every pair scored by hf-eager-D and btfast-D pair by pair
(N*M rows through the forward) and btfast-dedup-D (N images and M texts encoded once, then all N*M pairs
fused); pairs/s, dedup's speed-up over both, and each one's max |ITM logit - hf-eager-fp32| on all pairs.
Skipped, with the reason printed, when the time budget left cannot fit it.

figures: pairs/s (batch / median latency), p50 / p99 latency, first-call time (compile etc.), peak device
memory, MFU against the GEMM peak of the system's dtype measured in the same run (only the dtypes the run
uses are timed), max error of the ITM logits against hf-eager-fp32.

bf16 / fp16 on a CPU without units for them (torch capability below AVX512, or no avx512_bf16 / amx_bf16 /
avx512_fp16 / amx_fp16 flag) are emulated, ~20x slower than fp32: systems in such a dtype are skipped, with
the reason printed, unless asked for by --dtype or --systems (then they run and the report says emulated).
Exit status: 0 when something was measured, 1 otherwise, 2 bad arguments.
"""


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _all_pairs(text: str) -> tuple[int, int] | None:
    from btfast.benchmark.all_pairs import parse

    try:
        return parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _models(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in ("tiny", "base", "large")]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"models are base, large or tiny (comma list); got {text!r}")
    return names


RUN, MEASURE, OUT = "what to run", "how to measure", "presets and output"

# One row a flag, in help order (see btfast.cli.flag); laid out by hand, a flag a row.
# fmt: off
FLAGS = [
    flag(RUN, "--mode", choices=["e2e", "kernels", "all-pairs"], default="e2e", help="e2e: systems on (model, text, "
         "batch) cells (default); kernels: each Triton kernel against its torch path at the model's shapes, the "
         "kernel race's cases (--model, first --batch-sizes (32), first --text-lengths (40), --dtype; needs CUDA or "
         "TRITON_INTERPRET=1); all-pairs: only the all-pairs scenario"),
    flag(RUN, "--model", type=_models, metavar="base|large|tiny", help="architecture(s), random weights: base = "
         "bridgetower-base (768 hidden, 288 px), large = bridgetower-large (1024, 294 px), tiny = a small test "
         "model; a comma list runs each (default: base; --preset gpu: base,large)"),
    flag(RUN, "--systems", metavar="LIST",
         help="comma list of systems to compare, see below (default: hf-eager,btfast; presets: all)"),
    flag(RUN, "--batch-sizes", type=_ints, metavar="N,N,...",
         help="pairs per call, e.g. 1,8,64,256 (default: 4 on CPU / 64 on CUDA; presets: their sweep)"),
    flag(RUN, "--text-lengths", type=_ints, metavar="L,L,...",
         help="text tokens per pair (every text exactly this long), e.g. 16,40,64,512 (default: 40; tiny: 16)"),
    flag(RUN, "--all-pairs", type=_all_pairs, default=False, metavar="N,M", help="also score N images x M texts, "
         "every pair: HF eager and btfast pair by pair (N*M rows through the forward) against btfast-dedup (each "
         "image and text encoded once, all pairs fused), at the first text length, the largest batch size as rows "
         "per call, in --dtype, after every cell; `off` runs none (default: none; --quick: 2,2 on CPU, 16,16 on "
         "CUDA; --preset gpu: 64,64 on base at text 40)"),
    flag(RUN, "--dtype", choices=["bf16", "fp16", "fp32"], help="reduced precision of the comparison (hf-eager-D, "
         "btfast-D, hf-compile-D); with no preset the dtype HF eager and btfast both run in (default: fp32 on CPU, "
         "bf16 on CUDA; presets: bf16)"),
    flag(RUN, "--device", metavar="cpu|cuda[:N]", help="where to run (default: cuda if available, else cpu)"),
    flag(MEASURE, "--repeats", type=int, metavar="N", help="timed calls per cell; pairs/s uses their median "
         "(default: 3 on CPU, 20 on CUDA; presets: their own)"),
    flag(MEASURE, "--warmup", type=int, metavar="N", help="untimed calls before timing; the first is reported as "
         "first-call time (default: 1 on CPU, 3 on CUDA; hf-compile at least 3)"),
    flag(MEASURE, "--cell-seconds", type=float, metavar="S",
         help="stop a cell's timed calls after S seconds once 3 ran (default: none; --preset gpu: 2)"),
    flag(MEASURE, "--budget", type=float, metavar="SECONDS", help="time budget of the whole run, shared out between "
         "systems as they start; cells that would overrun are skipped with the reason printed (default: none; "
         "--quick: 240 on CPU, 240 on CUDA; --preset gpu: 290)"),
    flag(MEASURE, "--compile-mode", default="max-autotune",
         choices=["max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead", "default"],
         help="torch.compile mode of the hf-compile systems (default: max-autotune)"),
    flag(MEASURE, "--compile-backend", default="inductor", metavar="NAME", help="torch.compile backend of the "
         "hf-compile systems (default: inductor; `eager` only traces, as CI's dry runs do)"),
    flag(MEASURE, "--threads", type=int, metavar="N", help="CPU threads for torch (default: torch's, one per core). "
         "On a machine shared with other work, 1 is steadier: a multi-threaded op waits for its slowest thread"),
    flag(MEASURE, "--seed", type=int, default=0, help="seed of the random weights and inputs (default: 0)"),
    flag(OUT, "--quick", action="store_true",
         help="the full comparison at a few sizes: under 5 minutes on a 2-core CPU; writes reports"),
    flag(OUT, "--preset", choices=["headline", "gpu", "quick"], help="headline: the first GPU call (smoke checks; "
         "base, bf16, text 40, batch 1 and 128: hf-eager, hf-compile at 128, btfast default / kernels=False / "
         "kernels='all'; a profile of btfast at 128; the kernel race's verdicts), about 4 minutes; gpu: the full "
         "GPU sweep (base and large, batch 1..256, text 16/40/64 and 512), about 5 minutes on an H100; quick: same "
         "as --quick"),
    flag(OUT, "--out", metavar="DIR", help=f"write <date>-<device>-<preset>.json / .md / .png there (default with a "
         f"preset: {DEFAULT_OUT}; without one: no files)"),
    flag(OUT, "--no-plot", action="store_true", help="do not write the PNG plot"),
    flag(OUT, "--no-progress", action="store_true", help="no live progress display (the summary still prints)"),
]
# fmt: on


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    add_flags(parser, FLAGS)


def _cells(models: list[str], texts: list[int], batches: list[int]) -> list[Any]:
    from btfast.benchmark.runner import Cell

    return [Cell(m, t, b) for m in models for t in texts for b in batches]


def build_plan(args: argparse.Namespace) -> Any:
    """Turn the arguments (and the preset they name) into a runner.Plan; raises ValueError on bad combinations."""
    import torch

    from btfast.benchmark.device import emulated_reason, native
    from btfast.benchmark.runner import Cell, Plan
    from btfast.benchmark.systems import comparison, parse_systems

    preset = "quick" if args.quick else args.preset
    if args.quick and args.preset not in (None, "quick"):
        raise ValueError("--quick and --preset gpu are different presets: pick one")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {args.device!r}")
    cuda = device.type == "cuda"
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError("--threads must be ≥ 1")
        torch.set_num_threads(args.threads)
    models = args.model or (["base", "large"] if preset == "gpu" else ["base"])
    notes: list[str] = []
    if args.mode != "e2e":
        if preset is not None:
            raise ValueError(f"--mode {args.mode} runs alone: drop --quick / --preset")
        return _mode_plan(args, device, models)

    if preset is None:
        low = args.dtype or ("bf16" if cuda else "fp32")
        systems = parse_systems(args.systems or f"hf-eager-{low},btfast-{low}", low)
        batches, warmup, repeats = ([64], 3, 20) if cuda else ([2], 1, 3)
        budget, cell_s = None, None
        texts = [16] if models == ["tiny"] else [40]
        label = "default"
    else:
        low = args.dtype or "bf16"
        systems = parse_systems(args.systems, low) if args.systems else comparison(low)
        texts = [16] if models == ["tiny"] else [16, 40, 64] if cuda and preset == "quick" else [40]
        if preset == "headline":
            names = ["hf-eager", "hf-compile", "btfast", "btfast-torch", "btfast-triton"]
            systems = parse_systems(args.systems or ",".join(names), low)
            batches = [1, 128]
            warmup, repeats, budget, cell_s = (3, 20, None, 2.0) if cuda else (1, 3, None, None)
        elif preset == "quick":
            batches = [1, 8, 32, 128] if cuda else [1, 2]
            warmup, repeats, budget, cell_s = (3, 10, 240.0, 2.0) if cuda else (1, 2, 270.0, None)
        else:
            batches = [1, 2, 4, 8, 16, 32, 64, 128, 256]
            warmup, repeats, budget, cell_s = 2, 10, 290.0, 2.0
        label = preset

    batches = args.batch_sizes or batches
    warmup = args.warmup if args.warmup is not None else warmup
    repeats = args.repeats if args.repeats is not None else repeats
    budget = args.budget if args.budget is not None else budget
    cell_s = args.cell_seconds if args.cell_seconds is not None else cell_s
    if repeats < 1 or warmup < 0:
        raise ValueError("--repeats must be ≥ 1 and --warmup ≥ 0")

    emulated = {} if cuda else {d: emulated_reason(d) for d in ("bf16", "fp16") if not native(device, d)}
    asked = {args.dtype or low} if args.dtype or preset == "headline" else set()  # asked for by name: runs
    pairs_dtype = low
    if low in emulated and low not in asked and not args.systems:
        pairs_dtype = "fp32"
    spec = _all_pairs_spec(args, preset, cuda, models, args.text_lengths or texts, batches, pairs_dtype, budget)
    if spec is not None and spec.reserve_s:
        notes.append(
            f"all pairs ({spec.images} x {spec.texts}) runs after every cell; {spec.reserve_s:.0f}s of the "
            f"{budget:.0f}s budget are kept from the cells for it"
        )

    only: dict[str, tuple[set[Any], str]] = {}
    if preset == "gpu" and args.batch_sizes is None and args.text_lengths is None:
        cells = []
        for m in models:
            main = [1, 2, 4, 8, 16, 32, 64, 128, 256] if m != "large" else [1, 4, 16, 64, 256]
            cells += [Cell(m, 40, b) for b in main]
            cells += [Cell(m, t, b) for t in (16, 64) for b in ([1, 16, 64, 256] if m != "large" else [16, 256])]
            cells += [Cell(m, 512, b) for b in ([1, 8, 32] if m != "large" else [8])]
        compile_cells = {Cell(m, 40, b) for m in models for b in ([8, 64] if m != "large" else [64])}
        for s in systems:
            if s.compiles:
                only[s.name] = (
                    compile_cells,
                    "hf-compile runs at a few cells only: max-autotune compiles and autotunes every shape anew "
                    "(minutes each)",
                )
        notes.append("text 512 is a stress case (the position table's limit), at a few batch sizes")
    elif preset == "headline":
        cells = _cells(models, args.text_lengths or texts, batches)
        top = {c for c in cells if c.batch == max(batches)}
        for s in systems:
            if s.compiles:
                only[s.name] = (top, f"hf-compile runs at batch {max(batches)} in this call (max-autotune compiles "
                                "every shape anew); batch 1 runs in the second call (bench/gpu.sh sweep)")  # fmt: skip
    elif preset == "quick" and cuda and args.batch_sizes is None and args.text_lengths is None and models != ["tiny"]:
        cells = [Cell(m, 40, b) for m in models for b in batches]
        cells += [Cell(m, t, 32) for m in models for t in (16, 64)]
        compile_cells = {Cell(m, 40, 32) for m in models}
        for s in systems:
            if s.compiles:
                only[s.name] = (compile_cells, "hf-compile runs at one cell in --quick (compile time)")
    else:
        cells = _cells(models, args.text_lengths or texts, batches)

    skip: dict[str, str] = {}
    explicit = bool(args.systems)
    for s in systems:
        if s.dtype_name in emulated and s.dtype_name not in asked and not explicit:
            skip[s.name] = f"{emulated[s.dtype_name]}; ask for it with --dtype {s.dtype_name} or --systems to run it"
        elif (
            s.compiles
            and not cuda
            and preset in ("quick", "headline")
            and not explicit
            and args.compile_backend == "inductor"
        ):
            skip[s.name] = (
                f"torch.compile(mode={args.compile_mode!r}) on CPU autotunes every GEMM with inductor's C++ "
                "backend on the CPU's cores: a trial on a 2-core CPU took over 2 minutes for the tiny "
                "model alone, past this preset's time; ask for it with --systems (and a --budget) to include it"
            )
    if spec is not None and spec.dtype != low:
        notes.append(f"all pairs runs in fp32, not {low}: {emulated[low]}")
    for d in sorted({s.dtype_name for s in systems if s.name not in skip} & set(emulated)):
        notes.append(f"{d} runs as asked, emulated: {emulated[d]}")
    if not cuda:
        n = torch.get_num_threads()
        notes.append(f"CPU run: {n} thread{'s' if n != 1 else ''}")
    return Plan(
        cells=cells,
        systems=systems,
        device=device,
        warmup=warmup,
        repeats=repeats,
        cell_seconds=cell_s,
        budget_s=budget,
        compile_mode=args.compile_mode,
        compile_backend=args.compile_backend,
        smoke=low if preset == "headline" else None,
        profile=next((s.name for s in systems if s.impl == "btfast"), None) if preset == "headline" else None,
        seed=args.seed,
        preset=label,
        skip=skip,
        only=only,
        notes=notes,
        all_pairs=spec,
    )


def _mode_plan(args: argparse.Namespace, device: Any, models: list[str]) -> Any:
    """The plan of --mode kernels or --mode all-pairs: no cells, only that measurement."""
    import os

    from btfast.benchmark.all_pairs import AllPairs
    from btfast.benchmark.runner import Plan

    cuda = device.type == "cuda"
    low = args.dtype or ("bf16" if cuda else "fp32")
    batch = (args.batch_sizes or [32 if cuda else 2])[0]
    text_len = (args.text_lengths or [16 if models == ["tiny"] else 40])[0]
    plan = Plan(cells=[], systems=[], device=device, warmup=args.warmup or 1, repeats=args.repeats or 3,
                seed=args.seed, preset=args.mode)  # fmt: skip
    if args.mode == "kernels":
        if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("--mode kernels times the Triton kernels: it needs CUDA (or TRITON_INTERPRET=1 to check "
                             "the plumbing on CPU)")  # fmt: skip
        plan.kernels = (models[0], batch, text_len, low)
    else:
        images, texts = args.all_pairs or ((16, 16) if cuda else (2, 2))
        plan.all_pairs = AllPairs(images, texts, text_len, batch, low, models)
    return plan


def _all_pairs_spec(
    args: argparse.Namespace,
    preset: str | None,
    cuda: bool,
    models: list[str],
    texts: list[int],
    batches: list[int],
    low: str,
    budget: float | None,
) -> Any:
    """The all-pairs scenario asked for (--all-pairs), or the preset's own; None for none."""
    from btfast.benchmark.all_pairs import AllPairs

    asked = args.all_pairs  # False: not given; None: off; (N, M)
    if asked is None or (asked is False and preset in (None, "headline")):
        return None
    text_len, batch, on = texts[0], max(batches), list(models)
    if preset == "gpu":
        size, reserve = (64, 64), 75.0
        if args.text_lengths is None:
            text_len = 40
        if args.batch_sizes is None:
            batch = 64
        on = ["base"] if "base" in models else models[:1]
    elif preset == "quick":
        size, reserve = ((16, 16), 30.0) if cuda else ((2, 2), 150.0)
        if args.batch_sizes is None:
            batch = 32 if cuda else max(batches)
        on = ["base"] if "base" in models else models[:1]
    else:
        size, reserve = (1, 1), 0.25 * (budget or 0.0)
    if asked is not False:
        size = asked
    return AllPairs(size[0], size[1], text_len, batch, low, on, reserve if budget is not None else 0.0)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    try:
        plan = build_plan(args)
    except ValueError as e:
        print(f"btfast bench: {e}", file=sys.stderr)
        return 2

    from btfast.benchmark import report
    from btfast.benchmark.device import device_name
    from btfast.benchmark.progress import Progress
    from btfast.benchmark.runner import Runner

    cells = plan.cells
    texts = sorted({c.text_len for c in cells})
    batches = sorted({c.batch for c in cells})
    print(f"btfast bench ({plan.preset}) on {device_name(plan.device)}", flush=True)
    if plan.kernels is not None:
        print(f"  kernels against torch at {plan.kernels[0]}'s shapes, batch {plan.kernels[1]}, text "
              f"{plan.kernels[2]}, {plan.kernels[3]}", flush=True)  # fmt: skip
    if cells:
        print(
            f"  {', '.join(plan.models())} architecture(s), random weights; systems: "
            f"{', '.join(s.name for s in plan.systems)}\n  {len(cells)} cell(s): text {','.join(map(str, texts))} x "
            f"batch {','.join(map(str, batches))}; {plan.warmup} warmup + up to {plan.repeats} timed call(s) per cell"
            + (f"; budget {plan.budget_s:.0f} s" if plan.budget_s else ""),
            flush=True,
        )
    ap = plan.all_pairs
    if ap is not None:
        print(
            f"  all pairs: {ap.images} images x {ap.texts} texts ({ap.pairs} pairs) on {', '.join(ap.models)}, text "
            f"{ap.text_len}, {ap.batch} per call, {ap.dtype}: {', '.join(ap.system_names())}",
            flush=True,
        )
    for note in plan.notes:
        print(f"  note: {note}", flush=True)
    for name, why in plan.skip.items():
        print(f"  skipped: {name}: {why}", flush=True)
    extra = 0 if ap is None else 3 * len(ap.models)
    progress = Progress(total=len(cells) * len(plan.systems) + extra, enabled=not args.no_progress)
    runner = Runner(plan, progress)
    interrupted = False
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `timeout` sends SIGTERM: keep what was measured
    try:
        results = runner.run()
    except KeyboardInterrupt:
        interrupted = True
        print("\nbtfast bench: interrupted; writing what was measured so far", file=sys.stderr, flush=True)
        results = runner.snapshot(interrupted=True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        progress.close()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the report short
    try:
        print(report.summary(results))
        if plan.preset == "default":
            _print_main_job(results)
        preset = plan.preset if plan.preset != "default" else None
        out = args.out or (DEFAULT_OUT if preset else None)
        if out:
            written = report.write_all(results, Path(out), plot=not args.no_plot)
            for kind, where in written.items():
                print(f"  {kind}: {where}")
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        return 130
    measured = [r["status"] == "ok" for r in results["results"] + results.get("all_pairs", [])]
    return 0 if any(measured) or results["kernels"] else 1


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _print_main_job(results: dict[str, Any]) -> None:
    """The README's main job: for each cell, btfast ÷ HF eager and the ITM logits' max relative difference."""
    rows = [r for r in results["results"] if r["status"] == "ok"]
    for r in rows:
        if not r["impl"].startswith("btfast"):
            continue
        hf = next(
            (
                h
                for h in rows
                if h["impl"] == "hf-eager"
                and h["dtype"] == r["dtype"]
                and (h["model"], h["text_len"], h["batch"]) == (r["model"], r["text_len"], r["batch"])
            ),
            None,
        )
        if hf is None:
            continue
        diff = r.get("rel_diff_vs_hf_eager")
        print(
            f"{r['model']}, batch {r['batch']} x text {r['text_len']}, {r['dtype']}: btfast {r['pairs_per_s']:.4g} "
            f"pairs/s, HF eager {hf['pairs_per_s']:.4g} pairs/s: {r['pairs_per_s'] / hf['pairs_per_s']:.2f}x; "
            f"ITM logits max relative difference (max|btfast - HF| / max|HF|): "
            + ("n/a" if diff is None else f"{diff:.2e}")
        )
