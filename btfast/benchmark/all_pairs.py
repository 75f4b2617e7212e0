"""The all-pairs scenario: N images × M texts, every image scored against every text (`btfast bench --all-pairs N,M`).

Three systems score the same N·M pairs (image-major: pair k is image k // M with text k % M), in one dtype:

    hf-eager-<d>          pair by pair: the N·M rows through the transformers forward, `batch` rows per call
    btfast-<d>            pair by pair: the same rows through `fast(...)` (btfast's drop-in forward)
    btfast-dedup-<d>      each image and each text encoded once (`encode_image` / `encode_text`, `batch` per
                          call), then all N·M pairs fused from gathered rows (`itm_logits(ts.index(t), im.index(i))`,
                          `batch` pairs per call)

Each gathers its rows from the N images and M texts inside its timed call, as a caller would. One *call* scores all
N·M pairs; pairs/s = N·M ÷ the median call. The two btfast systems share one `btfast.optimize`d model (the same
system, called two ways); HF eager gets its own. Timed calls interleave round by round (one call of each system
per round), so machine load hits all three alike. The ITM logits of every system's last warmup call are compared
with hf-eager-fp32 on all N·M pairs (computed untimed, pair by pair, when the dtype is not fp32).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from btfast.benchmark import timing
from btfast.benchmark.systems import REFERENCE, Loaded, System, load, parse_system

if TYPE_CHECKING:
    from btfast.benchmark.runner import Runner


@dataclass
class AllPairs:
    """What the all-pairs scenario runs: `images` × `texts` at `text_len` tokens, `batch` rows per call, in `dtype`,
    on each of `models`. `reserve_s` of the run's --budget is kept from the cells for it."""

    images: int
    texts: int
    text_len: int
    batch: int
    dtype: str
    models: list[str] = field(default_factory=list)
    reserve_s: float = 0.0

    @property
    def pairs(self) -> int:
        return self.images * self.texts

    def system_names(self) -> list[str]:
        d = self.dtype
        return [f"hf-eager-{d}", f"btfast-{d}", f"btfast-dedup-{d}"]

    def as_dict(self) -> dict[str, Any]:
        return dict(
            images=self.images,
            texts=self.texts,
            pairs=self.pairs,
            text_len=self.text_len,
            batch=self.batch,
            dtype=self.dtype,
            models=list(self.models),
            reserve_s=self.reserve_s,
        )


def parse(text: str) -> tuple[int, int] | None:
    """'N,M' (or 'NxM') → (N, M); 'off' or '0' → None. Raises ValueError otherwise."""
    raw = text.strip().lower()
    if raw in ("off", "0", "none"):
        return None
    parts = raw.replace("x", ",").replace("×", ",").split(",")
    try:
        n, m = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"expected N,M (images, texts), e.g. 16,16; got {text!r}") from None
    if n < 1 or m < 1:
        raise ValueError(f"expected positive N,M; got {text!r}")
    return n, m


def _chunks(n: int, size: int) -> list[slice]:
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def scorers(
    spec: AllPairs, loaded: dict[str, Loaded], data: dict[str, torch.Tensor], device: torch.device
) -> dict[str, Callable[[], torch.Tensor]]:
    """name → a function scoring all N·M pairs (returns (N·M, 2) logits, image-major), for each loaded system.

    `loaded` holds "hf" (an hf-eager Loaded) and / or "btfast" (a btfast Loaded, whose module is the optimized
    model); `data` the N images' pixel_values and the M texts' input_ids / attention_mask.
    """
    from btfast.states import ImageStates, TextStates

    n, m, b = spec.images, spec.texts, spec.batch
    image_idx = torch.arange(n, device=device).repeat_interleave(m)
    text_idx = torch.arange(m, device=device).repeat(n)
    out: dict[str, Callable[[], torch.Tensor]] = {}

    def pair_by_pair(x: Loaded) -> Callable[[], torch.Tensor]:
        inputs = x.prepare(data)  # N images, M texts on the device (pixels in HF's dtype; btfast casts its own)
        pix, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]

        def fn() -> torch.Tensor:
            logits = []
            for s in _chunks(n * m, b):
                i, t = image_idx[s], text_idx[s]
                logits.append(x.call(dict(input_ids=ids[t], attention_mask=mask[t], pixel_values=pix[i])))
            return torch.cat(logits)

        return fn

    if "hf" in loaded:
        out[f"hf-eager-{spec.dtype}"] = pair_by_pair(loaded["hf"])
    if "btfast" in loaded:
        x = loaded["btfast"]
        out[f"btfast-{spec.dtype}"] = pair_by_pair(x)
        fast = x.module
        inputs = x.prepare(data)
        pix, ids, mask = inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"]

        def dedup() -> torch.Tensor:
            im = ImageStates.concat([fast.encode_image(pix[s]) for s in _chunks(n, b)])
            ts = TextStates.concat([fast.encode_text(ids[s], mask[s]) for s in _chunks(m, b)])
            logits = [fast.itm_logits(ts.index(text_idx[s]), im.index(image_idx[s])) for s in _chunks(n * m, b)]
            return torch.cat(logits)

        out[f"btfast-dedup-{spec.dtype}"] = dedup
    return out


