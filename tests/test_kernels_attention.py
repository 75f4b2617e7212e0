"""attention (flash-style forward with key padding mask) against HF-eager attention computed in fp32.

Small odd lengths run under the interpreter (16x16 blocks, so queries and keys cross block edges); the real
BridgeTower shapes (self- and cross-attention, base and large) run on CUDA only. Tolerance as in
flash-attention: fp32 within 1e-5; fp16/bf16 at most twice the error of PyTorch's own eager attention at that
dtype, plus one ulp at the output's largest magnitude.
"""

import math

import pytest
import torch
from kernel_checks import DEVICE, DTYPES, assert_matches, cuda_only

from btfast.kernels import attention, attention_reference, attention_unsupported_reasons


def padding_mask(batch: int, lk: int, all_masked_row: bool) -> torch.Tensor:
    """Text-like padding: row b keeps a prefix; with ``all_masked_row`` the last row keeps nothing."""
    lengths = torch.randint(1, lk + 1, (batch,))
    if all_masked_row:
        lengths[-1] = 0
    return torch.arange(lk)[None, :] < lengths[:, None]


def check(batch, heads, lq, lk, head_dim, dtype, mask) -> None:
    q, k, v = (torch.randn(batch, heads, n, head_dim, dtype=dtype, device=DEVICE) for n in (lq, lk, lk))
    mask = mask.to(DEVICE) if mask is not None else None
    out = attention(q, k, v, mask)
    ref = attention_reference(q, k, v, mask)
    assert_matches(out, ref, attention_reference(q, k, v, mask, upcast=False), dtype)


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("head_dim", [32, 64])
@pytest.mark.parametrize(("lq", "lk"), [(1, 7), (7, 17), (33, 5)])
def test_matches_reference(lq: int, lk: int, head_dim: int, masked: bool, dtype: torch.dtype) -> None:
    torch.manual_seed(lq * 100 + lk)
    check(2, 2, lq, lk, head_dim, dtype, padding_mask(2, lk, all_masked_row=True) if masked else None)


@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_all_masked_row_averages_all_values(dtype: torch.dtype) -> None:
    """HF adds finfo.min to masked scores, so a row with no key left gets uniform weights, not NaN."""
    torch.manual_seed(8)
    q, k, v = (torch.randn(2, 3, n, 64, dtype=dtype) for n in (5, 19, 19))
    mask = torch.zeros(2, 19, dtype=torch.int64)
    mask[0, :4] = 1
    out = attention(q, k, v, mask)
    expected = v[1].float().mean(dim=1, keepdim=True).expand(3, 5, 64)
    torch.testing.assert_close(out[1].float(), expected, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-5)
    torch.testing.assert_close(out[1].float(), attention_reference(q, k, v, mask)[1], rtol=1e-2, atol=1e-2)


@pytest.mark.usefixtures("poisoned_outputs")
def test_views_into_fused_qkv() -> None:
    """q, k, v as permuted views of one (B, L, 3, H, D) projection output: read through strides, no copy."""
    torch.manual_seed(9)
    qkv = torch.randn(2, 19, 3, 2, 64, device=DEVICE)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    mask = padding_mask(2, 19, all_masked_row=False).to(DEVICE)
    out = attention(q, k, v, mask, scale=0.2)
    torch.testing.assert_close(out, attention_reference(q, k, v, mask, scale=0.2), rtol=1e-5, atol=1e-5)


def test_output_is_free_to_merge_heads() -> None:
    q = torch.randn(2, 3, 7, 32, device=DEVICE)
    out = attention(q, q, q)
    assert out.shape == (2, 3, 7, 32) and out.transpose(1, 2).is_contiguous()


def test_default_scale_and_integer_mask() -> None:
    torch.manual_seed(10)
    q, k = torch.randn(1, 2, 9, 16, device=DEVICE), torch.randn(1, 2, 11, 16, device=DEVICE)
    mask = torch.tensor([[1, 0, 2, 0, 1, 1, 0, 0, 3, 1, 0]], dtype=torch.int32, device=DEVICE)
    out = attention(q, k, k, mask)
    ref = attention_reference(q, k, k, mask.bool(), scale=1 / math.sqrt(16))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_unsupported_reasons() -> None:
    q = torch.randn(2, 2, 5, 64, device=DEVICE)
    mask = torch.ones(2, 5, dtype=torch.bool, device=DEVICE)
    assert attention_unsupported_reasons(q, q, q, mask) == []
    odd = torch.randn(2, 2, 5, 48, device=DEVICE)
    assert any("head dim" in r for r in attention_unsupported_reasons(odd, odd, odd))
    assert any("Lk == 0" in r for r in attention_unsupported_reasons(q, q[:, :, :0], q[:, :, :0]))
    assert any("additive" in r for r in attention_unsupported_reasons(q, q, q, mask.float()))
    assert any("key_mask shape" in r for r in attention_unsupported_reasons(q, q, q, mask[:, :3]))
    assert any("dtypes differ" in r for r in attention_unsupported_reasons(q, q.half(), q))
    assert any("4-D" in r for r in attention_unsupported_reasons(q[0], q[0], q[0]))
    with pytest.raises(ValueError, match="head dim"):
        attention(odd, odd, odd)


def test_custom_op_is_registered() -> None:
    q, k = torch.randn(2, 2, 6, 32, device=DEVICE), torch.randn(2, 2, 9, 32, device=DEVICE)
    mask = padding_mask(2, 9, all_masked_row=True).to(DEVICE)
    out = torch.ops.btfast.attention(q, k, k, mask, 0.25)
    torch.testing.assert_close(out, attention_reference(q, k, k, mask, 0.25), rtol=1e-5, atol=1e-5)
    # Fake-tensor tests need real Triton: the interpreter would be handed fake tensors.
    checks = None if torch.cuda.is_available() else ("test_schema", "test_autograd_registration")
    torch.library.opcheck(torch.ops.btfast.attention.default, (q, k, k, mask, 0.25), test_utils=checks)


# (batch, heads, Lq, Lk, masked): text self-attention (padded), vision self-attention (no mask), text->image
# and image->text cross-attention (text keys padded), for base (12 heads, 325 patches) and large (16, 442).
REAL = [
    (4, 12, 40, 40, True),
    (4, 12, 325, 325, False),
    (4, 12, 40, 325, False),
    (4, 12, 325, 40, True),
    (2, 16, 50, 50, True),
    (2, 16, 442, 442, False),
    (2, 16, 442, 50, True),
    (1, 12, 512, 512, True),
]


@cuda_only
@pytest.mark.usefixtures("poisoned_outputs")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("batch", "heads", "lq", "lk", "masked"), REAL)
def test_real_shapes(batch: int, heads: int, lq: int, lk: int, masked: bool, dtype: torch.dtype) -> None:
    torch.manual_seed(lq + lk)
    check(batch, heads, lq, lk, 64, dtype, padding_mask(batch, lk, all_masked_row=True) if masked else None)


@cuda_only
def test_torch_compile_traces_the_op() -> None:
    qkv = torch.randn(4, 40, 3, 12, 64, device="cuda", dtype=torch.bfloat16)
    mask = padding_mask(4, 40, all_masked_row=False).cuda()

    def self_attention(qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return attention(q, k, v, mask).transpose(1, 2).reshape(4, 40, 768)

    torch.testing.assert_close(torch.compile(self_attention, fullgraph=True)(qkv), self_attention(qkv))
