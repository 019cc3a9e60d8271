"""The registered operator `atomconv::atom_conv2d` (and its backward), so that autograd,
`torch.compile(fullgraph=True)` and `torch.library.opcheck` see one opaque op.

    atomconv::atom_conv2d(x, atom_coeff, bases, weight, bias?, stride, padding, dilation,
                          groups, backend) -> y
    atomconv::atom_conv2d_backward(grad_y, x, atom_coeff, bases, weight, stride, padding,
                                   dilation, groups, backend, output_mask) -> [grads]

`backend` is "triton" (the fused kernels of `kernels/`), "reference" (the plain-PyTorch
path and its hand-written chunked backward, `atom_conv2d_reference_backward`) or "auto".
"auto" is resolved here, each time an op runs, from the tensors it is given (`resolve_backend`),
never at trace time: a program traced or exported on a CPU (`torch.export`, `jit.trace`,
`torch.compile`) records "auto" and takes the Triton path when it later runs on CUDA tensors.
Which backend ran is logged at DEBUG level on the "atomconv" logger.

Geometry is passed as int lists, already validated. Both ops have fake (meta) implementations,
so compilers trace them without running them and meta tensors give meta results; the backward
op has no autograd of its own: double backward raises at `backward(create_graph=True)`. d bias
is grad_y summed over (N, H_out, W_out) in float32 (float64 for float64), in the autograd
formula itself.

Autocast is handled by `atomconv.atom_conv2d` before the op is called (inputs cast once to
the autocast dtype, as `nn.Conv2d`); inside the ops autocast is off, so the reference path's
float32 accumulation is not rounded down again.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Optional

import torch
from torch import Tensor

from .reference import atom_conv2d_reference, atom_conv2d_reference_backward, compute_dtype
from .triton_backend import triton_kernels
from .validation import output_layout, validate_atom_conv2d

BACKENDS = ("auto", "triton", "reference")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
logger = logging.getLogger("atomconv")
_warned_reference_on_cuda: set[torch.dtype] = set()


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs for tensors on `device` of `dtype`: "auto" is "triton" for CUDA
    tensors of a kernel dtype (float16, bfloat16, float32) and "reference" otherwise (warning
    once per dtype when that sends CUDA tensors to the slow path); others are themselves."""
    _check_backend(backend)
    if backend != "auto":
        return backend
    if device.type != "cuda":
        return "reference"
    if dtype in TRITON_DTYPES:
        return "triton"
    if dtype not in _warned_reference_on_cuda:
        _warned_reference_on_cuda.add(dtype)
        warnings.warn(f"atomconv: backend='auto' runs CUDA tensors of dtype {dtype} on the reference (plain PyTorch) "
                      f"path, much slower than the Triton kernels, which take float16, bfloat16 and float32", stacklevel=3)
    return "reference"


def _log_backend(what: str, backend: str, x: Tensor) -> None:
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("atomconv::%s ran backend=%r on %s %s", what, backend, x.device, x.dtype)


def _no_autocast(device: torch.device):
    """Autocast off on the device (where autocast exists for it)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


@torch.library.custom_op("atomconv::atom_conv2d", mutates_args=())
def atom_conv2d_op(x: Tensor, atom_coeff: Tensor, bases: Tensor, weight: Tensor, bias: Optional[Tensor],
                   stride: list[int], padding: list[int], dilation: list[int], groups: int, backend: str) -> Tensor:
    """y [N, C_out, H_out, W_out] = docs/design.md §1 of the inputs (shapes as `atomconv.atom_conv2d`)."""
    backend = resolve_backend(backend, x.device, x.dtype)
    geo = validate_atom_conv2d(x, atom_coeff, bases, weight, bias, stride, padding, dilation, groups)
    _log_backend("atom_conv2d", backend, x)
    with _no_autocast(x.device):
        if backend == "triton":  # triton is imported only when this path is taken
            return triton_kernels().forward.launch_forward(x, atom_coeff, bases, weight, bias, geo)
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
    backend = resolve_backend(backend, x.device, x.dtype)
    geo = validate_atom_conv2d(x, atom_coeff, bases, weight, None, stride, padding, dilation, groups)
    inputs = (x, atom_coeff, bases, weight)
    _log_backend("atom_conv2d_backward", backend, x)
    with _no_autocast(x.device):
        if backend == "triton":
            backward = triton_kernels().backward.launch_backward
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
    """Gradients of every op argument: tensors that need one get it, the rest None. Grad mode
    is on here only when the backward itself is being recorded (create_graph=True), which
    needs a derivative of the backward op that does not exist: refuse that plainly."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "atomconv: double backward is not supported: atom_conv2d's gradients cannot themselves be "
            "differentiated, so backward(create_graph=True) / autograd.grad(create_graph=True) (gradient "
            "penalties, Hessians) cannot go through it. Call backward without create_graph.")
    needs_tensor_grad = list(ctx.needs_input_grad[:4])
    grads = iter(atom_conv2d_backward_op(grad_y, *ctx.saved_tensors, *ctx.geometry, needs_tensor_grad)
                 if any(needs_tensor_grad) else [])
    tensor_grads = [next(grads) if needed else None for needed in needs_tensor_grad]
    dbias = grad_y.sum((0, 2, 3), dtype=compute_dtype(grad_y.dtype)).to(grad_y.dtype) if ctx.needs_input_grad[4] else None
    return (*tensor_grads, dbias, None, None, None, None, None)


atom_conv2d_op.register_autograd(_backward, setup_context=_setup_context)
