"""`atom_conv2d`: the public operator (SPEC §4) and its dispatch between backends."""

from __future__ import annotations

import torch

from .reference import atom_conv2d_reference
from .validation import validate_atom_conv2d

BACKENDS = ("auto", "triton", "reference")


def atom_conv2d(
    x: torch.Tensor,
    atom_coeff: torch.Tensor,
    bases: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Adaptive convolution with per-pixel dynamic filter atoms (SPEC §1).

    x [N, C_in, H, W], atom_coeff [N, M*L, H_out, W_out] (channel m*L + l),
    bases [L, KH, KW], weight [C_out, C_in // groups, M], bias [C_out] or None
    -> y [N, C_out, H_out, W_out]. `stride`, `padding`, `dilation` are ints or pairs as in
    `nn.Conv2d`. All tensors share one dtype (float16, bfloat16, float32, float64) and device.

    backend: "reference" is plain PyTorch (any device); "auto" picks it for now.
    Differentiable in every tensor argument.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    geo = validate_atom_conv2d(x, atom_coeff, bases, weight, bias, stride, padding, dilation, groups)
    if backend == "triton":
        raise NotImplementedError("backend='triton' is not available yet: the fused kernels are not built")
    return atom_conv2d_reference(x, atom_coeff, bases, weight, bias, geo)
