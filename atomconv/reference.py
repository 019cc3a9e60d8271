"""Reference ACDA operator in plain PyTorch (SPEC §1): the readable path and the CPU path.

The three stages, per chunk of output pixels (P pixels: n samples x h rows x w columns):

1. basis-to-atom        A[t, p, m]  = sum_l Psi[l, t] * beta[l, p, m]           (one GEMM)
2. atom-times-features  Z[p, m, c]  = sum_t A[t, p, m] * x_t[p, c]               (a loop over taps)
3. coefficient sum      y[o, p]     = bias[o] + sum_{c in group(o), m} weight[o, c, m] * Z[p, m, c]

where t = (i, j) runs over the KH*KW taps and x_t[p, c] is the input pixel that tap reads for
output pixel p (zero in the padding). Why it is laid out this way: stage 2 is one broadcast
multiply-add per tap over the whole chunk (no unfolded copy of x, no per-pixel tiny matrix
products), on pixel-major tensors whose innermost dimension is the channels, so each pass
streams contiguous memory; stages 1 and 3 are GEMMs, stage 3 written straight into y.

Chunks (whole samples; else rows of one sample; else pieces of one row) keep every temporary
of a chunk, forward or backward, within `max_chunk_bytes` (`chunk_bytes` counts them); the
default is also small enough to keep a chunk's Z near the CPU's caches, which is where most of
the speed comes from. The backward (`atom_conv2d_reference_backward`) is written by hand, chunk
by chunk like the forward: per chunk, with dZ = dy . weight (a GEMM),
    d weight += dy^T . Z;   dA[t, p, m] = sum_c dZ[p, m, c] x_t[p, c];   dx_t += sum_m dZ A[t];
    d beta = Psi . dA;      d Psi += beta . dA^T.
dA is computed a kernel row at a time as a batched product over pixels of [KW, C] by [C, M]
matrices (the taps of one kernel row gathered side by side), which is several times faster than
multiplying and summing per tap.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from .validation import AtomConvGeometry, output_layout

DEFAULT_MAX_CHUNK_BYTES = 16 * 2**20


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype (SPEC §6): float32 for 16-bit inputs, else the input's own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


@dataclass(frozen=True)
class Chunk:
    """Output samples [n0, n1), rows [r0, r1) and columns [c0, c1), computed together."""

    n0: int
    n1: int
    r0: int
    r1: int
    c0: int
    c1: int

    def of(self, t: torch.Tensor) -> torch.Tensor:
        """The chunk's part of an output-grid tensor t [N, channels, H_out, W_out] (a view)."""
        return t[self.n0 : self.n1, :, self.r0 : self.r1, self.c0 : self.c1]

    @property
    def pixels(self) -> int:
        return (self.n1 - self.n0) * (self.r1 - self.r0) * (self.c1 - self.c0)


def _input_span(first: int, end: int, size: int, kernel: int, stride: int, padding: int, dilation: int):
    """Output positions [first, end) along one axis read input positions [lo, hi) of the padded
    axis: (hi - lo, the image's part of them as an input slice, the same part as a slice of the
    window [lo, hi)). The image part may be empty (a window wholly in the padding)."""
    lo, hi = first * stride - padding, (end - 1) * stride - padding + dilation * (kernel - 1) + 1
    start = max(lo, 0)
    stop = max(min(hi, size), start)
    return hi - lo, slice(start, stop), slice(start - lo, stop - lo)


