"""Triton kernels of the ACDA operator and their launchers, usable on their own as a backend."""

from .backward import atom_conv2d_backward
from .forward import atom_conv2d_forward

# atomconv checks this marker before using the package: Hugging Face's PyPI package `kernels`
# installs the same top-level name (see atomconv/triton_backend.py).
ATOMCONV_KERNELS = True

__all__ = ["atom_conv2d_backward", "atom_conv2d_forward"]
