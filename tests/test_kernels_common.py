"""What all kernels share: ``import btfast.kernels`` works without Triton, without a GPU (and without the
interpreter) the kernels say why they cannot run, and the ``*_unsupported_reasons`` checks trace under
``torch.compile`` without graph breaks (the public wrappers run them on every call).

The import cases run in a fresh interpreter: Triton's mode (interpreted or compiled) is fixed at import.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=environment, timeout=120
    )


def test_import_without_triton() -> None:
    result = run_python(
        """
        import sys
        sys.modules["triton"] = None  # as if triton were not installed
        import torch
        import btfast.kernels as K
        x = torch.randn(2, 8)
        reasons = K.linear_unsupported_reasons(x, torch.randn(4, 8))
        assert any("triton is not importable" in r for r in reasons), reasons
        assert not hasattr(torch.ops.btfast, "linear")
        try:
            K.attention(x[None, None], x[None, None], x[None, None])
        except RuntimeError as error:
            assert "needs Triton" in str(error), error
        else:
            raise AssertionError("no error without triton")
        """
    )
    assert result.returncode == 0, result.stderr


def test_a_second_copy_imported_as_top_level_kernels_registers_nothing() -> None:
    """From a source checkout transformers' probe for the hub's `kernels` package imports kernels/ again."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, torch, btfast.kernels, kernels\n"
            "assert not sys.modules['kernels._common'].CUSTOM_OPS\n"
            "assert sys.modules['btfast.kernels._common'].CUSTOM_OPS\n"
            "print(hasattr(torch.ops.btfast, 'linear'))",
        ],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),  # the repo root, where kernels/ is
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"  # the installed package's ops are still there


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cpu_tensors_refused_without_interpreter() -> None:
    result = run_python(
        """
        import torch
        import btfast.kernels as K
        x = torch.randn(2, 8)
        assert any("need CUDA" in r for r in K.add_layernorm_unsupported_reasons(x, x)), "no reason given"
        try:
            K.add_layernorm(x, x, None, None)
        except ValueError as error:
            assert "need CUDA" in str(error), error
        else:
            raise AssertionError("CPU tensors accepted without TRITON_INTERPRET")
        """,
        TRITON_INTERPRET="0",
    )
    assert result.returncode == 0, result.stderr


def test_reasons_trace_without_graph_breaks() -> None:
    import btfast.kernels as K

    x, mask, scale = torch.randn(2, 3, 5, 64), torch.ones(2, 5, dtype=torch.bool), torch.tensor(0.5)
    checks = [
        (K.attention_unsupported_reasons, (x, x, x, mask)),
        (K.linear_unsupported_reasons, (x, torch.randn(48, 64), torch.randn(48), "gelu", torch.randn(2, 3, 5, 48))),
        (K.add_layernorm_unsupported_reasons, (x, x, torch.ones(64), None, 1 - scale, scale)),
        (K.attention_unsupported_reasons, (x, x[..., :32], x, mask.float())),
    ]
    for reasons, args in checks:
        assert torch.compile(reasons, fullgraph=True, backend="eager")(*args) == reasons(*args)
