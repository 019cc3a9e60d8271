"""The problems a sweep measures: named grids of one base problem and one-parameter variations.

Every problem is "same" convolution geometry (stride 1, padding K//2, dilation 1), square
images, C_in = C_out, Fourier–Bessel bases with 6 per scale (L = 6·(K//2), the paper's
choice), so M can be varied on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from atomconv.validation import AtomConvGeometry, conv_output_size

BASES_PER_SCALE = 6


@dataclass(frozen=True)
class Problem:
    """One convolution the implementations are measured on."""

    batch: int
    channels: int  # C_in = C_out
    size: int  # H = W
    kernel_size: int  # K (odd)
    num_atoms: int  # M
    dtype: torch.dtype
    groups: int = 1

    @property
    def num_bases(self) -> int:
        return BASES_PER_SCALE * (self.kernel_size // 2)

    @property
    def padding(self) -> int:
        return self.kernel_size // 2

    def geometry(self) -> AtomConvGeometry:
        out = conv_output_size(self.size, self.kernel_size, 1, self.padding, 1)
        return AtomConvGeometry(
            batch=self.batch, in_channels=self.channels, out_channels=self.channels, groups=self.groups,
            num_atoms=self.num_atoms, num_bases=self.num_bases, in_size=(self.size, self.size),
            out_size=(out, out), kernel_size=(self.kernel_size,) * 2, stride=(1, 1),
            padding=(self.padding,) * 2, dilation=(1, 1),
        )

    def label(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"N={self.batch} C={self.channels} {self.size}x{self.size} K={self.kernel_size} M={self.num_atoms} {dtype}"


# How each axis of a grid changes the base problem, and its plot label.
AXES: dict[str, tuple[Callable[[Problem, int], Problem], str]] = {
    "resolution": (lambda p, v: replace(p, size=v), "resolution H = W (px)"),
    "channels": (lambda p, v: replace(p, channels=v), "channels C_in = C_out"),
    "kernel_size": (lambda p, v: replace(p, kernel_size=v), "kernel size K (K×K)"),
    "num_atoms": (lambda p, v: replace(p, num_atoms=v), "atoms M"),
}

DIRECTIONS = ("forward", "forward+backward")
OPERATOR_IMPLS = ("fused", "reference", "paper", "conv2d")
LAYER_IMPLS = ("layer_atomconv", "layer_conv2d")


@dataclass(frozen=True)
class Grid:
    """A base problem varied along some axes, one axis at a time; every implementation in
    `impls` runs every point in every direction. `headline` names the points whose ratios
    the report quotes, as (axis, value) pairs. `cpu_min_run_time_s` is how long each CPU
    timing repeats its call (torch.utils.benchmark's min_run_time)."""

    name: str
    base: Problem
    axes: dict[str, tuple[int, ...]]
    headline: tuple[tuple[str, int], ...]
    impls: tuple[str, ...] = OPERATOR_IMPLS + LAYER_IMPLS
    cpu_min_run_time_s: float = 0.5
    directions: tuple[str, ...] = DIRECTIONS

    def __post_init__(self):
        for name, given, known in (("axes", self.axes, AXES), ("impls", self.impls, OPERATOR_IMPLS + LAYER_IMPLS),
                                   ("directions", self.directions, DIRECTIONS)):
            if set(given) - set(known):
                raise ValueError(f"{name} must be among {list(known)}, got {sorted(set(given) - set(known))}")
        for axis, value in self.headline:
            if value not in self.axes.get(axis, ()):
                raise ValueError(f"headline point {axis}={value} is not on the grid's axes {self.axes}")

    def point(self, axis: str, value: int) -> Problem:
        return AXES[axis][0](self.base, value)

    def points(self) -> list[Problem]:
        """Every problem of the grid once, in axis order."""
        return list(dict.fromkeys(self.point(axis, v) for axis, values in self.axes.items() for v in values))


GRIDS = {
    # The project's GPU targets (issue 6), read off this grid: K=3, C=64, 56x56, N=32, float16,
    # M=6 (the base); K=7 on the kernel axis; C=256 on the channels axis.
    "gpu": Grid(
        name="gpu",
        base=Problem(batch=32, channels=64, size=56, kernel_size=3, num_atoms=6, dtype=torch.float16),
        axes={"resolution": (28, 56, 112), "channels": (32, 64, 128, 256), "kernel_size": (3, 5, 7),
              "num_atoms": (2, 4, 6, 8)},
        headline=(("kernel_size", 3), ("kernel_size", 7), ("channels", 256)),
    ),
    # The CPU comparison of the reference path with the paper's algorithm (issue 2's shape).
    "cpu": Grid(
        name="cpu",
        base=Problem(batch=8, channels=64, size=56, kernel_size=3, num_atoms=6, dtype=torch.float32),
        axes={"resolution": (28, 56, 112), "channels": (32, 64, 128), "kernel_size": (3, 5, 7),
              "num_atoms": (2, 4, 6, 8)},
        headline=(("kernel_size", 3), ("kernel_size", 7)),
    ),
    # Under a minute on a quiet 2-core CPU (issue 6 allows about two).
    "quick": Grid(
        name="quick",
        base=Problem(batch=2, channels=32, size=28, kernel_size=3, num_atoms=6, dtype=torch.float32),
        axes={"resolution": (14, 28, 56), "channels": (16, 32, 64), "kernel_size": (3, 5, 7), "num_atoms": (2, 6)},
        headline=(("kernel_size", 3), ("kernel_size", 7)),
        cpu_min_run_time_s=0.2,
    ),
}
