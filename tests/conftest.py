"""Test setup (TRITON_INTERPRET is set by the root conftest.py): keep torch to this machine's cores."""

import os

import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
