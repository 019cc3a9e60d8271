"""`atom_conv2d`: the public operator (SPEC §4) and its dispatch between backends."""

from __future__ import annotations

import torch

from .reference import atom_conv2d_reference
from .validation import AtomConvGeometry, validate_atom_conv2d

BACKENDS = ("auto", "triton", "reference")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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

    backend:
      "reference": plain PyTorch, any device and dtype.
      "triton": the fused Triton forward kernel (float16/bfloat16/float32). It needs CUDA
        tensors, or CPU tensors with TRITON_INTERPRET=1 set before `kernels` is imported;
        otherwise it raises. Its backward is not fused yet: gradients are computed by
        recomputing the reference path inside an autograd.Function (correct, not fast).
      "auto": "triton" for CUDA tensors of a kernel dtype, "reference" otherwise.
    Differentiable in every tensor argument.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    geo = validate_atom_conv2d(x, atom_coeff, bases, weight, bias, stride, padding, dilation, groups)
    if backend == "triton" or (backend == "auto" and x.is_cuda and x.dtype in TRITON_DTYPES):
        return FusedForwardReferenceBackward.apply(x, atom_coeff, bases, weight, bias, geo)
    return atom_conv2d_reference(x, atom_coeff, bases, weight, bias, geo)


class FusedForwardReferenceBackward(torch.autograd.Function):
    """Forward: the fused Triton kernel. Backward: autograd through the reference path on the
    saved inputs (a stop-gap until the fused backward kernels land)."""

    @staticmethod
    def forward(ctx, x, atom_coeff, bases, weight, bias, geo: AtomConvGeometry):
        from kernels.forward import launch_forward  # triton is imported only when this path is taken

        ctx.geo = geo
        ctx.save_for_backward(x, atom_coeff, bases, weight, bias)
        return launch_forward(x, atom_coeff, bases, weight, bias, geo)

    @staticmethod
    def backward(ctx, grad_y):
        with torch.enable_grad():
            inputs = [
                None if t is None else t.detach().requires_grad_(needed)
                for t, needed in zip(ctx.saved_tensors, ctx.needs_input_grad)
            ]
            wanted = [t for t in inputs if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad(atom_conv2d_reference(*inputs, ctx.geo), wanted, grad_y))
        return (*[next(grads) if t is not None and t.requires_grad else None for t in inputs], None)