def estimate(runner: Runner, spec: AllPairs, model: str) -> float | None:
    """Seconds the scenario will take on `model`, from what the cells measured (seconds per pair of hf-eager-<d>,
    btfast-<d> and, when the dtype is not fp32, hf-eager-fp32 for the reference, at the scenario's text length, the
    batch nearest its own); None when a figure is missing. btfast-dedup is priced as btfast pair by pair (it does
    less work: the towers run N + M times instead of N·M)."""
    rows = [
        r
        for r in runner.rows
        if r["status"] == "ok" and r["model"] == model and r["text_len"] == spec.text_len and r.get("pairs_per_s")
    ]

    def per_pair(system: str) -> float | None:
        mine = [r for r in rows if r["system"] == system]
        if not mine:
            return None
        best = min(mine, key=lambda r: abs(r["batch"] - min(spec.batch, spec.pairs)))
        return 1.0 / best["pairs_per_s"]

    hf, fast = per_pair(f"hf-eager-{spec.dtype}"), per_pair(f"btfast-{spec.dtype}")
    ref = 0.0 if spec.dtype == "fp32" else per_pair(REFERENCE)
    if hf is None or fast is None or ref is None:
        return None
    plan = runner.plan
    calls = plan.warmup + plan.repeats
    if plan.cell_seconds is not None:  # timed rounds stop once 3 ran and cell_seconds per system passed
        per_round = (hf + 2 * fast) * spec.pairs
        calls = plan.warmup + min(plan.repeats, max(3, int(plan.cell_seconds * 3 / per_round) + 1))
    builds = sum(
        v.get("build_s", {}).get(model, 0.0)
        for k, v in runner.system_info.items()
        if k in (f"hf-eager-{spec.dtype}", f"btfast-{spec.dtype}", REFERENCE)
    )
    return (hf + 2 * fast) * spec.pairs * calls + ref * spec.pairs + builds


