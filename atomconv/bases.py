"""Fourier–Bessel multi-scale bases (docs/design.md §2).

A scale of half-width h samples, on a (2h+1)×(2h+1) grid, the Fourier–Bessel functions
J_k(z_kq r) cos/sin(kθ) of the disc of radius h + 0.5, lowest frequencies first. The
multi-scale set stacks the first few of each scale, zero-padded to K×K, so an atom mixing
them can pick its own receptive field.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import special

MAX_ANGULAR_ORDER = 15  # k = 0..15
MAX_BASES_PER_SCALE = 6


def _modes(radius: float, band: float) -> list[tuple[float, int]]:
    """[(z_kq, k)] for modes whose *next* zero z_k,q+1 is within pi * radius * band, by z_kq."""
    limit = np.pi * radius * band
    modes = []
    for k in range(MAX_ANGULAR_ORDER + 1):
        zeros = special.jn_zeros(k, 64)  # far more zeros than the band admits for these sizes
        modes += [(float(zeros[q]), k) for q in range(len(zeros) - 1) if zeros[q + 1] <= limit]
    return sorted(modes)


def fourier_bessel_scale(half_width: int) -> np.ndarray:
    """All bases of one scale: [(2h+1)**2 - 1 or fewer, 2h+1, 2h+1] float64, divided by
    c = sqrt(mean_b ||psi_b||^2) so that their mean squared norm is 1."""
    radius = half_width + 0.5
    band = 2.0 if half_width < 2 else 1.5
    i, j = np.meshgrid(np.arange(-half_width, half_width + 1), np.arange(-half_width, half_width + 1), indexing="ij")
    r = np.sqrt(i**2 + j**2) / radius
    theta = np.arctan2(j, i)
    bases = []
    for z, k in _modes(radius, band):
        phi = np.where(r < 1, special.jv(k, z * r), 0.0) / abs(special.jv(k + 1, z))
        bases += [phi] if k == 0 else [np.sqrt(2) * phi * np.cos(k * theta), np.sqrt(2) * phi * np.sin(k * theta)]
    bases = np.stack(bases[: (2 * half_width + 1) ** 2 - 1])
    return bases / np.sqrt(np.mean(np.sum(bases**2, axis=(1, 2))))


def fourier_bessel_bases(kernel_size: int, bases_per_scale: int = 6) -> torch.Tensor:
    """Multi-scale Fourier–Bessel bases for an odd kernel_size K >= 3 -> [L, K, K] float32,
    L = bases_per_scale * (K // 2): the first `bases_per_scale` bases of each scale
    h = 1 .. K//2, zero-padded to K×K around the centre, smallest scale first."""
    if not isinstance(kernel_size, int) or isinstance(kernel_size, bool) or kernel_size < 3 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be an odd int >= 3 for Fourier–Bessel bases, got {kernel_size!r}")
    if not isinstance(bases_per_scale, int) or not 1 <= bases_per_scale <= MAX_BASES_PER_SCALE:
        raise ValueError(f"bases_per_scale must be an int in [1, {MAX_BASES_PER_SCALE}], got {bases_per_scale!r}")
    half = kernel_size // 2
    out = np.zeros((bases_per_scale * half, kernel_size, kernel_size))
    for h in range(1, half + 1):
        lo = half - h
        out[(h - 1) * bases_per_scale : h * bases_per_scale, lo : lo + 2 * h + 1, lo : lo + 2 * h + 1] = (
            fourier_bessel_scale(h)[:bases_per_scale]
        )
    return torch.from_numpy(out).float()
