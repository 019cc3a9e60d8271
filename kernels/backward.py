"""Fused Triton backward of the ACDA operator (SPEC §1): dx, dβ, dΨ, dα from dy.

With p an output pixel, q an input pixel, A the atoms and Z the stage-2 result of the
forward, and the two on-chip intermediates

    dZ[p, c, m] = Σ_{o ∈ group(c)} α[o, c, m] · dy[p, o]        (the gradient of stage 3)
    dA[p, m, t] = Σ_c dZ[p, c, m] · x_t[p, c]                    (of stage 2; x_t = tap t of x)

the gradients are

    dβ[p, m*L + l] = Σ_t dA[p, m, t] · Ψ[l, t]
    dΨ[l, t]       = Σ_{p, m} β[p, m*L + l] · dA[p, m, t]
    dα[o, c, m]    = Σ_p dy[p, o] · Z[p, c, m]
    dx[q, c]       = Σ_{o, m} α[o, c, m] · U[q, m, o],   U[q, m, o] = Σ_t A[p_t(q), m, t] · dy[p_t(q), o]

where p_t(q) is the output pixel that reads input pixel q through tap t (if any). Three
kernels compute them; none writes A, Z, dZ, dA, U or an unfolded x to memory, and none uses
atomics, so every gradient is bitwise reproducible run to run, in deterministic mode or not:

- `atom_conv2d_bwd_coeff_kernel` (dβ, and dΨ when asked): a program per output-pixel tile,
  looping over the channel chunks of every group (dβ sums over all of them). Per chunk: dZ =
  packed αᵀ @ dy, a tensor-core dot reducing over the group's output channels; then per tap
  dA (a reduction over the chunk's channels) and its projection on the bases, accumulated in
  registers. Writes each dβ element once;
  dΨ as one float32 partial [L, KH*KW] per program, summed by torch in a fixed order.
- `atom_conv2d_bwd_weight_kernel` (dα): a program per (pixel split, group, output-channel
  tile, input-channel chunk). It recomputes Z tiles with the forward's stage 1-2 code over the
  pixel tiles of its split and accumulates dy @ Zᵀ on tensor cores; one float32 partial of its
  α tile per split, summed by torch in a fixed order. The number of splits follows the GPU's
  SM count (`configs.weight_grad_splits`), so the scratch is bounded by programs x tile.
- `atom_conv2d_bwd_input_kernel` (dx): the forward kernel's structure on the transposed
  problem. A program per input-pixel tile, group and input-channel tile gathers, per tap, dy
  and the atoms of the output pixel that reads it into U (on chip), then dx += packed α @ U on
  tensor cores. A gather rather than a scatter: one write per dx element, no atomics.

dbias is not a kernel: it is dy summed over pixels in float32 (`atomconv.op` does it).
All accumulation is float32; 16-bit gradients are rounded to the input dtype once, at the end.
As in the forward, 16-bit dots take 16-bit operands on a GPU: Z (for dα) and U (for dx) are
rounded to the input dtype before their dot, so in float16 their atoms are first scaled by a
power of two that keeps them finite (per input pixel in dx, per pixel tile in dα, whose dot
sums over pixels; see `tiles`), undone on the accumulator. Lanes that are padding (atoms past
M, channels past the group, pixels past the end, taps no output pixel reads) are kept out of
every sum, so an Inf input gives the reference's ±Inf, not NaN.

Each launcher guards its launch with `launch.on_device_of` (Triton launches on the current
device), and gives the autotune cache a footprint per config (`*_footprint`): what fits, what
is padding, and a cost to rank candidates by, so a new shape times only a few.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import triton
import triton.language as tl

import autotune_cache

from atomconv.validation import AtomConvGeometry, output_layout, validate_atom_conv2d

from . import launch as launching
from .configs import (ForwardConfig, ForwardLaunch, arch_of, coeff_grad_candidates, fit_forward_config,
                      input_grad_candidates, pick_coeff_grad_config, pick_input_grad_config, pick_weight_grad_config,
                      pow2_at_least, tuned_config, weight_grad_candidates, weight_grad_splits)
from .forward import pack_weight
from .launch import INTERPRETING, check_int32_indexing, check_runnable, dot_precision, strides
from .tiles import (atom_l1, atom_times_features, basis_to_atom, coefficient_sum, dot_operand, load_taps, offset,
                    pixel_coords, pow2_scale)


@triton.jit
def _grad_of_z(w_ptrs, dy_ptrs, pix_mask, C_out_g, stride_dy_c, w_row, BLOCK_K: tl.constexpr,
               BLOCK_O: tl.constexpr, BLOCK_P: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """dZ of one channel chunk [BLOCK_K, BLOCK_P] fp32 (row m*BLOCK_C + c) = αᵀ chunk @ dy, a
    tensor-core dot per BLOCK_O output channels of the group. w_ptrs [BLOCK_K] point at the
    packed α chunk of the group's first output channel (rows w_row apart), dy_ptrs [BLOCK_P] at
    dy[n, first output channel of the group, oh, ow]. Both operands are inputs, already in the
    dot's dtype: nothing is rounded."""
    dtype: tl.constexpr = w_ptrs.dtype.element_ty
    out_chan = tl.arange(0, BLOCK_O)
    dz = tl.zeros([BLOCK_K, BLOCK_P], dtype=tl.float32)
    for o0 in range(0, C_out_g, BLOCK_O):
        o_mask = o0 + out_chan < C_out_g
        w_t = tl.load(w_ptrs[:, None] + offset(o0 + out_chan, w_row)[None, :], mask=o_mask[None, :], other=0.0)
        dy = tl.load(dy_ptrs[None, :] + offset(o0 + out_chan, stride_dy_c)[:, None],
                     mask=o_mask[:, None] & pix_mask[None, :], other=0.0)
        dz = tl.dot(dot_operand(w_t, dtype, INTERPRETED), dot_operand(dy, dtype, INTERPRETED), dz,
                    input_precision=DOT_PRECISION)
    return dz


