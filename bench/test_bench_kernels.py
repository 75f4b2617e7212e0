"""pytest-benchmark suite for the Triton kernels at tiny shapes; runs on CPU under the Triton interpreter.

CI runs it with ``--benchmark-disable`` (each benchmark body runs once, as a test). The cases come from
``kernels_bench.py``, so this also keeps the GPU benchmark's case builders working.
"""

import kernels_bench
import pytest
import torch

from btfast.kernels._common import INTERPRET

if not torch.cuda.is_available() and not INTERPRET:
    pytest.skip("no CUDA and TRITON_INTERPRET is not set (the root conftest.py sets it)", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if torch.cuda.is_available() else torch.float32
TOL = 3e-2 if DTYPE == torch.bfloat16 else 1e-4


def run_case(benchmark, case: kernels_bench.Case) -> None:
    out = benchmark(case.triton_fn)
    ours, theirs = kernels_bench._first(out), kernels_bench._first(case.torch_fn())
    torch.testing.assert_close(ours, theirs, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("mode", ["add", "add_sum", "scaled_add", "interpolate"])
def test_add_layernorm(benchmark, mode: str) -> None:
    run_case(benchmark, kernels_bench.layernorm_case(13, 96, mode, DTYPE, DEVICE))


@pytest.mark.parametrize(("activation", "residual"), [(None, False), ("gelu", False), ("quick_gelu", True)])
def test_linear(benchmark, activation: str | None, residual: bool) -> None:
    run_case(benchmark, kernels_bench.linear_case(21, 64, 48, activation, residual, DTYPE, DEVICE, "tiny"))


@pytest.mark.parametrize(("lq", "lk", "masked"), [(9, 9, True), (17, 5, False), (5, 17, True)])
def test_attention(benchmark, lq: int, lk: int, masked: bool) -> None:
    run_case(benchmark, kernels_bench.attention_case(2, 2, lq, lk, masked, DTYPE, DEVICE, "tiny"))


@pytest.mark.parametrize("model", sorted(kernels_bench.MODELS))
def test_real_cases_build(model: str) -> None:
    """The GPU benchmark's real-shape cases build and their torch side runs (batch 1, torch only: quick)."""
    cases = kernels_bench.model_cases(model, 1, torch.float32, "cpu")
    assert {c.kernel for c in cases} == {"add_layernorm", "linear", "attention"}
    for case in cases:
        assert case.bytes > 0 and not kernels_bench._first(case.torch_fn()).isnan().any()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_bench_refuses_without_cuda(tmp_path) -> None:
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        kernels_bench.main(["--out", str(tmp_path / "k.json")])
