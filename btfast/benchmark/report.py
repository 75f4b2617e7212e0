"""Write a run's results: JSON (every figure and where it came from), a Markdown table and a PNG plot.

Every writer takes the dict `runner.run_plan` returns; nothing here measures anything.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from btfast.benchmark import kernels
from btfast.benchmark.progress import duration

SCHEMA = 1


def stem(results: dict[str, Any]) -> str:
    """File name stem: <date>-<device>-<preset>, e.g. 2026-11-27-cpu-quick."""
    env = results["environment"]
    return f"{env['date'][:10]}-{env['device_slug']}-{results['plan']['preset']}"


def write_json(results: dict[str, Any], path: Path) -> Path:
    path.write_text(json.dumps({"schema": SCHEMA, **results}, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    return path


def _ok(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in results["results"] if r["status"] == "ok"]


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "—"
    if x == 0:
        return "0"
    if abs(x) >= 10 ** (digits + 1) or abs(x) < 10 ** -(digits - 1):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _speedups(results: dict[str, Any]) -> dict[tuple[str, int, int, str], float]:
    """pairs/s of each row ÷ that of hf-eager in the same dtype on the same cell."""
    rows = _ok(results)
    eager = {
        (r["model"], r["text_len"], r["batch"], r["dtype"]): r["pairs_per_s"] for r in rows if r["impl"] == "hf-eager"
    }
    out = {}
    for r in rows:
        base = eager.get((r["model"], r["text_len"], r["batch"], r["dtype"]))
        if base:
            out[(r["model"], r["text_len"], r["batch"], r["system"])] = r["pairs_per_s"] / base
    return out


def _compact(values: list[int]) -> str:
    return ",".join(str(v) for v in sorted(set(values)))


def markdown(results: dict[str, Any]) -> str:
    env, plan, peaks = results["environment"], results["plan"], results["gemm_peaks"]
    systems = plan["systems"]
    rows = _ok(results)
    speed = _speedups(results)
    commit = (env.get("commit") or "unknown")[:12] + (" (+ uncommitted changes)" if env.get("commit_dirty") else "")
    lines = [
        f"# btfast benchmark ({plan['preset']}): {env['date'][:10]}, {env['device']}",
        "",
        f"commit `{commit}`; torch {env['torch']}, triton {env['triton']}, transformers {env['transformers']}, "
        f"btfast {env['btfast']}, Python {env['python']}"
        + (f", CUDA {env['cuda']}, TF32 matmul {'on' if env.get('tf32_matmul') else 'off'}" if env.get("cuda") else "")
        + f"; {env['cpu_threads']} CPU thread{'s' if env['cpu_threads'] != 1 else ''}"
        + (f", load average {env['load_average']} at the start" if env.get("load_average") else "")
        + (f", {env['load_average_end']} at the end" if env.get("load_average_end") else "")
        + f". Run took {results['wall_s']:.0f} s.",
        "",
        "- Models: the real BridgeTower ITM architectures with random weights "
        "(`btfast.testing`); inputs: texts of exactly the stated length, random pixels; the same inputs for every "
        "system (batch B = the first B rows of one batch).",
        f"- Timing: per cell {plan['warmup']} warmup call(s) (the first one reported as *first call*: compile, "
        f"autotune, graph capture), then up to {plan['repeats']} timed calls"
        + (f" (stopping after {plan['cell_seconds']:g} s once 3 ran)" if plan.get("cell_seconds") else "")
        + ", each timed alone ("
        + ("CUDA events after a synchronize" if env["device_type"] == "cuda" else "`time.perf_counter`")
        + "). pairs/s = batch ÷ median latency; p50 / p99 over the timed calls (few calls: p99 ≈ the slowest).",
        "- Order: all systems loaded together, their timed calls interleaved round by round (one call of each "
        "system per round), so every system sees the same machine load. Build time (model copy, optimize() with its "
        "kernel race) is reported apart and not counted by --budget.",
        "- MFU = FLOPs per pair (from the config, `btfast/benchmark/flops.py`) × pairs/s ÷ the GEMM peak of the "
        "system's dtype measured in this run: "
        + "; ".join(f"**{p['flops_per_s'] / 1e12:.3g} TFLOP/s** ({p['note']})" for p in peaks.values())
        + ".",
        "- Max error: largest |ITM logit − reference| over the batch; the reference is hf-eager-fp32 on the same "
        "inputs; rel = ÷ the largest |reference logit|. × HF = pairs/s ÷ hf-eager's in the same dtype.",
        "- Peak memory: the system's weights (parameters and buffers) + the most memory one timed call added over "
        "what was in use before it ("
        + ("`torch.cuda.max_memory_allocated`" if env["device_type"] == "cuda" else "peak RSS, VmHWM")
        + ").",
    ]
    if plan.get("notes"):
        lines += [f"- {n}" for n in plan["notes"]]
    flops = results["flops_per_pair"]
    lines += [
        "",
        "FLOPs per pair (GEMMs and attention products, 2 per multiply-add): "
        + "; ".join(f"{k.replace('/', ', text ')}: {v['total'] / 1e9:.4g} GFLOP" for k, v in flops.items()),
    ]

    # pivot tables: pairs/s by batch size, one column per system, one table per (model, text length)
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["model"], r["text_len"])].append(r)
    ratio_cols = [(s, "hf-eager-" + s.split("-", 1)[1]) for s in systems if s.startswith("btfast-")]
    ratio_cols = [(s, h) for s, h in ratio_cols if h in systems]
    for (model, length), grp in sorted(groups.items()):
        present = [s for s in systems if any(r["system"] == s for r in grp)]
        cols = present + [f"{s} ÷ {h}" for s, h in ratio_cols if s in present and h in present]
        lines += ["", f"## pairs/s: {model}, text {length} tokens", ""]
        lines += ["| batch | " + " | ".join(cols) + " |", "|---:|" + "---:|" * len(cols)]
        by = {(r["batch"], r["system"]): r for r in grp}
        for b in sorted({r["batch"] for r in grp}):
            cells = [_fmt(by[(b, s)]["pairs_per_s"]) if (b, s) in by else "—" for s in present]
            for s, h in ratio_cols:
                if s in present and h in present:
                    ok = (b, s) in by and (b, h) in by
                    cells.append(f"{by[(b, s)]['pairs_per_s'] / by[(b, h)]['pairs_per_s']:.2f}×" if ok else "—")
            lines.append(f"| {b} | " + " | ".join(cells) + " |")

    lines += [
        "",
        "## All figures",
        "",
        "| model | text | batch | system | pairs/s | × HF | p50 ms | p99 ms | first call s | peak mem MiB | MFU "
        "| MFU (published peak) | max abs err | max rel err | runs |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = {s: i for i, s in enumerate(systems)}
    for r in sorted(rows, key=lambda r: (r["model"], r["text_len"], r["batch"], order.get(r["system"], 99))):
        sp = speed.get((r["model"], r["text_len"], r["batch"], r["system"]))
        mem = None if r.get("peak_mem_bytes") is None else r["peak_mem_bytes"] / 2**20
        lines.append(
            f"| {r['model']} | {r['text_len']} | {r['batch']} | {r['system']} | {_fmt(r['pairs_per_s'])} | "
            f"{'—' if sp is None else f'{sp:.2f}×'} | {_fmt(r['p50_ms'])} | {_fmt(r['p99_ms'])} | "
            f"{_fmt(r['first_call_s'])} | {'—' if mem is None else f'{mem:.0f}'} | {100 * r['mfu']:.1f}% | "
            f"{_pct(r.get('mfu_published'))} | "
            f"{_fmt(r.get('max_abs_err'), 2)} | {_fmt(r.get('max_rel_err'), 2)} | {r['repeats']} |"
        )

    lines += all_pairs_markdown(results.get("all_pairs", []))
    lines += _headline(results)
    for entry in results.get("kernels", []):
        lines += kernels.markdown(entry)

    skipped: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in results["results"]:
        if r["status"] != "ok":
            skipped[(r["system"], r["status"], r["reason"] or "")].append(r)
    if skipped:
        lines += ["", "## Not measured", ""]
        for (system, status, reason), rs in skipped.items():
            where = "; ".join(
                f"{m} text {t} batch {_compact([r['batch'] for r in rs if (r['model'], r['text_len']) == (m, t)])}"
                for m, t in sorted({(r["model"], r["text_len"]) for r in rs})
            )
            lines.append(f"- **{system}** ({status}) at {where}: {reason}")

    explain = {k: v for k, v in results["systems"].items() if v.get("explain")}
    if explain:
        lines += ["", "## What each system ran", ""]
        for name, info in explain.items():
            for model, text in info["explain"].items():
                built = info["build_s"].get(model, 0)
                lines += [f"{name} ({model}, built in {built:.1f} s):", "", "```text", text, "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def _headline(results: dict[str, Any]) -> list[str]:
    """The sections of the headline preset: smoke checks, build times, the profile split, the kernel race."""
    lines: list[str] = []
    if results.get("smoke"):
        lines += ["", "## Smoke checks", ""]
        lines += [f"- **{c['check']}**: {c['status']} ({c['detail']}; {c['seconds']:.1f} s)" for c in results["smoke"]]
    systems = results["systems"]
    if systems:
        lines += ["", "## Build time (apart from the steady-state figures)", ""]
        lines += ["| system | model | build s (load, optimize: the kernel race) | first call s per batch |"]
        lines += ["|---|---|---:|---|"]
        for name, info in systems.items():
            for model, built in info["build_s"].items():
                firsts = [r for r in _ok(results) if (r["system"], r["model"]) == (name, model)]
                firsts.sort(key=lambda r: r["batch"])
                first = ", ".join(f"{r['batch']}: {r['first_call_s']:.3g}" for r in firsts)
                lines.append(f"| {name} | {model} | {built:.3g} | {first or '—'} |")
    for key, prof in results.get("profiles", {}).items():
        lines += ["", f"## Where the time goes: {key}, batch {prof['cell']['batch']}", ""]
        if "error" in prof:
            lines.append(f"Not profiled: {prof['error']}")
            continue
        lines += [f"One call, {prof['wall_ms']:.4g} ms wall; {prof['source']}.", "", "| category | ms | share |"]
        lines += ["|---|---:|---:|"]
        lines += [f"| {k} | {v['ms']:.4g} | {_pct(v['share'])} |" for k, v in prof["categories"].items()]
        lines += ["", "| GEMM (M×N×K or kernel) | ms | calls |", "|---|---:|---:|"]
        lines += [f"| {g['what']} | {g['ms']:.4g} | {g['calls']} |" for g in prof["gemm"]]
    for name, info in systems.items():
        for model, race in info.get("race", {}).items():
            lines += ["", f"## Kernel race: {name}, {model}", "", race["note"]]
            if race["laps"]:
                lines += ["", "| op | Triton ms | torch ms | speed-up | serves |", "|---|---:|---:|---:|---|"]
                for op, lap in race["laps"].items():
                    lines.append(f"| {op} | {lap['triton_ms']:.4g} | {lap['torch_ms']:.4g} | {lap['speedup']:.2f}× | "
                                 f"{'Triton' if lap['serves'] else 'torch'} |")  # fmt: skip
            lines += [f"- {op} off: {why}" for op, why in race["off"].items()]
    return lines


def write_markdown(results: dict[str, Any], path: Path) -> Path:
    path.write_text(markdown(results), encoding="utf-8")
    return path


def write_plot(results: dict[str, Any], path: Path) -> Path | None:
    """pairs/s against batch size, one line per system, one panel per (model, text length) with ≥ 2 batch sizes.

    Returns None (and writes nothing) when matplotlib is missing or nothing was measured at two batch sizes.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    rows = _ok(results)
    panels = sorted({(r["model"], r["text_len"]) for r in rows})
    panels = [p for p in panels if len({r["batch"] for r in rows if (r["model"], r["text_len"]) == p}) >= 2] or panels
    if not panels:
        return None
    systems = results["plan"]["systems"]
    ncols = min(3, len(panels))
    nrows = (len(panels) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.9 * nrows), squeeze=False)
    colours = {"hf-eager": "tab:blue", "hf-compile": "tab:orange", "btfast": "tab:red"}
    for ax, (model, length) in zip(axes.flat, panels):
        for s in systems:
            mine = [r for r in rows if (r["model"], r["text_len"], r["system"]) == (model, length, s)]
            if not mine:
                continue
            pts = sorted((r["batch"], r["pairs_per_s"]) for r in mine)
            fp32 = mine[0]["dtype"] == "fp32"
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                marker="s" if fp32 else "o",
                linestyle="--" if fp32 else "-",
                color=colours.get(mine[0]["impl"]),
                label=s,
            )
        ax.set_xscale("log", base=2)
        batches = sorted({r["batch"] for r in rows if (r["model"], r["text_len"]) == (model, length)})
        ax.set_xticks(batches)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_yscale("log")
        ax.set_xlabel("batch size (pairs)")
        ax.set_ylabel("pairs/s (median)")
        ax.set_title(f"{model}, text {length} tokens")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    env = results["environment"]
    fig.suptitle(f"btfast bench ({results['plan']['preset']}): {env['device']}, {env['date'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_all(results: dict[str, Any], out_dir: Path, plot: bool = True) -> dict[str, Path | None | str]:
    """JSON + Markdown (+ PNG) under `out_dir`, named by `stem`; returns what was written (or why not)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / stem(results)
    written: dict[str, Path | None | str] = {
        "json": write_json(results, base.with_suffix(".json")),
        "md": write_markdown(results, base.with_suffix(".md")),
    }
    if plot:
        png = write_plot(results, base.with_suffix(".png"))
        written["png"] = png if png is not None else "not written: matplotlib missing or nothing measured"
    return written


def summary(results: dict[str, Any]) -> str:
    """A few lines for the terminal: pairs/s per system and cell, btfast ÷ HF eager, and the logits' differences."""
    rows = _ok(results)
    speed = _speedups(results)
    lines = []
    for r in sorted(rows, key=lambda r: (r["model"], r["text_len"], r["batch"])):
        sp = speed.get((r["model"], r["text_len"], r["batch"], r["system"]))
        extra = ""
        if r["impl"] != "hf-eager" and sp is not None:
            extra = f"  {sp:.2f}× hf-eager-{r['dtype']}"
        if r.get("rel_diff_vs_hf_eager") is not None:
            extra += f", ITM logits max rel diff vs it {r['rel_diff_vs_hf_eager']:.1e}"
        if r.get("max_rel_err") is not None and r["system"] != "hf-eager-fp32":
            extra += f", vs hf-eager-fp32 {r['max_rel_err']:.1e}"
        lines.append(
            f"  {r['model']} text {r['text_len']} batch {r['batch']:<4} {r['system']:<16} "
            f"{r['pairs_per_s']:10.4g} pairs/s  (p50 {duration(r['p50_ms'] / 1e3)}, {r['repeats']} calls){extra}"
        )
    lines += all_pairs_summary(results.get("all_pairs", []))
    bad = [r for r in results["results"] if r["status"] != "ok"]
    if bad:
        lines.append(f"  {len(bad)} cell(s) not measured: the reasons are printed above and kept in the report")
    return "\n".join(lines)


# -- the all-pairs scenario ------------------------------------------------------------------------------------------


def _what(name: str, e: dict[str, Any]) -> str:
    if "-dedup-" in name:
        return f"encode {e['images']} images + {e['texts']} texts once, fuse {e['pairs']} pairs"
    return f"{e['pairs']} pairs through the forward"


def all_pairs_markdown(entries: list[dict[str, Any]]) -> list[str]:
    """The Markdown section(s) "All pairs: N images × M texts", one per entry."""
    lines: list[str] = []
    for e in entries:
        lines += [
            "",
            f"## All pairs: {e['images']} images × {e['texts']} texts",
            "",
            f"{e['model']}, text {e['text_len']} tokens, {e['dtype']}, {e['batch']} rows per call: every image scored "
            f"against every text ({e['pairs']} pairs). Pair by pair: the {e['pairs']} rows through the forward; dedup: "
            "each image and text through its tower once, then the fusion of every pair (`encode_image`, "
            "`encode_text`, `itm_logits` over gathered rows). pairs/s = pairs ÷ the median time to score them all; "
            "max abs err = largest |ITM logit − hf-eager-fp32| over all pairs.",
            "",
        ]
        if e["status"] != "ok":
            lines.append(f"Not measured ({e['status']}): {e['reason']}")
            continue
        lines += [
            "| system | what | pairs/s | p50 s | first call s | calls | max abs err | max rel err |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, s in e["systems"].items():
            lines.append(
                f"| {name} | {_what(name, e)} | {_fmt(s['pairs_per_s'])} | {_fmt(s['p50_s'])} | "
                f"{_fmt(s['first_call_s'])} | {s['repeats']} | {_fmt(s['max_abs_err'], 2)} | "
                f"{_fmt(s['max_rel_err'], 2)} |"
            )
        lines += [
            "",
            f"dedup ÷ btfast pair by pair: **{e['speedup_dedup_vs_btfast']:.2f}×**; dedup ÷ HF eager pair by pair: "
            f"**{e['speedup_dedup_vs_hf']:.2f}×** (btfast ÷ HF, both pair by pair: {e['speedup_btfast_vs_hf']:.2f}×).",
        ]
    return lines


def all_pairs_summary(entries: list[dict[str, Any]]) -> list[str]:
    """Console lines: per system pairs/s and error; the two speed-ups."""
    lines: list[str] = []
    for e in entries:
        head = (
            f"  all pairs, {e['model']}: {e['images']} images × {e['texts']} texts = {e['pairs']} pairs, text "
            f"{e['text_len']}, {e['batch']} per call, {e['dtype']}"
        )
        if e["status"] != "ok":
            lines.append(f"{head}: not measured ({e['status']}: {e['reason']})")
            continue
        lines.append(head)
        for name, s in e["systems"].items():
            err = "n/a" if s["max_abs_err"] is None else f"{s['max_abs_err']:.1e}"
            lines.append(
                f"    {name:<20} {s['pairs_per_s']:10.4g} pairs/s  (p50 {duration(s['p50_s'])}, {s['repeats']} calls)"
                f"  max |ITM logit - hf-eager-fp32| {err}"
            )
        lines.append(
            f"    dedup {e['speedup_dedup_vs_btfast']:.2f}× btfast pair by pair, {e['speedup_dedup_vs_hf']:.2f}× "
            "HF eager pair by pair"
        )
    return lines
