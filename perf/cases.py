"""What each implementation runs on a problem: the calls a sweep times and weighs.

Operator level, on the same random inputs: `fused` (our Triton path), `reference` (our
PyTorch path), `paper` (the authors' unfold + einsum + 1x1 conv) and `conv2d` (a static
F.conv2d of the same channels, kernel and groups: the speed a dynamic conv has to beat).
Layer level: `layer_atomconv` (AtomConv2d, generator included, backend "auto") against
`layer_conv2d` (nn.Conv2d of the same geometry): what a user swapping layers feels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from atomconv import AtomConv2d, atom_conv2d, fourier_bessel_bases

from .costs import atom_conv_macs_per_pixel, static_conv_macs_per_pixel
from .grids import BASES_PER_SCALE, LAYER_IMPLS, OPERATOR_IMPLS, Problem
from .paper import paper_atom_conv2d


@dataclass(frozen=True)
class Case:
    """One implementation set up on one problem."""

    run: Callable[[], torch.Tensor]  # one forward -> y [N, C, H_out, W_out]
    wrt: list[torch.Tensor]  # what a backward differentiates: inputs and parameters
    macs_per_pixel: int  # useful multiply-adds of one forward per output pixel (docs/design.md §5)


def build_case(impl: str, problem: Problem, device: torch.device, *, requires_grad: bool) -> Case:
    """Fresh inputs (seeded) for `impl` on `problem`; `requires_grad` makes the inputs leaves
    of a graph and puts layers in training mode (batch-norm statistics), else eval mode."""
    if impl in ("fused", "reference", "paper"):
        return _atom_case(impl, problem, device, requires_grad)
    if impl == "conv2d":
        return _conv2d_case(problem, device, requires_grad)
    if impl in ("layer_atomconv", "layer_conv2d"):
        return _layer_case(impl, problem, device, requires_grad)
    raise ValueError(f"impl must be one of {OPERATOR_IMPLS + LAYER_IMPLS}, got {impl!r}")


def _random(shape, problem: Problem, device, generator, requires_grad: bool, scale: float = 1.0) -> torch.Tensor:
    t = (torch.randn(shape, generator=generator) * scale).to(device, problem.dtype)
    return t.requires_grad_(requires_grad)


def _atom_case(impl: str, problem: Problem, device, requires_grad: bool) -> Case:
    """x [N, C, H, W], β [N, M*L, H_out, W_out], Ψ [L, K, K], α [C, C/G, M] scaled to keep y
    of order one (16-bit inputs must not overflow), bias [C]."""
    geo = problem.geometry()
    g = torch.Generator().manual_seed(0)
    c, c_g, m = problem.channels, problem.channels // problem.groups, problem.num_atoms
    x = _random((problem.batch, c, problem.size, problem.size), problem, device, g, requires_grad)
    atom_coeff = _random((problem.batch, m * problem.num_bases, *geo.out_size), problem, device, g, requires_grad)
    bases = fourier_bessel_bases(problem.kernel_size, BASES_PER_SCALE).to(device, problem.dtype)
    weight = _random((c, c_g, m), problem, device, g, requires_grad, scale=(c_g * m) ** -0.5)
    bias = _random((c,), problem, device, g, requires_grad)
    if impl == "paper":
        if problem.groups != 1:
            raise ValueError(f"the paper's algorithm has groups = 1 only, got groups={problem.groups}")
        # α [C, C, M] is the paper's coef [C, C*M, 1, 1] (channel c*M + m) as a view.
        run = lambda: paper_atom_conv2d(x, atom_coeff, bases, weight.reshape(c, -1, 1, 1), bias, 1, problem.padding)
    else:
        run = functools.partial(atom_conv2d, x, atom_coeff, bases, weight, bias, 1, problem.padding, 1,
                                problem.groups, backend="triton" if impl == "fused" else "reference")
    return Case(run, [x, atom_coeff, weight, bias], atom_conv_macs_per_pixel(geo).total)


def _conv2d_case(problem: Problem, device, requires_grad: bool) -> Case:
    """x [N, C, H, W], static weight [C, C/G, K, K], bias [C]."""
    g = torch.Generator().manual_seed(0)
    c, c_g, k = problem.channels, problem.channels // problem.groups, problem.kernel_size
    x = _random((problem.batch, c, problem.size, problem.size), problem, device, g, requires_grad)
    weight = _random((c, c_g, k, k), problem, device, g, requires_grad, scale=(c_g * k * k) ** -0.5)
    bias = _random((c,), problem, device, g, requires_grad)
    run = functools.partial(F.conv2d, x, weight, bias, 1, problem.padding, 1, problem.groups)
    return Case(run, [x, weight, bias], static_conv_macs_per_pixel(c, c, problem.groups, (k, k)))


def _layer_case(impl: str, problem: Problem, device, requires_grad: bool) -> Case:
    """The layer on x [N, C, H, W]; its MACs count the generator's two convs too (they run on
    the output grid, so per output pixel)."""
    torch.manual_seed(0)
    c, k = problem.channels, problem.kernel_size
    if impl == "layer_atomconv":
        layer = AtomConv2d(c, c, k, padding=problem.padding, groups=problem.groups, num_atoms=problem.num_atoms,
                           bases_per_scale=BASES_PER_SCALE)
        generator_convs = [m for m in layer.generator if isinstance(m, nn.Conv2d)]
        macs = atom_conv_macs_per_pixel(problem.geometry()).total + sum(
            static_conv_macs_per_pixel(m.in_channels, m.out_channels, m.groups, m.kernel_size) for m in generator_convs)
    else:
        layer = nn.Conv2d(c, c, k, padding=problem.padding, groups=problem.groups)
        macs = static_conv_macs_per_pixel(c, c, problem.groups, (k, k))
    layer = layer.to(device, problem.dtype).train(requires_grad)
    x = _random((problem.batch, c, problem.size, problem.size), problem, device, torch.Generator().manual_seed(0),
                requires_grad)
    return Case(functools.partial(layer, x), [x, *layer.parameters()], macs)
