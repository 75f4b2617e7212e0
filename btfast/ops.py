"""The engine's op table: every primitive the forward uses, served by Triton on CUDA, torch elsewhere.

The model (btfast/model.py) calls only these methods, so the backend is chosen in one place. Each op has one
record (`OPS`): its kernel, the kernel's `unsupported_reasons` check and its torch path, which is the kernel's
own test reference; the kernel race's verdicts (`Verdicts`) say where a kernel serves.
Each time a Triton kernel cannot serve a call, the table falls back to torch and records why, once
per reason (a log line and `reasons()` for `explain()`), never silently.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor

import btfast.kernels as K
from btfast.kernels._common import INTERPRET, TRITON_IMPORT_ERROR
from btfast.weights import Linear, Link, Norm

log = logging.getLogger("btfast")


def split_heads(x: Tensor, parts: int, heads: int) -> list[Tensor]:
    """(B, L, parts·H) -> `parts` views of shape (B, heads, L, H/heads), no copy: the layout `Ops.attention` takes."""
    b, n, _ = x.shape
    return list(x.view(b, n, parts, heads, -1).permute(2, 0, 3, 1, 4).unbind(0))


def merge_heads(x: Tensor) -> Tensor:
    """(B, heads, L, D) -> (B, L, heads·D)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _link_coefficients(link: Link | None) -> tuple[Tensor | float, Tensor | float]:
    if link is None:
        return 1.0, 1.0
    if link.scale is not None:
        return link.scale, 1.0
    if link.beta is not None:
        return 1 - link.beta, link.beta
    return 1.0, 1.0


def _torch_add_layernorm(
    x: Tensor, residual: Tensor | None, norm: Norm, alpha: Tensor | float = 1.0, beta: Tensor | float = 1.0
) -> Tensor:
    return K.add_layernorm_reference(x, residual, norm.weight, norm.bias, norm.eps, alpha, beta, upcast=False)[0]


def _torch_linear(x: Tensor, lin: Linear, activation: str | None = None, residual: Tensor | None = None) -> Tensor:
    return K.linear_reference(x, lin.weight, lin.bias, activation, residual, upcast=False)


def _torch_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
    return K.attention_reference(q, k, v, key_mask, upcast=False)


@dataclass(frozen=True)
class OpRecord:
    """One op of the forward: its Triton kernel and the check saying why the kernel cannot serve a call (names in
    `btfast.kernels`), and its one torch path: the kernel's own test reference (`btfast.kernels.*_reference`), run
    in the inputs' dtype (PyTorch's LayerNorm and SDPA accumulate half inputs in fp32)."""

    kernel: str
    unsupported_reasons: str
    torch: Callable[..., Tensor]


OPS: dict[str, OpRecord] = {
    "add_layernorm": OpRecord("add_layernorm", "add_layernorm_unsupported_reasons", _torch_add_layernorm),
    "linear": OpRecord("linear", "linear_unsupported_reasons", _torch_linear),
    "attention": OpRecord("attention", "attention_unsupported_reasons", _torch_attention),
}
KERNEL_OPS = tuple(OPS)
LOST = "lost the kernel race"


@dataclass(frozen=True)
class Lap:
    """An op's race result: milliseconds per forward on each side (calls × time per call, summed over cases)."""

    triton_ms: float
    torch_ms: float

    @property
    def speedup(self) -> float:
        return self.torch_ms / self.triton_ms if self.triton_ms > 0 else float("inf")

    @property
    def triton_wins(self) -> bool:
        return self.triton_ms < self.torch_ms


@dataclass
class Verdicts:
    """What a kernel race (btfast.kernel_race) found, for the op table to take: per op its times, or why it
    could not be timed; `where` says at which shapes and how long the race took."""

    laps: dict[str, Lap] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    where: str = ""

    def off(self) -> dict[str, str]:
        """Why each op that lost or failed the race is served by torch."""
        lost = {
            op: f"{LOST}: Triton {lap.triton_ms:.3f} ms vs torch {lap.torch_ms:.3f} ms per forward at {self.where}"
            for op, lap in self.laps.items()
            if not lap.triton_wins
        }
        return {**lost, **self.failed}


