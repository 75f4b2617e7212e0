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
from typing import Any

import torch

from btfast.benchmark import timing
from btfast.benchmark.progress import Progress, duration, short_error
from btfast.benchmark.systems import REFERENCE, Loaded, System, load, parse_system


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


def estimate(
    rows: list[dict[str, Any]],
    builds: dict[str, float],
    spec: AllPairs,
    model: str,
    warmup: int,
    repeats: int,
    cell_seconds: float | None,
) -> float | None:
    """Seconds the scenario will take on `model`, from what the cells measured (seconds per pair of hf-eager-<d>,
    btfast-<d> and, when the dtype is not fp32, hf-eager-fp32 for the reference, at the scenario's text length, the
    batch nearest its own); None when a figure is missing. btfast-dedup is priced as btfast pair by pair (it does
    less work: the towers run N + M times instead of N·M). `rows`: the cells' results; `builds`: seconds each system
    took to build."""
    rows = [
        r
        for r in rows
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
    calls = warmup + repeats
    if cell_seconds is not None:  # timed rounds stop once 3 ran and cell_seconds per system passed
        per_round = (hf + 2 * fast) * spec.pairs
        calls = warmup + min(repeats, max(3, int(cell_seconds * 3 / per_round) + 1))
    built = sum(builds.get(k, 0.0) for k in (f"hf-eager-{spec.dtype}", f"btfast-{spec.dtype}", REFERENCE))
    return (hf + 2 * fast) * spec.pairs * calls + ref * spec.pairs + built


def _entry(spec: AllPairs, model: str, status: str, reason: str | None) -> dict[str, Any]:
    entry: dict[str, Any] = dict(model=model, **spec.as_dict(), status=status, reason=reason, systems={})
    for key in ("models", "reserve_s"):
        entry.pop(key)
    return entry


def not_run(spec: AllPairs, model: str, status: str, reason: str, progress: Progress) -> dict[str, Any]:
    """The entry of a scenario that did not run (or stopped), with the reason, said on the progress display."""
    for name in spec.system_names():
        progress.advance(f"{name} all pairs {model} {spec.images}x{spec.texts}: {status} ({reason})")
    return _entry(spec, model, status, reason)


def run(
    spec: AllPairs,
    model: str,
    data: dict[str, torch.Tensor],
    fresh: Callable[[], torch.nn.Module],
    device: torch.device,
    progress: Progress,
    *,
    warmup: int = 1,
    repeats: int = 3,
    cell_seconds: float | None = None,
    out_of_time: Callable[[], bool] = lambda: False,
) -> dict[str, Any]:
    """Run the scenario on `model` (`data`: its N images and M texts; `fresh()`: a new model with the run's weights);
    returns its entry of the results' `all_pairs` list (status "ok" or "error", with the reason). Timed rounds stop
    after 3 once `cell_seconds` per system passed, or once `out_of_time()`."""
    names = spec.system_names()
    label = f"all pairs {model} {spec.images}x{spec.texts}"

    def give_up(status: str, reason: str) -> dict[str, Any]:
        return not_run(spec, model, status, reason, progress)

    loaded: dict[str, Loaded] = {}
    logits: dict[str, torch.Tensor] = {}
    try:
        for key, system in (("hf", System("hf-eager", spec.dtype)), ("btfast", System("btfast", spec.dtype))):
            progress.note(f"building {system.name} ({model}) for all pairs ...")
            try:
                loaded[key] = load(system, fresh, device)
            except Exception as e:
                return give_up("error", f"{system.name} could not be built: {short_error(e)}")
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
                    for _ in range(warmup - 1):
                        out = fns[name]()
                    timing.sync(device)
                    logits[name] = out.detach().float().cpu()
                    del out
                except Exception as e:
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    return give_up("error", f"{name}: {short_error(e)}")
            spent = 0.0
            for i in range(repeats):
                progress.status(f"{label}: timed round {i + 1}/{repeats}")
                for name in names:
                    try:
                        seconds, _ = timing.timed_call(fns[name], device)
                    except Exception as e:
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        return give_up("error", f"{name}: {short_error(e)}")
                    lat[name].append(seconds)
                    spent += seconds
                if cell_seconds is not None and spent >= cell_seconds * len(names) and i + 1 >= 3:
                    break
                if out_of_time() and i + 1 < repeats:
                    progress.note(f"budget spent: {label} keeps {i + 1} timed round(s) of {repeats}")
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
            progress.note(f"all-pairs reference failed: {short_error(e)}")
    ref_logits = logits.get(REFERENCE)
    entry = _entry(spec, model, "ok", None)

    for name in names:
        t = timing.Timing(lat[name], first[name], warmup)
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
        progress.advance(f"{name} {label}: {spec.pairs / t.p50:.4g} pairs/s (p50 {duration(t.p50)})")
    rate = {name: entry["systems"][name]["pairs_per_s"] for name in names}
    hf, fast, dedup = names
    entry["speedup_dedup_vs_btfast"] = rate[dedup] / rate[fast]
    entry["speedup_dedup_vs_hf"] = rate[dedup] / rate[hf]
    entry["speedup_btfast_vs_hf"] = rate[fast] / rate[hf]
    entry["reference"] = REFERENCE
    return entry
