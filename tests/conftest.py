"""Test set-up: without a GPU, Triton kernels run in its interpreter, which must be switched
on before any kernel is defined (triton reads it when `@triton.jit` runs)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