def _resolve(kernels: bool | str | Iterable[str] | None) -> tuple[tuple[str, ...], bool]:
    """(ops to serve with Triton, whether the user asked for them explicitly).

    By default every kernel is a candidate; on CUDA each then races torch at the model's shapes and serves
    only where it wins (btfast.kernel_race). An explicit choice is served as asked, without a race.
    """
    if kernels is None:
        return KERNEL_OPS, False
    if kernels is False:
        return (), True
    if kernels is True or kernels == "all":
        return KERNEL_OPS, True
    names = (kernels,) if isinstance(kernels, str) else tuple(kernels)
    unknown = [n for n in names if n not in KERNEL_OPS]
    if unknown:
        raise ValueError(f"unknown kernels {unknown}; choose from {KERNEL_OPS}, True, False or 'all'")
    return names, True


class Ops:
    """Primitive ops of the BridgeTower forward.

    kernels: None = on CUDA, each Triton kernel that beats torch in the kernel race; True / "all" = every
    kernel; False = torch only; or a list of op names. Asked for explicitly under TRITON_INTERPRET=1, the
    kernels also run on CPU (tests).
    """

    def __init__(self, kernels: bool | str | Iterable[str] | None = None) -> None:
        wanted, self.explicit = _resolve(kernels)
        self.kernels = None
        self.interpret = False
        self.off: dict[str, str] = {}  # op -> why Triton does not serve it at all
        for op in KERNEL_OPS:
            if op not in wanted:
                self.off[op] = f"not asked for (optimize(..., kernels={kernels!r}))"
        if wanted and TRITON_IMPORT_ERROR is not None:  # say so, run torch
            for op in wanted:
                self.off[op] = f"Triton cannot be imported ({TRITON_IMPORT_ERROR})"
        elif wanted:
            self.kernels, self.interpret = K, INTERPRET
        self.used: Counter[str] = Counter()
        self.fallbacks: Counter[str] = Counter()
        self.verdicts = Verdicts()  # the last kernel race's, when the kernels raced torch

    # -- bookkeeping -------------------------------------------------------------------------------

    def _triton_ok(self, op: str, x: Tensor, *args: object) -> bool:
        """Whether the Triton kernel serves this call; otherwise record (and log once) why not."""
        if op in self.off:
            return False
        if not x.is_cuda and not (self.interpret and self.explicit):
            return False  # off CUDA torch is the intended path, not a fallback
        why = getattr(self.kernels, OPS[op].unsupported_reasons)(*args)
        if torch.compiler.is_compiling():
            # traced: keep no books (dynamo would guard on the counts and compile again every call); the
            # runtime calls each bucket once eagerly first, and those calls keep them
            return not why
        if not why:
            self.used[f"{op}: triton"] += 1
            return True
        reason = f"{op}: torch ({'; '.join(why)})"
        if reason not in self.fallbacks:
            log.warning("btfast fallback: %s", reason)
        self.fallbacks[reason] += 1
        return False

    def may_serve(self, x: Tensor) -> bool:
        """Whether a Triton kernel may serve calls on tensors like `x` (else torch serves every op, no books kept)."""
        on = self.kernels is not None and any(op not in self.off for op in KERNEL_OPS)
        return on and (x.is_cuda or (self.interpret and self.explicit))

    def racing(self) -> tuple[str, ...]:
        """The ops a kernel race would time: kernels on, apart from an earlier race's verdicts (a new device or
        dtype races anew)."""
        earlier = self.verdicts.off()
        return (
            tuple(op for op in KERNEL_OPS if self.off.get(op, earlier.get(op)) == earlier.get(op))
            if self.kernels
            else ()
        )

    def take(self, verdicts: Verdicts) -> None:
        """Serve each op as a kernel race decided: the losers and the failures by torch, with the figures."""
        for op, why in self.verdicts.off().items():
            if self.off.get(op) == why:  # an earlier race's verdict, not a later self-check's
                del self.off[op]
        self.verdicts = verdicts
        for op, why in verdicts.off().items():
            self.off[op] = why
            log.info("btfast: Triton %s kernel off: %s", op, why)

    def reasons(self) -> list[str]:
        """Human-readable lines: which backend served which op, and every fallback with its reason."""
        lines = [f"{k} ({n} calls)" for k, n in sorted(self.used.items())]
        lines += [f"fallback {k} ({n} calls)" for k, n in sorted(self.fallbacks.items())]
        lines += [f"{op}: torch ({why})" for op, why in self.off.items()]
        if self.verdicts.laps:
            lines.append(f"kernel race at {self.verdicts.where}, ms per forward:")
            lines += [
                f"  {op}: Triton {lap.triton_ms:.3f} vs torch {lap.torch_ms:.3f} ({lap.speedup:.2f}x) -> "
                f"{'Triton' if op not in self.off else 'torch'}"
                for op, lap in self.verdicts.laps.items()
            ]
        return lines

    @torch.no_grad()
    def self_check(self, device: torch.device, dtype: torch.dtype, hidden: int, heads: int) -> None:
        """Run each Triton kernel once on small inputs of the model's sizes against the torch path.

        A kernel that fails to compile or disagrees is switched off for this model, with the reason in
        `explain()` and a warning: a broken kernel never reaches a user's outputs.
        """
        if self.kernels is None:
            return
        g = torch.Generator(device="cpu").manual_seed(0)

        def rand(*shape: int) -> Tensor:
            return torch.randn(*shape, generator=g).to(device, dtype)

        norm = Norm(rand(hidden) + 1, rand(hidden), 1e-5)
        lin = Linear(rand(hidden, hidden) / hidden**0.5, rand(hidden))
        mask = torch.ones(2, 9, dtype=torch.bool, device=device)
        mask[1, 4:] = False
        q, k, v = rand(2, heads, 5, 64), rand(2, heads, 9, 64), rand(2, heads, 9, 64)
        x, r = rand(2, 7, hidden), rand(2, 7, hidden)
        cases = {
            "add_layernorm": lambda: self.add_layernorm(x, r, norm),
            "linear": lambda: self.linear(x, lin, activation="gelu", residual=r),
            "attention": lambda: self.attention(q, k, v, mask),
        }
        tol = 2e-3 if dtype == torch.float32 else 5e-2
        for op, case in cases.items():
            if op in self.off:
                continue
            try:
                got = case()
                self.off[op] = "self-check"  # the same call, served by torch
                want = case()
                del self.off[op]
                err = ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-6)).item()
                if not err <= tol:
                    self.off[op] = f"self-check disagreed with torch (relative error {err:.2g} > {tol:g})"
            except Exception as e:  # compile or launch failure on this GPU / Triton version
                self.off[op] = f"self-check failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}"
            if op in self.off:
                log.warning("btfast: Triton %s kernel off for this model: %s", op, self.off[op])
        self.used.clear()

    # -- ops -----------------------------------------------------------------------------------------

    def layer_norm(self, x: Tensor, norm: Norm) -> Tensor:
        return self.add_layernorm(x, None, norm)

    def add_layernorm(self, x: Tensor, residual: Tensor | None, norm: Norm, link: Link | None = None) -> Tensor:
        """LayerNorm(alpha·x + beta·residual) in fp32; alpha/beta from a bridge `link` (1 otherwise)."""
        alpha, beta = _link_coefficients(link)
        if self._triton_ok("add_layernorm", x, x, residual, norm.weight, norm.bias, alpha, beta):
            return self.kernels.add_layernorm(x, residual, norm.weight, norm.bias, norm.eps, alpha=alpha, beta=beta)
        return OPS["add_layernorm"].torch(x, residual, norm, alpha, beta)

    def linear(self, x: Tensor, lin: Linear, activation: str | None = None, residual: Tensor | None = None) -> Tensor:
        """act(x·Wᵀ + b) + residual."""
        if self._triton_ok("linear", x, x, lin.weight, lin.bias, activation, residual):
            return self.kernels.linear(x, lin.weight, lin.bias, activation=activation, residual=residual)
        return OPS["linear"].torch(x, lin, activation, residual)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """Non-causal softmax(q·kᵀ/√d)·v over (B, H, L, D); `key_mask` (B, Lk) bool, True = attend.

        A row whose keys are all masked averages all values, as the reference's additive mask does.
        """
        if self._triton_ok("attention", q, q, k, v, key_mask):
            return self.kernels.attention(q, k, v, key_mask=key_mask)
        return OPS["attention"].torch(q, k, v, key_mask)
