"""Run a benchmark plan: every system on every cell (model, text length, batch size), on the same inputs.

All systems of a model are loaded together and, per cell, their timed calls interleaved round by round
(`_run_interleaved`): load from other work on the machine then hits every system alike.

Inputs: per model and text length, one batch of the largest size is drawn once (`btfast.testing.random_inputs`,
fixed seed, texts of exactly that length, random pixels); a cell of batch B uses its first B rows, so every
system and batch size sees the same pairs. Each system gets a fresh copy of one built model (same weights).
Each cell: warmup calls (the first one timed apart: compile, autotune, graph capture), then timed calls; the last
warmup call's ITM logits are kept and compared, at the end, with those of hf-eager-fp32 (the reference) on the
same inputs.

--budget bounds the time spent measuring; building models (optimize() with its kernel race included) is
reported apart and never counted. A cell whose estimated time (from the system's previous cell, else from what
the reference took on that cell) would overrun what is left is skipped for the costliest systems until the
others fit, with the reason printed and recorded, never silent. Text lengths run in plan order (the main sweep
first), the largest batch first. An out-of-memory cell is recorded as such and the run goes on. The all-pairs
scenario (`Plan.all_pairs`, see all_pairs.py) runs after every cell; the cells share the budget less the part
kept for it, and it gets what is left then.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from btfast.benchmark import all_pairs, headline, kernels, timing
from btfast.benchmark.all_pairs import AllPairs
from btfast.benchmark.device import device_name, device_slug, published_bf16_flops
from btfast.benchmark.flops import flops_per_pair
from btfast.benchmark.progress import Progress, duration, short_error
from btfast.benchmark.systems import REFERENCE, Loaded, System, load, parse_system

MODELS = ("tiny", "base", "large")


def model_config(name: str) -> Any:
    from btfast import testing

    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return {"tiny": testing.tiny_config, "base": testing.base_config, "large": testing.large_config}[name]()


@dataclass(frozen=True, order=True)
class Cell:
    model: str
    text_len: int
    batch: int


@dataclass
class Plan:
    """What to run. `cells` in run order; `only[system name]` restricts a system to some cells (with the reason)."""

    cells: list[Cell]
    systems: list[System]
    device: torch.device
    warmup: int = 1
    repeats: int = 5
    cell_seconds: float | None = None
    budget_s: float | None = None
    compile_mode: str = "max-autotune"
    compile_backend: str = "inductor"
    seed: int = 0
    preset: str = "custom"
    skip: dict[str, str] = field(default_factory=dict)  # system name -> why it is not run at all
    only: dict[str, tuple[set[Cell], str]] = field(default_factory=dict)
    reference: bool = True  # compute hf-eager-fp32 logits (untimed) where no hf-eager-fp32 system runs
    notes: list[str] = field(default_factory=list)
    all_pairs: AllPairs | None = None  # the N images × M texts scenario, run after every cell (see all_pairs.py)
    smoke: str | None = None  # run headline.smoke in this dtype before any timing
    profile: str | None = None  # the system whose call at its model's largest cell headline.profile splits
    kernels: tuple[str, int, int, str] | None = None  # --mode kernels: (model, batch, text length, dtype)

    def models(self) -> list[str]:
        return list(dict.fromkeys(c.model for c in self.cells))

    def dtypes(self) -> list[str]:
        """The dtypes of the systems that run (and of the all-pairs scenario): the only ones the GEMM peak times."""
        names = [s.dtype_name for s in self.systems if s.name not in self.skip]
        names += [self.all_pairs.dtype] if self.all_pairs is not None else []
        return list(dict.fromkeys(names))

    @property
    def cells_budget_s(self) -> float | None:
        """The part of --budget the cells share: all of it, less what is kept for the all-pairs scenario."""
        if self.budget_s is None:
            return None
        reserve = self.all_pairs.reserve_s if self.all_pairs is not None else 0.0
        return max(0.0, self.budget_s - reserve)

    def budget_text(self) -> str:
        kept = self.all_pairs.reserve_s if self.all_pairs is not None and self.budget_s is not None else 0.0
        return f"--budget {self.budget_s:.0f}s" + (f" (less {kept:.0f}s kept for all pairs)" if kept else "")


def _git(*args: str) -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Where and with what a run happened: device, versions, commit."""
    import transformers

    import btfast

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # triton is optional off Linux / CUDA
        triton_version = None
    commit = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    if commit is None and os.environ.get("BTFAST_COMMIT"):  # a copied tree without .git (bench/gpu.sh)
        commit, dirty = os.environ["BTFAST_COMMIT"], None
    env: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": device_name(device),
        "device_type": device.type,
        "device_slug": device_slug(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "transformers": transformers.__version__,
        "btfast": btfast.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": commit,
        "commit_dirty": bool(dirty) if dirty is not None else None,
        "cpu_threads": torch.get_num_threads(),
        "argv": sys.argv[1:],
    }
    if hasattr(os, "getloadavg"):  # other work on the machine skews CPU figures: say how busy it was
        env["load_average"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        env["tf32_cudnn"] = torch.backends.cudnn.allow_tf32
        env["device_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return env


def _inputs(config: Any, batch: int, text_len: int, seed: int) -> dict[str, torch.Tensor]:
    from btfast.testing import random_inputs

    return random_inputs(config, batch=batch, seq_len=text_len, seed=seed + text_len)


def _slice(batch: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    return {k: v[:n] for k, v in batch.items()}


def _weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers, each storage counted once (packed views share storage)."""
    seen: dict[int, int] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


class Runner:
    def __init__(self, plan: Plan, progress: Progress | None = None) -> None:
        self.plan = plan
        self.progress = progress or Progress(total=0, enabled=False)
        self.rows: list[dict[str, Any]] = []
        self.logits: dict[tuple[Cell, str], torch.Tensor] = {}
        self.system_info: dict[str, dict[str, Any]] = {}
        self.t_start = time.perf_counter()
        self.build_s = 0.0  # seconds spent building models (see `elapsed`)
        self.max_text: dict[str, int] = {}
        self.flops: dict[str, dict[str, Any]] = {}
        self.cell_wall: dict[tuple[Cell, str], float] = {}  # seconds each measured cell took, all calls
        self.peaks: dict[str, timing.GemmPeak] = {}  # dtype name -> its GEMM peak, for the dtypes this run uses
        self._templates: dict[str, torch.nn.Module] = {}  # model name -> the built model every system copies
        self.env: dict[str, Any] | None = None
        self.all_pairs_rows: list[dict[str, Any]] = []  # one entry per model of the all-pairs scenario
        self.smoke: list[dict[str, Any]] = []
        self.kernels: list[dict[str, Any]] = []
        self.profiles: dict[str, dict[str, Any]] = {}  # "<model>/<system>" -> headline.profile's split
        self.published = published_bf16_flops(device_name(plan.device)) if plan.device.type == "cuda" else None

    # -- bookkeeping ----------------------------------------------------------------------------------------------

    def fresh(self, model_name: str) -> torch.nn.Module:
        """A fresh copy of the model `model_name` with the run's random weights (built once: base takes ~20 s to
        build on a CPU; a copy takes ~1 s)."""
        import copy

        from transformers import BridgeTowerForImageAndTextRetrieval

        from btfast.testing import build

        if model_name not in self._templates:
            self.progress.note(f"building the {model_name} model (random weights, seed {self.plan.seed}) ...")
            config = model_config(model_name)
            self._templates[model_name] = build(BridgeTowerForImageAndTextRetrieval, config, seed=self.plan.seed)
        return copy.deepcopy(self._templates[model_name])

    def elapsed(self) -> float:
        """Seconds since the start, less the time spent building models: the clock --budget runs on, so no system's
        build (an optimize() with a slow kernel race, say) is ever charged to any system's cells."""
        return time.perf_counter() - self.t_start - self.build_s

    def _row(self, cell: Cell, system: System, status: str, reason: str | None = None, **kw: Any) -> dict[str, Any]:
        row = dict(
            model=cell.model,
            text_len=cell.text_len,
            batch=cell.batch,
            system=system.name,
            impl=system.impl,
            dtype=system.dtype_name,
            status=status,
            reason=reason,
        )
        row.update(kw)
        self.rows.append(row)
        return row

    def _skip(self, cell: Cell, system: System, reason: str, status: str = "skipped") -> None:
        self._row(cell, system, status, reason)
        self.progress.advance(f"{system.name} {cell.model} L={cell.text_len} B={cell.batch}: {status} ({reason})")

    # -- the run -------------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Run the plan and return every figure (see `snapshot`); Ctrl-C / SIGTERM leave a partial `snapshot()`."""
        plan = self.plan
        self.env = environment(plan.device)
        if plan.kernels is not None:
            name, batch, text_len, dtype = plan.kernels
            self.kernels.append(kernels.run(model_config(name), batch, text_len, dtype, plan.device, self.progress))
        if plan.smoke is not None:
            model_name = plan.models()[0]
            cell = next(c for c in plan.cells if c.model == model_name)
            self.progress.status(f"smoke checks ({model_name}, {plan.smoke}, text {cell.text_len}, batch 2)")
            inputs = _inputs(model_config(model_name), 2, cell.text_len, plan.seed)
            self.smoke = headline.smoke(lambda: self.fresh(model_name), inputs, plan.device, plan.smoke)
            for check in self.smoke:
                self.progress.note(f"  smoke {check['check']}: {check['status']} ({check['detail']})")
        for dtype in plan.dtypes():
            n, iters = timing.gemm_size(plan.device, dtype)
            self.progress.note(f"measuring the {dtype} GEMM peak ({5 * iters} {n}x{n} matmuls) ...")
            self.peaks[dtype] = timing.measure_gemm_peak(plan.device, dtype)
            self.progress.note(f"  {dtype} GEMM peak: {self.peaks[dtype].flops_per_s / 1e12:.3g} TFLOP/s")
        systems = sorted(plan.systems, key=lambda s: s.name != REFERENCE)  # the reference first, then as given
        for model_name in plan.models():
            config = model_config(model_name)
            self.max_text[model_name] = config.text_config.max_position_embeddings - config.text_config.pad_token_id - 1
            cells = [c for c in plan.cells if c.model == model_name]
            lengths = list(dict.fromkeys(c.text_len for c in cells))
            for length in lengths:
                self.flops[f"{model_name}/{length}"] = flops_per_pair(config, length).as_dict()
            data = {
                length: _inputs(config, max(c.batch for c in cells if c.text_len == length), length, plan.seed)
                for length in lengths
                if length <= self.max_text[model_name]
            }
            self._run_interleaved(model_name, config, systems, cells, data)
            if plan.reference and not any(s.name == REFERENCE for s in systems):
                self._reference(model_name, config, cells, data)
        if plan.all_pairs is not None:
            self._all_pairs(plan.all_pairs)
        return self.snapshot()

    def _all_pairs(self, spec: AllPairs) -> None:
        """The N images × M texts scenario on each of its models, after every cell (it has its own budget slice)."""
        for model_name in spec.models:
            config = model_config(model_name)
            self.max_text.setdefault(
                model_name, config.text_config.max_position_embeddings - config.text_config.pad_token_id - 1
            )
            data: dict[str, torch.Tensor] = {}
            if spec.text_len <= self.max_text[model_name]:
                x = _inputs(config, max(spec.images, spec.texts), spec.text_len, self.plan.seed)
                data = dict(
                    pixel_values=x["pixel_values"][: spec.images],
                    input_ids=x["input_ids"][: spec.texts],
                    attention_mask=x["attention_mask"][: spec.texts],
                )
            self.all_pairs_rows.append(self._all_pairs_one(spec, model_name, data))

    def _all_pairs_one(self, spec: AllPairs, model_name: str, data: dict[str, torch.Tensor]) -> dict[str, Any]:
        plan = self.plan
        if spec.text_len > self.max_text[model_name]:
            why = f"text length {spec.text_len} > {self.max_text[model_name]} positions"
            return all_pairs.not_run(spec, model_name, "skipped", why, self.progress)
        if plan.budget_s is not None:
            left = plan.budget_s - self.elapsed()
            builds = {k: v["build_s"].get(model_name, 0.0) for k, v in self.system_info.items()}
            need = all_pairs.estimate(self.rows, builds, spec, model_name, plan.warmup, plan.repeats, plan.cell_seconds)
            if left <= 0 or (need is not None and need > left):
                need_s = "" if need is None else f"~{need:.0f}s needed, "
                why = f"time budget: {need_s}{max(0.0, left):.0f}s left of --budget {plan.budget_s:.0f}s"
                return all_pairs.not_run(spec, model_name, "skipped", why, self.progress)
        return all_pairs.run(
            spec, model_name, data, lambda: self.fresh(model_name), plan.device, self.progress,
            warmup=plan.warmup, repeats=plan.repeats, cell_seconds=plan.cell_seconds,
            out_of_time=lambda: plan.budget_s is not None and self.elapsed() > plan.budget_s,
        )  # fmt: skip

    def snapshot(self, interrupted: bool = False) -> dict[str, Any]:
        """Every figure so far: environment, plan, GEMM peak, FLOPs per pair, systems' explain(), one row per cell."""
        plan = self.plan
        self._errors()
        env = dict(self.env or environment(plan.device))
        if hasattr(os, "getloadavg"):
            env["load_average_end"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        return dict(
            environment=env,
            plan=dict(
                preset=plan.preset,
                systems=[s.name for s in plan.systems],
                cells=[vars(c) for c in plan.cells],
                warmup=plan.warmup,
                repeats=plan.repeats,
                cell_seconds=plan.cell_seconds,
                budget_s=plan.budget_s,
                compile_mode=plan.compile_mode,
                seed=plan.seed,
                inputs="btfast.testing.random_inputs: texts of exactly text_len tokens, random pixels; random weights",
                skipped_systems=plan.skip,
                restricted=({k: dict(cells=len(v[0]), reason=v[1]) for k, v in plan.only.items()}),
                notes=plan.notes + (["interrupted: the run was stopped before its end"] if interrupted else []),
                all_pairs=None if plan.all_pairs is None else plan.all_pairs.as_dict(),
            ),
            gemm_peaks={k: v.as_dict() for k, v in self.peaks.items()},
            published_bf16_flops_per_s=self.published,
            smoke=self.smoke,
            kernels=self.kernels,
            profiles=self.profiles,
            flops_per_pair=self.flops,
            systems=self.system_info,
            results=self.rows,
            all_pairs=self.all_pairs_rows,
            wall_s=time.perf_counter() - self.t_start,
            build_s=self.build_s,
            interrupted=interrupted,
        )

    # -- pieces shared by the two ways of running -------------------------------------------------------------------

    def _load(self, model_name: str, config: Any, system: System, cells: list[Cell]) -> Loaded | None:
        """A fresh model turned into `system`; None (and every cell recorded as an error) if that fails."""

        plan = self.plan
        self.progress.note(f"building {system.name} ({model_name}) ...")
        try:
            loaded = load(
                system,
                lambda: self.fresh(model_name),
                plan.device,
                plan.compile_mode,
                plan.compile_backend,
            )
        except Exception as e:  # report it, run the other systems
            reason = f"could not be built: {short_error(e)}"
            self.progress.note(f"{system.name}: {reason}")
            for cell in cells:
                self._skip(cell, system, reason, status="error")
            return None
        self.build_s += loaded.build_s
        info = self.system_info.setdefault(system.name, dict(build_s={}, notes=loaded.notes, explain={}, race={}))
        info["build_s"][model_name] = loaded.build_s
        if system.is_btfast:
            info["race"][model_name] = headline.verdicts(loaded.module)
        return loaded

    def _profile(self, x: Loaded, cells: list[Cell], data: dict[int, Any]) -> None:
        """headline.profile of `x`'s call at its largest measured cell (the first text length)."""
        done = [c for c in cells if (c, x.system.name) in self.logits]
        if not done:
            return
        cell = max(done, key=lambda c: (c.text_len == done[0].text_len, c.batch))
        key = f"{cell.model}/{x.system.name}"
        self.progress.status(f"profiling {x.system.name} at {cell.model} L={cell.text_len} B={cell.batch}")
        try:
            batch = x.prepare(_slice(data[cell.text_len], cell.batch))
            self.profiles[key] = dict(cell=vars(cell), **headline.profile(lambda: x.call(batch), self.plan.device))
        except Exception as e:
            self.profiles[key] = dict(cell=vars(cell), error=short_error(e))

    def _close(self, model_name: str, loaded: Loaded) -> None:
        info = self.system_info[loaded.system.name]
        try:
            info["explain"][model_name] = loaded.explain()
        except Exception as e:
            info["explain"][model_name] = f"explain() failed: {short_error(e)}"
        loaded.close()

    def _not_runnable(self, cell: Cell, system: System) -> str | None:
        """Why `system` does not run `cell` at all (restricted to other cells, text too long), else None."""
        allowed, why_not = self.plan.only.get(system.name, (None, ""))
        if allowed is not None and cell not in allowed:
            return why_not
        if cell.text_len > self.max_text[cell.model]:
            return f"text length {cell.text_len} > {self.max_text[cell.model]} positions"
        return None

    def _ordered(self, cells: list[Cell]) -> list[Cell]:
        # text lengths in plan order (the main sweep first, so a spent budget cuts the side cases), the largest
        # batch first: the throughput figure that matters most, and it prices the smaller ones
        order = {length: i for i, length in enumerate(dict.fromkeys(c.text_len for c in cells))}
        return sorted(cells, key=lambda c: (order[c.text_len], -c.batch))

    def _warmups(self, system: System) -> int:
        return max(self.plan.warmup, 3) if system.compiles else self.plan.warmup  # graph trees record on call 2

    def _record(self, cell: Cell, system: System, t: timing.Timing, interrupted: bool = False) -> float:
        """Add the row of a measured cell; returns its median latency."""
        p50 = t.p50
        pairs_per_s = cell.batch / p50
        fpp = self.flops[f"{cell.model}/{cell.text_len}"]["total"]
        peak = self.peaks[system.dtype_name].flops_per_s if system.dtype_name in self.peaks else float("nan")
        published = self.published if system.dtype_name != "fp32" else None  # a tensor-core figure: half precision
        self._row(
            cell,
            system,
            "ok",
            pairs_per_s=pairs_per_s,
            p50_ms=p50 * 1e3,
            p99_ms=t.p99 * 1e3,
            mean_ms=sum(t.latencies) / len(t.latencies) * 1e3,
            min_ms=min(t.latencies) * 1e3,
            repeats=len(t.latencies),
            warmup=t.warmup,
            capped=t.capped,
            first_call_s=t.first_call_s,
            peak_mem_bytes=t.peak_mem,
            peak_mem_kind=t.peak_mem_kind,
            gflop_per_pair=fpp / 1e9,
            mfu=fpp * pairs_per_s / peak,
            mfu_published=fpp * pairs_per_s / published if published else None,
            latencies_ms=[x * 1e3 for x in t.latencies],
            interrupted=interrupted,
        )
        label = f"{system.name} {cell.model} L={cell.text_len} B={cell.batch}"
        self.progress.advance(f"{label}: {pairs_per_s:.4g} pairs/s (p50 {duration(p50)})")
        return p50

    def _keep(self, cell: Cell, system: System) -> Any:
        def keep(out: torch.Tensor) -> None:
            self.logits[(cell, system.name)] = out.detach().float().cpu().clone()

        return keep

    # -- all systems at once, their calls interleaved ----------------------------------------------------------------

    def _run_interleaved(
        self, model_name: str, config: Any, systems: list[System], cells: list[Cell], data: dict[int, Any]
    ) -> None:
        """Every system loaded together; per cell, warmups, then rounds of one timed call per system in turn.

        On a machine shared with other work (a CI runner, a busy 2-core box) load comes and goes over minutes:
        systems timed one after another would each see a different machine, and their ratio would measure that.
        Interleaved, every system sees the same conditions. Peak memory here is per call: the model's weights plus
        the most memory one call added (the systems share the device, so an absolute peak would mix them).
        """
        plan = self.plan
        active: list[Loaded] = []
        for system in systems:
            if system.name in plan.skip:
                self.progress.note(f"skipping {system.name} on {model_name}: {plan.skip[system.name]}")
                for cell in cells:
                    self._skip(cell, system, plan.skip[system.name])
                continue
            loaded = self._load(model_name, config, system, cells)
            if loaded is not None:
                active.append(loaded)
        weights = {id(x): _weight_bytes(x.module) for x in active}
        per_pair: dict[str, float] = {}
        first_extra: dict[str, float] = {}
        failures: dict[str, int] = {x.system.name: 0 for x in active}
        try:
            for cell in self._ordered(cells):
                runnable = []
                for x in active:
                    why = self._not_runnable(cell, x.system)
                    if why is None and failures[x.system.name] >= 2:
                        why = "two cells failed before: system abandoned"
                    if why is not None:
                        self._skip(cell, x.system, why, status="error" if why.startswith("two") else "skipped")
                    else:
                        runnable.append(x)
                if not runnable:
                    continue
                estimates = [
                    self._estimate(
                        cell, per_pair.get(x.system.name), first_extra.get(x.system.name, 0.0), self._warmups(x.system)
                    )
                    for x in runnable
                ]
                if plan.cells_budget_s is not None:  # drop the costliest systems until the rest fit what is left
                    left = plan.cells_budget_s - self.elapsed()
                    priced = sorted(zip(estimates, runnable, strict=True), key=lambda p: -(p[0] or 0.0))
                    while priced and sum(e or 0.0 for e, _ in priced) > left and priced[0][0] is not None:
                        need, x = priced.pop(0)
                        self._skip(cell, x.system, f"time budget: ~{need:.0f}s needed, {max(0.0, left):.0f}s left of "
                                   f"{plan.budget_text()}")  # fmt: skip
                    runnable = [x for x in runnable if any(x is y for _, y in priced)]
                    if not runnable:
                        continue
                self._interleave_cell(cell, runnable, data, weights, per_pair, first_extra, failures)
        finally:
            for x in active:
                if x.system.name == plan.profile:
                    self._profile(x, cells, data)
                self._close(model_name, x)

    def _interleave_cell(
        self,
        cell: Cell,
        runnable: list[Loaded],
        data: dict[int, Any],
        weights: dict[int, int],
        per_pair: dict[str, float],
        first_extra: dict[str, float],
        failures: dict[str, int],
    ) -> None:
        plan = self.plan
        self.progress.status(
            f"{cell.model} L={cell.text_len} B={cell.batch}: " + ", ".join(x.system.name for x in runnable)
        )
        batches = {id(x): x.prepare(_slice(data[cell.text_len], cell.batch)) for x in runnable}
        first: dict[int, float] = {}
        failed: dict[int, tuple[str, str]] = {}
        label = f"{cell.model} L={cell.text_len} B={cell.batch}"
        for x in runnable:  # warmups, one system at a time (compiles happen here)
            self.progress.status(f"{label}: {self._warmups(x.system)} warmup call(s) of {x.system.name}")
            try:
                with torch.no_grad():
                    t0 = time.perf_counter()
                    out = x.call(batches[id(x)])
                    timing.sync(plan.device)
                    first[id(x)] = time.perf_counter() - t0
                    for _ in range(self._warmups(x.system) - 1):
                        out = x.call(batches[id(x)])
                    timing.sync(plan.device)
                    self._keep(cell, x.system)(out)
                    del out
            except Exception as e:
                failed[id(x)] = ("oom" if _is_oom(e) else "error", short_error(e))
        live = [x for x in runnable if id(x) not in failed]
        lat: dict[int, list[float]] = {id(x): [] for x in live}
        mem: dict[int, int | None] = {id(x): None for x in live}
        spent = 0.0
        interrupted = False
        if live:
            self.progress.status(f"{label}: up to {plan.repeats} timed round(s) of {len(live)} system(s)")
        try:
            for i in range(plan.repeats):
                for x in list(live):
                    batch = batches[id(x)]
                    try:
                        with torch.no_grad():
                            seconds, added = timing.timed_call(lambda x=x, batch=batch: x.call(batch), plan.device)
                    except Exception as e:
                        failed[id(x)] = ("oom" if _is_oom(e) else "error", short_error(e))
                        live.remove(x)
                        continue
                    lat[id(x)].append(seconds)
                    spent += seconds
                    if added is not None:
                        mem[id(x)] = max(mem[id(x)] or 0, added)
                if i == 0 and plan.repeats > 1:
                    self.progress.status(f"{label}: first timed round took {duration(spent)}")
                if plan.cell_seconds is not None and spent >= plan.cell_seconds * len(runnable) and i + 1 >= 3:
                    break
                if plan.cells_budget_s is not None and self.elapsed() > plan.cells_budget_s and i + 1 < plan.repeats:
                    self.progress.note(f"budget spent: {cell} keeps {i + 1} timed round(s) of {plan.repeats}")
                    break
        except KeyboardInterrupt:  # keep the calls timed so far, then stop the run
            interrupted = True
            for x in live:
                if not lat[id(x)]:
                    failed[id(x)] = ("interrupted", "interrupted before a timed call")
        batches.clear()
        if failed and plan.device.type == "cuda":
            torch.cuda.empty_cache()
        for x in runnable:
            name = x.system.name
            if id(x) in failed:
                status, reason = failed[id(x)]
                failures[name] += status == "error"
                self._skip(cell, x.system, reason, status=status)
                continue
            failures[name] = 0
            kind = ("cuda" if plan.device.type == "cuda" else "RSS") + ": weights + the most one call added"
            peak = None if mem[id(x)] is None else weights[id(x)] + mem[id(x)]
            t = timing.Timing(
                lat[id(x)], first[id(x)], self._warmups(x.system), peak, kind, len(lat[id(x)]) < plan.repeats
            )
            self.cell_wall[(cell, name)] = first[id(x)] + sum(t.latencies) + t.p50 * (t.warmup - 1)
            p50 = self._record(cell, x.system, t, interrupted)
            per_pair[name] = p50 / cell.batch
            first_extra[name] = max(0.0, t.first_call_s - p50)
        if interrupted:
            raise KeyboardInterrupt

    def _estimate(self, cell: Cell, per_pair: float | None, first_extra: float, warmup: int) -> float | None:
        """Seconds a cell will take: from this system's last cell (per pair, scaled to this batch), else what the
        reference system (else the slowest other system) took on this cell, else unknown."""
        plan = self.plan
        if per_pair is not None:
            per_call = per_pair * cell.batch
            timed = per_call * plan.repeats
            if plan.cell_seconds is not None:
                timed = min(timed, max(plan.cell_seconds, 3 * per_call))
            return per_call * warmup + timed + first_extra
        if (cell, REFERENCE) in self.cell_wall:
            return self.cell_wall[(cell, REFERENCE)]
        seen = [w for (c, _), w in self.cell_wall.items() if c == cell]
        return max(seen) if seen else None

    def _reference(
        self, model_name: str, config: Any, cells: list[Cell], data: dict[int, dict[str, torch.Tensor]]
    ) -> None:
        """hf-eager-fp32 logits (one untimed call per cell) where no hf-eager-fp32 system ran."""

        todo = [c for c in cells if c.text_len in data and any(k[0] == c for k in self.logits)]
        if not todo:
            return
        self.progress.note(f"computing the {REFERENCE} reference logits ({model_name}, untimed) ...")
        ref = parse_system(REFERENCE)
        loaded = load(ref, lambda: self.fresh(model_name), self.plan.device)
        try:
            for cell in todo:
                try:
                    with torch.no_grad():
                        out = loaded.call(loaded.prepare(_slice(data[cell.text_len], cell.batch)))
                    self.logits[(cell, REFERENCE)] = out.float().cpu()
                except Exception as e:
                    self.progress.note(f"reference failed at {cell}: {short_error(e)}")
                    if self.plan.device.type == "cuda":
                        torch.cuda.empty_cache()
        finally:
            loaded.close()

    def _errors(self) -> None:
        """Max error of each system's logits against hf-eager-fp32, and against hf-eager in its own dtype."""
        for row in self.rows:
            if row["status"] != "ok":
                continue
            cell = Cell(row["model"], row["text_len"], row["batch"])
            out = self.logits.get((cell, row["system"]))
            ref = self.logits.get((cell, REFERENCE))
            row["max_abs_err"] = row["max_rel_err"] = row["rel_diff_vs_hf_eager"] = None
            if out is not None and ref is not None:
                err = (out - ref).abs().max().item()
                row["max_abs_err"] = err
                row["max_rel_err"] = err / max(ref.abs().max().item(), 1e-30)
            same = self.logits.get((cell, f"hf-eager-{row['dtype']}"))
            if out is not None and same is not None and row["impl"] != "hf-eager":
                row["rel_diff_vs_hf_eager"] = (out - same).abs().max().item() / max(same.abs().max().item(), 1e-30)


def run_plan(plan: Plan, progress: Progress | None = None) -> dict[str, Any]:
    return Runner(plan, progress).run()
