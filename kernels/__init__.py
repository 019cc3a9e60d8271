"""Triton kernels of the ACDA operator and their launchers, usable on their own as a backend."""

from .backward import atom_conv2d_backward
from .forward import atom_conv2d_forward

__all__ = ["atom_conv2d_backward", "atom_conv2d_forward"]
