"""Fused Triton backward of the ACDA operator (docs/design.md §1): dx, dβ, dΨ, dα from dy.

With p an output pixel, q an input pixel, t a tap, A the atoms and Z the stage-2 result of the
forward, and the on-chip intermediates

    dZ[p, c, m] = Σ_{o ∈ group(c)} α[o, c, m] · dy[p, o]        (the gradient of stage 3)
    dA[p, m, t] = Σ_c dZ[p, c, m] · x_t[p, c]                    (of stage 2; x_t = tap t of x)

the gradients are

    dβ[p, m*L + l] = Σ_t dA[p, m, t] · Ψ[l, t]
    dΨ[l, t]       = Σ_{p, m} β[p, m*L + l] · dA[p, m, t]
    dα[o, c, m]    = Σ_p dy[p, o] · Z[p, c, m]
    dx[q, c]       = Σ_{o, m} α[o, c, m] · U[q, m, o],   U[q, m, o] = Σ_t A[p_t(q), m, t] · dy[p_t(q), o]

where p_t(q) is the output pixel that reads input pixel q through tap t (if any). Three kernels
compute them, each with the forward's tiling (one thread per pixel, KH, KW, L, M compile-time
constants, the stages of `tiles`); none writes A, Z, dZ, dA, U or an unfolded x to memory, and
none uses atomics, so every gradient is bitwise reproducible run to run:

- `atom_conv2d_bwd_coeff_kernel` (dβ, and dΨ when asked): a program per output-pixel tile. Per
  group and input-channel chunk, dZ[m] = α_mᵀ @ dy on tensor cores, then per tap dA += Σ_c dZ[m]
  · x_tap on CUDA cores (C*M*KH*KW multiply-adds per pixel, the floor); the dA of a pixel stay in
  its registers until every chunk of every group is in, then project on the bases. dΨ: one
  float32 partial [L, KH*KW] per program, summed by torch in a fixed order.
- `atom_conv2d_bwd_weight_kernel` (dα): a program per (pixel split, group, output-channel tile,
  run of input-channel chunks) recomputes Z of its chunks with the forward's stages 1-2 over the
  pixel tiles of its split (the atoms once per tile for the whole run) and accumulates dy @ Zᵀ
  on tensor cores; one float32 partial of its α tile per split, summed by torch in a fixed order
  (`configs.weight_grad_splits`).
- `atom_conv2d_bwd_input_kernel` (dx): the forward's structure on the transposed problem. A
  program per input-pixel tile, group and input-channel tile first makes the atoms of the output
  pixel that reads each of its pixels through each tap, then per chunk of output channels gathers
  dy into U (CUDA cores) and adds α @ U (tensor cores). A gather rather than a scatter: one write
  per dx element, no atomics.

dbias is not a kernel: it is dy summed over pixels in float32 (`atomconv.op` does it). All
accumulation is float32; 16-bit gradients are rounded to the input dtype once, at the end. As in
the forward, 16-bit dots take 16-bit operands on a GPU: Z (for dα) and U (for dx) are rounded to
the input dtype before their dot, so in float16 their atoms are first scaled by a power of two
that keeps them finite (per input pixel in dx, per pixel tile in dα, whose dot sums over pixels;
see `tiles`), undone on the accumulator. Lanes that are padding (channels past the group, pixels
past the end, taps no output pixel reads, taps of a tap group that do not exist) are kept out of
every sum, so an Inf input (dy included) gives the reference's ±Inf, not NaN.

Each launcher guards its launch with `launch.on_device_of` (Triton launches on the current
device), and gives the autotune cache a footprint per config (`*_footprint`): what fits, what
is padding, and a cost to rank candidates by, so a new shape times only a few.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

import autotune_cache

from atomconv.validation import AtomConvGeometry, output_layout, validate_atom_conv2d

from . import launch as launching
from .configs import (TileConfig, TileLaunch, arch_of, even_chunks, fit_tile_config, pow2_at_least, row_passes,
                      tile_candidates, default_config, tuned_config, weight_grad_chunks, weight_grad_programs,
                      weight_grad_splits)
from .forward import forward_footprint, pack_weight, reads_rows_of_bases, zero_padded_weight
from .launch import INTERPRETING, Launch, check_runnable, dot_precision, pixel_run, needs_wide_offsets, strides
from .tiles import (add_at, atom_l1_bound, atom_times_features, basis_at_tap, basis_coefficients, basis_row,
                    coefficient_sum, column_blocks, column_tap, columns_tile, dot_operand, existing_taps_only,
                    joined_columns, offset, packed_weight_tile, pixel_atoms, pixel_offset, pixel_sums, pixel_tile,
                    pow2_scale, rows_to_columns, scaled_atoms, tap_geometry, tile_rows, to_columns)


@triton.jit
def atom_conv2d_bwd_coeff_kernel(
    x_ptr, coeff_ptr, bases_ptr, w_ptr, dy_ptr, dcoeff_ptr, dbases_ptr,
    N, H, W, H_out, W_out, G, C_in_g, C_out_g,
    SH, SW, PH, PW, DH, DW,
    stride_x_n, stride_x_c, stride_x_h, stride_x_w,
    stride_coeff_n, stride_coeff_c, stride_coeff_h, stride_coeff_w,
    stride_bases_l, stride_bases_h, stride_bases_w,
    stride_dy_n, stride_dy_c, stride_dy_h, stride_dy_w,
    stride_dcoeff_n, stride_dcoeff_c, stride_dcoeff_h, stride_dcoeff_w,
    M: tl.constexpr, L: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_P: tl.constexpr, TAP_GROUPS: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
    M_DOT: tl.constexpr, WIDE_ATOMS: tl.constexpr, BASES_GRAD: tl.constexpr, EVEN_C: tl.constexpr,
    DY_RESIDENT: tl.constexpr, FLAT_DY: tl.constexpr, WIDE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """x [N, C_in, H, W], β (coeff) [N, M*L, H_out, W_out], Ψ (bases) [L, KH, KW], α (w) packed
    by rows (`pack_weight_rows`, M_DOT atoms per chunk), dy [N, C_out, H_out, W_out] ->
    dβ (dcoeff) [N, M*L, H_out, W_out] and, if BASES_GRAD, dΨ partials (dbases) [programs, L,
    KH*KW] float32 contiguous. Any strides elsewhere (dy may be an expanded, stride-0 tensor).

    1-D grid of cdiv(N*H_out*W_out, BLOCK_P) programs; each loops over the channel chunks of
    every group, since dβ sums over all of them. BLOCK_O output channels per step of dZ's dots,
    WIDE_ATOMS (a power of two, `wide_dot_atoms`) atoms per dot. With TAP_GROUPS > 1 each column (one
    pixel's group of taps) gets the dZ of its pixel after the dots, which take a row per pixel
    (`rows_to_columns`). EVEN_C: C_in_g is a multiple of BLOCK_C.
    DY_RESIDENT (`dy_resident`): dZ's dots take one step (C_out_g <= BLOCK_O), so a group's dyᵀ is
    loaded once for all its chunks, and its dot operand stays in shared memory across them.
    """
    TAPS: tl.constexpr = KH * KW
    PER_GROUP: tl.constexpr = (TAPS + TAP_GROUPS - 1) // TAP_GROUPS
    COLUMNS: tl.constexpr = TAP_GROUPS * BLOCK_P
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    n, _, oh, ow, pix_mask = pixel_tile(pid, N, H_out, W_out, BLOCK_P, TAP_GROUPS, FLAT_DY)  # per column
    n = n.to(tl.int32)  # (its offsets are int32 unless WIDE)
    # dZ depends on the pixel only: its dots take a row per pixel, not per column (with tap groups,
    # TAP_GROUPS times fewer rows), and each column gets its pixel's row after the dots.
    out_n, out_pix, out_h, out_w, out_mask = pixel_tile(pid, N, H_out, W_out, BLOCK_P, 1, FLAT_DY)  # per pixel
    out_n = out_n.to(tl.int32)
    dy_pix = offset(out_n, stride_dy_n, WIDE) + pixel_offset(out_pix, out_h, out_w, stride_dy_h, stride_dy_w, FLAT_DY,
                                                             WIDE)
    x_pix = offset(n, stride_x_n, WIDE) + offset(oh * SH - PH, stride_x_h, WIDE) \
        + offset(ow * SW - PW, stride_x_w, WIDE)  # window corner
    row_offsets, column_offsets, tap_masks = tap_geometry(oh, ow, pix_mask, H, W, SH, SW, PH, PW, DH, DW, stride_x_h,
                                                          stride_x_w, KH, KW, TAP_GROUPS, BLOCK_P, WIDE)

    num_chunks = tl.cdiv(C_in_g, BLOCK_C)
    w_row = num_chunks * M_DOT * BLOCK_C  # length of a packed α row
    chan = tl.arange(0, BLOCK_C)
    out_chan = tl.arange(0, BLOCK_O)
    dz_cols = tl.arange(0, WIDE_ATOMS * BLOCK_C)
    d_atoms = (tl.zeros([COLUMNS], tl.float32),) * (PER_GROUP * M)  # entry k*M + m: dA[m, the column's tap k]
    for group in range(G):
        if DY_RESIDENT:
            dy_group = dot_operand(transposed_grad_output(dy_ptr, dy_pix, out_mask, group * C_out_g, out_chan,
                                                          out_chan < C_out_g, stride_dy_c, WIDE), dtype, INTERPRETED)
        for chunk in range(num_chunks):
            c = chunk * BLOCK_C + chan
            chan_mask = c < C_in_g
            # dZᵀ[m] [BLOCK_P, BLOCK_C] = dyᵀ @ α_m over the group's output channels (pixels as the
            # dot's rows: BLOCK_C may be 8, below a tensor-core tile's 16 rows), WIDE_ATOMS atoms per
            # dot: each dot reads dyᵀ from shared memory once for all its columns.
            dz = (tl.zeros([BLOCK_P, BLOCK_C], tl.float32),) * M
            for o0 in range(0, C_out_g, BLOCK_O):
                o = o0 + out_chan
                o_mask = o < C_out_g
                if DY_RESIDENT:
                    dy_t = dy_group
                else:
                    dy_t = dot_operand(transposed_grad_output(dy_ptr, dy_pix, out_mask, group * C_out_g, o, o_mask,
                                                              stride_dy_c, WIDE), dtype, INTERPRETED)
                w_t = w_ptr + ((group * C_out_g + o) * w_row)[:, None] + (chunk * M_DOT * BLOCK_C + dz_cols)[None, :]
                for m in tl.static_range(0, M, WIDE_ATOMS):
                    # α of atoms m .. m + WIDE_ATOMS - 1 [BLOCK_O, WIDE_ATOMS * BLOCK_C], zero past M.
                    alpha = tl.load(w_t + m * BLOCK_C, mask=o_mask[:, None] & (dz_cols < (M - m) * BLOCK_C)[None, :],
                                    other=0.0)
                    dz_block = tl.dot(dy_t, dot_operand(alpha, dtype, INTERPRETED),
                                      input_precision=DOT_PRECISION)
                    parts = column_blocks(dz_block, WIDE_ATOMS, BLOCK_P, BLOCK_C)
                    for i in tl.static_range(WIDE_ATOMS):
                        if m + i < M:
                            dz = add_at(dz, m + i, parts[i])
            dz_rows = ()  # dz_rows[m][k] [COLUMNS]: dZ[m] of channel k of the chunk
            for m in tl.static_range(M):
                dz_m = tl.trans(rows_to_columns(dz[m], TAP_GROUPS, BLOCK_P, BLOCK_C))
                if BASES_GRAD or not EVEN_C:
                    # Padding lanes of dZ are exactly zero, so that an Inf there (Inf α or dy times a
                    # zero) cannot meet a tap's zero: in dA of a real pixel through a channel past the
                    # group, or in dΨ through a pixel past the end (dβ there is never stored).
                    dz_m = tl.where(chan_mask[:, None] & pix_mask[None, :], dz_m, 0.0)
                dz_rows = dz_rows + (tile_rows(dz_m, BLOCK_C, COLUMNS),)
            for k in tl.static_range(BLOCK_C):
                x_chan = x_ptr + offset(group * C_in_g + chunk * BLOCK_C + k, stride_x_c, WIDE) + x_pix
                for t in tl.static_range(PER_GROUP):
                    x_mask = tap_masks[t]
                    if not EVEN_C or TAP_GROUPS > 1:
                        # (Kept with tap groups even where every channel exists: without it the 5x5 and
                        # 7x7 builds spill, 72 B on sm_90. Compared as a vector: the interpreter's bool
                        # scalar & vector is int32.)
                        x_mask = x_mask & (tl.full([COLUMNS], chunk * BLOCK_C + k, tl.int32) < C_in_g)
                    x_tap = tl.load(x_chan + row_offsets[t] + column_offsets[t], mask=x_mask, other=0.0).to(tl.float32)
                    for m in tl.static_range(M):
                        d_atoms = add_at(d_atoms, t * M + m, dz_rows[m][k] * x_tap)

    # A tap that does not exist has no dA (its zero x times an Inf dZ is NaN, which its zero Ψ would
    # carry into dβ).
    d_atoms = existing_taps_only(d_atoms, M, TAPS, TAP_GROUPS, BLOCK_P)
    # dβ[m*L + l] = Σ_taps dA[m, tap] · Ψ[l, tap]: over each column's taps, then a pixel's columns.
    # (Bases outermost, each Ψ value used by every atom as it is loaded, as in `pixel_atoms`.)
    dcoeff_pix = offset(out_n, stride_dcoeff_n, WIDE) + offset(out_h, stride_dcoeff_h, WIDE) \
        + offset(out_w, stride_dcoeff_w, WIDE)
    for l in tl.static_range(L):
        d_beta = (tl.zeros([COLUMNS], tl.float32),) * M
        for k in tl.static_range(PER_GROUP):
            t, exists = column_tap(k, TAPS, TAP_GROUPS, BLOCK_P)
            psi = basis_at_tap(bases_ptr, l, t, exists, stride_bases_l, stride_bases_h, stride_bases_w, KW, TAP_GROUPS)
            for m in tl.static_range(M):
                d_beta = add_at(d_beta, m, d_atoms[k * M + m] * psi)
        d_beta = pixel_sums(d_beta, M, TAP_GROUPS, BLOCK_P)
        for m in tl.static_range(M):
            tl.store(dcoeff_ptr + offset(m * L + l, stride_dcoeff_c, WIDE) + dcoeff_pix,
                     d_beta[m].to(dcoeff_ptr.dtype.element_ty), mask=out_mask)
    if BASES_GRAD:
        # dΨ[l, tap] partial = Σ over the tile's pixels and the atoms of β[m*L + l] · dA[m, tap].
        coeff_pix = offset(n, stride_coeff_n, WIDE) + offset(oh, stride_coeff_h, WIDE) \
            + offset(ow, stride_coeff_w, WIDE)
        partials = dbases_ptr + pid.to(tl.int64) * (L * TAPS)
        for l in tl.static_range(L):
            # Pixels past the end have zero dA, but an Inf in β there must not meet it: β is 0 there.
            betas = basis_coefficients(coeff_ptr, coeff_pix, pix_mask, l, stride_coeff_c, M, L, WIDE)
            for k in tl.static_range(PER_GROUP):
                per_column = tl.zeros([COLUMNS], tl.float32)
                for m in tl.static_range(M):
                    per_column += betas[m] * d_atoms[k * M + m]
                if TAP_GROUPS == 1:
                    tl.store(partials + l * TAPS + k, tl.sum(per_column, axis=0))
                else:
                    # One sum per tap group: the k-th taps of the groups are different taps.
                    group_tap = tl.arange(0, TAP_GROUPS) * PER_GROUP + k
                    tl.store(partials + l * TAPS + group_tap,
                             tl.sum(tl.reshape(per_column, [TAP_GROUPS, BLOCK_P]), axis=1), mask=group_tap < TAPS)


@triton.jit
def transposed_grad_output(dy_ptr, dy_pix, pix_mask, first_channel, o, o_mask, stride_dy_c, WIDE: tl.constexpr):
    """dyᵀ [COLUMNS, BLOCK_O] of output channels first_channel + o (o [BLOCK_O] inside the group,
    zero where o_mask is false) at each column's pixel (dy_pix, zero where pix_mask is false),
    loaded as such: pixels are the contiguous (coalesced) axis."""
    return tl.load(dy_ptr + dy_pix[:, None] + offset(first_channel + o, stride_dy_c, WIDE)[None, :],
                   mask=pix_mask[:, None] & o_mask[None, :], other=0.0)


@triton.jit
def atom_conv2d_bwd_weight_kernel(
    x_ptr, coeff_ptr, bases_ptr, dy_ptr, dw_ptr,
    N, H, W, H_out, W_out, G, C_in_g, C_out_g,
    SH, SW, PH, PW, DH, DW,
    stride_x_n, stride_x_c, stride_x_h, stride_x_w,
    stride_coeff_n, stride_coeff_c, stride_coeff_h, stride_coeff_w,
    stride_bases_l, stride_bases_h, stride_bases_w,
    stride_dy_n, stride_dy_c, stride_dy_h, stride_dy_w,
    SPLITS,
    M: tl.constexpr, L: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_P: tl.constexpr, TAP_GROUPS: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
    M_DOT: tl.constexpr, WIDE_ATOMS: tl.constexpr, CHUNKS: tl.constexpr, ROWS_OF_PSI: tl.constexpr,
    EVEN_C: tl.constexpr, FLAT_DY: tl.constexpr, WIDE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """x [N, C_in, H, W], β (coeff) [N, M*L, H_out, W_out], Ψ (bases) [L, KH, KW],
    dy [N, C_out, H_out, W_out], any strides (Ψ's rows padded by `launch.row_padded_bases` where
    ROWS_OF_PSI, `weight_grad_reads_rows_of_bases`: stage 1 reads them whole) -> dα partials (dw) [SPLITS, C_out,
    cdiv(C_in_g, BLOCK_C), M_DOT, BLOCK_C] float32 contiguous, packed like `pack_weight_rows`:
    split s holds Σ over pixel tiles s, s + SPLITS, ... of dy @ Zᵀ. Columns that are padding
    (channels past the group, atoms past M) hold garbage; the launcher drops them. EVEN_C:
    C_in_g is a multiple of BLOCK_C.

    A program owns CHUNKS consecutive channel chunks (`configs.weight_grad_chunks`: CHUNKS divides
    cdiv(C_in_g, BLOCK_C)): each pixel tile's atoms and dy, made and loaded once, serve all of them.
    Grid (G * cdiv(C_out_g, BLOCK_O) * cdiv(C_in_g, BLOCK_C) / CHUNKS, SPLITS): the programs of
    one split are neighbours, so they read the same pixels from L2.
    """
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    PER_GROUP: tl.constexpr = (KH * KW + TAP_GROUPS - 1) // TAP_GROUPS
    COLUMNS: tl.constexpr = TAP_GROUPS * BLOCK_P
    num_o_tiles = tl.cdiv(C_out_g, BLOCK_O)
    num_chunks = tl.cdiv(C_in_g, BLOCK_C)
    chunk_runs = num_chunks // CHUNKS
    tile, split = tl.program_id(0), tl.program_id(1)
    group, tile = tile // (num_o_tiles * chunk_runs), tile % (num_o_tiles * chunk_runs)
    pid_o, first_chunk = tile // chunk_runs, tile % chunk_runs * CHUNKS

    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_mask = o < C_out_g
    # dα of chunk first_chunk + j, atoms b*WIDE_ATOMS .. in dw[j*BLOCKS + b] [BLOCK_O, WIDE_ATOMS *
    # BLOCK_C]: one dot per block reads dy once.
    BLOCKS: tl.constexpr = (M + WIDE_ATOMS - 1) // WIDE_ATOMS
    dw = (tl.zeros([BLOCK_O, WIDE_ATOMS * BLOCK_C], tl.float32),) * (CHUNKS * BLOCKS)
    pixel_tiles = tl.cdiv(tl.cast(N, tl.int64) * (H_out * W_out), BLOCK_P).to(tl.int32)  # (N*H*W may pass 2**31)
    for pixel_tile_id in range(split, pixel_tiles, SPLITS):
        n, pix, oh, ow, pix_mask = pixel_tile(pixel_tile_id, N, H_out, W_out, BLOCK_P, TAP_GROUPS, FLAT_DY)  # per column
        n = n.to(tl.int32)  # (its offsets are int32 unless WIDE)
        coeff_pix = offset(n, stride_coeff_n, WIDE) + offset(oh, stride_coeff_h, WIDE) + offset(ow, stride_coeff_w, WIDE)
        atoms = pixel_atoms(coeff_ptr, coeff_pix, pix_mask, stride_coeff_c, bases_ptr, stride_bases_l, stride_bases_h,
                            stride_bases_w, M, L, KH, KW, TAP_GROUPS, BLOCK_P, ROWS_OF_PSI, WIDE)
        if dtype == tl.float16:
            # The dot sums over pixels: one power of two for the tile, from its largest atom norm.
            tile_scale, inverse_scale = pow2_scale(tl.max(atom_l1_bound(atoms, M, PER_GROUP, TAP_GROUPS, BLOCK_P), axis=0))
            atoms = scaled_atoms(atoms, tile_scale, PER_GROUP * M)
        taps = tap_geometry(oh, ow, pix_mask, H, W, SH, SW, PH, PW, DH, DW, stride_x_h, stride_x_w, KH, KW,
                            TAP_GROUPS, BLOCK_P, WIDE)
        x_pix = offset(n, stride_x_n, WIDE) + offset(oh * SH - PH, stride_x_h, WIDE) \
            + offset(ow * SW - PW, stride_x_w, WIDE)  # window corner
        for j in tl.static_range(CHUNKS):
            chunk = first_chunk + j
            z = atom_times_features(x_ptr + offset(group * C_in_g + chunk * BLOCK_C, stride_x_c, WIDE) + x_pix,
                                    stride_x_c, C_in_g - chunk * BLOCK_C, taps, atoms, M, PER_GROUP, EVEN_C, BLOCK_C,
                                    COLUMNS, WIDE)
            if j == 0:  # (loaded after the first Z, not before: at K=7 holding it through stage 2 spills more)
                # dy of each column's pixel: the dot then sums the tap groups' partial Z along with the pixels.
                dy = tl.load(dy_ptr + offset(group * C_out_g + o, stride_dy_c, WIDE)[:, None]
                             + (offset(n, stride_dy_n, WIDE) + pixel_offset(pix, oh, ow, stride_dy_h, stride_dy_w,
                                                                             FLAT_DY, WIDE))[None, :],
                             mask=o_mask[:, None] & pix_mask[None, :], other=0.0)
                dy = dot_operand(dy, dtype, INTERPRETED)
            for b in tl.static_range(BLOCKS):
                # Zᵀ of atoms b*WIDE_ATOMS .. [COLUMNS, WIDE_ATOMS * BLOCK_C], zero past M. Pixels past
                # the end have zero Z (`pixel_atoms` gives them zero atoms, and their taps read 0), so an
                # Inf there cannot meet their zero dy.
                z_t = ()
                for m in tl.static_range(b * WIDE_ATOMS, (b + 1) * WIDE_ATOMS):
                    if m < M:
                        z_m = columns_tile(z[m * BLOCK_C:(m + 1) * BLOCK_C], BLOCK_C, COLUMNS)
                        if dtype == tl.float32:
                            # (No change in value, but without it the float32 default spills 8.4 KB on
                            # sm_90 instead of 2.2 KB.)
                            z_m = tl.where(pix_mask[:, None], z_m, 0.0)
                        z_t = z_t + (z_m,)
                    else:
                        z_t = z_t + (tl.zeros([COLUMNS, BLOCK_C], tl.float32),)
                # (joined per atom: stacking all the rows at once spills)
                z_t = dot_operand(joined_columns(z_t, WIDE_ATOMS, COLUMNS, BLOCK_C), dtype, INTERPRETED)
                if dtype == tl.float16:
                    dw = add_at(dw, j * BLOCKS + b, tl.dot(dy, z_t, input_precision=DOT_PRECISION) * inverse_scale)
                else:  # (accumulating in the dot; the index is spelled out: a constexpr cannot be reassigned)
                    dw = dw[:j * BLOCKS + b] + (tl.dot(dy, z_t, dw[j * BLOCKS + b], input_precision=DOT_PRECISION),) \
                        + dw[j * BLOCKS + b + 1:]

    num_chunks_row = num_chunks * M_DOT * BLOCK_C
    dw_cols = tl.arange(0, WIDE_ATOMS * BLOCK_C)
    dw_ptrs = dw_ptr + split.to(tl.int64) * (G * C_out_g * num_chunks_row) \
        + ((group * C_out_g + o) * num_chunks_row)[:, None] + (first_chunk * M_DOT * BLOCK_C + dw_cols)[None, :]
    for j in tl.static_range(CHUNKS):
        for b in tl.static_range(BLOCKS):
            tl.store(dw_ptrs + j * M_DOT * BLOCK_C + b * WIDE_ATOMS * BLOCK_C, dw[j * BLOCKS + b],
                     mask=o_mask[:, None] & (dw_cols < (M - b * WIDE_ATOMS) * BLOCK_C)[None, :])


@triton.jit
def _reading_output_coord(in_coord, pad, tap_offset, step, out_size, ok):
    """The output coordinate that reads input coordinate in_coord [BLOCK] through a tap at
    tap_offset (= tap index * dilation) along one axis, out * step - pad + tap_offset = in_coord,
    and where it exists (ok and the division exact and inside [0, out_size))."""
    shifted = in_coord + pad - tap_offset
    out = shifted // step
    return out, ok & (shifted >= 0) & (out * step == shifted) & (out < out_size)


@triton.jit
def atom_conv2d_bwd_input_kernel(
    dy_ptr, coeff_ptr, bases_ptr, w_ptr, dx_ptr,
    N, H, W, H_out, W_out, G, C_in_g, C_out_g,
    SH, SW, PH, PW, DH, DW,
    stride_dy_n, stride_dy_c, stride_dy_h, stride_dy_w,
    stride_coeff_n, stride_coeff_c, stride_coeff_h, stride_coeff_w,
    stride_bases_l, stride_bases_h, stride_bases_w,
    stride_dx_n, stride_dx_c, stride_dx_h, stride_dx_w,
    M: tl.constexpr, L: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_P: tl.constexpr, TAP_GROUPS: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
    ATOMS_PER_DOT: tl.constexpr, ROW_PASSES: tl.constexpr, ROWS_OF_PSI: tl.constexpr, EVEN_C: tl.constexpr,
    FLAT_DX: tl.constexpr, UNIT_STRIDE: tl.constexpr, WIDE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """dy [N, C_out, H_out, W_out], β (coeff) [N, M*L, H_out, W_out], Ψ (bases) [L, KH, KW],
    α (w) transposed per group and packed (`pack_transposed_weight`) -> dx [N, C_in, H, W]; any
    strides but w's, and Ψ's where ROWS_OF_PSI (`input_grad_reads_rows_of_bases`: the row passes
    read its rows whole from `launch.row_padded_bases`).

    The forward's tiling of the transposed problem: BLOCK_P input pixels (times TAP_GROUPS
    columns), BLOCK_O input channels (the dot's rows), output channels reduced in chunks of
    BLOCK_C. 1-D grid of cdiv(N*H*W, BLOCK_P) * G * cdiv(C_in_g, BLOCK_O) programs.
    ROW_PASSES (`configs.row_passes`, as in the forward): one pass per row of taps, in a loop at
    run time, each pass a 1 x KW kernel of its own adding its share of dx.
    """
    num_c_tiles = tl.cdiv(C_in_g, BLOCK_O)
    pid = tl.program_id(0)
    pid_p, pid_gc = pid // (G * num_c_tiles), pid % (G * num_c_tiles)
    group, pid_c = pid_gc // num_c_tiles, pid_gc % num_c_tiles
    n, _, ih, iw, q_mask = pixel_tile(pid_p, N, H, W, BLOCK_P, TAP_GROUPS, 1)  # per column
    n = n.to(tl.int32)  # (its offsets are int32 unless WIDE)
    # Per column, at its sample: as pointers here (and in the forward), where dβ and dα add the sample
    # to their offsets (with offsets, this kernel's 7x7 build spills 2.5 KB instead of 1.7 KB).
    dy_ptr += offset(group * C_out_g, stride_dy_c, WIDE) + offset(n, stride_dy_n, WIDE)
    coeff_ptr += offset(n, stride_coeff_n, WIDE)

    c = pid_c * BLOCK_O + tl.arange(0, BLOCK_O)
    c_mask = c < C_in_g
    w_ptr, w_chunk = packed_weight_tile(w_ptr, pid_gc, G * num_c_tiles, M, ATOMS_PER_DOT, BLOCK_O, BLOCK_C)
    acc = tl.zeros([BLOCK_O, BLOCK_P], dtype=tl.float32)
    # float16: the atoms of every pass scaled by one power of two per pixel (the module doc of
    # `tiles`), the smallest any pass has needed so far (a pass that needs a smaller one first
    # rescales what the earlier ones added); `pow2_scale` of a zero bound to start.
    scale, inverse_scale = pow2_scale(tl.zeros([BLOCK_P], tl.float32))
    if ROW_PASSES:
        for i in range(KH):
            acc, scale, inverse_scale = input_grad_taps(
                acc, scale, inverse_scale, dy_ptr, coeff_ptr, bases_ptr + i * stride_bases_h, w_ptr, w_chunk, ih,
                iw, q_mask, H_out, W_out, C_out_g, SH, SW, PH - i * DH, PW, DH, DW, stride_dy_c, stride_dy_h,
                stride_dy_w, stride_coeff_c, stride_coeff_h, stride_coeff_w, stride_bases_l, stride_bases_h,
                stride_bases_w, M, L, 1, KW, 1, BLOCK_P, BLOCK_C, ATOMS_PER_DOT, EVEN_C, UNIT_STRIDE, ROWS_OF_PSI,
                True, dx_ptr.dtype.element_ty == tl.float16, WIDE, DOT_PRECISION, INTERPRETED)
    else:
        acc, scale, inverse_scale = input_grad_taps(
            acc, scale, inverse_scale, dy_ptr, coeff_ptr, bases_ptr, w_ptr, w_chunk, ih, iw, q_mask, H_out, W_out,
            C_out_g, SH, SW, PH, PW, DH, DW, stride_dy_c, stride_dy_h, stride_dy_w, stride_coeff_c, stride_coeff_h,
            stride_coeff_w, stride_bases_l, stride_bases_h, stride_bases_w, M, L, KH, KW, TAP_GROUPS, BLOCK_P, BLOCK_C,
            ATOMS_PER_DOT, EVEN_C, UNIT_STRIDE, ROWS_OF_PSI, False, dx_ptr.dtype.element_ty == tl.float16, WIDE,
            DOT_PRECISION, INTERPRETED)

    if dx_ptr.dtype.element_ty == tl.float16:
        acc *= inverse_scale[None, :]
    n, q, ih, iw, q_mask = pixel_tile(pid_p, N, H, W, BLOCK_P, 1, FLAT_DX)  # per pixel
    n = n.to(tl.int32)
    dx_ptrs = dx_ptr + offset(group * C_in_g + c, stride_dx_c, WIDE)[:, None] \
        + (offset(n, stride_dx_n, WIDE) + pixel_offset(q, ih, iw, stride_dx_h, stride_dx_w, FLAT_DX, WIDE))[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=c_mask[:, None] & q_mask[None, :])


@triton.jit
def input_grad_taps(acc, scale, inverse_scale, dy_ptr, coeff_ptr, bases_ptr, w_ptr, w_chunk, ih, iw, q_mask, H_out,
                    W_out, C_out_g, SH, SW, PH, PW, DH, DW, stride_dy_c, stride_dy_h, stride_dy_w, stride_coeff_c,
                    stride_coeff_h, stride_coeff_w, stride_bases_l, stride_bases_h, stride_bases_w,
                    M: tl.constexpr, L: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, TAP_GROUPS: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, ATOMS_PER_DOT: tl.constexpr,
                    EVEN_C: tl.constexpr, UNIT_STRIDE: tl.constexpr, ROWS_OF_PSI: tl.constexpr,
                    RESCALE: tl.constexpr, SCALED: tl.constexpr, WIDE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    INTERPRETED: tl.constexpr):
    """The dx kernel's stages 1-3 for the KH x KW taps of Ψ (bases_ptr) and padding PH, every
    output-channel chunk: (acc, scale, inverse_scale) with acc [BLOCK_O, BLOCK_P] += Σ_o,m α U.
    dy_ptr and coeff_ptr [COLUMNS] are at each column's sample (dy at the group's first channel);
    w_ptr at the first chunk's α of the program's tile, the next w_chunk elements on.
    SCALED (float16): the atoms are scaled by the smaller of scale and their own `pow2_scale`,
    which becomes the new scale; RESCALE: acc (from earlier passes) is brought to it first.
    UNIT_STRIDE: SH == SW == 1, so the output pixel that reads q through a tap is q shifted by a
    constant: with one tap group, a tap's dy and β offsets are then one vector, plus the tap row's
    scalar, plus its column's (a constant where DW and the W strides are 1), added in that order.
    ROWS_OF_PSI (a one-row kernel, KW > 1, one tap group): each row of Ψ is read in one vector load
    (`tiles.basis_row`), the bases outside the tap loop."""
    TAPS: tl.constexpr = KH * KW
    PER_GROUP: tl.constexpr = (TAPS + TAP_GROUPS - 1) // TAP_GROUPS
    COLUMNS: tl.constexpr = TAP_GROUPS * BLOCK_P
    # The atoms that reach each input pixel: tap t's atoms at the output pixel p_t(q) that reads
    # it, zero where no output pixel does (then dy reads 0 there too), and where dy is read.
    SHIFTED: tl.constexpr = UNIT_STRIDE and TAP_GROUPS == 1
    if SHIFTED:  # dy and β offsets of the output pixel q + (PH, PW), which each tap shifts by a scalar
        dy_pix = offset(ih + PH, stride_dy_h, WIDE) + offset(iw + PW, stride_dy_w, WIDE)
        coeff_q = offset(ih + PH, stride_coeff_h, WIDE) + offset(iw + PW, stride_coeff_w, WIDE)
    else:
        dy_pix = 0
    tl.static_assert(not ROWS_OF_PSI or (KH == 1 and KW > 1 and TAP_GROUPS == 1), "rows of Ψ: one row, one group")
    atoms = (tl.zeros([COLUMNS], tl.float32),) * (PER_GROUP * M)
    dy_taps = ()
    dy_columns = ()
    tap_masks = ()
    coeff_taps = ()  # per tap: (a pointer, an offset) whose sum is β's address at the tap
    for k in tl.static_range(PER_GROUP):
        t, exists = column_tap(k, TAPS, TAP_GROUPS, BLOCK_P)
        oh, row_ok = _reading_output_coord(ih, PH, (t // KW) * DH, SH, H_out, q_mask)
        ow, tap_ok = _reading_output_coord(iw, PW, (t % KW) * DW, SW, W_out, row_ok)
        if TAP_GROUPS > 1:
            tap_ok = tap_ok & exists
        if SHIFTED:  # the tap's row, then its column: a constant (where DW and stride_w are 1) the loads
            # add to their row's address as an immediate, one address a row, not one a tap
            dy_tap = offset(-(t // KW) * DH, stride_dy_h, WIDE)
            dy_column = offset(-(t % KW) * DW, stride_dy_w, WIDE)
            coeff_tap = coeff_ptr + (coeff_q + offset(-(t // KW) * DH, stride_coeff_h, WIDE))
            coeff_pix = offset(-(t % KW) * DW, stride_coeff_w, WIDE)
        else:
            dy_tap = offset(oh, stride_dy_h, WIDE) + offset(ow, stride_dy_w, WIDE)
            dy_column = 0
            coeff_tap = coeff_ptr
            coeff_pix = offset(oh, stride_coeff_h, WIDE) + offset(ow, stride_coeff_w, WIDE)
        if not ROWS_OF_PSI:
            for l in tl.static_range(L):
                psi = basis_at_tap(bases_ptr, l, t, exists, stride_bases_l, stride_bases_h, stride_bases_w, KW,
                                   TAP_GROUPS)
                betas = basis_coefficients(coeff_tap, coeff_pix, tap_ok, l, stride_coeff_c, M, L, WIDE)
                for m in tl.static_range(M):
                    atoms = add_at(atoms, k * M + m, betas[m] * psi)
        dy_taps = dy_taps + (dy_tap,)
        dy_columns = dy_columns + (dy_column,)
        tap_masks = tap_masks + (tap_ok,)
        coeff_taps = coeff_taps + ((coeff_tap, coeff_pix),)
    if ROWS_OF_PSI:  # (one row, KH == 1; each atom still sums its bases in order: the same values)
        for l in tl.static_range(L):
            psi_row = basis_row(bases_ptr + l * stride_bases_l, stride_bases_w, None, KW, COLUMNS)
            for j in tl.static_range(KW):
                coeff_tap, coeff_pix = coeff_taps[j]
                betas = basis_coefficients(coeff_tap, coeff_pix, tap_masks[j], l, stride_coeff_c, M, L, WIDE)
                for m in tl.static_range(M):
                    atoms = add_at(atoms, j * M + m, betas[m] * psi_row[j])
    # Taps no output pixel reads add nothing (their masked β times an Inf in Ψ would add NaN).
    zeroed = ()
    for k in tl.static_range(PER_GROUP * M):
        zeroed = zeroed + (tl.where(tap_masks[k // M], atoms[k], 0.0),)
    atoms = zeroed
    if SCALED:
        own_scale, own_inverse = pow2_scale(atom_l1_bound(atoms, M, PER_GROUP, TAP_GROUPS, BLOCK_P))
        if RESCALE:  # (exact: powers of two, the ratio at most 1)
            acc *= (tl.minimum(scale, own_scale) * inverse_scale)[None, :]
        scale, inverse_scale = tl.minimum(scale, own_scale), tl.maximum(inverse_scale, own_inverse)
        atoms = scaled_atoms(atoms, to_columns(scale, TAP_GROUPS, BLOCK_P), PER_GROUP * M)

    out_chan = tl.arange(0, BLOCK_C)
    for chunk in range(tl.cdiv(C_out_g, BLOCK_C)):
        o_mask = chunk * BLOCK_C + out_chan < C_out_g
        # U[m] [BLOCK_C, COLUMNS]: stage 2 with dy for x, at the output pixels that read each input pixel.
        u = atom_times_features(dy_ptr + offset(chunk * BLOCK_C, stride_dy_c, WIDE) + dy_pix, stride_dy_c,
                                C_out_g - chunk * BLOCK_C, (dy_taps, dy_columns, tap_masks), atoms, M,
                                PER_GROUP, EVEN_C, BLOCK_C, COLUMNS, WIDE)
        acc = coefficient_sum(acc, u, w_ptr + chunk * w_chunk, o_mask, M, EVEN_C, ATOMS_PER_DOT, TAP_GROUPS,
                              BLOCK_C, BLOCK_P, DOT_PRECISION, INTERPRETED)
    return acc, scale, inverse_scale


def _geometry_args(geo: AtomConvGeometry) -> dict[str, int]:
    """The geometry arguments every backward kernel takes, by name, and its compile-time shape."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geo.kernel_size, geo.stride, geo.padding, geo.dilation
    return dict(N=geo.batch, H=geo.in_size[0], W=geo.in_size[1], H_out=geo.out_size[0], W_out=geo.out_size[1],
                G=geo.groups,
                C_in_g=geo.in_channels // geo.groups, C_out_g=geo.out_channels // geo.groups,
                SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw)


