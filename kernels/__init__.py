"""Triton kernels for BridgeTower's hot paths, installed as ``btfast.kernels``.

Each module holds a ``@triton.jit`` kernel, its Python launcher and a plain-PyTorch reference.
"""