def chunk_bytes(geo: AtomConvGeometry, element_size: int, samples: int, rows: int, cols: int, *,
                backward: bool, low_precision: bool) -> int:
    """Bytes of every temporary of one chunk of samples x rows x cols output pixels, as
    `atom_conv2d_reference` (backward=False) or `atom_conv2d_reference_backward` allocates
    them; `low_precision`: the inputs are 16-bit, so y (or dy) is converted through a float32
    copy. Outputs (y; the gradients) are not temporaries and are not counted."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geo.kernel_size, geo.stride, geo.padding, geo.dilation
    rows_in = _input_span(0, rows, geo.in_size[0], kh, sh, ph, dh)[0]
    cols_in = _input_span(0, cols, geo.in_size[1], kw, sw, pw, dw)[0]
    window = samples * rows_in * cols_in * geo.in_channels  # the chunk's padded input (and, backward, its dx)
    m, taps, c_in = geo.num_atoms, kh * kw, geo.in_channels
    per_pixel = m * geo.num_bases + taps * m + m * c_in  # beta, atoms, Z (backward: Z, then dZ in its place)
    if backward:
        per_pixel += taps * m + kw * (c_in + (geo.groups + 1) * m) + geo.out_channels  # dA, a kernel row's taps and dA, dy
    elif low_precision:
        per_pixel += geo.out_channels  # y in float32
    return element_size * ((2 if backward else 1) * window + samples * rows * cols * per_pixel)


def chunk_plan(geo: AtomConvGeometry, element_size: int, max_chunk_bytes: int | None, *, backward: bool,
               low_precision: bool = False) -> list[Chunk]:
    """Chunks covering the output, each within `max_chunk_bytes` by `chunk_bytes`: as many
    whole samples as fit, else as many rows of one sample, else as many columns of one row
    (at least one pixel a chunk). None means one chunk. An empty batch still gets one (empty)
    chunk, so the output keeps its autograd history."""
    n_all, (h_out, w_out) = geo.batch, geo.out_size
    if max_chunk_bytes is None or n_all == 0:
        return [Chunk(0, n_all, 0, h_out, 0, w_out)]

    def fits(samples: int, rows: int, cols: int) -> bool:
        cost = chunk_bytes(geo, element_size, samples, rows, cols, backward=backward, low_precision=low_precision)
        return cost <= max_chunk_bytes

    def most(limit: int, fit) -> int:  # the largest k in [1, limit] with fit(k), else 1 (fit is monotone)
        return max(1, bisect.bisect_right(range(1, limit + 1), False, key=lambda k: not fit(k)))

    if fits(1, h_out, w_out):
        samples = most(n_all, lambda k: fits(k, h_out, w_out))
        return [Chunk(n0, min(n0 + samples, n_all), 0, h_out, 0, w_out) for n0 in range(0, n_all, samples)]
    if fits(1, 1, w_out):
        rows = most(h_out, lambda k: fits(1, k, w_out))
        return [Chunk(n, n + 1, r0, min(r0 + rows, h_out), 0, w_out)
                for n in range(n_all) for r0 in range(0, h_out, rows)]
    cols = most(w_out, lambda k: fits(1, 1, k))
    return [Chunk(n, n + 1, r, r + 1, c0, min(c0 + cols, w_out))
            for n in range(n_all) for r in range(h_out) for c0 in range(0, w_out, cols)]


def input_window(x: torch.Tensor, geo: AtomConvGeometry, chunk: Chunk,
                 ctype: torch.dtype) -> tuple[torch.Tensor, tuple[slice, slice], tuple[slice, slice]]:
    """The input pixels the chunk reads, as x_window [n, rows_in, cols_in, C_in] in ctype,
    zero outside the image; and where the image part sits: (rows, cols) slices of x (dims 2, 3)
    and the same (rows, cols) slices of x_window (dims 1, 2)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geo.kernel_size, geo.stride, geo.padding, geo.dilation
    rows_in, image_rows, window_rows = _input_span(chunk.r0, chunk.r1, geo.in_size[0], kh, sh, ph, dh)
    cols_in, image_cols, window_cols = _input_span(chunk.c0, chunk.c1, geo.in_size[1], kw, sw, pw, dw)
    x_window = x.new_zeros((chunk.n1 - chunk.n0, rows_in, cols_in, geo.in_channels), dtype=ctype)
    x_window[:, window_rows, window_cols] = x[chunk.n0 : chunk.n1, :, image_rows, image_cols].permute(0, 2, 3, 1)
    return x_window, (image_rows, image_cols), (window_rows, window_cols)


