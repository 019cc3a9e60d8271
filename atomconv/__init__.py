"""atomconv: adaptive convolutions with per-pixel dynamic filter atoms (ACDA, ICCV 2021)."""

from .functional import atom_conv2d

__all__ = ["atom_conv2d"]
