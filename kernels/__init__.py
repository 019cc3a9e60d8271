"""Triton kernels of the ACDA operator and their launchers, usable on their own as a backend."""

from .forward import atom_conv2d_forward

__all__ = ["atom_conv2d_forward"]