def chunk_atoms(atom_coeff: torch.Tensor, bases: torch.Tensor, num_atoms: int,
                ctype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1. atom_coeff [n, M*L, h, w] (any strides), bases [L, KH, KW] -> (beta
    [L, n, h, w, M], the coefficients pixel-major in ctype; atoms [KH*KW, n, h, w, M])."""
    n, _, h, w = atom_coeff.shape
    num_bases = bases.shape[0]
    beta = atom_coeff.new_empty((num_bases, n, h, w, num_atoms), dtype=ctype)
    beta.copy_(atom_coeff.unflatten(1, (num_atoms, num_bases)).permute(2, 0, 3, 4, 1))
    atoms = torch.mm(bases.flatten(1).t().to(ctype), beta.view(num_bases, -1))
    return beta, atoms.view(bases.shape[1] * bases.shape[2], n, h, w, num_atoms)


def basis_to_atom(atom_coeff: torch.Tensor, bases: torch.Tensor, num_atoms: int) -> torch.Tensor:
    """Stage 1 alone. atom_coeff [n, M*L, h, w], bases [L, KH, KW] -> atoms [KH*KW, n, h, w, M]."""
    return chunk_atoms(atom_coeff, bases, num_atoms, atom_coeff.dtype)[1]


def _tap(x_window: torch.Tensor, geo: AtomConvGeometry, i: int, j: int, h: int, w: int) -> torch.Tensor:
    """The window pixels tap (i, j) reads for the chunk's h x w output pixels: [n, h, w, C_in] (a view)."""
    (sh, sw), (dh, dw) = geo.stride, geo.dilation
    return x_window[:, i * dh : i * dh + (h - 1) * sh + 1 : sh, j * dw : j * dw + (w - 1) * sw + 1 : sw]


def atom_times_features(x_window: torch.Tensor, atoms: torch.Tensor, geo: AtomConvGeometry) -> torch.Tensor:
    """Stage 2. x_window [n, rows_in, cols_in, C_in] (as `input_window`), atoms
    [KH*KW, n, h, w, M] -> Z [n, h, w, G, M, C_in/G]."""
    _, n, h, w, m = atoms.shape
    kh, kw = geo.kernel_size
    z = None
    for i in range(kh):
        for j in range(kw):
            tap = _tap(x_window, geo, i, j, h, w).unflatten(3, (geo.groups, 1, -1))  # [n, h, w, G, 1, C_in/G]
            atom = atoms[i * kw + j].view(n, h, w, 1, m, 1)
            z = tap * atom if z is None else z.addcmul_(tap, atom)
    return z


def grouped_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """weight [C_out, C_in/G, M] -> [G, C_out/G, M*C_in/G], columns in Z's (m, c) order."""
    c_out, c_in_g, m = weight.shape
    return weight.view(groups, c_out // groups, c_in_g, m).transpose(2, 3).reshape(groups, c_out // groups, -1)


def _per_sample_and_group(z: torch.Tensor, grid: torch.Tensor, out_per_group: int):
    """The operands of stage 3's GEMMs and of their gradients: for each sample and group, (g,
    its channel slice, Z of that sample and group [h*w, M*C_in/G], `grid`'s part of that sample
    and group [C/G, h, w]). grid [n, C, h, w] is the chunk's part of an output-grid tensor."""
    n, h, w, groups = z.shape[:4]
    for sample in range(n):
        z_sample = z[sample].view(h * w, groups, -1)
        for g in range(groups):
            channels = slice(g * out_per_group, (g + 1) * out_per_group)
            yield g, channels, z_sample[:, g], grid[sample, channels]


def coefficient_sum(z: torch.Tensor, weight_g: torch.Tensor, bias: torch.Tensor | None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """Stage 3. Z [n, h, w, G, M, C_in/G], weight_g [G, C_out/G, M*C_in/G] (`grouped_weight`),
    bias [C_out] or None -> y [n, C_out, h, w] in Z's dtype. With `out` (a view of y whose
    (h, w) flatten to one dimension: whole rows, or one row, as `chunk_plan` makes them) the
    GEMMs write y there, with no copy; without it (needed under autograd) y is a new tensor."""
    if out is None:
        n, h, w, groups, m, c_in_g = z.shape
        y = torch.einsum("pgk,gok->pgo", z.reshape(-1, groups, m * c_in_g), weight_g).reshape(n, h, w, -1)
        return (y if bias is None else y + bias).permute(0, 3, 1, 2)
    out_per_group = weight_g.shape[1]
    for g, channels, z_g, out_g in _per_sample_and_group(z, out, out_per_group):
        out_g = out_g.view(out_per_group, -1)  # [C_out/G, h*w], still a view of y
        if bias is None:
            torch.mm(weight_g[g], z_g.t(), out=out_g)
        else:
            torch.addmm(bias[channels, None], weight_g[g], z_g.t(), out=out_g)
    return out


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
    """SPEC §1 on already validated inputs (see `validate_atom_conv2d`).

    x [N, C_in, H, W], atom_coeff [N, M*L, H_out, W_out], bases [L, KH, KW],
    weight [C_out, C_in/G, M], bias [C_out] or None -> y [N, C_out, H_out, W_out] in x's
    dtype, channels_last when x is. Computes in float32 for 16-bit inputs. Temporaries are
    bounded by `max_chunk_bytes` (None: the whole output in one chunk). Autograd can
    differentiate it (the Triton kernels' gradients are checked against that); the bound then
    does not hold, as autograd keeps each chunk's tensors for the backward.
    """
    ctype = compute_dtype(x.dtype)
    y = torch.empty(
        (geo.batch, geo.out_channels, *geo.out_size), dtype=x.dtype, device=x.device, memory_format=output_layout(x)
    )
    weight_g = grouped_weight(weight.to(ctype), geo.groups)
    bias = None if bias is None else bias.to(ctype)
    low_precision = ctype != x.dtype
    differentiated = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, atom_coeff, bases, weight, bias))
    def forward_chunk(chunk: Chunk) -> None:  # a function, so that the chunk's tensors die with it
        x_window, _, _ = input_window(x, geo, chunk, ctype)
        z = atom_times_features(x_window, chunk_atoms(chunk.of(atom_coeff), bases, geo.num_atoms, ctype)[1], geo)
        del x_window  # stage 3 does not need it: free it before stage 3 may allocate
        if differentiated:
            chunk.of(y).copy_(coefficient_sum(z, weight_g, bias))
        elif low_precision:  # the GEMMs accumulate in float32: through a float32 copy of the chunk's y
            chunk.of(y).copy_(coefficient_sum(z, weight_g, bias, out=z.new_empty(chunk.of(y).shape)))
        else:
            coefficient_sum(z, weight_g, bias, out=chunk.of(y))

    for chunk in chunk_plan(geo, torch.finfo(ctype).bits // 8, max_chunk_bytes, backward=False,
                            low_precision=low_precision):
        forward_chunk(chunk)
    return y


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
    """Gradients of SPEC §1 with respect to (x, atom_coeff, bases, weight), each where `needs`
    (same order) asks for it, else None; each in its input's dtype, d x and d atom_coeff in
    their input's layout.

    grad_y [N, C_out, H_out, W_out] (any strides), the rest as `atom_conv2d_reference`. Works
    chunk by chunk like the forward (the module docstring has the formulas), recomputing the
    chunk's atoms (and Z, for the weight's gradient) instead of keeping anything from the
    forward; every temporary of a chunk is within `max_chunk_bytes`. The gradients are written
    in place chunk by chunk (for 16-bit inputs d x is summed in a float32 copy, since chunks
    that share input rows both add to them). d bias is grad_y summed over (N, H_out, W_out),
    left to the caller.
    """
    need_x, need_coeff, need_bases, need_weight = needs
    need_atoms_grad = need_coeff or need_bases
    ctype = compute_dtype(x.dtype)
    (kh, kw), m, groups = geo.kernel_size, geo.num_atoms, geo.groups
    c_in_g, out_per_group = geo.in_channels // groups, geo.out_channels // groups
    bases_c = bases.to(ctype).flatten(1)  # [L, KH*KW]
    weight_g = grouped_weight(weight.to(ctype), groups)  # [G, C_out/G, M*C_in/G]
    dx = torch.zeros_like(x, dtype=ctype, memory_format=output_layout(x)) if need_x else None
    dcoeff = torch.empty_like(atom_coeff, dtype=ctype, memory_format=output_layout(atom_coeff)) if need_coeff else None
    dbases = bases_c.new_zeros(bases_c.shape) if need_bases else None
    dweight = weight_g.new_zeros(weight_g.shape) if need_weight else None

    def backward_chunk(chunk: Chunk) -> None:  # a function, so that the chunk's tensors die with it
        x_window, image, window = input_window(x, geo, chunk, ctype)
        beta, atoms = chunk_atoms(chunk.of(atom_coeff), bases, m, ctype)  # [L, n, h, w, M], [T, n, h, w, M]
        _, n, h, w, _ = atoms.shape
        dy = chunk.of(grad_y).to(ctype)  # [n, C_out, h, w]
        if need_weight:
            z = atom_times_features(x_window, atoms, geo)
            for g, _, z_g, dy_g in _per_sample_and_group(z, dy, out_per_group):
                dweight[g].addmm_(dy_g.reshape(out_per_group, -1), z_g)
        if not (need_x or need_atoms_grad):
            return
        dz = z if need_weight else x_window.new_empty((n, h, w, groups, m, c_in_g))  # dZ takes Z's memory
        for g, _, dz_g, dy_g in _per_sample_and_group(dz, dy, out_per_group):
            torch.mm(dy_g.reshape(out_per_group, -1).t(), weight_g[g], out=dz_g)
        del dy
        if need_atoms_grad:
            datoms = atoms_gradient(x_window, dz, geo)  # [T, n, h, w, M]
        if need_x:
            dx_window = torch.zeros_like(x_window)
            for t in range(kh * kw):
                dx_tap = _tap(dx_window, geo, t // kw, t % kw, h, w).unflatten(3, (groups, -1))  # [n, h, w, G, C_in/G]
                for a in range(m):
                    dx_tap.addcmul_(dz[:, :, :, :, a], atoms[t, ..., a, None, None])
            (image_rows, image_cols), (window_rows, window_cols) = image, window
            dx[chunk.n0 : chunk.n1, :, image_rows, image_cols].add_(
                dx_window[:, window_rows, window_cols].permute(0, 3, 1, 2))
        if need_bases:  # d Psi[l, t] += sum over pixels and atoms of beta[l, .] dA[t, .]
            dbases.addmm_(beta.view(beta.shape[0], -1), datoms.view(kh * kw, -1).t())
        if need_coeff:  # d beta[l, p, m] = sum_t Psi[l, t] dA[t, p, m], in beta's memory
            torch.mm(bases_c, datoms.view(kh * kw, -1), out=beta.view(beta.shape[0], -1))
            chunk.of(dcoeff).unflatten(1, (m, -1)).permute(2, 0, 3, 4, 1).copy_(beta)

    for chunk in chunk_plan(geo, torch.finfo(ctype).bits // 8, max_chunk_bytes, backward=True,
                            low_precision=ctype != x.dtype):
        backward_chunk(chunk)

    c_out, c_in_g = weight.shape[:2]
    return [
        None if dx is None else dx.to(x.dtype),
        None if dcoeff is None else dcoeff.to(atom_coeff.dtype),
        None if dbases is None else dbases.view(bases.shape).to(bases.dtype),
        None if dweight is None else dweight.view(c_out, m, c_in_g).transpose(1, 2).to(weight.dtype),
    ]


def atoms_gradient(x_window: torch.Tensor, dz: torch.Tensor, geo: AtomConvGeometry) -> torch.Tensor:
    """dA[t, p, m] = sum_c dZ[p, m, c] x_t[p, c] (summed within each group, then over groups).
    x_window [n, rows_in, cols_in, C_in], dZ [n, h, w, G, M, C_in/G] -> dA [KH*KW, n, h, w, M].

    A kernel row at a time: its KW taps gathered into one [P, G, KW, C_in/G] tensor, then one
    batched matrix product over the P pixels (and G groups) of [KW, C_in/G] by [C_in/G, M]."""
    n, h, w, groups, m, c_in_g = dz.shape
    kh, kw = geo.kernel_size
    pixels = n * h * w
    datoms = dz.new_empty((kh * kw, n, h, w, m))
    row_taps = dz.new_empty((n, h, w, groups, kw, c_in_g))
    dz_t = dz.view(pixels * groups, m, c_in_g).transpose(1, 2)  # [P*G, C_in/G, M]
    for i in range(kh):
        for j in range(kw):
            row_taps[:, :, :, :, j] = _tap(x_window, geo, i, j, h, w).unflatten(3, (groups, -1))
        per_group = torch.bmm(row_taps.view(pixels * groups, kw, c_in_g), dz_t)  # [P*G, KW, M]
        datoms[i * kw : (i + 1) * kw] = per_group.view(n, h, w, groups, kw, m).sum(3).permute(3, 0, 1, 2, 4)
    return datoms
