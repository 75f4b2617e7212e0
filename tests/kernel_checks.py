"""What the kernel tests share: dtypes, the device, the CUDA-only mark and the tolerance rule.

Tolerance as in flash-attention: fp32 within 1e-5; fp16/bf16 at most twice the error of PyTorch's own op at
that dtype against the fp32 reference, plus one ulp at the output's largest magnitude.
"""

import pytest
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="real shapes need CUDA")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def assert_matches(out: torch.Tensor, ref: torch.Tensor, torch_out: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.dtype == dtype and out.shape == ref.shape
    assert not out.isnan().any()
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        return
    err = (out.float() - ref).abs().max().item()
    torch_err = (torch_out.float() - ref).abs().max().item()
    ulp = torch.finfo(dtype).eps * max(1.0, ref.abs().max().item())
    assert err <= 2 * torch_err + ulp, f"kernel error {err:.3g}, torch's own {torch_err:.3g}, ulp {ulp:.3g}"
