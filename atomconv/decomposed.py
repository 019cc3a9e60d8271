"""The ACDA operator in standard tensor operations only, for exporters (ONNX) that cannot
carry the registered op `atomconv::atom_conv2d`.

`atom_conv2d_decomposed` is what `atom_conv2d` becomes under `torch.onnx.export`: zero
padding, one strided slice of the padded input per kernel tap, multiply-adds, and two
matrix products, each of which maps onto one standard ONNX operator (Pad, Slice, Mul, Add,
MatMul, plus Reshape/Transpose). The input is never unfolded: the largest temporary is
Z [N, M, C_in, H_out*W_out], M times the output grid (the paper's algorithm builds a K²-times
copy of the input instead).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import compute_dtype, grouped_weight
from .validation import AtomConvGeometry


def atom_conv2d_decomposed(x: torch.Tensor, atom_coeff: torch.Tensor, bases: torch.Tensor, weight: torch.Tensor,
                           bias: torch.Tensor | None, geo: AtomConvGeometry) -> torch.Tensor:
    """docs/design.md §1 on validated inputs: x [N, C_in, H, W], atom_coeff [N, M*L, H_out, W_out],
    bases [L, KH, KW], weight [C_out, C_in/G, M], bias [C_out] or None -> y [N, C_out, H_out, W_out]
    in x's dtype (computed in float32 for 16-bit inputs, as the other paths)."""
    n, c_in = geo.batch, geo.in_channels
    (h_out, w_out), (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
        geo.out_size, geo.kernel_size, geo.stride, geo.padding, geo.dilation)
    m, num_bases, groups, c_out = geo.num_atoms, geo.num_bases, geo.groups, geo.out_channels
    pixels = h_out * w_out
    ctype = compute_dtype(x.dtype)
    x_padded = F.pad(x.to(ctype), (pw, pw, ph, ph))  # [N, C_in, H + 2ph, W + 2pw]

    # 1. basis-to-atom: atoms [N, M, KH*KW, P] = bases^T [KH*KW, L] @ beta [N, M, L, P]
    beta = atom_coeff.to(ctype).reshape(n, m, num_bases, pixels)
    atoms = torch.matmul(bases.to(ctype).reshape(num_bases, kh * kw).t(), beta)

    # 2. atom-times-features: Z [N, M, C_in, P] = sum over taps of atom [N, M, 1, P] * tap [N, 1, C_in, P]
    z = None
    for i in range(kh):
        for j in range(kw):
            tap = x_padded[:, :, i * dh : i * dh + (h_out - 1) * sh + 1 : sh, j * dw : j * dw + (w_out - 1) * sw + 1 : sw]
            term = atoms[:, :, i * kw + j : i * kw + j + 1] * tap.reshape(n, 1, c_in, pixels)
            z = term if z is None else z + term

    # 3. coefficient sum, per group: y [N, G, C_out/G, P] = weight [G, C_out/G, M*C_in/G] @ Z [N, G, M*C_in/G, P]
    z = z.reshape(n, m, groups, c_in // groups, pixels).transpose(1, 2).reshape(n, groups, m * c_in // groups, pixels)
    y = torch.matmul(grouped_weight(weight.to(ctype), groups).flatten(2), z).reshape(n, c_out, h_out, w_out)
    if bias is not None:
        y = y + bias.to(ctype).reshape(1, c_out, 1, 1)
    return y.to(x.dtype)
