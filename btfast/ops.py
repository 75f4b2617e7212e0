"""The engine's op table: every primitive the forward uses, served by Triton on CUDA, torch elsewhere.

The model code (btfast/model/) calls only these methods, so the backend is chosen in one place.
Each time a Triton kernel cannot serve a call, the table falls back to torch and records why, once
per reason (a log line and `reasons()` for `explain()`), never silently.
"""

from __future__ import annotations

import logging
import math
from collections import Counter

import torch
import torch.nn.functional as F
from torch import Tensor

from btfast.weights import Linear, Link, Norm

log = logging.getLogger("btfast")

ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu", "relu")


def _activate(x: Tensor, activation: str | None) -> Tensor:
    if activation is None:
        return x
    if activation == "gelu":
        return F.gelu(x)
    if activation == "gelu_tanh":
        # HF's NewGELUActivation, written out so fp32 matches it exactly
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))
    if activation == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    if activation == "relu":
        return F.relu(x)
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def _link_coefficients(link: Link | None) -> tuple[Tensor | float, Tensor | float]:
    if link is None:
        return 1.0, 1.0
    if link.scale is not None:
        return link.scale, 1.0
    if link.beta is not None:
        return 1 - link.beta, link.beta
    return 1.0, 1.0


class Ops:
    """Primitive ops of the BridgeTower forward. `triton=None` means: use the kernels where they can serve."""

    def __init__(self, triton: bool | None = None) -> None:
        self.kernels = None
        self.disabled_reason: str | None = None
        if triton is False:
            self.disabled_reason = "disabled by optimize(..., kernels=False)"
        else:
            try:
                import btfast.kernels as kernels

                self.kernels = kernels if hasattr(kernels, "attention") else None
                if self.kernels is None:
                    self.disabled_reason = "btfast.kernels provides no kernels in this build"
            except Exception as e:  # triton missing or broken: say so, run torch
                self.disabled_reason = f"btfast.kernels cannot be imported ({type(e).__name__}: {e})"
        self.used: Counter[str] = Counter()
        self.fallbacks: Counter[str] = Counter()

    # -- bookkeeping -------------------------------------------------------------------------------

    def _triton_ok(self, op: str, x: Tensor, reasons_fn_name: str, *args: object) -> bool:
        """Whether the Triton kernel serves this call; otherwise record (and log once) why not."""
        if not x.is_cuda:
            return False  # off CUDA torch is the intended path, not a fallback
        if self.kernels is None:
            reason = f"{op}: torch ({self.disabled_reason})"
        else:
            why = getattr(self.kernels, reasons_fn_name)(*args)
            if not why:
                self.used[f"{op}: triton"] += 1
                return True
            reason = f"{op}: torch ({'; '.join(why)})"
        if reason not in self.fallbacks:
            log.warning("btfast fallback: %s", reason)
        self.fallbacks[reason] += 1
        return False

    def reasons(self) -> list[str]:
        """Human-readable lines: which backend served which op, and every fallback with its reason."""
        lines = [f"{k} ({n} calls)" for k, n in sorted(self.used.items())]
        lines += [f"fallback {k} ({n} calls)" for k, n in sorted(self.fallbacks.items())]
        if self.kernels is None and self.disabled_reason:
            lines.append(f"Triton kernels off: {self.disabled_reason}")
        return lines

    # -- ops -----------------------------------------------------------------------------------------

    def layer_norm(self, x: Tensor, norm: Norm) -> Tensor:
        return self.add_layernorm(x, None, norm)

    def add_layernorm(self, x: Tensor, residual: Tensor | None, norm: Norm, link: Link | None = None) -> Tensor:
        """LayerNorm(alpha·x + beta·residual) in fp32; alpha/beta from a bridge `link` (1 otherwise)."""
        alpha, beta = _link_coefficients(link)
        if self._triton_ok("add_layernorm", x, "add_layernorm_unsupported_reasons", x, residual, norm.weight):
            return self.kernels.add_layernorm(x, residual, norm.weight, norm.bias, norm.eps, alpha=alpha, beta=beta)
        s = x if isinstance(alpha, float) and alpha == 1.0 else x * alpha
        if residual is not None:
            s = s + (residual if isinstance(beta, float) and beta == 1.0 else residual * beta)
        if s.dtype == torch.float32:
            return F.layer_norm(s, s.shape[-1:], norm.weight, norm.bias, norm.eps)
        out = F.layer_norm(s.float(), s.shape[-1:], norm.weight.float(), norm.bias.float(), norm.eps)
        return out.to(x.dtype)

    def linear(self, x: Tensor, lin: Linear, activation: str | None = None, residual: Tensor | None = None) -> Tensor:
        """act(x·Wᵀ + b) + residual."""
        if self._triton_ok("linear", x, "linear_unsupported_reasons", x, lin.weight, activation):
            return self.kernels.linear(x, lin.weight, lin.bias, activation=activation, residual=residual)
        y = _activate(F.linear(x, lin.weight, lin.bias), activation)
        return y if residual is None else y + residual

    def attention(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """Non-causal softmax(q·kᵀ/√d)·v over (B, H, L, D); `key_mask` (B, Lk) bool, True = attend.

        A row whose keys are all masked averages all values, as the reference's additive mask does.
        """
        if self._triton_ok("attention", q, "attention_unsupported_reasons", q, k, v, key_mask):
            return self.kernels.attention(q, k, v, key_mask=key_mask)
        bias = None
        if key_mask is not None:
            bias = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(~key_mask, torch.finfo(q.dtype).min)[:, None, None, :]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
