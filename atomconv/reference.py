"""Reference ACDA operator in plain PyTorch (SPEC §1): the readable path and the CPU path.

The three stages, per chunk of output pixels:

1. basis-to-atom        A[n, m, i, j, h, w] = sum_l beta[n, m*L+l, h, w] * bases[l, i, j]
2. atom-times-features  Z[n, c, m, h, w]    = sum_{i,j} A[n, m, i, j, h, w] * xp[n, c, tap(h, i), tap(w, j)]
3. coefficient sum      y[n, o, h, w]       = bias[o] + sum_{c in group(o), m} weight[o, c, m] * Z[n, c, m, h, w]

Stage 2 loops over the KH*KW taps with one broadcast multiply-add over whole feature maps
per tap (instead of unfolding x, which costs KH*KW copies of the input); stage 3 is one
batched GEMM. The output is processed in chunks of samples and rows so the temporaries
(atoms, Z, padded input rows) stay under `max_chunk_bytes`, whatever the input size.
Autograd differentiates through all of it.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from .validation import AtomConvGeometry

DEFAULT_MAX_CHUNK_BYTES = 256 * 2**20


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype (SPEC §6): float32 for 16-bit inputs, else the input's own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def basis_to_atom(atom_coeff: torch.Tensor, bases: torch.Tensor, num_atoms: int) -> torch.Tensor:
    """Stage 1. atom_coeff [n, M*L, h, w], bases [L, KH, KW] -> atoms [n, M, KH*KW, h, w]."""
    n, _, h, w = atom_coeff.shape
    beta = atom_coeff.reshape(n, num_atoms, bases.shape[0], h, w)
    return torch.einsum("nmlhw,lt->nmthw", beta, bases.flatten(1))


def atom_times_features(
    x_padded: torch.Tensor, atoms: torch.Tensor, geo: AtomConvGeometry, out_rows: int
) -> torch.Tensor:
    """Stage 2. x_padded [n, C_in, rows_in, W + 2*pad_w] (zero padded, first row = first
    input row of this chunk), atoms [n, M, KH*KW, out_rows, W_out] -> Z [n, C_in, M, out_rows, W_out].
    """
    n, c_in = x_padded.shape[:2]
    (kh, kw), (sh, sw), (dh, dw) = geo.kernel_size, geo.stride, geo.dilation
    w_out = geo.out_size[1]
    z = x_padded.new_zeros(n, c_in, geo.num_atoms, out_rows, w_out)
    for i in range(kh):
        for j in range(kw):
            tap = x_padded[:, :, i * dh : i * dh + (out_rows - 1) * sh + 1 : sh,
                                 j * dw : j * dw + (w_out - 1) * sw + 1 : sw]
            z.addcmul_(tap.unsqueeze(2), atoms[:, None, :, i * kw + j])
    return z


def coefficient_sum(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int) -> torch.Tensor:
    """Stage 3. Z [n, C_in, M, h, w], weight [C_out, C_in/G, M], bias [C_out] -> y [n, C_out, h, w]."""
    n, c_in, m, h, w = z.shape
    c_out = weight.shape[0]
    # weight as [G, C_out/G, (C_in/G)*M] times Z as [n, G, (C_in/G)*M, h*w]: one batched GEMM.
    y = torch.matmul(weight.reshape(groups, c_out // groups, -1), z.reshape(n, groups, -1, h * w))
    y = y.reshape(n, c_out, h, w)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


def _chunk_plan(geo: AtomConvGeometry, bytes_per_row: int, max_chunk_bytes: int) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """[(n0, n1, [(r0, r1), ...])]: whole samples while one fits the budget, else rows of one
    sample; at least one row per chunk. An empty batch still gets one (empty) chunk, so the
    output keeps its autograd history."""
    h_out = geo.out_size[0]
    rows = max(1, max_chunk_bytes // max(1, bytes_per_row))
    if rows >= h_out or geo.batch == 0:
        samples = max(1, rows // h_out)
        return [(n0, min(n0 + samples, geo.batch), [(0, h_out)]) for n0 in range(0, max(geo.batch, 1), samples)]
    row_ranges = [(r0, min(r0 + rows, h_out)) for r0 in range(0, h_out, rows)]
    return [(n0, n0 + 1, row_ranges) for n0 in range(geo.batch)]


def chunk_bytes_per_row(geo: AtomConvGeometry, element_size: int) -> int:
    """Temporary bytes per output row of one sample: Z, atoms, y and the padded input rows."""
    (kh, kw), w_out = geo.kernel_size, geo.out_size[1]
    w_padded = geo.in_size[1] + 2 * geo.padding[1]
    per_pixel = geo.in_channels * geo.num_atoms + geo.num_atoms * kh * kw + geo.out_channels
    return element_size * (per_pixel * w_out + geo.in_channels * geo.stride[0] * w_padded)


def atom_conv2d_reference(
    x: torch.Tensor,
    atom_coeff: torch.Tensor,
    bases: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    geo: AtomConvGeometry,
    *,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
) -> torch.Tensor:
    """SPEC §1 on already validated inputs (see `validate_atom_conv2d`).

    x [N, C_in, H, W], atom_coeff [N, M*L, H_out, W_out], bases [L, KH, KW],
    weight [C_out, C_in/G, M], bias [C_out] or None -> y [N, C_out, H_out, W_out] in x's
    dtype, channels_last when x is. Computes in float32 for 16-bit inputs.
    """
    out_dtype = x.dtype
    memory_format = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
    ctype = compute_dtype(out_dtype)
    x, atom_coeff, bases, weight = (t.to(ctype) for t in (x, atom_coeff, bases, weight))
    bias = None if bias is None else bias.to(ctype)
    (kh, _), (sh, _), (ph, pw), (dh, _) = geo.kernel_size, geo.stride, geo.padding, geo.dilation
    h = geo.in_size[0]

    def chunk(n0: int, n1: int, r0: int, r1: int) -> torch.Tensor:
        # Input rows this chunk reads, clipped to the image; the clipped part becomes zero padding.
        top, bottom = r0 * sh - ph, (r1 - 1) * sh - ph + dh * (kh - 1) + 1
        x_rows = x[n0:n1, :, max(top, 0) : min(bottom, h)]
        x_padded = F.pad(x_rows, (pw, pw, max(-top, 0), max(bottom - h, 0)))
        atoms = basis_to_atom(atom_coeff[n0:n1, :, r0:r1], bases, geo.num_atoms)
        z = atom_times_features(x_padded, atoms, geo, r1 - r0)
        return coefficient_sum(z, weight, bias, geo.groups)

    plan = _chunk_plan(geo, chunk_bytes_per_row(geo, torch.finfo(ctype).bits // 8), max_chunk_bytes)
    y = torch.cat([torch.cat([chunk(n0, n1, r0, r1) for r0, r1 in rows], dim=2) for n0, n1, rows in plan])
    return y.to(dtype=out_dtype).contiguous(memory_format=memory_format)


def _is_channels_last(x: torch.Tensor) -> bool:
    """True when x is stored channels_last (and not also plain contiguous, as when C == 1)."""
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
