"""Fourier–Bessel bases against docs/design.md §2's figures and properties."""

import numpy as np
import pytest
import torch
from scipy import special

from atomconv import fourier_bessel_bases
from atomconv.bases import fourier_bessel_scale


def test_scale_sizes():
    assert fourier_bessel_scale(1).shape == (6, 3, 3)
    assert fourier_bessel_scale(2).shape == (14, 5, 5)


def test_3x3_norms_match_spec():
    bases = fourier_bessel_bases(3, 6)
    assert bases.shape == (6, 3, 3) and bases.dtype == torch.float32
    norms = bases.flatten(1).norm(dim=1)
    assert norms.min().item() == pytest.approx(0.295, abs=5e-4)
    assert norms.max().item() == pytest.approx(1.360, abs=5e-4)


@pytest.mark.parametrize("kernel_size,per_scale,count", [(3, 6, 6), (5, 6, 12), (7, 6, 18), (7, 3, 9), (9, 2, 8)])
def test_multiscale_count(kernel_size, per_scale, count):
    assert fourier_bessel_bases(kernel_size, per_scale).shape == (count, kernel_size, kernel_size)


def test_multiscale_stacks_zero_padded_scales_in_order():
    bases = fourier_bessel_bases(7, 6).double()
    for h in (1, 2, 3):
        block = bases[(h - 1) * 6 : h * 6]
        lo = 3 - h
        inner = block[:, lo : lo + 2 * h + 1, lo : lo + 2 * h + 1]
        torch.testing.assert_close(inner, torch.from_numpy(fourier_bessel_scale(h)[:6]), rtol=1e-6, atol=1e-6)
        assert inner.abs().sum() == pytest.approx(block.abs().sum())  # nothing outside the scale's grid


def test_first_basis_is_the_lowest_radial_mode():
    """psi_0 of scale 1 is J_0(z_01 r) / |J_1(z_01)| on the grid, up to the scale's common factor."""
    z = special.jn_zeros(0, 1)[0]
    i, j = np.meshgrid(np.arange(-1, 2), np.arange(-1, 2), indexing="ij")
    r = np.sqrt(i**2 + j**2) / 1.5
    expected = special.j0(z * r) / abs(special.j1(z))
    got = fourier_bessel_scale(1)[0]
    np.testing.assert_allclose(got / got[1, 1], expected / expected[1, 1], rtol=1e-12)


@pytest.mark.parametrize("half_width", [2, 3])
def test_leading_bases_of_larger_scales_are_orthonormal(half_width):
    """The first six bases of the 5x5 and 7x7 scales are orthonormal up to sampling error."""
    b = fourier_bessel_scale(half_width)[:6].reshape(6, -1)
    np.testing.assert_allclose(b @ b.T, np.eye(6), atol=0.06)


def test_scale_normalisation_gives_unit_mean_squared_norm():
    for h in (1, 2, 3):
        assert np.mean(np.sum(fourier_bessel_scale(h) ** 2, axis=(1, 2))) == pytest.approx(1.0)


@pytest.mark.parametrize("kernel_size", [1, 2, 4, 6, 3.0, True, (3, 3)])
def test_bad_kernel_size(kernel_size):
    with pytest.raises(ValueError, match="kernel_size"):
        fourier_bessel_bases(kernel_size)


@pytest.mark.parametrize("per_scale", [0, 7, 2.5])
def test_bad_bases_per_scale(per_scale):
    with pytest.raises(ValueError, match="bases_per_scale"):
        fourier_bessel_bases(5, per_scale)
