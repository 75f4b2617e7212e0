"""What every kernel module shares: the guarded Triton import, the interpreter switch, input checks.

``import btfast.kernels`` must work without Triton (CPU-only installs, macOS): the kernel modules then
decorate their kernels with the inert stand-ins below, every ``*_unsupported_reasons`` says that Triton
is missing, and calling a kernel raises a clear error.
"""

import os
from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR: ImportError | None = None
except ImportError as error:  # pragma: no cover - exercised in a subprocess by the tests
    TRITON_IMPORT_ERROR = error

    def _identity_decorator(*args: object, **kwargs: object) -> object:
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return lambda fn: fn

    triton = SimpleNamespace(jit=_identity_decorator, autotune=_identity_decorator, Config=lambda *a, **k: None)
    tl = SimpleNamespace(constexpr=object)

try:  # torch >= 2.6: user Triton kernels as custom ops that torch.compile traces into
    from torch.library import triton_op, wrap_triton
except ImportError:  # pragma: no cover - older torch: kernels are launched directly
    triton_op = wrap_triton = None

# Only the installed package registers the ``btfast::`` ops. From a source checkout, transformers' probe for
# the hub's ``kernels`` package imports this folder a second time as a top-level ``kernels``; that copy must
# not re-register the ops to its own functions.
CUSTOM_OPS = TRITON_IMPORT_ERROR is None and triton_op is not None and __name__.startswith("btfast.kernels.")

# Read once, like ``triton.jit`` does when it decorates: under TRITON_INTERPRET=1 the kernels are
# interpreted on the CPU (numpy), so CPU tensors are fine and the autotune lists shrink to one small config.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def require_triton() -> None:
    """Raise a clear error when a kernel is called but Triton could not be imported."""
    if TRITON_IMPORT_ERROR is not None:
        raise RuntimeError(
            "btfast.kernels needs Triton (pip install triton; Linux + CUDA, or TRITON_INTERPRET=1 on CPU): "
            f"{TRITON_IMPORT_ERROR}"
        )


def common_reasons(*tensors: torch.Tensor | None) -> list[str]:
    """Reasons shared by all kernels: Triton present, tensors where the kernels can run, one device."""
    reasons = []
    if TRITON_IMPORT_ERROR is not None:
        reasons.append(f"triton is not importable ({TRITON_IMPORT_ERROR})")
    present = [t for t in tensors if t is not None]
    if not INTERPRET:
        for t in present:
            if t.device.type != "cuda":
                reasons.append(f"tensor on {t.device.type}: Triton kernels need CUDA (or TRITON_INTERPRET=1)")
                break
    if any(t.device != present[0].device for t in present):
        reasons.append(f"tensors on different devices: {', '.join(str(t.device) for t in present)}")
    return reasons


def dtype_reason(name: str, t: torch.Tensor) -> list[str]:
    """A reason when ``t`` is not fp32/fp16/bf16."""
    if t.dtype not in FLOAT_DTYPES:
        return [f"{name} dtype {t.dtype} is not one of float32/float16/bfloat16"]
    return []


def scalar_reason(name: str, value: float | torch.Tensor, like: torch.Tensor) -> list[str]:
    """A reason when a scale factor is neither a Python number nor a one-element float tensor on ``like``'s device."""
    if not isinstance(value, torch.Tensor):
        return []
    if value.numel() != 1:
        return [f"{name} must be a Python float or a one-element tensor, got shape {tuple(value.shape)}"]
    if not value.dtype.is_floating_point:
        return [f"{name} tensor dtype {value.dtype} is not floating point"]
    if value.device != like.device:
        return [f"{name} is on {value.device} but the input is on {like.device}"]
    return []


def index_span(t: torch.Tensor) -> int:
    """One past the largest element offset ``t`` reaches through its strides."""
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def upcast_dot(dtype: torch.dtype) -> bool:
    """Whether a kernel must feed ``tl.dot`` fp32 copies of its operands: only bf16 under the interpreter,
    whose ``tl.dot`` multiplies bf16 bit patterns as integers (triton-lang/triton#11584, not supported
    upstream). Products of bf16 values are exact in fp32, so this changes nothing but the speed."""
    return INTERPRET and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact fp32 products ("ieee", no TF32) for fp32 inputs, tensor cores otherwise."""
    return "ieee" if dtype == torch.float32 else "tf32"
