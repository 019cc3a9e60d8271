"""atomconv: adaptive convolutions with per-pixel dynamic filter atoms (ACDA, ICCV 2021)."""

from .bases import fourier_bessel_bases
from .functional import atom_conv2d
from .layer import AtomConv2d

__all__ = ["AtomConv2d", "atom_conv2d", "fourier_bessel_bases"]