def _shape_args(geo: AtomConvGeometry) -> dict[str, int]:
    return dict(M=geo.num_atoms, L=geo.num_bases, KH=geo.kernel_size[0], KW=geo.kernel_size[1])


def dy_resident(geo: AtomConvGeometry, launch: TileLaunch) -> bool:
    """Whether the dβ kernel loads a group's dyᵀ once for all its channel chunks: where dZ's dot
    takes one step over the group's output channels. (Hoisted, Triton keeps the dot's copy of dyᵀ
    in shared memory, not the registers: dβ at K=3, float16, sm_90 loses 7 of 12 shared-store
    wavefronts per pixel and all of dy's reloads.)"""
    return geo.out_channels // geo.groups <= launch.BLOCK_O


WIDE_DOT_COLUMNS = 64
"""At most this many columns (atoms times BLOCK_C channels) in the dots of dZ (dβ kernel) and of
dα (dα kernel) that take several atoms at once."""


def wide_dot_atoms(geo: AtomConvGeometry, launch: TileLaunch, dtype: torch.dtype) -> int:
    """Atoms per dot where all of a chunk's atoms share the dot's other operand: dZᵀ = dyᵀ @ α
    (dβ kernel) and dα += dy @ Zᵀ (dα kernel). For 16-bit dtypes M rounded up to a power of two,
    at most WIDE_DOT_COLUMNS // BLOCK_C (at least one): fewer, wider dots read dy from shared
    memory fewer times (dβ at K=3, fp16, sm_90: 55 wavefronts per pixel with one atom per dot, 16
    with eight), while the fp32 result of a dot stays at WIDE_DOT_COLUMNS * BLOCK_O (dα) or
    * BLOCK_P (dβ) values per program. One for float32, whose wide dots spill (7 to 10 KB at K=3
    on sm_90: Triton 3.6 and 3.9 both)."""
    if dtype.itemsize == 4:
        return 1
    return max(1, min(pow2_at_least(geo.num_atoms), WIDE_DOT_COLUMNS // launch.BLOCK_C))


def coeff_grad_launch(x, atom_coeff, bases, weight, grad_y, dcoeff, dbases, geo: AtomConvGeometry,
                      launch: TileLaunch) -> Launch:
    """The dβ kernel's launch (dbases None: no dΨ, BASES_GRAD off; else [programs, L, KH*KW])."""
    programs = launching.pixel_tiles(geo.batch, geo.out_size[0] * geo.out_size[1], launch.BLOCK_P)
    launching.check_int32_indexing("H_out*W_out", geo.out_size[0] * geo.out_size[1], launch.BLOCK_P, programs)
    args = dict(
        x_ptr=x, coeff_ptr=atom_coeff, bases_ptr=bases, w_ptr=pack_weight_rows(weight, launch),
        dy_ptr=grad_y, dcoeff_ptr=dcoeff, dbases_ptr=dbases, **_geometry_args(geo),
        **strides("stride_x", "nchw", x), **strides("stride_coeff", "nchw", atom_coeff),
        **strides("stride_bases", "lhw", bases), **strides("stride_dy", "nchw", grad_y),
        **strides("stride_dcoeff", "nchw", dcoeff), **_shape_args(geo),
        BLOCK_P=launch.BLOCK_P, TAP_GROUPS=launch.TAP_GROUPS, BLOCK_O=launch.BLOCK_O, BLOCK_C=launch.BLOCK_C,
        M_DOT=launch.padded_atoms(geo.num_atoms), WIDE_ATOMS=wide_dot_atoms(geo, launch, x.dtype),
        BASES_GRAD=dbases is not None,
        EVEN_C=even_chunks(geo, launch), DY_RESIDENT=dy_resident(geo, launch),
        FLAT_DY=pixel_run(grad_y),
        WIDE=needs_wide_offsets(x, atom_coeff, grad_y, dcoeff),
        DOT_PRECISION=dot_precision(x.dtype), INTERPRETED=INTERPRETING,
    )
    name = "atom_conv2d_bwd_coeff_bases" if dbases is not None else "atom_conv2d_bwd_coeff"
    # Loops over groups, chunks and dZ's dot steps; Triton folds G == 1, and the group loop with it.
    trips = (geo.groups,) * (geo.groups > 1) + (triton.cdiv(args["C_in_g"], launch.BLOCK_C),
                                                triton.cdiv(args["C_out_g"], launch.BLOCK_O))
    return Launch(name, atom_conv2d_bwd_coeff_kernel, args, (programs,), launch.num_warps, launch.num_stages, trips)


def weight_grad_launch(x, atom_coeff, bases, grad_y, dweight_partials, geo: AtomConvGeometry,
                       launch: TileLaunch) -> Launch:
    """The dα kernel's launch; the split count is dweight_partials.shape[0]."""
    splits = dweight_partials.shape[0]
    programs_per_split = weight_grad_programs(geo, launch, x.dtype)
    launching.check_int32_indexing("H_out*W_out", geo.out_size[0] * geo.out_size[1], launch.BLOCK_P,
                                   programs_per_split * splits)
    rows_of_bases = weight_grad_reads_rows_of_bases(geo, launch, x.dtype)
    if rows_of_bases:
        bases = launching.row_padded_bases(bases)
    args = dict(
        x_ptr=x, coeff_ptr=atom_coeff, bases_ptr=bases, dy_ptr=grad_y, dw_ptr=dweight_partials,
        **_geometry_args(geo),
        **strides("stride_x", "nchw", x), **strides("stride_coeff", "nchw", atom_coeff),
        **strides("stride_bases", "lhw", bases), **strides("stride_dy", "nchw", grad_y),
        SPLITS=splits, **_shape_args(geo),
        BLOCK_P=launch.BLOCK_P, TAP_GROUPS=launch.TAP_GROUPS, BLOCK_O=launch.BLOCK_O, BLOCK_C=launch.BLOCK_C,
        M_DOT=launch.padded_atoms(geo.num_atoms), WIDE_ATOMS=wide_dot_atoms(geo, launch, x.dtype),
        CHUNKS=weight_grad_chunks(geo, launch, x.dtype), ROWS_OF_PSI=rows_of_bases, EVEN_C=even_chunks(geo, launch),
        FLAT_DY=pixel_run(grad_y),
        WIDE=needs_wide_offsets(x, atom_coeff, grad_y), DOT_PRECISION=dot_precision(x.dtype), INTERPRETED=INTERPRETING,
    )
    pixel_tiles = launching.pixel_tiles(geo.batch, geo.out_size[0] * geo.out_size[1], launch.BLOCK_P)
    return Launch("atom_conv2d_bwd_weight", atom_conv2d_bwd_weight_kernel, args, (programs_per_split, splits),
                  launch.num_warps, launch.num_stages, loop_trips=(pixel_tiles / splits,))


def input_grad_launch(atom_coeff, bases, weight, grad_y, dx, geo: AtomConvGeometry, launch: TileLaunch) -> Launch:
    """The dx kernel's launch; launch as `input_grad_tile_launch` fits it."""
    c_in_g, c_out_g = geo.in_channels // geo.groups, geo.out_channels // geo.groups
    pixels = geo.in_size[0] * geo.in_size[1]
    programs = launching.pixel_tiles(geo.batch, pixels, launch.BLOCK_P) * geo.groups * triton.cdiv(c_in_g, launch.BLOCK_O)
    launching.check_int32_indexing("H*W", pixels, launch.BLOCK_P, programs)
    rows_of_bases = input_grad_reads_rows_of_bases(geo, launch)
    if rows_of_bases:
        bases = launching.row_padded_bases(bases)
    args = dict(
        dy_ptr=grad_y, coeff_ptr=atom_coeff, bases_ptr=bases, w_ptr=pack_transposed_weight(weight, geo.groups, launch),
        dx_ptr=dx, **_geometry_args(geo),
        **strides("stride_dy", "nchw", grad_y), **strides("stride_coeff", "nchw", atom_coeff),
        **strides("stride_bases", "lhw", bases), **strides("stride_dx", "nchw", dx), **_shape_args(geo),
        BLOCK_P=launch.BLOCK_P, TAP_GROUPS=launch.TAP_GROUPS, BLOCK_O=launch.BLOCK_O, BLOCK_C=launch.BLOCK_C,
        ATOMS_PER_DOT=launch.ATOMS_PER_DOT, ROW_PASSES=row_passes(geo), ROWS_OF_PSI=rows_of_bases,
        EVEN_C=even_chunks(geo, launch, transposed=True), FLAT_DX=pixel_run(dx),
        UNIT_STRIDE=geo.stride == (1, 1), WIDE=needs_wide_offsets(grad_y, atom_coeff, dx),
        DOT_PRECISION=dot_precision(dx.dtype), INTERPRETED=INTERPRETING,
    )
    return Launch("atom_conv2d_bwd_input", atom_conv2d_bwd_input_kernel, args, (programs,), launch.num_warps,
                  launch.num_stages, loop_trips=((geo.kernel_size[0],) if row_passes(geo) else ())
                  + (triton.cdiv(c_out_g, launch.BLOCK_C),))


def weight_grad_reads_rows_of_bases(geo: AtomConvGeometry, launch: TileLaunch, dtype: torch.dtype) -> bool:
    """The dα kernel's ROWS_OF_PSI: whether stage 1 reads Ψ a row at a time, as the forward's
    (`forward.reads_rows_of_bases`), which it does in 16 bits only: in float32 the default
    spilled 8.5 KB at 32 registers on sm_90 that way, 2.2 KB at 255 without."""
    return dtype.itemsize == 2 and reads_rows_of_bases(geo, launch)


ROW_OF_PSI_ATOMS = 32
"""dx reads Ψ by rows in passes of one row of at most this many atoms (KW * M)."""


def input_grad_reads_rows_of_bases(geo: AtomConvGeometry, launch: TileLaunch) -> bool:
    """The dx kernel's ROWS_OF_PSI: whether it reads each row of Ψ whole, bases outside the tap loop,
    where its taps are one row: in row passes (`configs.row_passes`) or for a kernel one tap high;
    only for rows of at most ROW_OF_PSI_ATOMS atoms, wider than one tap. Measured on sm_90 fp16 at
    M=6 (static model): 5 taps wide, 142 -> 133 us and 800 -> 592 B of spills; 7 wide, 312 -> 320 us
    and 1712 -> 2016 B. (All 3 rows of a 3x3 read so, not in row passes, spilled 264 B, not 8, and
    bounded it at 29.0 us, not 27.9.)"""
    kh, kw = geo.kernel_size
    return ((row_passes(geo) or kh == 1) and launch.TAP_GROUPS == 1 and 1 < kw
            and kw * geo.num_atoms <= ROW_OF_PSI_ATOMS)


def input_grad_tile_launch(config: TileConfig, geo: AtomConvGeometry) -> TileLaunch:
    """The dx kernel's fit of a config: to the transposed problem, without tap groups where it
    runs by rows of taps (as the forward)."""
    return fit_tile_config(config, geo, transposed=True, by_rows=row_passes(geo))


def pack_transposed_weight(weight: torch.Tensor, groups: int, launch: TileLaunch) -> torch.Tensor:
    """α [C_out, C_in_g, M] -> per group transposed [C_in, C_out_g, M], then `pack_weight`: row c
    holds α[g*C_out_g + o, c - g*C_in_g, m] at chunk o // BLOCK_C."""
    c_out, c_in_g, m = weight.shape
    c_out_g = c_out // groups
    transposed = weight.view(groups, c_out_g, c_in_g, m).transpose(1, 2).reshape(groups * c_in_g, c_out_g, m)
    return pack_weight(transposed, groups, launch)


def pack_weight_rows(weight: torch.Tensor, launch: TileLaunch) -> torch.Tensor:
    """α [C_out, C_in_g, M] -> [C_out, cdiv(C_in_g, BLOCK_C), M_DOT, BLOCK_C] contiguous, zero where
    the channel or the atom is padding: row o holds α[o, j*BLOCK_C + c, m] at chunk j, atom m and
    column c (the dβ kernel's packing: its α tile spans up to 8 atoms of a row)."""
    return zero_padded_weight(weight[None], weight.shape[0], launch)[0].transpose(2, 3).contiguous()


def unpack_weight(packed: torch.Tensor, c_in_g: int, num_atoms: int) -> torch.Tensor:
    """Inverse of `pack_weight_rows`: [C_out, chunks, M_DOT, BLOCK_C] -> [C_out, C_in_g, M]."""
    c_out, chunks, m_dot, block_c = packed.shape
    return packed.transpose(2, 3).reshape(c_out, chunks * block_c, m_dot)[:, :c_in_g, :num_atoms]


def coeff_grad_footprint(launch: TileLaunch, geo: AtomConvGeometry, dtype: torch.dtype, arch: str,
                         bases_grad: bool) -> autotune_cache.Footprint:
    """What a config of the dβ kernel costs on a problem (candidate pruning; a lower bound of
    the registers, like `forward_footprint`): per thread the M*KH*KW gradients of the atoms and
    M*BLOCK_C of dZ; dZ's dots stage α [BLOCK_O, WIDE_ATOMS*BLOCK_C] and dyᵀ [BLOCK_P, BLOCK_O]. Cost: the
    per-tap reductions over the padded chunks of every group."""
    (kh, kw), m = geo.kernel_size, geo.num_atoms
    c_in_g = geo.in_channels // geo.groups
    pixels = geo.out_size[0] * geo.out_size[1]
    padded_pixels = launch.BLOCK_P * launching.pixel_tiles(geo.batch, pixels, launch.BLOCK_P)
    padded_c = launch.BLOCK_C * triton.cdiv(c_in_g, launch.BLOCK_C)
    return autotune_cache.Footprint(
        launch=launch, threads=32 * launch.num_warps,
        shared_bytes=(wide_dot_atoms(geo, launch, dtype) * launch.BLOCK_C + launch.BLOCK_P) * launch.BLOCK_O
        * dtype.itemsize,
        registers=m * kh * kw + m * launch.BLOCK_C + launch.BLOCK_O * (2 if bases_grad else 1),
        fill=geo.batch * pixels / padded_pixels * c_in_g / padded_c,
        cost=padded_pixels * geo.groups * padded_c * m * kh * kw)


def weight_grad_footprint(launch: TileLaunch, geo: AtomConvGeometry, dtype: torch.dtype,
                          arch: str) -> autotune_cache.Footprint:
    """What a config of the dα kernel costs: the forward's stages 1-2 per (output-channel tile,
    run of chunks) program (`forward_footprint`: its cost counts stage 1 for every output-channel
    tile; here it is also redone for every run of `weight_grad_chunks` chunks)."""
    forward = forward_footprint(launch, geo, dtype, arch)
    chunks = triton.cdiv(geo.in_channels // geo.groups, launch.BLOCK_C)
    stage_1 = forward.cost * geo.num_bases / (launch.BLOCK_C * chunks + geo.num_bases)
    runs = chunks // weight_grad_chunks(geo, launch, dtype)
    return dataclasses.replace(forward, cost=forward.cost + stage_1 * (runs - 1))


def input_grad_footprint(launch: TileLaunch, geo: AtomConvGeometry, dtype: torch.dtype,
                         arch: str) -> autotune_cache.Footprint:
    """What a config of the dx kernel costs: the forward's footprint of the transposed problem
    (input and output channels swapped, input pixels), whose tiling it uses."""
    transposed = dataclasses.replace(geo, in_channels=geo.out_channels, out_channels=geo.in_channels,
                                     out_size=geo.in_size)
    return forward_footprint(launch, transposed, dtype, arch, by_rows=row_passes(geo))


def launch_coeff_grad(grad_y, x, atom_coeff, bases, weight, geo: AtomConvGeometry, *, bases_grad: bool,
                      config: TileConfig | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dβ [N, M*L, H_out, W_out] (atom_coeff's dtype and layout) and, if bases_grad, dΨ
    [L, KH, KW] (bases' dtype), else None. Validated inputs; `config` forces a launch config."""
    dcoeff = torch.empty_like(atom_coeff, memory_format=output_layout(atom_coeff))
    kernel = "atom_conv2d_bwd_coeff_bases" if bases_grad else "atom_conv2d_bwd_coeff"
    arch = arch_of(x.device)
    config = config or tuned_config(
        kernel, x, geo, tile_candidates(), default_config(),
        run=lambda c: launch_coeff_grad(grad_y, x, atom_coeff, bases, weight, geo, bases_grad=bases_grad, config=c),
        footprint=lambda c: coeff_grad_footprint(fit_tile_config(c, geo), geo, x.dtype, arch, bases_grad))
    launch = fit_tile_config(config, geo)
    programs = launching.pixel_tiles(geo.batch, geo.out_size[0] * geo.out_size[1], launch.BLOCK_P)
    taps = geo.kernel_size[0] * geo.kernel_size[1]
    partials = torch.zeros(programs, geo.num_bases, taps, dtype=torch.float32, device=x.device) if bases_grad else None
    if programs:
        with launching.on_device_of(x):
            coeff_grad_launch(x, atom_coeff, bases, weight, grad_y, dcoeff, partials, geo, launch).run()
    dbases = None if partials is None else partials.sum(0).view_as(bases).to(bases.dtype)
    return dcoeff, dbases


def launch_weight_grad(grad_y, x, atom_coeff, bases, weight, geo: AtomConvGeometry, *,
                       config: TileConfig | None = None, splits: int | None = None) -> torch.Tensor:
    """dα [C_out, C_in_g, M] in weight's dtype. Validated inputs; `config` forces a launch config,
    `splits` the number of programs that share the pixel reduction of one α tile."""
    arch = arch_of(x.device)
    config = config or tuned_config(
        "atom_conv2d_bwd_weight", x, geo, tile_candidates(), default_config(),
        run=lambda c: launch_weight_grad(grad_y, x, atom_coeff, bases, weight, geo, config=c, splits=splits),
        footprint=lambda c: weight_grad_footprint(fit_tile_config(c, geo), geo, x.dtype, arch))
    launch = fit_tile_config(config, geo)
    c_in_g = geo.in_channels // geo.groups
    if splits is None:
        splits = weight_grad_splits(geo, launch, x.dtype, _target_programs(x.device))
    partials = torch.empty(splits, geo.out_channels, triton.cdiv(c_in_g, launch.BLOCK_C),
                           launch.padded_atoms(geo.num_atoms), launch.BLOCK_C, dtype=torch.float32, device=x.device)
    with launching.on_device_of(x):
        weight_grad_launch(x, atom_coeff, bases, grad_y, partials, geo, launch).run()
    return unpack_weight(partials.sum(0), c_in_g, geo.num_atoms).to(weight.dtype, memory_format=torch.contiguous_format)


def launch_input_grad(grad_y, x, atom_coeff, bases, weight, geo: AtomConvGeometry, *,
                      config: TileConfig | None = None) -> torch.Tensor:
    """dx [N, C_in, H, W] in x's dtype and layout (x itself is not read). Validated inputs;
    `config` forces a launch config (fitted to the transposed problem)."""
    dx = torch.empty_like(x, memory_format=output_layout(x))
    arch = arch_of(x.device)
    config = config or tuned_config(
        "atom_conv2d_bwd_input", x, geo, tile_candidates(), default_config(),
        run=lambda c: launch_input_grad(grad_y, x, atom_coeff, bases, weight, geo, config=c),
        footprint=lambda c: input_grad_footprint(input_grad_tile_launch(c, geo), geo, x.dtype, arch))
    if dx.numel():
        with launching.on_device_of(x):
            input_grad_launch(atom_coeff, bases, weight, grad_y, dx, geo,
                              input_grad_tile_launch(config, geo)).run()
    return dx


def _target_programs(device: torch.device) -> int:
    """Programs the dα kernel aims for: two per SM fill a GPU with room to balance; a few under
    the interpreter, which runs them one by one."""
    if device.type != "cuda":
        return 4
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def launch_backward(grad_y, x, atom_coeff, bases, weight, geo: AtomConvGeometry,
                    output_mask: tuple[bool, bool, bool, bool]) -> list[torch.Tensor | None]:
    """[dx, dβ, dΨ, dα] of validated inputs, None where output_mask (same order) says not needed.
    grad_y [N, C_out, H_out, W_out] in x's dtype, any strides (stride 0 included)."""
    check_runnable(x)
    _check_grad_output(grad_y, x, geo)
    want_x, want_coeff, want_bases, want_weight = output_mask
    dx = launch_input_grad(grad_y, x, atom_coeff, bases, weight, geo) if want_x else None
    dcoeff = dbases = None
    if want_coeff or want_bases:
        dcoeff, dbases = launch_coeff_grad(grad_y, x, atom_coeff, bases, weight, geo, bases_grad=want_bases)
    dweight = launch_weight_grad(grad_y, x, atom_coeff, bases, weight, geo) if want_weight else None
    return [dx, dcoeff if want_coeff else None, dbases, dweight]


def _check_grad_output(grad_y, x, geo: AtomConvGeometry) -> None:
    expected = (geo.batch, geo.out_channels, *geo.out_size)
    if not isinstance(grad_y, torch.Tensor):
        raise TypeError(f"grad_y must be a torch.Tensor, got {type(grad_y).__name__}")
    if tuple(grad_y.shape) != expected:
        raise ValueError(f"grad_y must have the output's shape [N, C_out, H_out, W_out] = {list(expected)}, "
                         f"got {list(grad_y.shape)}")
    if grad_y.dtype != x.dtype or grad_y.device != x.device:
        raise TypeError(f"grad_y must have x's dtype and device ({x.dtype}, {x.device}), "
                        f"got {grad_y.dtype} on {grad_y.device}")


def atom_conv2d_backward(grad_y, x, atom_coeff, bases, weight, stride=1, padding=0, dilation=1, groups=1, *,
                         output_mask=(True, True, True, True)):
    """Fused backward (docs/design.md §1): always Triton, no autograd. Arguments as `atom_conv2d_forward`
    plus grad_y [N, C_out, H_out, W_out] (any strides); returns [dx, d atom_coeff, d bases,
    d weight] in the inputs' dtype, None where output_mask says not needed. d bias is
    grad_y summed over (N, H_out, W_out)."""
    geo = validate_atom_conv2d(x, atom_coeff, bases, weight, None, stride, padding, dilation, groups)
    return launch_backward(grad_y, x, atom_coeff, bases, weight, geo, tuple(output_mask))


def _tune_backward(x, atom_coeff, bases, weight, bias, stride, padding, dilation, groups):
    """`python -m autotune_cache tune`'s runner (it passes atom_conv2d's arguments; the backward
    kernels never read bias): one full backward on a random grad_y, so each kernel learns its config."""
    grad_y = torch.randn(atom_coeff.shape[0], weight.shape[0], *atom_coeff.shape[2:], dtype=x.dtype, device=x.device)
    atom_conv2d_backward(grad_y, x, atom_coeff, bases, weight, stride, padding, dilation, groups)


autotune_cache.register_tuner("atom_conv2d_bwd", _tune_backward)
