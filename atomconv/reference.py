"""Reference ACDA operator in plain PyTorch (docs/design.md §1): the readable path and the CPU path.

The three stages, per chunk of output pixels p (and taps t = (i, j), KH*KW of them):

1. basis-to-atom        A[p, m, t]  = sum_l beta[l, p, m] * Psi[l, t]            (a GEMM per kernel row)
2. atom-times-features  Z[p, m, c]  = sum_t A[p, m, t] * x_t[p, c]               (batched GEMMs)
3. coefficient sum      y[p, o]     = bias[o] + sum_{c in group(o), m} weight[o, c, m] * Z[p, m, c]

where x_t[p, c] is the input pixel tap t reads for output pixel p (zero in the padding).

Why it is laid out this way. The chunk's input is copied once into a zero-padded, pixel-major
window (channels innermost). In that window the taps of one kernel row i, for one output pixel,
are KW vectors a fixed step apart, and consecutive output pixels of a row are a fixed step
apart too; laying the chunk's output pixels out on a "virtual grid" whose rows are as long as
a window row allows (a few columns past the last output column are computed and discarded),
every pixel of a sample is one fixed step further into the window. So x_t for a whole kernel
row is a strided view of the window ([pixels, KW, C], no copy), and stage 2 is, per sample and
kernel row, one batched product of [M, KW] by [KW, C] matrices; stages 1 and 3 are GEMMs.
Atoms (and, backward, their gradients) exist one kernel row at a time. The virtual grid's
extra columns have zero coefficients, hence zero atoms, Z and gradients.

Chunks (whole samples; else rows of one sample; else pieces of one row) keep every temporary
of a chunk, forward or backward, within `max_chunk_bytes` (`chunk_bytes` counts them); the
default is also small enough to keep a chunk near the CPU's caches, which is where much of the
speed comes from. The backward (`atom_conv2d_reference_backward`) is written by hand, chunk by
chunk like the forward: with dZ = dy . weight (a GEMM),
    d weight += dy^T . Z;   dA[p, m, t] = sum_c dZ[p, m, c] x_t[p, c];   dx_t += sum_m A[., ., t] dZ;
    d beta = Psi . dA;      d Psi += beta . dA^T,
dA by the same batched products as stage 2, dx_t by one broadcast multiply-add per tap and atom.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from .validation import AtomConvGeometry, output_layout

DEFAULT_MAX_CHUNK_BYTES = 16 * 2**20


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype (docs/design.md §6): float32 for 16-bit inputs, else the input's own."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def basis_to_atom(atom_coeff: torch.Tensor, bases: torch.Tensor, num_atoms: int) -> torch.Tensor:
    """Stage 1 on its own. atom_coeff [n, M*L, h, w], bases [L, KH, KW] -> atoms [KH*KW, n, h, w, M]."""
    n, _, h, w = atom_coeff.shape
    beta = atom_coeff.reshape(n, num_atoms, bases.shape[0], h, w)
    return torch.einsum("nmlhw,lt->tnhwm", beta, bases.flatten(1))


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


def _image_part(first: int, end: int, size: int, kernel: int, stride: int, padding: int, dilation: int):
    """Output positions [first, end) along one axis read the padded axis's positions [lo, hi):
    the image's part of them, as a slice of the input and as a slice of [lo, hi) (empty when
    those positions lie wholly in the padding)."""
    lo, hi = first * stride - padding, (end - 1) * stride - padding + dilation * (kernel - 1) + 1
    start = max(lo, 0)
    stop = max(min(hi, size), start)
    return slice(start, stop), slice(start - lo, stop - lo)


@dataclass(frozen=True)
class Layout:
    """Where a chunk of n x h x w output pixels lives. Its input window is
    [n, rows_in, row_pitch, C_in]: the rows_in rows and (at least) the columns its pixels read,
    padding included, columns past those zero. Its virtual grid is [n, h, virtual_width]:
    virtual pixel (r, v) of a sample reads, for tap (0, 0), window element
    (r * virtual_width + v) * stride_w of that sample (in pixels), i.e. column v * stride_w of
    window row r * stride_h, so one step per pixel covers all its pixels. Columns v < w are the
    chunk's; the rest are computed and discarded. The taps reach only the first
    `reach` = (h - 1) * virtual_width + w virtual pixels of a sample (the rest would read past
    its window)."""

    n: int
    h: int
    w: int
    rows_in: int
    row_pitch: int
    virtual_width: int

    @classmethod
    def of(cls, geo: AtomConvGeometry, samples: int, rows: int, cols: int) -> Layout:
        (kh, kw), (sh, sw), (dh, dw) = geo.kernel_size, geo.stride, geo.dilation
        row_pitch = (cols - 1) * sw + dw * (kw - 1) + 1  # the columns read
        while sh * row_pitch % sw:  # a window row must be a whole number of virtual pixel steps
            row_pitch += 1
        return cls(samples, rows, cols, (rows - 1) * sh + dh * (kh - 1) + 1, row_pitch, sh * row_pitch // sw)

    @property
    def virtual_pixels(self) -> int:
        return self.n * self.h * self.virtual_width

    @property
    def reach(self) -> int:
        return (self.h - 1) * self.virtual_width + self.w


def chunk_bytes(geo: AtomConvGeometry, element_size: int, samples: int, rows: int, cols: int, *,
                backward: bool) -> int:
    """Bytes of every temporary of one chunk of samples x rows x cols output pixels, as
    `atom_conv2d_reference` (backward=False) or `atom_conv2d_reference_backward` allocates
    them (outputs, y or the gradients, are not temporaries)."""
    layout = Layout.of(geo, samples, rows, cols)
    m, kw, c_in, c_out = geo.num_atoms, geo.kernel_size[1], geo.in_channels, geo.out_channels
    window = samples * layout.rows_in * layout.row_pitch * c_in  # the padded input (backward: and its dx)
    # Per virtual pixel: beta, one kernel row's atoms, Z (backward: then dZ in its place), y
    # (backward: dy); with groups, the einsums of stage 3 take a permuted copy of Z and of y; the
    # backward adds d beta and one kernel row's dA.
    per_pixel = m * geo.num_bases + kw * m + m * c_in + c_out + (m * c_in + c_out if geo.groups > 1 else 0)
    if backward:
        per_pixel += m * geo.num_bases + kw * m
    return element_size * ((2 if backward else 1) * window + layout.virtual_pixels * per_pixel)


def chunk_plan(geo: AtomConvGeometry, element_size: int, max_chunk_bytes: int | None, *,
               backward: bool) -> list[Chunk]:
    """Chunks covering the output, each within `max_chunk_bytes` by `chunk_bytes`: as many
    whole samples as fit, else as many rows of one sample, else as many columns of one row
    (at least one pixel a chunk). None means one chunk. An empty batch still gets one (empty)
    chunk, so the output keeps its autograd history."""
    n_all, (h_out, w_out) = geo.batch, geo.out_size
    if max_chunk_bytes is None or n_all == 0:
        return [Chunk(0, n_all, 0, h_out, 0, w_out)]

    def fits(samples: int, rows: int, cols: int) -> bool:
        return chunk_bytes(geo, element_size, samples, rows, cols, backward=backward) <= max_chunk_bytes

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


def input_window(x: torch.Tensor, geo: AtomConvGeometry, chunk: Chunk, layout: Layout,
                 ctype: torch.dtype) -> tuple[torch.Tensor, tuple[slice, slice], tuple[slice, slice]]:
    """The input pixels the chunk reads, as x_window [n, rows_in, row_pitch, C_in] in ctype,
    zero outside the image; and where the image part sits: (rows, cols) slices of x (dims 2, 3)
    and the same (rows, cols) slices of x_window (dims 1, 2)."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geo.kernel_size, geo.stride, geo.padding, geo.dilation
    image_rows, window_rows = _image_part(chunk.r0, chunk.r1, geo.in_size[0], kh, sh, ph, dh)
    image_cols, window_cols = _image_part(chunk.c0, chunk.c1, geo.in_size[1], kw, sw, pw, dw)
    x_window = x.new_zeros((layout.n, layout.rows_in, layout.row_pitch, geo.in_channels), dtype=ctype)
    x_window[:, window_rows, window_cols] = x[chunk.n0 : chunk.n1, :, image_rows, image_cols].permute(0, 2, 3, 1)
    return x_window, (image_rows, image_cols), (window_rows, window_cols)


