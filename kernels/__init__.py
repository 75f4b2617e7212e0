"""Triton kernels for BridgeTower's hot paths, installed as ``btfast.kernels``.

Each module holds a ``@triton.jit`` kernel, its Python launcher, a ``*_unsupported_reasons`` check and a
plain-PyTorch ``*_reference``. With Triton and torch >= 2.6 the kernels are also registered as custom ops
(``torch.ops.btfast.add_layernorm``, ``add_layernorm_sum``, ``linear``, ``attention``) through
``torch.library.triton_op``, so ``torch.compile`` traces into them; the public functions use those ops on
CUDA. Under ``TRITON_INTERPRET=1`` on CPU they launch the interpreted kernels directly: the ops still run
eagerly there, but tracing them would hand fake tensors to the interpreter. Importing this package never
needs Triton; calling a kernel without it raises a clear error.
"""

from .add_layernorm import add_layernorm, add_layernorm_reference, add_layernorm_unsupported_reasons
from .attention import attention, attention_reference, attention_unsupported_reasons
from .linear import ACTIVATIONS, linear, linear_reference, linear_unsupported_reasons

__all__ = [
    "ACTIVATIONS",
    "add_layernorm",
    "add_layernorm_reference",
    "add_layernorm_unsupported_reasons",
    "attention",
    "attention_reference",
    "attention_unsupported_reasons",
    "linear",
    "linear_reference",
    "linear_unsupported_reasons",
]
