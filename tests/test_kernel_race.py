"""The kernel race: each Triton kernel serves only where it beats the torch path at the model's shapes.

On CPU the race's logic runs under TRITON_INTERPRET=1 with a scripted timer (interpreted kernels have no
meaningful speed); the CUDA-event timer and the race inside optimize() run on a GPU.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from transformers import BridgeTowerForImageAndTextRetrieval

import btfast
from btfast import kernel_race
from btfast.kernel_race import Workload, cases, cuda_timer, race
from btfast.ops import LOST, Ops
from btfast.spec import read_spec
from btfast.testing import build, tiny_config

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
WORKLOAD = Workload.of(read_spec(build(BridgeTowerForImageAndTextRetrieval, tiny_config())), batch=2, text_len=7)


def _spied_ops() -> tuple[Ops, list[str]]:
    """Ops whose kernel calls are recorded, so a timer can tell which side of a case it was handed."""
    ops = Ops()
    calls: list[str] = []
    real = ops.kernels

    def spy(name: str):
        def call(*args, **kwargs):
            calls.append(name)
            return getattr(real, name)(*args, **kwargs)

        return call

    ops.kernels = SimpleNamespace(**{n: spy(n) for n in ("add_layernorm", "linear", "attention")})
    return ops, calls


def _scripted_timer(calls: list[str], ms: dict[tuple[str, str], float], seen: list[tuple[str, str]]):
    """Runs the function once (it must work) and returns the scripted time of its op and side."""
    current = {"op": None}

    def timer(fn) -> float:
        calls.clear()
        out = fn()
        assert torch.isfinite(out).all()
        side = "triton" if calls else "torch"
        op = calls[0] if calls else current["op"]
        current["op"] = op  # each case times its Triton side first, then torch
        seen.append((op, side))
        return ms[op, side]

    return timer


def _runs_once(fn) -> float:
    assert torch.isfinite(fn()).all()
    return 1.0


def test_cases_serve_the_same_numbers_both_ways():
    ops = Ops()
    all_cases = cases(ops, WORKLOAD, torch.device("cpu"), torch.float32)
    assert {c.op for c in all_cases} == {"add_layernorm", "attention", "linear"}
    for case in all_cases:
        got, want = case.triton(), case.torch()
        assert got.shape == want.shape, case.name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=case.name)


def test_losers_are_switched_off_with_their_figures_and_winners_stay():
    ops, calls = _spied_ops()
    ms = {
        ("add_layernorm", "triton"): 1.0,
        ("add_layernorm", "torch"): 2.0,  # Triton wins
        ("attention", "triton"): 3.0,
        ("attention", "torch"): 1.5,  # torch wins
        ("linear", "triton"): 1.0,
        ("linear", "torch"): 1.0,  # a tie is not a win
    }
    seen: list[tuple[str, str]] = []
    verdicts = race(
        ops, WORKLOAD, torch.device("cpu"), torch.float32, False, False, timer=_scripted_timer(calls, ms, seen)
    )
    assert ops.off == {}, "the race only returns verdicts; the op table takes them"
    ops.take(verdicts)
    laps = verdicts.laps
    assert set(laps) == {"add_layernorm", "attention", "linear"}
    per_op = {op: sum(c.calls for c in cases(Ops(), WORKLOAD, torch.device("cpu"), torch.float32) if c.op == op)
              for op in laps}  # fmt: skip
    for op, lap in laps.items():  # times are per call × calls per forward
        assert lap.triton_ms == pytest.approx(ms[op, "triton"] * per_op[op])
        assert lap.torch_ms == pytest.approx(ms[op, "torch"] * per_op[op])
    assert "add_layernorm" not in ops.off
    assert ops.off["attention"].startswith(LOST) and "ms per forward" in ops.off["attention"]
    assert ops.off["linear"].startswith(LOST)
    assert {side for _, side in seen} == {"triton", "torch"}
    text = "\n".join(ops.reasons())
    assert "kernel race at batch 2, text 7 tokens" in text
    assert "add_layernorm: Triton" in text and "(2.00x) -> Triton" in text
    assert "-> torch" in text


def test_a_new_race_starts_from_scratch():
    ops, calls = _spied_ops()
    ops_names = ("add_layernorm", "attention", "linear")
    slow = {(op, side): (2.0 if side == "triton" else 1.0) for op in ops_names for side in ("triton", "torch")}
    ops.take(
        race(ops, WORKLOAD, torch.device("cpu"), torch.float32, False, False, timer=_scripted_timer(calls, slow, []))
    )
    assert all(ops.off[op].startswith(LOST) for op in ops_names)
    fast = {key: 3.0 - t for key, t in slow.items()}  # now Triton wins everywhere (another dtype, say)
    ops.take(
        race(ops, WORKLOAD, torch.device("cpu"), torch.float32, False, False, timer=_scripted_timer(calls, fast, []))
    )
    assert ops.off == {}


def test_a_kernel_that_cannot_be_timed_is_switched_off():
    ops, calls = _spied_ops()

    def timer(fn) -> float:
        calls.clear()
        fn()
        if calls == ["attention"]:
            raise RuntimeError("out of resources: shared memory")
        return 1.0

    verdicts = race(ops, WORKLOAD, torch.device("cpu"), torch.float32, False, False, timer=timer)
    ops.take(verdicts)
    assert "attention" not in verdicts.laps
    assert ops.off["attention"].startswith("kernel race failed: RuntimeError: out of resources")


def test_torch_side_is_compiled_for_norms_and_gemms_in_one_graph_each():
    counter = CompileCounter()  # a real dynamo trace (fullgraph) of every norm and GEMM case
    ops = Ops()
    laps = race(ops, WORKLOAD, torch.device("cpu"), torch.float32, counter, False, timer=_runs_once).laps
    assert set(laps) == {"add_layernorm", "attention", "linear"}
    assert counter.frame_count == sum(
        c.op != "attention" for c in cases(ops, WORKLOAD, torch.device("cpu"), torch.float32)
    )


def test_a_torch_side_that_fails_to_compile_is_timed_eagerly(monkeypatch):
    def no_compiler(fn, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(kernel_race.torch, "compile", no_compiler)
    laps = race(Ops(), WORKLOAD, torch.device("cpu"), torch.float32, True, False, timer=_runs_once).laps
    assert set(laps) == {"add_layernorm", "attention", "linear"}


def test_explicit_kernels_do_not_race_and_nothing_races_off_cuda():
    model = build(BridgeTowerForImageAndTextRetrieval, tiny_config())
    assert "kernel race" not in btfast.optimize(model).explain()  # CPU: torch is the path, nothing to race


@cuda
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph"])
def test_cuda_timer_measures(graphs):
    a = torch.randn(1024, 1024, device="cuda")
    small, big = cuda_timer(graphs)(lambda: a @ a), cuda_timer(graphs)(lambda: (a @ a) @ (a @ a))
    assert 0 < small < big


@cuda
def test_race_inside_optimize_on_cuda():
    fast = btfast.optimize(build(BridgeTowerForImageAndTextRetrieval, tiny_config()), device="cuda")
    text = fast.explain()
    assert "kernel race at" in text, text
    for op in ("add_layernorm", "attention", "linear"):
        assert f"  {op}: Triton" in text, text
