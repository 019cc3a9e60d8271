"""Reference ACDA operator in plain PyTorch (docs/design.md §1): the readable path and the CPU path.

The three stages, per chunk of output pixels:

1. basis-to-atom        A[n, m, i, j, h, w] = sum_l beta[n, m*L+l, h, w] * bases[l, i, j]
2. atom-times-features  Z[n, c, m, h, w]    = sum_{i,j} A[n, m, i, j, h, w] * xp[n, c, tap(h, i), tap(w, j)]
3. coefficient sum      y[n, o, h, w]       = bias[o] + sum_{c in group(o), m} weight[o, c, m] * Z[n, c, m, h, w]

Why it is laid out this way: stage 2 is a loop over the KH*KW taps, one broadcast
multiply-add per tap over a whole chunk (no unfolded copy of x, no per-pixel tiny matrix
products), on pixel-major tensors whose innermost dimension is the channels, so each
multiply-add streams contiguous memory; stage 3 is then one GEMM over all pixels of the
chunk. Chunks (whole samples, or rows of one sample) keep the temporaries under
`max_chunk_bytes`; the default is also small enough to keep a chunk's Z near the CPU's
caches, which is where most of the speed comes from. Autograd differentiates through it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .validation import AtomConvGeometry, output_layout

DEFAULT_MAX_CHUNK_BYTES = 16 * 2**20


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype (docs/design.md §6): float32 for 16-bit inputs, else the input's own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def basis_to_atom(atom_coeff: torch.Tensor, bases: torch.Tensor, num_atoms: int) -> torch.Tensor:
    """Stage 1. atom_coeff [n, M*L, h, w], bases [L, KH, KW] -> atoms [KH*KW, n, h, w, M]."""
    n, _, h, w = atom_coeff.shape
    beta = atom_coeff.reshape(n, num_atoms, bases.shape[0], h, w)
    return torch.einsum("nmlhw,lt->tnhwm", beta, bases.flatten(1))


def atom_times_features(x_padded: torch.Tensor, atoms: torch.Tensor, geo: AtomConvGeometry) -> torch.Tensor:
    """Stage 2. x_padded [n, rows_in, W + 2*pad_w, C_in] (zero padded; row 0 is the first input
    row this chunk reads), atoms [KH*KW, n, h, w, M] -> Z [n, h, w, G, M, C_in/G]."""
    _, n, h, w, m = atoms.shape
    (kh, kw), (sh, sw), (dh, dw) = geo.kernel_size, geo.stride, geo.dilation
    z = None
    for i in range(kh):
        for j in range(kw):
            tap = x_padded[:, i * dh : i * dh + (h - 1) * sh + 1 : sh, j * dw : j * dw + (w - 1) * sw + 1 : sw]
            tap = tap.unflatten(3, (geo.groups, 1, -1))  # [n, h, w, G, 1, C_in/G]
            atom = atoms[i * kw + j].view(n, h, w, 1, m, 1)
            z = tap * atom if z is None else z.addcmul_(tap, atom)
    return z


def grouped_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """weight [C_out, C_in/G, M] -> [G, C_out/G, M*C_in/G], columns in Z's (m, c) order."""
    c_out, c_in_g, m = weight.shape
    return weight.view(groups, c_out // groups, c_in_g, m).transpose(2, 3).reshape(groups, c_out // groups, -1)


def coefficient_sum(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Stage 3. Z [n, h, w, G, M, C_in/G], weight [C_out, C_in/G, M], bias [C_out] or None
    -> y [n, h, w, C_out]."""
    n, h, w, groups, m, c_in_g = z.shape
    y = torch.einsum("pgk,gok->pgo", z.reshape(-1, groups, m * c_in_g), grouped_weight(weight, groups))
    y = y.reshape(n, h, w, weight.shape[0])
    return y if bias is None else y + bias


def chunk_bytes_per_row(geo: AtomConvGeometry, element_size: int) -> int:
    """Temporary bytes per output row of one sample: Z, atoms, y, and the padded input rows."""
    (kh, kw), w_out = geo.kernel_size, geo.out_size[1]
    w_padded = geo.in_size[1] + 2 * geo.padding[1]
    per_pixel = geo.in_channels * geo.num_atoms + geo.num_atoms * kh * kw + geo.out_channels
    return element_size * (per_pixel * w_out + geo.in_channels * geo.stride[0] * w_padded)


def chunk_plan(geo: AtomConvGeometry, bytes_per_row: int, max_chunk_bytes: int | None) -> list[tuple[int, int, int, int]]:
    """[(n0, n1, r0, r1)] covering the output: whole samples while one fits the budget, else
    rows of one sample, at least one row a chunk; None means one chunk. An empty batch still
    gets one (empty) chunk, so the output keeps its autograd history."""
    h_out = geo.out_size[0]
    if max_chunk_bytes is None:
        return [(0, geo.batch, 0, h_out)]
    rows = max(1, max_chunk_bytes // max(1, bytes_per_row))
    if rows >= h_out or geo.batch == 0:
        samples = max(1, rows // h_out)
        return [(n0, min(n0 + samples, geo.batch), 0, h_out) for n0 in range(0, max(geo.batch, 1), samples)]
    return [(n0, n0 + 1, r0, min(r0 + rows, h_out)) for n0 in range(geo.batch) for r0 in range(0, h_out, rows)]


def atom_conv2d_reference(
    x: torch.Tensor,
    atom_coeff: torch.Tensor,
    bases: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    geo: AtomConvGeometry,
    *,
    max_chunk_bytes: int | None = DEFAULT_MAX_CHUNK_BYTES,
) -> torch.Tensor:
    """docs/design.md §1 on already validated inputs (see `validate_atom_conv2d`).

    x [N, C_in, H, W], atom_coeff [N, M*L, H_out, W_out], bases [L, KH, KW],
    weight [C_out, C_in/G, M], bias [C_out] or None -> y [N, C_out, H_out, W_out] in x's
    dtype, channels_last when x is. Computes in float32 for 16-bit inputs. Temporaries are
    bounded by `max_chunk_bytes` (None: the whole output in one chunk).
    """
    ctype = compute_dtype(x.dtype)
    y = torch.empty(
        (geo.batch, geo.out_channels, *geo.out_size), dtype=x.dtype, device=x.device, memory_format=output_layout(x)
    )
    bases, weight = bases.to(ctype), weight.to(ctype)
    bias = None if bias is None else bias.to(ctype)
    plan = chunk_plan(geo, chunk_bytes_per_row(geo, torch.finfo(ctype).bits // 8), max_chunk_bytes)
    for n0, n1, r0, r1 in plan:
        x_padded, _ = padded_input_rows(x, geo, n0, n1, r0, r1, ctype)
        atoms = basis_to_atom(atom_coeff[n0:n1, :, r0:r1].to(ctype), bases, geo.num_atoms)
        z = atom_times_features(x_padded, atoms, geo)
        y[n0:n1, :, r0:r1] = coefficient_sum(z, weight, bias).permute(0, 3, 1, 2)
    return y


def padded_input_rows(x: torch.Tensor, geo: AtomConvGeometry, n0: int, n1: int, r0: int, r1: int,
                      ctype: torch.dtype) -> tuple[torch.Tensor, tuple[slice, slice]]:
    """The input rows that output rows [r0, r1) of samples [n0, n1) read, as x_padded
    [n, rows, W + 2*pad_w, C_in] in ctype, zero outside the image; and (image rows, padded rows),
    the slices where the image part sits in x (dim 2) and in x_padded (dim 1)."""
    (kh, _), (sh, _), (ph, pw), (dh, _) = geo.kernel_size, geo.stride, geo.padding, geo.dilation
    h = geo.in_size[0]
    top, bottom = r0 * sh - ph, (r1 - 1) * sh - ph + dh * (kh - 1) + 1
    image_rows = slice(max(top, 0), max(min(bottom, h), max(top, 0)))
    x_rows = x[n0:n1, :, image_rows].permute(0, 2, 3, 1).to(ctype)
    x_padded = F.pad(x_rows, (0, 0, pw, pw, max(-top, 0), max(bottom - max(h, top), 0)))
    padded_rows = slice(max(-top, 0), max(-top, 0) + x_rows.shape[1])
    return x_padded, (image_rows, padded_rows)


def atom_conv2d_reference_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    atom_coeff: torch.Tensor,
    bases: torch.Tensor,
    weight: torch.Tensor,
    geo: AtomConvGeometry,
    needs: tuple[bool, bool, bool, bool],
    *,
    max_chunk_bytes: int | None = DEFAULT_MAX_CHUNK_BYTES,
) -> list[torch.Tensor | None]:
    """Gradients of docs/design.md §1 with respect to (x, atom_coeff, bases, weight), each where `needs`
    (same order) asks for it, else None; each in its input's dtype.

    grad_y [N, C_out, H_out, W_out] (any strides), the rest as `atom_conv2d_reference`. Works
    chunk by chunk like the forward, recomputing the chunk's atoms (and Z, for the weight's
    gradient) instead of keeping anything from the forward, so its temporaries stay within a
    small multiple (about 3x: dZ, the per-tap products, the chunk's dx) of `max_chunk_bytes`. Per chunk, with dZ = dy·weight (a GEMM):
      d weight += dyᵀ·Z;   dA[tap] = Σ_c dZ·x_tap;   dx_tap += Σ_m dZ·A[tap];
      d atom_coeff = dA projected on the bases;   d bases += Σ β·dA.
    d bias is grad_y summed over (N, H_out, W_out), left to the caller.
    """
    need_x, need_coeff, need_bases, need_weight = needs
    ctype = compute_dtype(x.dtype)
    groups, m, num_bases = geo.groups, geo.num_atoms, geo.num_bases
    (kh, kw), (sh, sw), (dh, dw), pw = geo.kernel_size, geo.stride, geo.dilation, geo.padding[1]
    bases_c = bases.to(ctype).flatten(1)  # [L, KH*KW]
    weight_g = grouped_weight(weight.to(ctype), groups)  # [G, C_out/G, M*C_in/G]
    dx = x.new_zeros((geo.batch, *geo.in_size, geo.in_channels), dtype=ctype) if need_x else None
    dcoeff = atom_coeff.new_empty(atom_coeff.shape, dtype=ctype) if need_coeff else None
    dbases = bases_c.new_zeros(bases_c.shape) if need_bases else None
    dweight = weight_g.new_zeros(weight_g.shape) if need_weight else None

    plan = chunk_plan(geo, chunk_bytes_per_row(geo, torch.finfo(ctype).bits // 8), max_chunk_bytes)
    for n0, n1, r0, r1 in plan:
        x_padded, (image_rows, padded_rows) = padded_input_rows(x, geo, n0, n1, r0, r1, ctype)
        beta = atom_coeff[n0:n1, :, r0:r1].to(ctype)
        atoms = basis_to_atom(beta, bases_c.view(bases.shape), m)  # [T, n, h, w, M]
        dy = grad_y[n0:n1, :, r0:r1].permute(0, 2, 3, 1).to(ctype)  # [n, h, w, C_out]
        n, h, w, c_out = dy.shape
        dy = dy.reshape(-1, groups, c_out // groups)
        if need_weight:
            z = atom_times_features(x_padded, atoms, geo)
            dweight += torch.einsum("pgo,pgk->gok", dy, z.reshape(-1, groups, weight_g.shape[2]))
        if not (need_x or need_coeff or need_bases):
            continue
        dz = torch.einsum("pgo,gok->pgk", dy, weight_g).view(n, h, w, groups, m, weight.shape[1])
        dx_padded = torch.zeros_like(x_padded) if need_x else None
        datoms = atoms.new_empty(atoms.shape) if (need_coeff or need_bases) else None
        for i in range(kh):
            for j in range(kw):
                rows = slice(i * dh, i * dh + (h - 1) * sh + 1, sh)
                cols = slice(j * dw, j * dw + (w - 1) * sw + 1, sw)
                if datoms is not None:
                    tap = x_padded[:, rows, cols].unflatten(3, (groups, 1, -1))  # [n, h, w, G, 1, C_in/G]
                    datoms[i * kw + j] = torch.mul(dz, tap).sum((3, 5))
                if need_x:
                    dx_tap = dx_padded[:, rows, cols].unflatten(3, (groups, -1))  # a view: [n, h, w, G, C_in/G]
                    for a in range(m):
                        dx_tap.addcmul_(dz[:, :, :, :, a], atoms[i * kw + j, ..., a, None, None])
        if need_x:
            dx[n0:n1, image_rows] += dx_padded[:, padded_rows, pw : pw + geo.in_size[1]]
        if need_coeff:
            dcoeff[n0:n1, :, r0:r1] = torch.einsum("tnhwm,lt->nmlhw", datoms, bases_c).reshape(n, m * num_bases, h, w)
        if need_bases:
            dbases += torch.einsum("nmlhw,tnhwm->lt", beta.reshape(n, m, num_bases, h, w), datoms)

    c_out, c_in_g = weight.shape[:2]
    return [
        None if dx is None else dx.permute(0, 3, 1, 2).to(x.dtype),
        None if dcoeff is None else dcoeff.to(atom_coeff.dtype),
        None if dbases is None else dbases.view(bases.shape).to(bases.dtype),
        None if dweight is None else dweight.view(c_out, m, c_in_g).transpose(1, 2).to(weight.dtype),
    ]
