"""Test set-up, read before any test module is imported.

- Without a GPU, Triton kernels run in its interpreter, which must be switched on before any
  kernel is defined (triton reads it when `@triton.jit` runs).
- The suite never reads or writes the user's autotune cache, and does not tune the shapes it
  runs on a GPU (ATOMCONV_AUTOTUNE=0): the tests of tuning switch it back on for themselves
  and give their caches their own directories.
- Tests marked `cuda` need a CUDA GPU: skipped without one (`python -m pytest -m cuda` runs them).
"""

import os
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ["ATOMCONV_CACHE_DIR"] = tempfile.mkdtemp(prefix="atomconv-tests-cache-")
os.environ["ATOMCONV_AUTOTUNE"] = "0"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
