"""The authors' algorithm (Conv_DCFD's forward), kept as a baseline for the benchmarks.

Unfold x into K*K shifted copies, contract them with the atoms per pixel (an einsum that
becomes a batched product of tiny matrices), then a 1x1 conv with `coef`. Groups = 1 only,
as in the paper's layer. Shapes as docs/design.md §1; `coef` is [C_out, C_in*M, 1, 1], channel c*M + m.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def paper_atom_conv2d(x, atom_coeff, bases, coef, bias=None, stride=1, padding=0, dilation=1):
    """x [N, C, H, W], atom_coeff [N, M*L, H_out, W_out], bases [L, KH, KW],
    coef [C_out, C*M, 1, 1], bias [C_out] or None -> y [N, C_out, H_out, W_out]."""
    n, c, _, _ = x.shape
    num_bases, kh, kw = bases.shape
    h_out, w_out = atom_coeff.shape[2:]
    num_atoms = atom_coeff.shape[1] // num_bases
    atoms = torch.einsum("bmkhw,kl->bmlhw", atom_coeff.view(n, num_atoms, num_bases, h_out, w_out), bases.view(num_bases, -1))
    cols = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride).view(n, c, kh * kw, h_out, w_out)
    z = torch.einsum("bmlhw,bclhw->bcmhw", atoms, cols).reshape(n, c * num_atoms, h_out, w_out)
    return F.conv2d(z, coef, bias)
