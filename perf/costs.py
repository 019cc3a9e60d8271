"""Work and minimum memory traffic of the ACDA operator and of a static conv (docs/design.md §5).

Counts are multiply-adds (MACs) per output pixel; one MAC is two floating-point operations.
"""

from __future__ import annotations

from dataclasses import dataclass

from atomconv.validation import AtomConvGeometry


@dataclass(frozen=True)
class AtomConvMacs:
    """Multiply-adds per output pixel of each stage of docs/design.md §1."""

    basis_to_atom: int  # M·L·KH·KW
    atom_times_features: int  # C_in·M·KH·KW
    coefficient_sum: int  # C_out·(C_in/G)·M

    @property
    def total(self) -> int:
        return self.basis_to_atom + self.atom_times_features + self.coefficient_sum


def atom_conv_macs_per_pixel(geo: AtomConvGeometry) -> AtomConvMacs:
    """docs/design.md §5: M·L·K², C_in·M·K² and C_out·(C_in/G)·M multiply-adds per output pixel."""
    taps = geo.kernel_size[0] * geo.kernel_size[1]
    return AtomConvMacs(
        basis_to_atom=geo.num_atoms * geo.num_bases * taps,
        atom_times_features=geo.in_channels * geo.num_atoms * taps,
        coefficient_sum=geo.out_channels * (geo.in_channels // geo.groups) * geo.num_atoms,
    )


def static_conv_macs_per_pixel(in_channels: int, out_channels: int, groups: int, kernel_size: tuple[int, int]) -> int:
    """docs/design.md §5: a static conv costs C_out·(C_in/G)·KH·KW multiply-adds per output pixel."""
    return out_channels * (in_channels // groups) * kernel_size[0] * kernel_size[1]


def fused_forward_min_bytes(geo: AtomConvGeometry, element_size: int) -> int:
    """docs/design.md §5: the least a fused forward can move: read x, β, α, Ψ once and write y once,
    every tensor in the inputs' dtype (element_size bytes). Bias (C_out numbers) is left out."""
    in_pixels = geo.batch * geo.in_size[0] * geo.in_size[1]
    out_pixels = geo.batch * geo.out_size[0] * geo.out_size[1]
    taps = geo.kernel_size[0] * geo.kernel_size[1]
    elements = (
        in_pixels * geo.in_channels  # x
        + out_pixels * geo.num_atoms * geo.num_bases  # β
        + geo.out_channels * (geo.in_channels // geo.groups) * geo.num_atoms  # α
        + geo.num_bases * taps  # Ψ
        + out_pixels * geo.out_channels  # y
    )
    return elements * element_size