@triton.jit
def atom_conv2d_bwd_coeff_kernel(
    x_ptr, coeff_ptr, bases_ptr, w_ptr, dy_ptr, dcoeff_ptr, dbases_ptr,
    num_pixels, H, W, H_out, W_out, G, C_in_g, C_out_g, M, L, KH, KW,
    SH, SW, PH, PW, DH, DW,
    stride_x_n, stride_x_c, stride_x_h, stride_x_w,
    stride_coeff_n, stride_coeff_c, stride_coeff_h, stride_coeff_w,
    stride_bases_l, stride_bases_h, stride_bases_w,
    stride_dy_n, stride_dy_c, stride_dy_h, stride_dy_w,
    stride_dcoeff_n, stride_dcoeff_c, stride_dcoeff_h, stride_dcoeff_w,
    BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, M_PAD: tl.constexpr,
    L_PAD: tl.constexpr, TAPS_PAD: tl.constexpr, BASES_GRAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """x [N, C_in, H, W], β (coeff) [N, M*L, H_out, W_out], Ψ (bases) [L, KH, KW],
    α (w) packed [C_out, cdiv(C_in_g, BLOCK_C), M_PAD, BLOCK_C] (`pack_weight`),
    dy [N, C_out, H_out, W_out] -> dβ (dcoeff) [N, M*L, H_out, W_out] and, if BASES_GRAD,
    dΨ partials (dbases) [programs, L, KH*KW] float32 contiguous. Any strides elsewhere
    (dy may be an expanded, stride-0 tensor).

    1-D grid of cdiv(num_pixels, BLOCK_P) programs; each loops over the channel chunks of every
    group, since dβ sums over all of them. BLOCK_O is the chunk of output channels one dZ dot
    reduces over; L_PAD and TAPS_PAD are L and KH*KW padded to powers of two.
    """
    BLOCK_K: tl.constexpr = M_PAD * BLOCK_C
    pid = tl.program_id(0)
    pix = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    pix_mask = pix < num_pixels
    n, oh, ow = pixel_coords(pix, H_out, W_out)
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW

    # β-shaped tiles [M_PAD, L_PAD, BLOCK_P]: channel m*L + l of pixel p.
    atom = tl.arange(0, M_PAD)
    basis = tl.arange(0, L_PAD)
    coeff_chan = atom[:, None] * L + basis[None, :]
    coeff_mask = ((atom < M)[:, None] & (basis < L)[None, :])[:, :, None] & pix_mask[None, None, :]
    if BASES_GRAD:
        beta = tl.load(coeff_ptr + offset(coeff_chan, stride_coeff_c)[:, :, None]
                       + (n * stride_coeff_n + oh * stride_coeff_h + ow * stride_coeff_w)[None, None, :],
                       mask=coeff_mask, other=0.0).to(tl.float32)
        dbases = tl.zeros([L_PAD, TAPS_PAD], dtype=tl.float32)
        tap_index = tl.arange(0, TAPS_PAD)

    num_chunks = tl.cdiv(C_in_g, BLOCK_C)
    w_row = num_chunks * BLOCK_K  # length of a packed α row
    chan = tl.arange(0, BLOCK_C)
    dy_pix = dy_ptr + n * stride_dy_n + oh * stride_dy_h + ow * stride_dy_w
    dcoeff = tl.zeros([M_PAD, L_PAD, BLOCK_P], dtype=tl.float32)
    for group_chunk in range(G * num_chunks):
        group, c0 = group_chunk // num_chunks, (group_chunk % num_chunks) * BLOCK_C
        dz = _grad_of_z(w_ptr + offset(group * C_out_g, w_row) + c0 * M_PAD + tl.arange(0, BLOCK_K),
                        dy_pix + offset(group * C_out_g, stride_dy_c), pix_mask, C_out_g, stride_dy_c, w_row,
                        BLOCK_K, BLOCK_O, BLOCK_P, DOT_PRECISION, INTERPRETED)
        dz = tl.reshape(dz, [M_PAD, BLOCK_C, BLOCK_P])
        x_ptrs = x_ptr + offset(group * C_in_g + c0 + chan, stride_x_c)[:, None] + (n * stride_x_n)[None, :]
        chan_mask = c0 + chan < C_in_g
        for i in range(KH):
            for j in range(KW):
                taps = load_taps(x_ptrs, chan_mask, pix_mask, ih0 + i * DH, iw0 + j * DW, H, W, stride_x_h, stride_x_w)
                # This chunk's share of dA at this tap [M_PAD, BLOCK_P]; padded atoms zeroed, as
                # their dZ is 0 and an Inf tap would make it NaN.
                d_atoms = tl.where((atom < M)[:, None], tl.sum(dz * taps[None, :, :], axis=1), 0.0)
                psi = tl.load(bases_ptr + offset(basis, stride_bases_l) + offset(i, stride_bases_h)
                              + offset(j, stride_bases_w), mask=basis < L, other=0.0).to(tl.float32)
                dcoeff += d_atoms[:, None, :] * psi[None, :, None]
                if BASES_GRAD:
                    per_basis = tl.sum(tl.sum(beta * d_atoms[:, None, :], axis=2), axis=0)  # [L_PAD]
                    dbases += tl.where((tap_index == i * KW + j)[None, :], per_basis[:, None], 0.0)

    dcoeff_ptrs = dcoeff_ptr + offset(coeff_chan, stride_dcoeff_c)[:, :, None] \
        + (n * stride_dcoeff_n + oh * stride_dcoeff_h + ow * stride_dcoeff_w)[None, None, :]
    tl.store(dcoeff_ptrs, dcoeff.to(dcoeff_ptr.dtype.element_ty), mask=coeff_mask)
    if BASES_GRAD:
        taps_total = KH * KW
        dbases_ptrs = dbases_ptr + offset(pid, L * taps_total) + basis[:, None] * taps_total + tap_index[None, :]
        tl.store(dbases_ptrs, dbases, mask=(basis < L)[:, None] & (tap_index < taps_total)[None, :])


@triton.jit
def atom_conv2d_bwd_weight_kernel(
    x_ptr, coeff_ptr, bases_ptr, dy_ptr, dw_ptr,
    num_pixels, H, W, H_out, W_out, G, C_in_g, C_out_g, M, L, KH, KW,
    SH, SW, PH, PW, DH, DW,
    stride_x_n, stride_x_c, stride_x_h, stride_x_w,
    stride_coeff_n, stride_coeff_c, stride_coeff_h, stride_coeff_w,
    stride_bases_l, stride_bases_h, stride_bases_w,
    stride_dy_n, stride_dy_c, stride_dy_h, stride_dy_w,
    SPLITS,
    BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, M_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """x [N, C_in, H, W], β (coeff) [N, M*L, H_out, W_out], Ψ (bases) [L, KH, KW],
    dy [N, C_out, H_out, W_out], any strides -> dα partials (dw) [SPLITS, C_out,
    cdiv(C_in_g, BLOCK_C), M_PAD, BLOCK_C] float32 contiguous, packed like `pack_weight`:
    split s holds Σ over pixel tiles s, s + SPLITS, ... of dy @ Zᵀ. Columns that are padding
    (atoms m >= M, channels past the group) hold garbage; the launcher drops them.

    1-D grid of SPLITS * G * cdiv(C_out_g, BLOCK_O) * cdiv(C_in_g, BLOCK_C) programs; the
    programs of one split are neighbours, so they read the same pixels from L2.
    """
    BLOCK_K: tl.constexpr = M_PAD * BLOCK_C
    num_o_tiles = tl.cdiv(C_out_g, BLOCK_O)
    num_chunks = tl.cdiv(C_in_g, BLOCK_C)
    pid = tl.program_id(0)
    split, tile = pid // (G * num_o_tiles * num_chunks), pid % (G * num_o_tiles * num_chunks)
    group, tile = tile // (num_o_tiles * num_chunks), tile % (num_o_tiles * num_chunks)
    pid_o, chunk = tile // num_chunks, tile % num_chunks
    c0 = chunk * BLOCK_C

    o_in_g = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_mask = o_in_g < C_out_g
    o_glob = group * C_out_g + o_in_g
    chan = tl.arange(0, BLOCK_C)
    x_chan = offset(group * C_in_g + c0 + chan, stride_x_c)
    chan_mask = c0 + chan < C_in_g
    atom = tl.arange(0, M_PAD)
    coeff_chan = offset(atom * L, stride_coeff_c)
    dtype: tl.constexpr = x_ptr.dtype.element_ty

    acc = tl.zeros([BLOCK_O, BLOCK_K], dtype=tl.float32)
    for pixel_tile in range(split, tl.cdiv(num_pixels, BLOCK_P), SPLITS):
        pix = pixel_tile * BLOCK_P + tl.arange(0, BLOCK_P)
        pix_mask = pix < num_pixels
        n, oh, ow = pixel_coords(pix, H_out, W_out)
        coeff_pix = n * stride_coeff_n + oh * stride_coeff_h + ow * stride_coeff_w
        coeff_ptrs = coeff_ptr + coeff_chan[:, None] + coeff_pix[None, :]
        coeff_mask = (atom < M)[:, None] & pix_mask[None, :]
        # float16 Z of large atoms would overflow in the dot: one power of two for the tile (the
        # dot reduces over its pixels), from the largest atom L1 norm of the tile (see tiles).
        tile_scale = 1.0
        inverse_scale = 1.0
        if dtype == tl.float16:
            bound = tl.zeros([M_PAD, BLOCK_P], dtype=tl.float32)
            for i in range(KH):
                for j in range(KW):
                    bound += atom_l1(coeff_ptrs, coeff_mask,
                                     bases_ptr + offset(i, stride_bases_h) + offset(j, stride_bases_w),
                                     stride_coeff_c, stride_bases_l, L, M_PAD, BLOCK_P)
            tile_scale, inverse_scale = pow2_scale(tl.max(tl.max(bound, axis=0), axis=0))
        z = atom_times_features(x_ptr + x_chan[:, None] + (n * stride_x_n)[None, :], chan_mask, oh * SH - PH,
                                ow * SW - PW, pix_mask, H, W, KH, KW, DH, DW, stride_x_h, stride_x_w, coeff_ptrs,
                                coeff_mask, tl.zeros([BLOCK_P], tl.float32) + tile_scale, bases_ptr, stride_coeff_c,
                                stride_bases_l, stride_bases_h, stride_bases_w, L, M_PAD, BLOCK_C, BLOCK_P)
        dy_pix = n * stride_dy_n + oh * stride_dy_h + ow * stride_dy_w
        dy = tl.load(dy_ptr + offset(o_glob, stride_dy_c)[:, None] + dy_pix[None, :],
                     mask=o_mask[:, None] & pix_mask[None, :], other=0.0)
        # Pixels past the end: dy is 0 there, but Z may be NaN (masked β times an Inf in Ψ).
        z = dot_operand(tl.where(pix_mask[None, :], tl.reshape(z, [BLOCK_K, BLOCK_P]), 0.0), dtype, INTERPRETED)
        tile_acc = tl.dot(dot_operand(dy, dtype, INTERPRETED), tl.trans(z), input_precision=DOT_PRECISION)
        acc += tile_acc * inverse_scale

    w_row = num_chunks * BLOCK_K
    dw_ptrs = dw_ptr + offset(split, G * C_out_g * w_row) + offset(o_glob, w_row)[:, None] \
        + c0 * M_PAD + tl.arange(0, BLOCK_K)[None, :]
    tl.store(dw_ptrs, acc, mask=o_mask[:, None])


@triton.jit
def atom_conv2d_bwd_input_kernel(
    dy_ptr, coeff_ptr, bases_ptr, w_ptr, dx_ptr,
    num_in_pixels, H, W, H_out, W_out, G, C_in_g, C_out_g, M, L, KH, KW,
    SH, SW, PH, PW, DH, DW,
    stride_dy_n, stride_dy_c, stride_dy_h, stride_dy_w,
    stride_coeff_n, stride_coeff_c, stride_coeff_h, stride_coeff_w,
    stride_bases_l, stride_bases_h, stride_bases_w,
    stride_dx_n, stride_dx_c, stride_dx_h, stride_dx_w,
    BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, M_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """dy [N, C_out, H_out, W_out], β (coeff) [N, M*L, H_out, W_out], Ψ (bases) [L, KH, KW],
    α (w) transposed per group and packed: [C_in, cdiv(C_out_g, BLOCK_C), M_PAD, BLOCK_C]
    (`pack_transposed_weight`) -> dx [N, C_in, H, W]; any strides but w's.

    The forward's tiling of the transposed problem: BLOCK_P input pixels, BLOCK_O input
    channels (the dot's rows), output channels reduced in chunks of BLOCK_C. 1-D grid of
    cdiv(num_in_pixels, BLOCK_P) * G * cdiv(C_in_g, BLOCK_O) programs.
    """
    BLOCK_K: tl.constexpr = M_PAD * BLOCK_C
    num_c_tiles = tl.cdiv(C_in_g, BLOCK_O)
    pid = tl.program_id(0)
    pid_p, pid_gc = pid // (G * num_c_tiles), pid % (G * num_c_tiles)
    group, pid_c = pid_gc // num_c_tiles, pid_gc % num_c_tiles

    q = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    q_mask = q < num_in_pixels
    n, ih, iw = pixel_coords(q, H, W)

    c_in_g = pid_c * BLOCK_O + tl.arange(0, BLOCK_O)
    c_mask = c_in_g < C_in_g
    c_glob = group * C_in_g + c_in_g
    w_ptrs = w_ptr + offset(c_glob, tl.cdiv(C_out_g, BLOCK_C) * BLOCK_K)[:, None] + tl.arange(0, BLOCK_K)[None, :]

    atom = tl.arange(0, M_PAD)
    coeff_chan = offset(atom * L, stride_coeff_c)

    # float16 U of large atoms would overflow in the dot: scale each input pixel's atoms by a
    # power of two that bounds the L1 norm of the atoms reaching it by 1 (|U| <= max |dy|).
    atom_scale = tl.full([BLOCK_P], 1.0, tl.float32)
    inverse_scale = tl.full([BLOCK_P], 1.0, tl.float32)
    if dx_ptr.dtype.element_ty == tl.float16:
        bound = tl.zeros([M_PAD, BLOCK_P], dtype=tl.float32)
        for i in range(KH):
            oh, row_ok = _reading_output_coord(ih, PH, i * DH, SH, H_out, q_mask)
            for j in range(KW):
                ow, tap_ok = _reading_output_coord(iw, PW, j * DW, SW, W_out, row_ok)
                coeff_ptrs = coeff_ptr + coeff_chan[:, None] \
                    + (n * stride_coeff_n + oh * stride_coeff_h + ow * stride_coeff_w)[None, :]
                bound += atom_l1(coeff_ptrs, (atom < M)[:, None] & tap_ok[None, :],
                                 bases_ptr + offset(i, stride_bases_h) + offset(j, stride_bases_w),
                                 stride_coeff_c, stride_bases_l, L, M_PAD, BLOCK_P)
        atom_scale, inverse_scale = pow2_scale(tl.max(bound, axis=0))

    out_chan = tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_O, BLOCK_P], dtype=tl.float32)
    for o0 in range(0, C_out_g, BLOCK_C):
        dy_chan = offset(group * C_out_g + o0 + out_chan, stride_dy_c)[:, None]
        o_mask = (o0 + out_chan < C_out_g)[:, None]
        u = tl.zeros([M_PAD, BLOCK_C, BLOCK_P], dtype=tl.float32)
        for i in range(KH):
            oh, row_ok = _reading_output_coord(ih, PH, i * DH, SH, H_out, q_mask)
            for j in range(KW):
                ow, tap_ok = _reading_output_coord(iw, PW, j * DW, SW, W_out, row_ok)
                dy = tl.load(dy_ptr + dy_chan + (n * stride_dy_n + oh * stride_dy_h + ow * stride_dy_w)[None, :],
                             mask=o_mask & tap_ok[None, :], other=0.0).to(tl.float32)
                coeff_ptrs = coeff_ptr + coeff_chan[:, None] \
                    + (n * stride_coeff_n + oh * stride_coeff_h + ow * stride_coeff_w)[None, :]
                atoms = basis_to_atom(coeff_ptrs, (atom < M)[:, None] & tap_ok[None, :],
                                      bases_ptr + offset(i, stride_bases_h) + offset(j, stride_bases_w),
                                      stride_coeff_c, stride_bases_l, L, M_PAD, BLOCK_P)
                # Taps no output pixel reads through add nothing (their masked β times an Inf in Ψ
                # would add NaN).
                atoms = tl.where(tap_ok[None, :], atoms * atom_scale[None, :], 0.0)
                u += atoms[:, None, :] * dy[None, :, :]
        # Chunk o0 // BLOCK_C of every packed row starts o0 * M_PAD elements in.
        acc = coefficient_sum(acc, u, (atom < M)[:, None, None] & o_mask[None, :, :], w_ptrs + o0 * M_PAD,
                              c_mask[:, None], BLOCK_K, BLOCK_P, DOT_PRECISION, INTERPRETED)

    acc *= inverse_scale[None, :]
    dx_ptrs = dx_ptr + offset(c_glob, stride_dx_c)[:, None] \
        + (n * stride_dx_n + ih * stride_dx_h + iw * stride_dx_w)[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=c_mask[:, None] & q_mask[None, :])


@triton.jit
def _reading_output_coord(in_coord, pad, tap_offset, step, out_size, ok):
    """The output coordinate that reads input coordinate in_coord [BLOCK] (int64) through a tap at
    tap_offset (= tap index * dilation) along one axis, out * step - pad + tap_offset = in_coord,
    and where it exists (ok and the division exact and inside [0, out_size))."""
    shifted = in_coord + pad - tap_offset
    out = shifted // step
    return out, ok & (shifted >= 0) & (out * step == shifted) & (out < out_size)


def _geometry_args(geo: AtomConvGeometry) -> dict[str, int]:
    """The geometry arguments every backward kernel takes, by name."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geo.kernel_size, geo.stride, geo.padding, geo.dilation
    return dict(H=geo.in_size[0], W=geo.in_size[1], H_out=geo.out_size[0], W_out=geo.out_size[1], G=geo.groups,
                C_in_g=geo.in_channels // geo.groups, C_out_g=geo.out_channels // geo.groups,
                M=geo.num_atoms, L=geo.num_bases, KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw)


def _num_out_pixels(geo: AtomConvGeometry) -> int:
    return geo.batch * geo.out_size[0] * geo.out_size[1]


def coeff_grad_kernel_args(x, atom_coeff, bases, weight, grad_y, dcoeff, dbases, geo: AtomConvGeometry,
                           launch: ForwardLaunch) -> dict[str, object]:
    """Every argument of `atom_conv2d_bwd_coeff_kernel`, by name (launcher and static report).
    dbases None: no dΨ (BASES_GRAD off)."""
    return dict(
        x_ptr=x, coeff_ptr=atom_coeff, bases_ptr=bases, w_ptr=pack_weight(weight, launch), dy_ptr=grad_y,
        dcoeff_ptr=dcoeff, dbases_ptr=dbases, num_pixels=_num_out_pixels(geo), **_geometry_args(geo),
        **strides("stride_x", "nchw", x), **strides("stride_coeff", "nchw", atom_coeff),
        **strides("stride_bases", "lhw", bases), **strides("stride_dy", "nchw", grad_y),
        **strides("stride_dcoeff", "nchw", dcoeff),
        BLOCK_P=launch.BLOCK_P, BLOCK_O=launch.BLOCK_O, BLOCK_C=launch.BLOCK_C, M_PAD=launch.M_PAD,
        L_PAD=pow2_at_least(geo.num_bases), TAPS_PAD=pow2_at_least(geo.kernel_size[0] * geo.kernel_size[1]),
        BASES_GRAD=dbases is not None, DOT_PRECISION=dot_precision(x.dtype), INTERPRETED=INTERPRETING,
    )


def weight_grad_kernel_args(x, atom_coeff, bases, grad_y, dweight_partials, geo: AtomConvGeometry,
                            launch: ForwardLaunch) -> dict[str, object]:
    """Every argument of `atom_conv2d_bwd_weight_kernel`, by name; the split count is
    dweight_partials.shape[0]."""
    return dict(
        x_ptr=x, coeff_ptr=atom_coeff, bases_ptr=bases, dy_ptr=grad_y, dw_ptr=dweight_partials,
        num_pixels=_num_out_pixels(geo), **_geometry_args(geo),
        **strides("stride_x", "nchw", x), **strides("stride_coeff", "nchw", atom_coeff),
        **strides("stride_bases", "lhw", bases), **strides("stride_dy", "nchw", grad_y),
        SPLITS=dweight_partials.shape[0],
        BLOCK_P=launch.BLOCK_P, BLOCK_O=launch.BLOCK_O, BLOCK_C=launch.BLOCK_C, M_PAD=launch.M_PAD,
        DOT_PRECISION=dot_precision(x.dtype), INTERPRETED=INTERPRETING,
    )


def input_grad_kernel_args(atom_coeff, bases, weight, grad_y, dx, geo: AtomConvGeometry,
                           launch: ForwardLaunch) -> dict[str, object]:
    """Every argument of `atom_conv2d_bwd_input_kernel`, by name; launch is fitted to the
    transposed geometry (`transposed_geometry`)."""
    return dict(
        dy_ptr=grad_y, coeff_ptr=atom_coeff, bases_ptr=bases, w_ptr=pack_transposed_weight(weight, geo.groups, launch),
        dx_ptr=dx, num_in_pixels=geo.batch * geo.in_size[0] * geo.in_size[1], **_geometry_args(geo),
        **strides("stride_dy", "nchw", grad_y), **strides("stride_coeff", "nchw", atom_coeff),
        **strides("stride_bases", "lhw", bases), **strides("stride_dx", "nchw", dx),
        BLOCK_P=launch.BLOCK_P, BLOCK_O=launch.BLOCK_O, BLOCK_C=launch.BLOCK_C, M_PAD=launch.M_PAD,
        DOT_PRECISION=dot_precision(dx.dtype), INTERPRETED=INTERPRETING,
    )


def transposed_geometry(geo: AtomConvGeometry) -> AtomConvGeometry:
    """The geometry whose forward tiling the dx kernel uses: input and output channels swapped."""
    return dataclasses.replace(geo, in_channels=geo.out_channels, out_channels=geo.in_channels)


def pack_transposed_weight(weight: torch.Tensor, groups: int, launch: ForwardLaunch) -> torch.Tensor:
    """α [C_out, C_in_g, M] -> per group transposed [C_in, C_out_g, M], then `pack_weight`:
    [C_in, cdiv(C_out_g, BLOCK_C), M_PAD, BLOCK_C], row c holding α[g*C_out_g + o, c - g*C_in_g, m]."""
    c_out, c_in_g, m = weight.shape
    c_out_g = c_out // groups
    transposed = weight.view(groups, c_out_g, c_in_g, m).transpose(1, 2).reshape(groups * c_in_g, c_out_g, m)
    return pack_weight(transposed, launch)


def unpack_weight(packed: torch.Tensor, c_in_g: int, num_atoms: int) -> torch.Tensor:
    """Inverse of `pack_weight`: [C_out, chunks, M_PAD, BLOCK_C] -> [C_out, C_in_g, M]."""
    c_out, chunks, m_pad, block_c = packed.shape
    return packed.transpose(2, 3).reshape(c_out, chunks * block_c, m_pad)[:, :c_in_g, :num_atoms]


def _tile_footprint(launch: ForwardLaunch, dtype: torch.dtype, arch: str, live_fp32: int, dot_operands: int,
                    fill: float, cost: float) -> autotune_cache.Footprint:
    """A backward kernel's `Footprint` from what one program holds: `live_fp32` elements of fp32
    tiles in registers, `dot_operands` elements of 16-bit (or fp32) dot operands staged in shared
    memory (and, on sm_80 whose mma.sync reads them from registers, held there too)."""
    threads = 32 * launch.num_warps
    registers = math.ceil(live_fp32 / threads)
    if arch == "sm_80" and dtype.itemsize == 2:
        registers += math.ceil(dot_operands / 2 / threads)  # two 16-bit values per register
    key = (launch.BLOCK_P, launch.BLOCK_O, launch.BLOCK_C, launch.M_PAD, launch.num_warps, launch.num_stages)
    return autotune_cache.Footprint(launch=key, threads=threads, shared_bytes=dot_operands * dtype.itemsize,
                                    registers=registers, fill=fill, cost=cost)


def _fill(extent: int, block: int) -> float:
    return extent / _padded(extent, block)


def _padded(extent: int, block: int) -> int:
    return triton.cdiv(extent, block) * block


def coeff_grad_footprint(launch: ForwardLaunch, geo: AtomConvGeometry, dtype: torch.dtype, arch: str,
                         bases_grad: bool) -> autotune_cache.Footprint:
    """What a config of the dβ kernel costs on a problem (candidate pruning; a lower bound of
    the registers, like `autotune_cache.forward_footprint`). Live per program: dZ [BLOCK_K,
    BLOCK_P], dβ's accumulator [M_PAD, L_PAD, BLOCK_P], one tap [BLOCK_C, BLOCK_P] (and β and dΨ's
    partial with bases_grad); the dZ dot's operands αᵀ [BLOCK_K, BLOCK_O] and dy [BLOCK_O, BLOCK_P].
    Cost: the per-tap reductions over the padded tiles, for every channel chunk of every group."""
    p, o, c, m_pad = launch.BLOCK_P, launch.BLOCK_O, launch.BLOCK_C, launch.M_PAD
    l_pad, c_in_g = pow2_at_least(geo.num_bases), geo.in_channels // geo.groups
    live = m_pad * c * p + m_pad * l_pad * p * (2 if bases_grad else 1) + c * p
    cost = (_padded(_num_out_pixels(geo), p) * geo.groups * _padded(c_in_g, c) * _taps(geo) * m_pad
            * (1 + l_pad / c))
    return _tile_footprint(launch, dtype, arch, live, m_pad * c * o + o * p,
                           _fill(_num_out_pixels(geo), p) * _fill(c_in_g, c), cost)


def weight_grad_footprint(launch: ForwardLaunch, geo: AtomConvGeometry, dtype: torch.dtype,
                          arch: str) -> autotune_cache.Footprint:
    """What a config of the dα kernel costs on a problem (see `coeff_grad_footprint`). Live per
    program: Z [BLOCK_K, BLOCK_P], the α tile's accumulator [BLOCK_O, BLOCK_K], one tap; the dot's
    operands dy [BLOCK_O, BLOCK_P] and Zᵀ. Cost: stage 2 over the padded tiles, redone for every
    output-channel tile."""
    p, o, c, m_pad = launch.BLOCK_P, launch.BLOCK_O, launch.BLOCK_C, launch.M_PAD
    c_in_g, c_out_g = geo.in_channels // geo.groups, geo.out_channels // geo.groups
    cost = (_padded(_num_out_pixels(geo), p) * geo.groups * triton.cdiv(c_out_g, o) * _padded(c_in_g, c)
            * _taps(geo) * m_pad)
    fill = _fill(_num_out_pixels(geo), p) * _fill(c_in_g, c) * _fill(c_out_g, o)
    return _tile_footprint(launch, dtype, arch, m_pad * c * p + o * m_pad * c + c * p, o * p + p * m_pad * c,
                           fill, cost)


def input_grad_footprint(launch: ForwardLaunch, geo: AtomConvGeometry, dtype: torch.dtype,
                         arch: str) -> autotune_cache.Footprint:
    """What a config of the dx kernel costs on a problem: the forward's footprint of the
    transposed problem (`transposed_geometry`), whose tiling it uses."""
    transposed = transposed_geometry(geo)
    shape = autotune_cache.layer_shape(transposed) | {"pixels": geo.batch * geo.in_size[0] * geo.in_size[1]}
    return autotune_cache.forward_footprint(launch, shape, dtype, arch)


def _taps(geo: AtomConvGeometry) -> int:
    return geo.kernel_size[0] * geo.kernel_size[1]


def launch_coeff_grad(grad_y, x, atom_coeff, bases, weight, geo: AtomConvGeometry, *, bases_grad: bool,
                      config: ForwardConfig | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dβ [N, M*L, H_out, W_out] (atom_coeff's dtype and layout) and, if bases_grad, dΨ
    [L, KH, KW] (bases' dtype), else None. Validated inputs; `config` forces a launch config."""
    dcoeff = torch.empty_like(atom_coeff, memory_format=output_layout(atom_coeff))
    kernel = "atom_conv2d_bwd_coeff_bases" if bases_grad else "atom_conv2d_bwd_coeff"
    arch = arch_of(x.device)
    config = config or tuned_config(
        kernel, x, geo, coeff_grad_candidates(), pick_coeff_grad_config(x.dtype, arch, bases_grad),
        run=lambda c: launch_coeff_grad(grad_y, x, atom_coeff, bases, weight, geo, bases_grad=bases_grad, config=c),
        footprint=lambda c: coeff_grad_footprint(fit_forward_config(c, geo), geo, x.dtype, arch, bases_grad))
    launch = fit_forward_config(config, geo)
    programs = triton.cdiv(_num_out_pixels(geo), launch.BLOCK_P)
    check_int32_indexing("N*H_out*W_out", _num_out_pixels(geo), launch.BLOCK_P, programs)
    taps = geo.kernel_size[0] * geo.kernel_size[1]
    partials = torch.zeros(programs, geo.num_bases, taps, dtype=torch.float32, device=x.device) if bases_grad else None
    if programs:
        with launching.on_device_of(x):
            atom_conv2d_bwd_coeff_kernel[(programs,)](
                **coeff_grad_kernel_args(x, atom_coeff, bases, weight, grad_y, dcoeff, partials, geo, launch),
                num_warps=launch.num_warps, num_stages=launch.num_stages)
    dbases = None if partials is None else partials.sum(0).view_as(bases).to(bases.dtype)
    return dcoeff, dbases


