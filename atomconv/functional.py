"""`atom_conv2d`: the public operator (docs/design.md §4), autocast, and the forms it takes
under exporters."""

from __future__ import annotations

import torch

from .decomposed import atom_conv2d_decomposed
from .op import BACKENDS, atom_conv2d_op
from .validation import validate_atom_conv2d


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
    """Adaptive convolution with per-pixel dynamic filter atoms (docs/design.md §1).

    x [N, C_in, H, W], atom_coeff [N, M*L, H_out, W_out] (channel m*L + l),
    bases [L, KH, KW], weight [C_out, C_in // groups, M], bias [C_out] or None
    -> y [N, C_out, H_out, W_out]. `stride`, `padding`, `dilation` are ints or pairs as in
    `nn.Conv2d`; `padding` may also be "valid" or "same" (stride 1), as in `F.conv2d`. All
    tensors share one dtype (float16, bfloat16, float32, float64) and device; meta tensors give
    a meta result.

    backend:
      "reference": plain PyTorch, any device and dtype.
      "triton": the fused Triton kernels, forward and backward (float16/bfloat16/float32).
        They need CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before `kernels` is
        imported; otherwise it raises.
      "auto": "triton" for CUDA tensors of a kernel dtype, "reference" otherwise, decided when
        the op runs (so also in programs traced or exported elsewhere); CUDA float64 tensors
        take the reference path with a one-time warning.
    Both run as the registered op `atomconv::atom_conv2d` (see `atomconv.op`), which autograd,
    `torch.compile(fullgraph=True)` and `torch.export` treat as one op; which backend ran is
    logged at DEBUG level on the "atomconv" logger. Differentiable in every tensor argument,
    once: double backward (create_graph=True) and torch.func's grad/jacrev/jvp raise.
    Under `torch.onnx.export` the op is written out in standard operators instead
    (`atomconv.decomposed`).

    Autocast: inside `torch.autocast(device_type)` regions where it is enabled, the tensors are
    cast once to that region's dtype (`torch.get_autocast_dtype`, e.g. float16 or bfloat16 on
    CUDA, bfloat16 by default on CPU) and so is the output, the policy `nn.Conv2d` follows;
    float64 tensors are left alone, as autocast leaves them.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    x, atom_coeff, bases, weight, bias = _autocast(x, atom_coeff, bases, weight, bias)
    geo = validate_atom_conv2d(x, atom_coeff, bases, weight, bias, stride, padding, dilation, groups)
    if torch.onnx.is_in_onnx_export():
        return atom_conv2d_decomposed(x, atom_coeff, bases, weight, bias, geo)
    try:
        return atom_conv2d_op(x, atom_coeff, bases, weight, bias, list(geo.stride), list(geo.padding),
                              list(geo.dilation), groups, backend)
    except RuntimeError as error:
        if "functorch transforms" not in str(error):
            raise
        raise RuntimeError(
            "atomconv: torch.func transforms that differentiate (grad, jacrev, jacfwd, jvp, vjp, hessian) are not "
            "supported by atom_conv2d, whose registered op has a plain autograd formula only. Use "
            "torch.autograd.grad or .backward() instead.") from error


def _autocast(*tensors):
    """The tensors cast to the autocast dtype of their device type where autocast is on there
    (floating tensors other than float64, as autocast casts); unchanged otherwise. Non-tensors
    pass through for validation to name."""
    x = tensors[0]
    if (not isinstance(x, torch.Tensor) or not torch.amp.is_autocast_available(x.device.type)
            or not torch.is_autocast_enabled(x.device.type)):
        return tensors
    dtype = torch.get_autocast_dtype(x.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)
