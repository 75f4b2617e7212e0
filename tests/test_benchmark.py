"""The benchmark harness (`btfast bench`): FLOP counter, timing helpers, systems, report writers, CLI, tiny runs."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import BridgeTowerForImageAndTextRetrieval

from btfast import cli as btfast_cli
from btfast.benchmark import cli, device, report, systems, timing
from btfast.benchmark.flops import flops_per_pair
from btfast.benchmark.progress import Progress
from btfast.benchmark.runner import Cell, Plan, run_plan
from btfast.testing import base_config, build, large_config, random_inputs, tiny_config

# -- FLOPs ------------------------------------------------------------------------------------------------------


def test_flops_reproduce_the_design_figures() -> None:
    base, large = flops_per_pair(base_config(), 40), flops_per_pair(large_config(), 40)
    # DESIGN.md's 109 / 401 GFLOP/pair are FlopCounterMode's figures (no vision attention products); exact here
    assert base.counter_visible == 108_819_750_912
    assert large.counter_visible == 400_624_779_264
    assert base.total / 1e9 == pytest.approx(112.71, abs=0.01)
    assert large.total / 1e9 == pytest.approx(419.83, abs=0.01)
    parts = base.as_dict()
    assert parts["total"] == sum(parts[k] for k in ("text_tower", "vision_tower", "bridges", "fusion", "heads"))
    # the vision tower dominates, and longer texts cost more
    assert base.vision_tower > base.fusion > base.text_tower
    assert flops_per_pair(base_config(), 64).total > base.total > flops_per_pair(base_config(), 16).total


@pytest.mark.parametrize("text_len", [5, 16])
def test_flops_match_torch_flop_counter(text_len: int) -> None:
    """The formula against torch's own count on a tiny model (which may or may not see the vision attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    config = tiny_config()
    model = build(BridgeTowerForImageAndTextRetrieval, config)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**random_inputs(config, batch=1, seq_len=text_len))
    ours = flops_per_pair(config, text_len)
    assert counter.get_total_flops() in (ours.total, ours.counter_visible)


# -- timing -----------------------------------------------------------------------------------------------------


def test_percentiles() -> None:
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert timing.median(xs) == 3.0
    assert timing.percentile(xs, 0) == 1.0 and timing.percentile(xs, 100) == 5.0
    assert timing.percentile(xs, 99) == pytest.approx(4.96)
    assert timing.median([1.0, 2.0]) == 1.5
    with pytest.raises(ValueError):
        timing.percentile([], 50)


def test_timed_call_on_cpu() -> None:
    seconds, added = timing.timed_call(lambda: torch.ones(4 << 20), torch.device("cpu"))  # 16 MiB
    assert seconds > 0 and (added is None or added >= 0)
    assert timing.timed_call(lambda: None, torch.device("cpu"), memory=False)[1] is None


def test_peak_memory_and_gemm_peak_on_cpu() -> None:
    mem = timing.PeakMemory(torch.device("cpu"), baseline=timing.rss_bytes())
    mem.reset()
    x = torch.ones(8 << 20)  # 32 MiB
    peak = mem.peak()
    del x
    assert peak is None or peak >= 0


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_gemm_peak_on_cpu_is_quick_and_says_emulated(dtype: str) -> None:
    cpu = torch.device("cpu")
    n, _ = timing.gemm_size(cpu, dtype)
    assert n == (1024 if device.native(cpu, dtype) else 256)
    gp = timing.measure_gemm_peak(cpu, dtype, n=64)
    assert gp.flops_per_s > 0 and gp.dtype == dtype and gp.note.startswith(f"{dtype} GEMM peak")
    assert ("emulated" in gp.note) == (not device.native(cpu, dtype))
    assert device.device_slug(cpu) == "cpu"