def launch_weight_grad(grad_y, x, atom_coeff, bases, weight, geo: AtomConvGeometry, *,
                       config: ForwardConfig | None = None, splits: int | None = None) -> torch.Tensor:
    """dα [C_out, C_in_g, M] in weight's dtype. Validated inputs; `config` forces a launch config,
    `splits` the number of programs that share the pixel reduction of one α tile."""
    arch = arch_of(x.device)
    config = config or tuned_config(
        "atom_conv2d_bwd_weight", x, geo, weight_grad_candidates(), pick_weight_grad_config(x.dtype, arch),
        run=lambda c: launch_weight_grad(grad_y, x, atom_coeff, bases, weight, geo, config=c, splits=splits),
        footprint=lambda c: weight_grad_footprint(fit_forward_config(c, geo), geo, x.dtype, arch))
    launch = fit_forward_config(config, geo)
    c_in_g = geo.in_channels // geo.groups
    chunks = triton.cdiv(c_in_g, launch.BLOCK_C)
    if splits is None:
        splits = weight_grad_splits(geo, launch, _target_programs(x.device))
    partials = torch.empty(splits, geo.out_channels, chunks, launch.M_PAD, launch.BLOCK_C,
                           dtype=torch.float32, device=x.device)
    programs = splits * geo.groups * triton.cdiv(geo.out_channels // geo.groups, launch.BLOCK_O) * chunks
    check_int32_indexing("N*H_out*W_out", _num_out_pixels(geo), launch.BLOCK_P, programs)
    with launching.on_device_of(x):
        atom_conv2d_bwd_weight_kernel[(programs,)](
            **weight_grad_kernel_args(x, atom_coeff, bases, grad_y, partials, geo, launch),
            num_warps=launch.num_warps, num_stages=launch.num_stages)
    return unpack_weight(partials.sum(0), c_in_g, geo.num_atoms).to(weight.dtype, memory_format=torch.contiguous_format)


def launch_input_grad(grad_y, x, atom_coeff, bases, weight, geo: AtomConvGeometry, *,
                      config: ForwardConfig | None = None) -> torch.Tensor:
    """dx [N, C_in, H, W] in x's dtype and layout (x itself is not read). Validated inputs;
    `config` forces a launch config (fitted to the transposed geometry)."""
    dx = torch.empty_like(x, memory_format=output_layout(x))
    arch = arch_of(x.device)
    config = config or tuned_config(
        "atom_conv2d_bwd_input", x, geo, input_grad_candidates(), pick_input_grad_config(x.dtype, arch),
        run=lambda c: launch_input_grad(grad_y, x, atom_coeff, bases, weight, geo, config=c),
        footprint=lambda c: input_grad_footprint(fit_forward_config(c, transposed_geometry(geo)), geo, x.dtype, arch))
    launch = fit_forward_config(config, transposed_geometry(geo))
    num_pixel_tiles = triton.cdiv(geo.batch * geo.in_size[0] * geo.in_size[1], launch.BLOCK_P)
    programs = num_pixel_tiles * geo.groups * triton.cdiv(geo.in_channels // geo.groups, launch.BLOCK_O)
    check_int32_indexing("N*H*W", geo.batch * geo.in_size[0] * geo.in_size[1], launch.BLOCK_P, programs)
    if programs:
        with launching.on_device_of(x):
            atom_conv2d_bwd_input_kernel[(programs,)](
                **input_grad_kernel_args(atom_coeff, bases, weight, grad_y, dx, geo, launch),
                num_warps=launch.num_warps, num_stages=launch.num_stages)
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
    """Fused backward (SPEC §1): always Triton, no autograd. Arguments as `atom_conv2d_forward`
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