def _tap_start(window: torch.Tensor, geo: AtomConvGeometry, layout: Layout, i: int, j: int) -> int:
    """Storage offset of the element tap (i, j) reads for virtual pixel 0 of sample 0."""
    dh, dw = geo.dilation
    return window.storage_offset() + (i * dh * layout.row_pitch + j * dw) * window.shape[3]


def kernel_row_taps(window: torch.Tensor, geo: AtomConvGeometry, layout: Layout, sample: int, i: int) -> torch.Tensor:
    """The KW taps of kernel row i for the first `reach` virtual pixels of one sample, as a
    strided view of window [n, rows_in, row_pitch, C] (no copy; rows overlap): [reach, KW, C]."""
    c, (_, sw), (_, dw) = window.shape[3], geo.stride, geo.dilation
    start = _tap_start(window, geo, layout, i, 0) + window.stride(0) * sample
    return window.as_strided((layout.reach, geo.kernel_size[1], c), (sw * c, dw * c, 1), start)


def tap_of_all_samples(window: torch.Tensor, geo: AtomConvGeometry, layout: Layout, t: int) -> torch.Tensor:
    """Tap t of every sample for its first `reach` virtual pixels: [n, reach, C], a strided view of window."""
    c, kw, sw = window.shape[3], geo.kernel_size[1], geo.stride[1]
    return window.as_strided((layout.n, layout.reach, c), (window.stride(0), sw * c, 1),
                             _tap_start(window, geo, layout, t // kw, t % kw))


def chunk_coefficients(atom_coeff: torch.Tensor, layout: Layout, num_atoms: int, ctype: torch.dtype) -> torch.Tensor:
    """atom_coeff [n, M*L, h, w] (the chunk's part) -> beta [L, n, h, virtual_width, M] in ctype,
    pixel-major on the virtual grid, zero on its extra columns."""
    n, _, h, w = atom_coeff.shape
    num_bases = atom_coeff.shape[1] // num_atoms
    beta = atom_coeff.new_zeros((num_bases, n, h, layout.virtual_width, num_atoms), dtype=ctype)
    beta[:, :, :, :w] = atom_coeff.unflatten(1, (num_atoms, num_bases)).permute(2, 0, 3, 4, 1)
    return beta


def zero_extra_columns(t: torch.Tensor, layout: Layout, pixel_dim: int) -> torch.Tensor:
    """t (contiguous, dim pixel_dim over the virtual grid's h*V pixels) with its entries at the
    extra columns (v >= w) zeroed in place. Their β and dy are zero, but times an Inf in Ψ or in
    an x the column's taps read they are NaN, which sums over pixels would carry into real
    gradients."""
    t.unflatten(pixel_dim, (layout.h, layout.virtual_width)).narrow(
        pixel_dim + 1, layout.w, layout.virtual_width - layout.w).zero_()
    return t


def kernel_row_atoms(beta: torch.Tensor, bases: torch.Tensor, i: int, layout: Layout) -> torch.Tensor:
    """Stage 1 for the taps of kernel row i: A[j, p, m] = sum_l Psi[l, i, j] beta[l, p, m], one
    GEMM, zero on the extra columns. beta [L, n, h, V, M] (`chunk_coefficients`), bases
    [L, KH, KW] in beta's dtype -> [KW, n, h*V, M]."""
    _, n, h, virtual_width, m = beta.shape
    atoms = torch.mm(bases[:, i].t(), beta.flatten(1)).view(bases.shape[2], n, h * virtual_width, m)
    return zero_extra_columns(atoms, layout, 2)


def atom_times_features(x_window: torch.Tensor, beta: torch.Tensor, bases: torch.Tensor, geo: AtomConvGeometry,
                        layout: Layout) -> torch.Tensor:
    """Stages 1 and 2. x_window [n, rows_in, row_pitch, C_in] (`input_window`), beta
    [L, n, h, V, M] (`chunk_coefficients`), bases [L, KH, KW] -> Z [n, h*V, M, C_in], zero past
    `reach`. Per kernel row, its atoms; then per sample, one batched [M, KW] x [KW, C_in]
    product over pixels."""
    _, n, h, virtual_width, m = beta.shape
    z = x_window.new_zeros((n, h * virtual_width, m, x_window.shape[3]))
    for i in range(geo.kernel_size[0]):
        atoms = kernel_row_atoms(beta, bases, i, layout)
        for sample in range(n):
            z[sample, : layout.reach].baddbmm_(atoms[:, sample, : layout.reach].permute(1, 2, 0),  # [reach, M, KW]
                                               kernel_row_taps(x_window, geo, layout, sample, i))
        del atoms  # before the next row's are made
    return z


def add_kernel_row_input_gradient(dx_window: torch.Tensor, dz_by_atom: tuple[torch.Tensor, ...], atoms: torch.Tensor,
                                  geo: AtomConvGeometry, layout: Layout, i: int) -> None:
    """dx_t += sum_m A[., m, t] dZ[., m, .] for the taps t = (i, j) of kernel row i, one
    multiply-add per tap and atom over the chunk. dx_window as x_window, dz_by_atom M x
    [n, reach, C_in], atoms [KW, n, h*V, M] (`kernel_row_atoms`)."""
    kw = geo.kernel_size[1]
    for j in range(kw):
        dx_tap = tap_of_all_samples(dx_window, geo, layout, i * kw + j)  # [n, reach, C_in]
        for dz_a, atom in zip(dz_by_atom, atoms[j, :, : layout.reach, :, None].unbind(2)):
            dx_tap.addcmul_(dz_a, atom)


def grouped_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """weight [C_out, C_in/G, M] -> [G, C_out/G, M, C_in/G], Z's (m, c) order within each group."""
    c_out, c_in_g, m = weight.shape
    return weight.view(groups, c_out // groups, c_in_g, m).transpose(2, 3)


def coefficient_sum(z: torch.Tensor, weight_g: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Stage 3. Z [q, M, C_in] (q pixels), weight_g [G, C_out/G, M, C_in/G] (`grouped_weight`),
    bias [C_out] or None -> y [q, C_out]."""
    groups, out_per_group, m, c_in_g = weight_g.shape
    if groups == 1:
        weight_t = weight_g.reshape(out_per_group, -1).t()
        z = z.reshape(z.shape[0], -1)
        return torch.mm(z, weight_t) if bias is None else torch.addmm(bias, z, weight_t)
    y = torch.einsum("qmgc,gomc->qgo", z.view(z.shape[0], m, groups, c_in_g), weight_g).flatten(1)
    return y if bias is None else y + bias


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
    bounded by `max_chunk_bytes` (None: the whole output in one chunk). Autograd can
    differentiate it (the Triton kernels' gradients are checked against that); the bound then
    does not hold, as autograd keeps each chunk's tensors for the backward.
    """
    ctype = compute_dtype(x.dtype)
    y = torch.empty(
        (geo.batch, geo.out_channels, *geo.out_size), dtype=x.dtype, device=x.device, memory_format=output_layout(x)
    )
    bases_c, weight_g = bases.to(ctype), grouped_weight(weight.to(ctype), geo.groups)
    bias = None if bias is None else bias.to(ctype)

    def forward_chunk(chunk: Chunk) -> None:  # a function, so that the chunk's tensors die with it
        layout = Layout.of(geo, chunk.n1 - chunk.n0, chunk.r1 - chunk.r0, chunk.c1 - chunk.c0)
        x_window, _, _ = input_window(x, geo, chunk, layout, ctype)
        # (Z's extra columns zeroed although y drops them: autograd through this forward sums Z over
        # every virtual pixel for d weight, and an Inf that their taps read makes them NaN.)
        z = zero_extra_columns(atom_times_features(x_window, chunk_coefficients(chunk.of(atom_coeff), layout,
                                                                                geo.num_atoms, ctype),
                                                   bases_c, geo, layout), layout, 1)
        del x_window  # stage 3 does not need it: free it first
        y_virtual = coefficient_sum(z.view(layout.virtual_pixels, *z.shape[2:]), weight_g, bias)
        del z
        y_virtual = y_virtual.view(layout.n, layout.h, layout.virtual_width, geo.out_channels)[:, :, : layout.w]
        chunk.of(y).copy_(y_virtual.permute(0, 3, 1, 2))

    for chunk in chunk_plan(geo, torch.finfo(ctype).bits // 8, max_chunk_bytes, backward=False):
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
    """Gradients of docs/design.md §1 with respect to (x, atom_coeff, bases, weight), each where `needs`
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
    bases_c = bases.to(ctype)  # [L, KH, KW]
    weight_g = grouped_weight(weight.to(ctype), groups)  # [G, C_out/G, M, C_in/G]
    dx = torch.zeros_like(x, dtype=ctype, memory_format=output_layout(x)) if need_x else None
    dcoeff = torch.empty_like(atom_coeff, dtype=ctype, memory_format=output_layout(atom_coeff)) if need_coeff else None
    dbases = torch.zeros_like(bases_c) if need_bases else None
    dweight_g = torch.zeros_like(weight_g) if need_weight else None  # [G, C_out/G, M, C_in/G]

    def backward_chunk(chunk: Chunk) -> None:  # a function, so that the chunk's tensors die with it
        layout = Layout.of(geo, chunk.n1 - chunk.n0, chunk.r1 - chunk.r0, chunk.c1 - chunk.c0)
        q, reach = layout.virtual_pixels, layout.reach
        x_window, image, window = input_window(x, geo, chunk, layout, ctype)
        beta = chunk_coefficients(chunk.of(atom_coeff), layout, m, ctype)  # [L, n, h, V, M]
        dy = x_window.new_zeros((layout.n, layout.h, layout.virtual_width, geo.out_channels))
        dy[:, :, : layout.w] = chunk.of(grad_y).permute(0, 2, 3, 1)
        dy = dy.view(q, groups, geo.out_channels // groups)
        if need_weight:
            z = zero_extra_columns(atom_times_features(x_window, beta, bases_c, geo, layout), layout, 1)
            z = z.view(q, m, groups, geo.in_channels // groups)
            dweight_g.add_(torch.einsum("qgo,qmgc->gomc", dy, z))
        if not (need_x or need_atoms_grad):
            return
        # dZ = dy . weight, in Z's memory (zero past `reach`, where dy is zero).
        dz = z if need_weight else x_window.new_empty((q, m, groups, geo.in_channels // groups))
        if groups == 1:
            torch.mm(dy.flatten(1), weight_g.flatten(2).squeeze(0), out=dz.flatten(1))
        else:
            dz.copy_(torch.einsum("qgo,gomc->qmgc", dy, weight_g))
        del dy
        dz = dz.view(layout.n, layout.h * layout.virtual_width, m, geo.in_channels)
        dz_by_atom = dz[:, :reach].unbind(2)  # M x [n, reach, C_in]
        dx_window = torch.zeros_like(x_window) if need_x else None
        dbeta = torch.zeros_like(beta) if need_coeff else None
        datoms = dz.new_zeros((*dz.shape[:3], kw)) if need_atoms_grad else None  # one kernel row's dA, 0 past reach
        for i in range(kh):  # everything per kernel row: its atoms, their gradient, its taps' dx
            atoms = kernel_row_atoms(beta, bases_c, i, layout)  # [KW, n, h*V, M]
            if need_atoms_grad:
                for sample in range(layout.n):
                    torch.bmm(dz[sample, :reach], kernel_row_taps(x_window, geo, layout, sample, i).transpose(1, 2),
                              out=datoms[sample, :reach])
                zero_extra_columns(datoms, layout, 1)
                if need_bases:  # d Psi[l, i, j] += sum over pixels and atoms of beta[l, .] dA[., j]
                    dbases[:, i].addmm_(beta.flatten(1), datoms.flatten(0, 2))
                if need_coeff:  # d beta[l, p, m] += sum_j Psi[l, i, j] dA[p, m, j]
                    dbeta.flatten(1).addmm_(bases_c[:, i], datoms.flatten(0, 2).t())
            if need_x:
                add_kernel_row_input_gradient(dx_window, dz_by_atom, atoms, geo, layout, i)
            del atoms  # before the next row's are made
        if need_x:
            (image_rows, image_cols), (window_rows, window_cols) = image, window
            dx[chunk.n0 : chunk.n1, :, image_rows, image_cols].add_(
                dx_window[:, window_rows, window_cols].permute(0, 3, 1, 2))
        if need_coeff:
            chunk.of(dcoeff).unflatten(1, (m, -1)).permute(2, 0, 3, 4, 1).copy_(dbeta[:, :, :, : layout.w])

    for chunk in chunk_plan(geo, torch.finfo(ctype).bits // 8, max_chunk_bytes, backward=True):
        backward_chunk(chunk)

    return [
        None if dx is None else dx.to(x.dtype),
        None if dcoeff is None else dcoeff.to(atom_coeff.dtype),
        None if dbases is None else dbases.to(bases.dtype),
        None if dweight_g is None else dweight_g.transpose(2, 3).reshape(weight.shape).to(weight.dtype),
    ]
