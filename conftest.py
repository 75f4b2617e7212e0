"""Root pytest setup: without CUDA, Triton kernels run under the interpreter.

Set here, before anything imports triton (``triton.jit`` reads TRITON_INTERPRET when it decorates).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