def test_native_dtypes(monkeypatch) -> None:
    cpu = torch.device("cpu")
    assert device.native(cpu, "fp32") and device.native("cuda", "bf16")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(device, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert device.native(cpu, "bf16") and not device.native(cpu, "fp16")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")  # flags without the kernels
    assert not device.native(cpu, "bf16")
    assert "AVX2" in device.emulated_reason("bf16") and "avx512_bf16" in device.emulated_reason("bf16")
    assert device.published_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert device.published_bf16_flops("NVIDIA H100 80GB HBM3") == device.published_bf16_flops("NVIDIA H200")
    assert device.published_bf16_flops("Tesla T4") is None


# -- systems ----------------------------------------------------------------------------------------------------


def test_system_names() -> None:
    names = [s.name for s in systems.parse_systems("all", "bf16")]
    assert names == ["hf-eager-fp32", "hf-eager-bf16", "btfast-fp32", "btfast-bf16", "hf-compile-bf16"]
    assert [s.name for s in systems.parse_systems("hf-eager,btfast-fp16", "fp16")] == ["hf-eager-fp16", "btfast-fp16"]
    assert [s.name for s in systems.comparison("fp32")] == ["hf-eager-fp32", "btfast-fp32", "hf-compile-fp32"]
    with pytest.raises(ValueError, match="unknown system"):
        systems.parse_systems("tensorrt-fp8", "bf16")


def test_hf_compile_system_runs() -> None:
    """The hf-compile path (dynamo, with the cheap 'eager' backend here) gives HF's logits."""
    config = tiny_config()
    loaded = systems.load(
        systems.parse_system("hf-compile-fp32"),
        lambda: build(BridgeTowerForImageAndTextRetrieval, config),
        torch.device("cpu"),
        compile_backend="eager",
    )
    batch = random_inputs(config, batch=2, seq_len=9)
    try:
        with torch.no_grad():
            got = loaded.call(loaded.prepare(batch))
            want = build(BridgeTowerForImageAndTextRetrieval, config)(**batch).logits
    finally:
        loaded.close()
    torch.testing.assert_close(got, want)


def test_hf_compile_falls_back_to_per_layer_compile_on_the_transformers_mask_bug(monkeypatch) -> None:
    """transformers 5.17 cannot be traced whole (its cross-attention mask); the baseline then compiles each layer."""
    config = tiny_config()
    real_compile = torch.compile

    def whole_model_trace_fails(module, **kwargs):
        def run(**batch):
            raise torch._dynamo.exc.TorchRuntimeError("got RuntimeError('Attempting to broadcast a dimension of 17')")

        return run

    monkeypatch.setattr(systems.torch, "compile", whole_model_trace_fails)
    loaded = systems.load(
        systems.parse_system("hf-compile-fp32"),
        lambda: build(BridgeTowerForImageAndTextRetrieval, config),
        torch.device("cpu"),
        compile_backend="eager",
    )
    monkeypatch.setattr(systems.torch, "compile", real_compile)
    batch = random_inputs(config, batch=2, seq_len=9)
    try:
        with torch.no_grad():
            got = loaded.call(loaded.prepare(batch))
            want = build(BridgeTowerForImageAndTextRetrieval, config)(**batch).logits
        core = loaded.module.bridgetower
        layers = [*core.text_model.encoder.layer, *core.cross_modal_text_layers, *core.cross_modal_image_layers]
        assert all(layer._compiled_call_impl is not None for layer in layers)
        assert "compiled its" in loaded.explain() and "layers one by one" in loaded.explain()
    finally:
        loaded.close()
    torch.testing.assert_close(got, want)


# -- report writers ---------------------------------------------------------------------------------------------


def _fake_results() -> dict:
    rows = []
    for system, impl, dtype, speed in [
        ("hf-eager-fp32", "hf-eager", "fp32", 10.0),
        ("btfast-fp32", "btfast", "fp32", 25.0),
    ]:
        for b in (1, 4):
            rows.append(
                dict(
                    model="base", text_len=40, batch=b, system=system, impl=impl, dtype=dtype, status="ok",
                    reason=None, pairs_per_s=speed * b, p50_ms=1e3 / speed, p99_ms=1.1e3 / speed, mean_ms=1e3 / speed,
                    min_ms=0.9e3 / speed, repeats=3, warmup=1, capped=False, first_call_s=0.5,
                    peak_mem_bytes=2**30, peak_mem_kind="x", gflop_per_pair=112.7, mfu=0.25, latencies_ms=[1, 2, 3],
                    max_abs_err=0.0 if impl == "hf-eager" else 1e-6, max_rel_err=0.0 if impl == "hf-eager" else 3e-7,
                    rel_diff_vs_hf_eager=None if impl == "hf-eager" else 3e-7,
                )
            )  # fmt: skip
    rows.append(
        dict(model="base", text_len=40, batch=1, system="hf-compile-bf16", impl="hf-compile", dtype="bf16",
             status="skipped", reason="too slow to compile here")
    )  # fmt: skip
    return dict(
        environment=dict(
            date="2026-11-27T00:00:00Z",
            device="Test CPU (2 threads)",
            device_type="cpu",
            device_slug="cpu",
            torch="2.13",
            triton="3.9",
            transformers="5.24",
            btfast="0.1.0",
            python="3.11",
            commit="abc123",
            commit_dirty=False,
            cpu_threads=2,
        ),  # fmt: skip
        plan=dict(preset="quick", systems=["hf-eager-fp32", "btfast-fp32", "hf-compile-bf16"], warmup=1, repeats=3),
        gemm_peaks={"fp32": dict(flops_per_s=1e11, dtype="fp32", n=1024, device="cpu", note="fp32 GEMM peak")},
        flops_per_pair={"base/40": flops_per_pair(base_config(), 40).as_dict()},
        systems={"btfast-fp32": dict(build_s={"base": 1.0}, notes=[], explain={"base": "btfast: ops: torch"})},
        results=rows,
        wall_s=12.0,
    )


def test_report_writers(tmp_path) -> None:
    results = _fake_results()
    written = report.write_all(results, tmp_path / "out")
    assert written["json"].name == "2026-11-27-cpu-quick.json"
    data = json.loads(written["json"].read_text())
    assert data["schema"] == report.SCHEMA and data["environment"]["commit"] == "abc123"
    assert len(data["results"]) == 5
    md = written["md"].read_text()
    assert "## pairs/s: base, text 40 tokens" in md
    assert "btfast-fp32 ÷ hf-eager-fp32" in md and "2.50×" in md
    assert "too slow to compile here" in md and "hf-compile-bf16" in md
    assert "fp32 GEMM peak" in md and "btfast: ops: torch" in md
    png = written["png"]
    if not isinstance(png, str):  # matplotlib installed
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.summary(results)
    assert "2.50× hf-eager-fp32" in text and "not measured" in text


# -- CLI --------------------------------------------------------------------------------------------------------


def test_help_explains_every_option(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        btfast_cli.main(["bench", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--model", "--systems", "--batch-sizes", "--text-lengths", "--dtype", "--device", "--repeats", "--quick",
        "--preset", "--out", "--no-plot", "--warmup", "--budget", "--cell-seconds", "--compile-mode", "--threads",
        "--compile-backend", "--all-pairs", "--mode",
    ):  # fmt: skip
        assert option in out, option
    assert "base|large|tiny" in out and "max-autotune" in out and "hf-eager-fp32" in out


def _plan(*argv: str) -> Plan:
    parser = btfast_cli.build_parser("bench")
    return cli.build_plan(parser.parse_args(["bench", *argv]))


def test_plans_on_cpu() -> None:
    main = _plan("--device", "cpu")
    assert main.preset == "default" and [s.name for s in main.systems] == ["hf-eager-fp32", "btfast-fp32"]
    assert main.cells == [Cell("base", 40, 2)] and main.budget_s is None
    assert main.dtypes() == ["fp32"]  # the only GEMM peak this run times
    quick = _plan("--quick", "--device", "cpu")
    if device.native("cpu", "bf16"):
        assert "2 minutes" in quick.skip["hf-compile-bf16"] and "bf16" in quick.dtypes()
    else:  # skipped with the reason, and never timed
        for name in ("hf-eager-bf16", "btfast-bf16", "hf-compile-bf16"):
            assert "emulated" in quick.skip[name] and "--dtype bf16" in quick.skip[name]
        assert quick.dtypes() == ["fp32"] and quick.all_pairs.dtype == "fp32"
        emulated = _plan("--quick", "--device", "cpu", "--dtype", "bf16")  # asked for: runs, and says emulated
        assert "hf-eager-bf16" not in emulated.skip and "bf16" in emulated.dtypes()
        assert any("emulated" in n for n in emulated.notes) and emulated.all_pairs.dtype == "bf16"
    assert {c.batch for c in quick.cells} == {1, 2} and quick.budget_s is not None
    asked = _plan("--quick", "--device", "cpu", "--systems", "hf-compile")
    assert not asked.skip  # asked for explicitly: it runs
    gpu = _plan("--preset", "gpu", "--device", "cpu")
    assert {c.model for c in gpu.cells} == {"base", "large"} and Cell("base", 512, 8) in gpu.cells
    assert Cell("base", 40, 256) in gpu.cells and "hf-compile-bf16" in gpu.only
    custom = _plan("--model", "tiny,base", "--batch-sizes", "2,3", "--text-lengths", "7", "--dtype", "fp16")
    assert len(custom.cells) == 4 and {s.name for s in custom.systems} == {"hf-eager-fp16", "btfast-fp16"}
    assert main.all_pairs is None and custom.all_pairs is None  # asked for only, without a preset
    with pytest.raises(SystemExit):
        _plan("--model", "huge")


def test_all_pairs_plans() -> None:
    gpu = _plan("--preset", "gpu", "--device", "cpu").all_pairs
    low = "bf16" if device.native("cpu", "bf16") else "fp32"  # planned on this CPU: bf16 only where native
    assert (gpu.images, gpu.texts, gpu.text_len, gpu.batch, gpu.models, gpu.dtype) == (64, 64, 40, 64, ["base"], low)
    plan = _plan("--preset", "gpu", "--device", "cpu")
    assert 0 < gpu.reserve_s < plan.budget_s and plan.cells_budget_s == plan.budget_s - gpu.reserve_s
    assert "less 75s kept for all pairs" in plan.budget_text()
    quick = _plan("--quick", "--device", "cpu").all_pairs
    assert (quick.images, quick.texts, quick.models, quick.batch) == (2, 2, ["base"], 2) and quick.reserve_s > 0
    asked = _plan(
        "--device", "cpu", "--model", "tiny", "--all-pairs", "16x8", "--batch-sizes", "2,8", "--dtype", "bf16"
    )
    ap = asked.all_pairs
    assert (ap.images, ap.texts, ap.pairs, ap.text_len, ap.batch, ap.dtype, ap.models) == (
        16,
        8,
        128,
        16,
        8,
        "bf16",
        ["tiny"],
    )
    assert ap.reserve_s == 0 and asked.cells_budget_s is None
    assert ap.system_names() == ["hf-eager-bf16", "btfast-bf16", "btfast-dedup-bf16"]
    assert _plan("--quick", "--device", "cpu", "--all-pairs", "off").all_pairs is None
    assert _plan("--quick", "--device", "cpu", "--all-pairs", "3,5").all_pairs.pairs == 15
    for bad in ("3", "3,0", "a,b", "1,2,3"):
        with pytest.raises(SystemExit):
            _plan("--all-pairs", bad)


def test_bad_combinations_exit_2(capsys) -> None:
    assert btfast_cli.main(["bench", "--quick", "--preset", "gpu", "--device", "cpu"]) == 2
    assert "pick one" in capsys.readouterr().err
    assert btfast_cli.main(["bench", "--mode", "kernels", "--quick", "--device", "cpu"]) == 2
    assert "runs alone" in capsys.readouterr().err


# -- tiny runs end to end ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("asked", [False, True], ids=["default", "dtype-bf16"])
def test_quick_tiny_end_to_end(tmp_path, capsys, asked: bool) -> None:
    """--quick on the tiny model; bf16 runs where the CPU has bf16 units or where asked for (then it says emulated),
    else it is skipped with the reason printed and no bf16 is timed at all (not even the GEMM peak)."""
    argv = ["bench", "--model", "tiny", "--quick", "--device", "cpu", "--out", str(tmp_path), "--repeats", "2"]
    argv += ["--budget", "3600"]  # what the test checks must not depend on how loaded the machine is
    rc = btfast_cli.main(argv + (["--dtype", "bf16", "--all-pairs", "off"] if asked else []))  # pairs: below
    assert rc == 0
    out = capsys.readouterr()
    assert "skipping hf-compile-bf16" in out.err  # never silently
    bf16 = asked or device.native("cpu", "bf16")
    files = sorted(p.name for p in tmp_path.iterdir())
    assert [f.rsplit(".", 1)[1] for f in files] == ["json", "md", "png"] and files[0].endswith("-cpu-quick.json")
    data = json.loads((tmp_path / files[0]).read_text())
    env = data["environment"]
    for key in ("device", "torch", "triton", "transformers", "commit", "date"):
        assert key in env
    assert sorted(data["gemm_peaks"]) == (["bf16", "fp32"] if bf16 else ["fp32"])
    ok = {r["system"]: r for r in data["results"] if r["status"] == "ok" and r["batch"] == 2}
    assert set(ok) == {"hf-eager-fp32", "btfast-fp32"} | ({"hf-eager-bf16", "btfast-bf16"} if bf16 else set())
    for r in ok.values():
        assert r["pairs_per_s"] > 0 and r["p50_ms"] <= r["p99_ms"] and r["repeats"] == 2
        assert 0 < r["mfu"] and math.isfinite(r["mfu"]) and r["gflop_per_pair"] > 0
    assert ok["hf-eager-fp32"]["max_abs_err"] == 0.0
    assert ok["btfast-fp32"]["max_rel_err"] < 1e-5 and ok["btfast-fp32"]["rel_diff_vs_hf_eager"] < 1e-5
    if bf16:
        assert ok["btfast-bf16"]["max_rel_err"] < 0.1
        assert ("emulated" in out.out) == (not device.native("cpu", "bf16"))
    else:
        for name in ("hf-eager-bf16", "btfast-bf16"):
            rows = [r for r in data["results"] if r["system"] == name]
            assert rows and all(r["status"] == "skipped" and "emulated" in r["reason"] for r in rows)
        assert "skipped: btfast-bf16: bf16 is emulated on this CPU" in out.out
    skipped = [r for r in data["results"] if r["system"] == "hf-compile-bf16"]
    assert skipped and all(r["status"] == "skipped" and r["reason"] for r in skipped)
    assert "btfast:" in data["systems"]["btfast-fp32"]["explain"]["tiny"]
    if asked:
        assert not data["all_pairs"]
        return
    # --quick also scores all pairs (2 x 2 on CPU), in the comparison's low dtype where it runs
    (ap,) = data["all_pairs"]
    low = "bf16" if bf16 else "fp32"
    assert (ap["images"], ap["texts"], ap["dtype"], ap["status"]) == (2, 2, low, "ok"), ap
    assert ap["systems"][f"btfast-dedup-{low}"]["max_rel_err"] < 0.1


def test_ctrl_c_writes_what_was_measured(tmp_path) -> None:
    """A real SIGINT to `btfast bench` in its timed calls: it stops within seconds and writes the calls timed so far."""
    argv = [sys.executable, "-m", "btfast.cli", "bench", "--model", "tiny", "--device", "cpu", "--batch-sizes", "2"]
    argv += ["--repeats", "1000000", "--out", str(tmp_path), "--no-plot"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(180, proc.kill)
    watchdog.start()
    try:
        for line in proc.stderr:
            if "first timed round took" in line:  # every system has one timed call
                break
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        stopped = time.perf_counter() - t0
    finally:
        watchdog.cancel()
        proc.kill()
    assert proc.returncode == 130, err
    assert stopped < 15 and "interrupted; writing what was measured" in err
    (json_file,) = tmp_path.glob("*.json")
    data = json.loads(json_file.read_text())
    assert data["interrupted"]
    ok = [r for r in data["results"] if r["status"] == "ok"]
    assert {r["system"] for r in ok} == {"hf-eager-fp32", "btfast-fp32"}
    assert all(r["interrupted"] and 1 <= r["repeats"] < 1000000 for r in ok) and data["plan"]["notes"]
    assert "btfast-fp32" in out


def test_main_job_tiny_prints_ratio_and_difference(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # no preset: nothing may be written
    argv = ["bench", "--model", "tiny", "--device", "cpu", "--no-progress", "--repeats", "2"]
    assert btfast_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "btfast-fp32" in out and "hf-eager-fp32" in out
    assert "ITM logits max relative difference" in out and "x;" in out
    assert not list(tmp_path.iterdir())


def test_all_pairs_tiny_end_to_end(tmp_path, capsys) -> None:
    """3 images x 4 texts at 5 rows per call (a short last chunk): figures in JSON, Markdown and console; fp32 exact."""
    argv = ["bench", "--model", "tiny", "--device", "cpu", "--all-pairs", "3,4", "--batch-sizes", "5"]
    argv += ["--repeats", "2", "--out", str(tmp_path), "--no-plot", "--no-progress"]
    assert btfast_cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "all pairs, tiny: 3 images × 4 texts = 12 pairs" in out and "HF eager pair by pair" in out
    (json_file,) = tmp_path.glob("*.json")
    data = json.loads(json_file.read_text())
    assert data["plan"]["all_pairs"]["pairs"] == 12
    (ap,) = data["all_pairs"]
    assert ap["status"] == "ok" and (ap["model"], ap["pairs"], ap["batch"], ap["text_len"]) == ("tiny", 12, 5, 16)
    assert set(ap["systems"]) == {"hf-eager-fp32", "btfast-fp32", "btfast-dedup-fp32"}
    for s in ap["systems"].values():
        assert s["pairs_per_s"] > 0 and s["repeats"] == 2 and s["p50_s"] <= s["p99_s"]
        assert s["max_abs_err"] < 1e-5 and s["max_rel_err"] < 1e-5
    assert ap["systems"]["hf-eager-fp32"]["max_abs_err"] == 0.0  # it is the reference
    rate = {k: v["pairs_per_s"] for k, v in ap["systems"].items()}
    assert ap["speedup_dedup_vs_btfast"] == pytest.approx(rate["btfast-dedup-fp32"] / rate["btfast-fp32"])
    assert ap["speedup_dedup_vs_hf"] == pytest.approx(rate["btfast-dedup-fp32"] / rate["hf-eager-fp32"])
    md = json_file.with_suffix(".md").read_text()
    assert "## All pairs: 3 images × 4 texts" in md and "dedup ÷ btfast pair by pair" in md
    assert "encode 3 images + 4 texts once, fuse 12 pairs" in md


def test_all_pairs_scorers_agree_with_hf_pairs() -> None:
    """The three scorers give HF's logits of every (image, text) pair, image-major."""
    from btfast.benchmark import all_pairs

    config = tiny_config()
    spec = all_pairs.AllPairs(images=3, texts=2, text_len=9, batch=4, dtype="fp32")
    x = random_inputs(config, batch=3, seq_len=9, seed=5)
    data = dict(pixel_values=x["pixel_values"], input_ids=x["input_ids"][:2], attention_mask=x["attention_mask"][:2])
    cpu = torch.device("cpu")
    loaded = {
        key: systems.load(systems.parse_system(name), lambda: build(BridgeTowerForImageAndTextRetrieval, config), cpu)
        for key, name in (("hf", "hf-eager-fp32"), ("btfast", "btfast-fp32"))
    }
    try:
        fns = all_pairs.scorers(spec, loaded, data, cpu)
        with torch.no_grad():
            got = {name: fn() for name, fn in fns.items()}
            model = build(BridgeTowerForImageAndTextRetrieval, config)
            want = torch.cat([model(**{k: v[[t]] for k, v in data.items() if k != "pixel_values"},
                                    pixel_values=data["pixel_values"][[i]]).logits
                              for i in range(3) for t in range(2)])  # fmt: skip
    finally:
        for v in loaded.values():
            v.close()
    assert list(got) == ["hf-eager-fp32", "btfast-fp32", "btfast-dedup-fp32"]
    for logits in got.values():
        torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-5)


def test_all_pairs_skipped_when_the_budget_is_spent() -> None:
    from btfast.benchmark.all_pairs import AllPairs

    plan = Plan(
        cells=[Cell("tiny", 8, 2)],
        systems=systems.parse_systems("hf-eager,btfast", "fp32"),
        device=torch.device("cpu"),
        repeats=1,
        budget_s=0.0,
        preset="test",
        all_pairs=AllPairs(2, 2, 8, 2, "fp32", ["tiny"]),
    )
    results = run_plan(plan, Progress(total=0, enabled=False))
    (ap,) = results["all_pairs"]
    assert ap["status"] == "skipped" and "time budget" in ap["reason"] and not ap["systems"]
    assert "not measured (skipped: time budget" in report.summary(results)
    assert "Not measured (skipped): time budget" in report.markdown(results)


def test_budget_skips_with_reason_and_reference_is_computed() -> None:
    plan = Plan(
        cells=[Cell("tiny", 8, 1), Cell("tiny", 8, 2), Cell("tiny", 60, 1)],
        systems=systems.parse_systems("btfast-bf16", "bf16"),
        device=torch.device("cpu"),
        repeats=2,
        budget_s=0.0,
        preset="test",
    )
    results = run_plan(plan, Progress(total=0, enabled=False))
    by = {(r["text_len"], r["batch"]): r for r in results["results"]}
    # the largest batch first; a system's first cell always runs (nothing to estimate it from); a spent budget
    # also stops the timed rounds after the first
    assert by[(8, 2)]["status"] == "ok" and by[(8, 2)]["repeats"] == 1
    assert by[(8, 1)]["status"] == "skipped" and "time budget" in by[(8, 1)]["reason"]
    assert by[(60, 1)]["status"] == "skipped" and "positions" in by[(60, 1)]["reason"]
    # no hf-eager-fp32 system: the reference was computed apart, so the error is known
    assert by[(8, 2)]["max_rel_err"] is not None and by[(8, 2)]["max_rel_err"] < 0.1


def test_cell_estimates() -> None:
    from btfast.benchmark.runner import Runner

    runner = Runner(Plan(cells=[], systems=[], device=torch.device("cpu"), repeats=10, cell_seconds=2.0))
    cell = Cell("base", 40, 8)
    assert runner._estimate(cell, None, 0.0, 1) is None  # nothing measured yet
    runner.cell_wall[(cell, "btfast-fp32")] = 5.0
    runner.cell_wall[(cell, "hf-eager-bf16")] = 7.0
    assert runner._estimate(cell, None, 0.0, 1) == 7.0  # the slowest other system
    runner.cell_wall[(cell, "hf-eager-fp32")] = 9.0
    assert runner._estimate(cell, None, 0.0, 1) == 9.0  # the reference
    # own last cell: 0.1 s per pair → 0.8 s per call; 1 warmup + 10 timed calls capped at 2 s (≥ 3 calls) + extra
    assert runner._estimate(cell, 0.1, 0.5, 1) == pytest.approx(0.8 + 2.4 + 0.5)


def test_first_contact_script_cpu_dry_run(tmp_path) -> None:
    """bench/gpu.sh, the first GPU call, on CPU with the tiny model: every headline field is in its JSON, so that
    call cannot die of a typo; its planned device time (header) fits a 15-minute lease with a machine start and a
    rerun."""
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu.sh"
    planned = re.search(r"planned device time: (\d+) s", script.read_text())
    assert planned and int(planned.group(1)) <= 300
    args = "--model tiny --device cpu --compile-backend eager --batch-sizes 1,2 --no-plot"
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, BENCH_ARGS=args)
    done = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8 and "env.txt" in files and "bench.log" in files
    (json_file,) = tmp_path.glob("*-cpu-headline.json")
    data = json.loads(json_file.read_text())
    assert [c["check"] for c in data["smoke"]] == ["kernels", "engine", "graphs"]
    assert {c["status"] for c in data["smoke"]} <= {"ok", "skipped"} and data["smoke"][1]["status"] == "ok"
    names = ["hf-eager-bf16", "hf-compile-bf16", "btfast-bf16", "btfast-torch-bf16", "btfast-triton-bf16"]
    assert data["plan"]["systems"] == names
    ok = {(r["system"], r["batch"]): r for r in data["results"] if r["status"] == "ok"}
    assert set(ok) == {(n, b) for n in names for b in (1, 2)} - {("hf-compile-bf16", 1)}  # compile: largest batch
    for r in ok.values():
        for key in ("pairs_per_s", "p50_ms", "p99_ms", "first_call_s", "mfu", "max_abs_err", "max_rel_err"):
            assert r[key] is not None and math.isfinite(r[key]), (r["system"], key)
        assert "mfu_published" in r  # None off a known GPU
    assert "published_bf16_flops_per_s" in data and data["gemm_peaks"]["bf16"]["flops_per_s"] > 0
    for name in names:
        assert data["systems"][name]["build_s"]["tiny"] >= 0
    for name in names[2:]:
        race = data["systems"][name]["race"]["tiny"]
        assert {"note", "laps", "off"} <= set(race)
    (prof,) = data["profiles"].values()
    assert prof["cell"]["batch"] == 2 and {"gemm", "idle"} <= set(prof["categories"]) and prof["gemm"]
    assert sum(c["share"] for c in prof["categories"].values()) == pytest.approx(1.0)
    md = json_file.with_suffix(".md").read_text()
    for section in ("## Smoke checks", "## Build time", "## Where the time goes", "## Kernel race"):
        assert section in md


@pytest.mark.parametrize(
    ("name", "want"),
    [("aten::addmm", "gemm"), ("sm90_xmma_gemm_bf16bf16_bf16f32", "gemm"), ("_attention_fwd_kernel", "attention"),
     ("triton_per_fused_add_native_layer_norm_3", "add/layernorm"), ("aten::copy_", "copies"),
     ("triton_poi_fused_gelu_2", "pointwise"), ("aten::_softmax", "attention")],
)  # fmt: skip
def test_profile_categories(name: str, want: str) -> None:
    from btfast.benchmark.headline import category

    assert category(name) == want


def test_kernels_mode_tiny(tmp_path, capsys) -> None:
    """--mode kernels: the kernel race's cases at the tiny model's shapes, both sides run (interpreted on CPU)."""
    argv = ["bench", "--mode", "kernels", "--model", "tiny", "--batch-sizes", "1", "--text-lengths", "8"]
    assert btfast_cli.main(argv + ["--device", "cpu", "--out", str(tmp_path), "--no-plot", "--no-progress"]) == 0
    (json_file,) = tmp_path.glob("*-cpu-kernels.json")
    (entry,) = json.loads(json_file.read_text())["kernels"]
    assert entry["dtype"] == "fp32" and "batch 1, text 8 tokens" in entry["workload"]
    assert {c["op"] for c in entry["cases"]} == set(entry["per_forward"]) == {"add_layernorm", "attention", "linear"}
    for c in entry["cases"]:
        assert c["calls"] > 0 and c["triton_ms"] > 0 and c["torch_ms"] > 0 and c["max_rel_diff"] < 1e-4, c
    assert "## Kernels against torch" in json_file.with_suffix(".md").read_text()


def test_kernels_mode_needs_cuda_or_the_interpreter(monkeypatch, capsys) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert btfast_cli.main(["bench", "--mode", "kernels", "--model", "tiny", "--device", "cpu"]) == 2
    assert "needs CUDA" in capsys.readouterr().err


def test_all_pairs_mode_runs_only_the_scenario(tmp_path) -> None:
    argv = ["bench", "--mode", "all-pairs", "--model", "tiny", "--all-pairs", "2,3", "--device", "cpu"]
    assert btfast_cli.main(argv + ["--repeats", "1", "--out", str(tmp_path), "--no-plot", "--no-progress"]) == 0
    data = json.loads(next(tmp_path.glob("*-cpu-all-pairs.json")).read_text())
    (ap,) = data["all_pairs"]
    assert not data["results"] and ap["status"] == "ok" and ap["pairs"] == 6 and ap["batch"] == 2
    assert ap["systems"]["btfast-dedup-fp32"]["max_rel_err"] < 1e-5
