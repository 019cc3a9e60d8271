"""atomconv: adaptive convolutions with per-pixel dynamic filter atoms (ACDA, ICCV 2021)."""

__version__ = "0.2.0"

from .bases import fourier_bessel_bases  # noqa: E402
from .convert import ConversionReport, convert_conv2d  # noqa: E402
from .functional import atom_conv2d  # noqa: E402
from .layer import AtomConv2d  # noqa: E402

__all__ = ["AtomConv2d", "ConversionReport", "atom_conv2d", "convert_conv2d", "fourier_bessel_bases", "__version__"]
