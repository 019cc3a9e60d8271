"""The registered operator `atomconv::atom_conv2d` (and its backward), so that autograd,
`torch.compile(fullgraph=True)` and `torch.library.opcheck` see one opaque op.

    atomconv::atom_conv2d(x, atom_coeff, bases, weight, bias?, stride, padding, dilation,
                          groups, backend) -> y
    atomconv::atom_conv2d_backward(grad_y, x, atom_coeff, bases, weight, stride, padding,
                                   dilation, groups, backend, output_mask) -> [grads]

`backend` is "triton" (the fused kernels of `kernels/`) or "reference" (the plain-PyTorch
path and its hand-written chunked backward, `atom_conv2d_reference_backward`). Geometry is passed as int lists, already validated. Both ops have fake (meta)
implementations, so compilers trace them without running them; the backward op has no
autograd of its own (no double backward). d bias is grad_y summed over (N, H_out, W_out) in
float32 (float64 for float64), in the autograd formula itself.

Autocast is handled by `atomconv.atom_conv2d` before the op is called (inputs cast once to
the autocast dtype, as `nn.Conv2d`); inside the ops autocast is off, so the reference path's
float32 accumulation is not rounded down again.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .reference import atom_conv2d_reference, atom_conv2d_reference_backward, compute_dtype
from .validation import output_layout, validate_atom_conv2d

OP_BACKENDS = ("triton", "reference")


def _check_backend(backend: str) -> None:
    if backend not in OP_BACKENDS:
        raise ValueError(f"backend must be one of {OP_BACKENDS} inside atomconv::atom_conv2d, got {backend!r}")


@torch.library.custom_op("atomconv::atom_conv2d", mutates_args=())
def atom_conv2d_op(x: Tensor, atom_coeff: Tensor, bases: Tensor, weight: Tensor, bias: Optional[Tensor],
                   stride: list[int], padding: list[int], dilation: list[int], groups: int, backend: str) -> Tensor:
    """y [N, C_out, H_out, W_out] = SPEC §1 of the inputs (shapes as `atomconv.atom_conv2d`)."""
    _check_backend(backend)
    geo = validate_atom_conv2d(x, atom_coeff, bases, weight, bias, stride, padding, dilation, groups)
    with torch.autocast(x.device.type, enabled=False):
        if backend == "triton":
            from kernels import forward  # triton is imported only when this path is taken

            return forward.launch_forward(x, atom_coeff, bases, weight, bias, geo)
        return atom_conv2d_reference(x, atom_coeff, bases, weight, bias, geo)


@atom_conv2d_op.register_fake
def _atom_conv2d_fake(x, atom_coeff, bases, weight, bias, stride, padding, dilation, groups, backend):
    _check_backend(backend)
    geo = validate_atom_conv2d(x, atom_coeff, bases, weight, bias, stride, padding, dilation, groups)
    return x.new_empty((geo.batch, geo.out_channels, *geo.out_size)).contiguous(memory_format=output_layout(x))


@torch.library.custom_op("atomconv::atom_conv2d_backward", mutates_args=())
def atom_conv2d_backward_op(grad_y: Tensor, x: Tensor, atom_coeff: Tensor, bases: Tensor, weight: Tensor,
                            stride: list[int], padding: list[int], dilation: list[int], groups: int, backend: str,
                            output_mask: list[bool]) -> list[Tensor]:
    """The gradients of (x, atom_coeff, bases, weight) that output_mask (same order) asks for,
    in that order, each in its input's dtype (and x's / atom_coeff's layout)."""
    _check_backend(backend)
    geo = validate_atom_conv2d(x, atom_coeff, bases, weight, None, stride, padding, dilation, groups)
    inputs = (x, atom_coeff, bases, weight)
    with torch.autocast(x.device.type, enabled=False):
        if backend == "triton":
            from kernels.backward import launch_backward as backward
        else:
            backward = atom_conv2d_reference_backward
        grads = backward(grad_y, *inputs, geo, tuple(output_mask))
    return [g.contiguous(memory_format=output_layout(t)) for g, t in zip(grads, inputs) if g is not None]


@atom_conv2d_backward_op.register_fake
def _atom_conv2d_backward_fake(grad_y, x, atom_coeff, bases, weight, stride, padding, dilation, groups, backend,
                               output_mask):
    _check_backend(backend)
    inputs = (x, atom_coeff, bases, weight)
    return [torch.empty_like(t, memory_format=output_layout(t)) for t, want in zip(inputs, output_mask) if want]


def _setup_context(ctx, inputs, output):
    x, atom_coeff, bases, weight, bias, stride, padding, dilation, groups, backend = inputs
    ctx.save_for_backward(x, atom_coeff, bases, weight)
    ctx.geometry = (stride, padding, dilation, groups, backend)


def _backward(ctx, grad_y):
    """Gradients of every op argument: tensors that need one get it, the rest None."""
    needs_tensor_grad = list(ctx.needs_input_grad[:4])
    grads = iter(atom_conv2d_backward_op(grad_y, *ctx.saved_tensors, *ctx.geometry, needs_tensor_grad)
                 if any(needs_tensor_grad) else [])
    tensor_grads = [next(grads) if needed else None for needed in needs_tensor_grad]
    dbias = grad_y.sum((0, 2, 3), dtype=compute_dtype(grad_y.dtype)).to(grad_y.dtype) if ctx.needs_input_grad[4] else None
    return (*tensor_grads, dbias, None, None, None, None, None)


atom_conv2d_op.register_autograd(_backward, setup_context=_setup_context)