def run(runner: Runner, spec: AllPairs, model: str, config: Any, data: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Run the scenario on `model`; returns its entry of the results' `all_pairs` list (status "ok", "skipped" or
    "error", with the reason)."""

    plan, progress = runner.plan, runner.progress
    device = plan.device
    names = spec.system_names()
    entry: dict[str, Any] = dict(model=model, **spec.as_dict(), status="ok", reason=None, systems={})
    entry.pop("models")
    entry.pop("reserve_s")
    label = f"all pairs {model} {spec.images}x{spec.texts}"

    def give_up(status: str, reason: str) -> dict[str, Any]:
        entry.update(status=status, reason=reason)
        for name in names:
            if name not in entry["systems"]:
                progress.advance(f"{name} {label}: {status} ({reason})")
        return entry

    if spec.text_len > runner.max_text[model]:
        return give_up("skipped", f"text length {spec.text_len} > {runner.max_text[model]} positions")
    if plan.budget_s is not None:
        left = plan.budget_s - runner.elapsed()
        need = estimate(runner, spec, model)
        if left <= 0 or (need is not None and need > left):
            need_s = "" if need is None else f"~{need:.0f}s needed, "
            return give_up(
                "skipped", f"time budget: {need_s}{max(0.0, left):.0f}s left of --budget {plan.budget_s:.0f}s"
            )

    def fresh() -> torch.nn.Module:
        return runner.fresh(model)

    loaded: dict[str, Loaded] = {}
    logits: dict[str, torch.Tensor] = {}
    try:
        for key, system in (("hf", System("hf-eager", spec.dtype)), ("btfast", System("btfast", spec.dtype))):
            progress.note(f"building {system.name} ({model}) for all pairs ...")
            try:
                loaded[key] = load(system, fresh, device, plan.compile_mode, plan.compile_backend)
            except Exception as e:
                return give_up("error", f"{system.name} could not be built: {_short(e)}")
        fns = scorers(spec, loaded, data, device)
        first: dict[str, float] = {}
        lat: dict[str, list[float]] = {name: [] for name in names}
        progress.status(f"{label}: warmup")
        with torch.no_grad():
            for name in names:
                try:
                    timing.sync(device)
                    t0 = time.perf_counter()
                    out = fns[name]()
                    timing.sync(device)
                    first[name] = time.perf_counter() - t0
                    for _ in range(plan.warmup - 1):
                        out = fns[name]()
                    timing.sync(device)
                    logits[name] = out.detach().float().cpu()
                    del out
                except Exception as e:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    return give_up("error", f"{name}: {_short(e)}")
            spent = 0.0
            for i in range(plan.repeats):
                progress.status(f"{label}: timed round {i + 1}/{plan.repeats}")
                for name in names:
                    try:
                        seconds, _ = timing.timed_call(fns[name], device)
                    except Exception as e:
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        return give_up("error", f"{name}: {_short(e)}")
                    lat[name].append(seconds)
                    spent += seconds
                if plan.cell_seconds is not None and spent >= plan.cell_seconds * len(names) and i + 1 >= 3:
                    break
                if plan.budget_s is not None and runner.elapsed() > plan.budget_s and i + 1 < plan.repeats:
                    progress.note(f"budget spent: {label} keeps {i + 1} timed round(s) of {plan.repeats}")
                    break
    finally:
        for x in loaded.values():
            x.close()
        loaded.clear()

    if spec.dtype == "fp32":
        logits[REFERENCE] = logits[names[0]]
    else:
        progress.note(f"computing the {REFERENCE} reference logits of all pairs ({model}, untimed) ...")
        try:
            ref = load(parse_system(REFERENCE), fresh, device)
            try:
                with torch.no_grad():
                    (score,) = scorers(spec, {"hf": ref}, data, device).values()
                    logits[REFERENCE] = score().float().cpu()
            finally:
                ref.close()
        except Exception as e:
            progress.note(f"all-pairs reference failed: {_short(e)}")
    ref_logits = logits.get(REFERENCE)

    for name in names:
        t = timing.Timing(lat[name], first[name], plan.warmup)
        err = rel = None
        if ref_logits is not None:
            err = (logits[name] - ref_logits).abs().max().item()
            rel = err / max(ref_logits.abs().max().item(), 1e-30)
        entry["systems"][name] = dict(
            pairs_per_s=spec.pairs / t.p50,
            p50_s=t.p50,
            p99_s=t.p99,
            first_call_s=t.first_call_s,
            repeats=len(t.latencies),
            latencies_s=list(t.latencies),
            max_abs_err=err,
            max_rel_err=rel,
        )
        progress.advance(f"{name} {label}: {spec.pairs / t.p50:.4g} pairs/s (p50 {_duration(t.p50)})")
    rate = {name: entry["systems"][name]["pairs_per_s"] for name in names}
    hf, fast, dedup = names
    entry["speedup_dedup_vs_btfast"] = rate[dedup] / rate[fast]
    entry["speedup_dedup_vs_hf"] = rate[dedup] / rate[hf]
    entry["speedup_btfast_vs_hf"] = rate[fast] / rate[hf]
    entry["reference"] = REFERENCE
    return entry


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def _duration(seconds: float) -> str:
    return f"{seconds:.3g} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"


# -- reporting ----------------------------------------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "—"
    if x == 0:
        return "0"
    if abs(x) >= 10 ** (digits + 1) or abs(x) < 10 ** -(digits - 1):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def _what(name: str, e: dict[str, Any]) -> str:
    if "-dedup-" in name:
        return f"encode {e['images']} images + {e['texts']} texts once, fuse {e['pairs']} pairs"
    return f"{e['pairs']} pairs through the forward"


def markdown(entries: list[dict[str, Any]]) -> list[str]:
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


def summary(entries: list[dict[str, Any]]) -> list[str]:
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
                f"    {name:<20} {s['pairs_per_s']:10.4g} pairs/s  (p50 {_duration(s['p50_s'])}, {s['repeats']} calls)"
                f"  max |ITM logit - hf-eager-fp32| {err}"
            )
        lines.append(
            f"    dedup {e['speedup_dedup_vs_btfast']:.2f}× btfast pair by pair, {e['speedup_dedup_vs_hf']:.2f}× "
            "HF eager pair by pair"
        )
    return lines
