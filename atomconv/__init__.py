"""atomconv: adaptive convolutions with per-pixel dynamic filter atoms (ACDA, ICCV 2021)."""

from .bases import fourier_bessel_bases
from .convert import convert_conv2d
from .functional import atom_conv2d
from .layer import AtomConv2d

__all__ = ["AtomConv2d", "atom_conv2d", "convert_conv2d", "fourier_bessel_bases"]
