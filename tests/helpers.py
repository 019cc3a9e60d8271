"""Small builders shared by the tests."""

from __future__ import annotations

import torch

from atomconv.validation import as_pair, conv_output_size


def output_size(hw, kernel, stride, padding, dilation):
    """(H_out, W_out) as nn.Conv2d computes them, for ints or pairs."""
    args = [as_pair(v, "", 0) for v in (kernel, stride, padding, dilation)]
    return tuple(conv_output_size(s, *a) for s, *a in zip(hw, *args))


def static_atom_problem(n, c_in, c_out, hw, kernel, stride, padding, dilation, groups, num_atoms=3, num_bases=4,
                        dtype=torch.float64, seed=0):
    """Inputs whose atoms do not depend on the pixel, and the static kernel they amount to:
    returns (x, atom_coeff, bases, weight, bias, static_weight [C_out, C_in/G, KH, KW])."""
    g = torch.Generator().manual_seed(seed)
    kh, kw = as_pair(kernel, "", 1)
    x = torch.randn(n, c_in, *hw, generator=g, dtype=dtype)
    bases = torch.randn(num_bases, kh, kw, generator=g, dtype=dtype)
    beta = torch.randn(num_atoms, num_bases, generator=g, dtype=dtype)
    weight = torch.randn(c_out, c_in // groups, num_atoms, generator=g, dtype=dtype)
    bias = torch.randn(c_out, generator=g, dtype=dtype)
    h_out, w_out = output_size(hw, kernel, stride, padding, dilation)
    atom_coeff = beta.reshape(1, -1, 1, 1).expand(n, -1, h_out, w_out).contiguous()
    static_weight = torch.einsum("ocm,ml,lij->ocij", weight, beta, bases)
    return x, atom_coeff, bases, weight, bias, static_weight
