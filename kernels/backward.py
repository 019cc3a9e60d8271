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
rounded to the input dtype before their dot.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

import autotune_cache

from atomconv.validation import AtomConvGeometry, output_layout, validate_atom_conv2d

from .configs import (ForwardConfig, ForwardLaunch, arch_of, coeff_grad_candidates, fit_forward_config,
                      input_grad_candidates, pick_coeff_grad_config, pick_input_grad_config, pick_weight_grad_config,
                      pow2_at_least, tuned_config, weight_grad_candidates, weight_grad_splits)
from .forward import (INTERPRETING, _atom_times_features, check_int32_indexing, load_taps, _basis_to_atom, _check_runnable, _coefficient_sum,
                      _dot_precision, _strides, pack_weight)


@triton.jit
def _pixel_coords(pix, H, W):
    """Flat pixel indices [BLOCK] over [N, H, W] -> (n, row, col), int64 because
    n * stride and channel * stride overflow int32 on large tensors."""
    n = (pix // (H * W)).to(tl.int64)
    row = ((pix // W) % H).to(tl.int64)
    col = (pix % W).to(tl.int64)
    return n, row, col


@triton.jit
def _grad_of_z(w_ptrs, dy_ptrs, pix_mask, C_out_g, stride_dy_c, w_row, BLOCK_K: tl.constexpr,
               BLOCK_O: tl.constexpr, BLOCK_P: tl.constexpr, DOT_PRECISION: tl.constexpr, FP32_DOTS: tl.constexpr):
    """dZ of one channel chunk [BLOCK_K, BLOCK_P] fp32 (row m*BLOCK_C + c) = αᵀ chunk @ dy, a
    tensor-core dot per BLOCK_O output channels of the group. w_ptrs [BLOCK_K] point at the
    packed α chunk of the group's first output channel (rows w_row apart), dy_ptrs [BLOCK_P] at
    dy[n, first output channel of the group, oh, ow]."""
    dot_dtype: tl.constexpr = tl.float32 if FP32_DOTS else w_ptrs.dtype.element_ty
    out_chan = tl.arange(0, BLOCK_O)
    dz = tl.zeros([BLOCK_K, BLOCK_P], dtype=tl.float32)
    for o0 in range(0, C_out_g, BLOCK_O):
        o_mask = o0 + out_chan < C_out_g
        o = (o0 + out_chan).to(tl.int64)
        w_t = tl.load(w_ptrs[:, None] + (o * w_row)[None, :], mask=o_mask[None, :], other=0.0)
        dy = tl.load(dy_ptrs[None, :] + (o * stride_dy_c)[:, None], mask=o_mask[:, None] & pix_mask[None, :], other=0.0)
        dz = tl.dot(w_t.to(dot_dtype), dy.to(dot_dtype), dz, input_precision=DOT_PRECISION)
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
    DOT_PRECISION: tl.constexpr, FP32_DOTS: tl.constexpr,
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
    n, oh, ow = _pixel_coords(pix, H_out, W_out)
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW

    # β-shaped tiles [M_PAD, L_PAD, BLOCK_P]: channel m*L + l of pixel p.
    atom = tl.arange(0, M_PAD)
    basis = tl.arange(0, L_PAD)
    coeff_chan = (atom[:, None] * L + basis[None, :]).to(tl.int64)
    coeff_mask = ((atom < M)[:, None] & (basis < L)[None, :])[:, :, None] & pix_mask[None, None, :]
    if BASES_GRAD:
        beta = tl.load(coeff_ptr + (coeff_chan * stride_coeff_c)[:, :, None]
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
        dz = _grad_of_z(w_ptr + group * C_out_g * w_row + c0 * M_PAD + tl.arange(0, BLOCK_K),
                        dy_pix + group * C_out_g * stride_dy_c, pix_mask, C_out_g, stride_dy_c, w_row,
                        BLOCK_K, BLOCK_O, BLOCK_P, DOT_PRECISION, FP32_DOTS)
        dz = tl.reshape(dz, [M_PAD, BLOCK_C, BLOCK_P])
        x_ptrs = x_ptr + ((group * C_in_g + c0 + chan).to(tl.int64) * stride_x_c)[:, None] + (n * stride_x_n)[None, :]
        chan_mask = c0 + chan < C_in_g
        for i in range(KH):
            for j in range(KW):
                taps = load_taps(x_ptrs, chan_mask, pix_mask, ih0 + i * DH, iw0 + j * DW, H, W, stride_x_h, stride_x_w)
                d_atoms = tl.sum(dz * taps[None, :, :], axis=1)  # this chunk's share of dA at this tap [M_PAD, BLOCK_P]
                psi = tl.load(bases_ptr + basis * stride_bases_l + i * stride_bases_h + j * stride_bases_w,
                              mask=basis < L, other=0.0).to(tl.float32)
                dcoeff += d_atoms[:, None, :] * psi[None, :, None]
                if BASES_GRAD:
                    per_basis = tl.sum(tl.sum(beta * d_atoms[:, None, :], axis=2), axis=0)  # [L_PAD]
                    dbases += per_basis[:, None] * (tap_index == i * KW + j).to(tl.float32)[None, :]

    dcoeff_ptrs = dcoeff_ptr + (coeff_chan * stride_dcoeff_c)[:, :, None] \
        + (n * stride_dcoeff_n + oh * stride_dcoeff_h + ow * stride_dcoeff_w)[None, None, :]
    tl.store(dcoeff_ptrs, dcoeff.to(dcoeff_ptr.dtype.element_ty), mask=coeff_mask)
    if BASES_GRAD:
        taps_total = KH * KW
        dbases_ptrs = dbases_ptr + pid.to(tl.int64) * L * taps_total + basis[:, None] * taps_total + tap_index[None, :]
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
    DOT_PRECISION: tl.constexpr, FP32_DOTS: tl.constexpr,
):
    """x [N, C_in, H, W], β (coeff) [N, M*L, H_out, W_out], Ψ (bases) [L, KH, KW],
    dy [N, C_out, H_out, W_out], any strides -> dα partials (dw) [SPLITS, C_out,
    cdiv(C_in_g, BLOCK_C), M_PAD, BLOCK_C] float32 contiguous, packed like `pack_weight`:
    split s holds Σ over pixel tiles s, s + SPLITS, ... of dy @ Zᵀ.

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
    o_glob = (group * C_out_g + o_in_g).to(tl.int64)
    chan = tl.arange(0, BLOCK_C)
    x_chan = (group * C_in_g + c0 + chan).to(tl.int64) * stride_x_c
    chan_mask = c0 + chan < C_in_g
    atom = tl.arange(0, M_PAD)
    coeff_chan = (atom * L).to(tl.int64) * stride_coeff_c
    dot_dtype: tl.constexpr = tl.float32 if FP32_DOTS else x_ptr.dtype.element_ty

    acc = tl.zeros([BLOCK_O, BLOCK_K], dtype=tl.float32)
    for pixel_tile in range(split, tl.cdiv(num_pixels, BLOCK_P), SPLITS):
        pix = pixel_tile * BLOCK_P + tl.arange(0, BLOCK_P)
        pix_mask = pix < num_pixels
        n, oh, ow = _pixel_coords(pix, H_out, W_out)
        coeff_pix = n * stride_coeff_n + oh * stride_coeff_h + ow * stride_coeff_w
        coeff_ptrs = coeff_ptr + coeff_chan[:, None] + coeff_pix[None, :]
        coeff_mask = (atom < M)[:, None] & pix_mask[None, :]
        z = _atom_times_features(x_ptr + x_chan[:, None] + (n * stride_x_n)[None, :], chan_mask, oh * SH - PH,
                                 ow * SW - PW, pix_mask, H, W, KH, KW, DH, DW, stride_x_h, stride_x_w, coeff_ptrs,
                                 coeff_mask, bases_ptr, stride_coeff_c, stride_bases_l, stride_bases_h,
                                 stride_bases_w, L, M_PAD, BLOCK_C, BLOCK_P)
        dy_pix = n * stride_dy_n + oh * stride_dy_h + ow * stride_dy_w
        dy = tl.load(dy_ptr + (o_glob * stride_dy_c)[:, None] + dy_pix[None, :], mask=o_mask[:, None] & pix_mask[None, :],
                     other=0.0)
        z = tl.reshape(z, [BLOCK_K, BLOCK_P]).to(dot_dtype)
        acc = tl.dot(dy.to(dot_dtype), tl.trans(z), acc, input_precision=DOT_PRECISION)

    w_row = num_chunks * BLOCK_K
    dw_ptrs = dw_ptr + split.to(tl.int64) * (G * C_out_g) * w_row + (o_glob * w_row)[:, None] \
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
    DOT_PRECISION: tl.constexpr, FP32_DOTS: tl.constexpr,
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
    n, ih, iw = _pixel_coords(q, H, W)

    c_in_g = pid_c * BLOCK_O + tl.arange(0, BLOCK_O)
    c_mask = c_in_g < C_in_g
    c_glob = group * C_in_g + c_in_g
    w_ptrs = w_ptr + (c_glob * (tl.cdiv(C_out_g, BLOCK_C) * BLOCK_K))[:, None] + tl.arange(0, BLOCK_K)[None, :]

    atom = tl.arange(0, M_PAD)
    out_chan = tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_O, BLOCK_P], dtype=tl.float32)
    for o0 in range(0, C_out_g, BLOCK_C):
        dy_chan = ((group * C_out_g + o0 + out_chan).to(tl.int64) * stride_dy_c)[:, None]
        o_mask = (o0 + out_chan < C_out_g)[:, None]
        u = tl.zeros([M_PAD, BLOCK_C, BLOCK_P], dtype=tl.float32)
        for i in range(KH):
            # The output row that reads input row ih through tap row i: oh * SH - PH + i * DH = ih.
            rows = ih + PH - i * DH
            oh = rows // SH
            row_ok = q_mask & (rows >= 0) & (oh * SH == rows) & (oh < H_out)
            for j in range(KW):
                cols = iw + PW - j * DW
                ow = cols // SW
                tap_ok = row_ok & (cols >= 0) & (ow * SW == cols) & (ow < W_out)
                dy = tl.load(dy_ptr + dy_chan + (n * stride_dy_n + oh * stride_dy_h + ow * stride_dy_w)[None, :],
                             mask=o_mask & tap_ok[None, :], other=0.0).to(tl.float32)
                coeff_ptrs = coeff_ptr + ((atom * L).to(tl.int64) * stride_coeff_c)[:, None] \
                    + (n * stride_coeff_n + oh * stride_coeff_h + ow * stride_coeff_w)[None, :]
                atoms = _basis_to_atom(coeff_ptrs, (atom < M)[:, None] & tap_ok[None, :],
                                       bases_ptr + i * stride_bases_h + j * stride_bases_w,
                                       stride_coeff_c, stride_bases_l, L, M_PAD, BLOCK_P)
                u += atoms[:, None, :] * dy[None, :, :]
        # Chunk o0 // BLOCK_C of every packed row starts o0 * M_PAD elements in.
        acc = _coefficient_sum(acc, u, w_ptrs + o0 * M_PAD, c_mask[:, None], BLOCK_K, BLOCK_P,
                               DOT_PRECISION, FP32_DOTS)

    dx_ptrs = dx_ptr + c_glob.to(tl.int64)[:, None] * stride_dx_c \
        + (n * stride_dx_n + ih * stride_dx_h + iw * stride_dx_w)[None, :]
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=c_mask[:, None] & q_mask[None, :])


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
        **_strides("stride_x", "nchw", x), **_strides("stride_coeff", "nchw", atom_coeff),
        **_strides("stride_bases", "lhw", bases), **_strides("stride_dy", "nchw", grad_y),
        **_strides("stride_dcoeff", "nchw", dcoeff),
        BLOCK_P=launch.BLOCK_P, BLOCK_O=launch.BLOCK_O, BLOCK_C=launch.BLOCK_C, M_PAD=launch.M_PAD,
        L_PAD=pow2_at_least(geo.num_bases), TAPS_PAD=pow2_at_least(geo.kernel_size[0] * geo.kernel_size[1]),
        BASES_GRAD=dbases is not None, DOT_PRECISION=_dot_precision(x.dtype), FP32_DOTS=INTERPRETING,
    )


def weight_grad_kernel_args(x, atom_coeff, bases, grad_y, dweight_partials, geo: AtomConvGeometry,
                            launch: ForwardLaunch) -> dict[str, object]:
    """Every argument of `atom_conv2d_bwd_weight_kernel`, by name; the split count is
    dweight_partials.shape[0]."""
    return dict(
        x_ptr=x, coeff_ptr=atom_coeff, bases_ptr=bases, dy_ptr=grad_y, dw_ptr=dweight_partials,
        num_pixels=_num_out_pixels(geo), **_geometry_args(geo),
        **_strides("stride_x", "nchw", x), **_strides("stride_coeff", "nchw", atom_coeff),
        **_strides("stride_bases", "lhw", bases), **_strides("stride_dy", "nchw", grad_y),
        SPLITS=dweight_partials.shape[0],
        BLOCK_P=launch.BLOCK_P, BLOCK_O=launch.BLOCK_O, BLOCK_C=launch.BLOCK_C, M_PAD=launch.M_PAD,
        DOT_PRECISION=_dot_precision(x.dtype), FP32_DOTS=INTERPRETING,
    )


def input_grad_kernel_args(atom_coeff, bases, weight, grad_y, dx, geo: AtomConvGeometry,
                           launch: ForwardLaunch) -> dict[str, object]:
    """Every argument of `atom_conv2d_bwd_input_kernel`, by name; launch is fitted to the
    transposed geometry (`transposed_geometry`)."""
    return dict(
        dy_ptr=grad_y, coeff_ptr=atom_coeff, bases_ptr=bases, w_ptr=pack_transposed_weight(weight, geo.groups, launch),
        dx_ptr=dx, num_in_pixels=geo.batch * geo.in_size[0] * geo.in_size[1], **_geometry_args(geo),
        **_strides("stride_dy", "nchw", grad_y), **_strides("stride_coeff", "nchw", atom_coeff),
        **_strides("stride_bases", "lhw", bases), **_strides("stride_dx", "nchw", dx),
        BLOCK_P=launch.BLOCK_P, BLOCK_O=launch.BLOCK_O, BLOCK_C=launch.BLOCK_C, M_PAD=launch.M_PAD,
        DOT_PRECISION=_dot_precision(dx.dtype), FP32_DOTS=INTERPRETING,
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


def launch_coeff_grad(grad_y, x, atom_coeff, bases, weight, geo: AtomConvGeometry, *, bases_grad: bool,
                      config: ForwardConfig | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dβ [N, M*L, H_out, W_out] (atom_coeff's dtype and layout) and, if bases_grad, dΨ
    [L, KH, KW] (bases' dtype), else None. Validated inputs; `config` forces a launch config."""
    dcoeff = torch.empty_like(atom_coeff, memory_format=output_layout(atom_coeff))
    kernel = "atom_conv2d_bwd_coeff_bases" if bases_grad else "atom_conv2d_bwd_coeff"
    config = config or tuned_config(
        kernel, x, geo, coeff_grad_candidates(), pick_coeff_grad_config(x.dtype, arch_of(x.device)),
        run=lambda c: launch_coeff_grad(grad_y, x, atom_coeff, bases, weight, geo, bases_grad=bases_grad, config=c))
    launch = fit_forward_config(config, geo)
    programs = triton.cdiv(_num_out_pixels(geo), launch.BLOCK_P)
    check_int32_indexing("N*H_out*W_out", _num_out_pixels(geo), launch.BLOCK_P, programs)
    taps = geo.kernel_size[0] * geo.kernel_size[1]
    partials = torch.zeros(programs, geo.num_bases, taps, dtype=torch.float32, device=x.device) if bases_grad else None
    if programs:
        atom_conv2d_bwd_coeff_kernel[(programs,)](
            **coeff_grad_kernel_args(x, atom_coeff, bases, weight, grad_y, dcoeff, partials, geo, launch),
            num_warps=launch.num_warps, num_stages=launch.num_stages)
    dbases = None if partials is None else partials.sum(0).view_as(bases).to(bases.dtype)
    return dcoeff, dbases


def launch_weight_grad(grad_y, x, atom_coeff, bases, weight, geo: AtomConvGeometry, *,
                       config: ForwardConfig | None = None, splits: int | None = None) -> torch.Tensor:
    """dα [C_out, C_in_g, M] in weight's dtype. Validated inputs; `config` forces a launch config,
    `splits` the number of programs that share the pixel reduction of one α tile."""
    config = config or tuned_config(
        "atom_conv2d_bwd_weight", x, geo, weight_grad_candidates(), pick_weight_grad_config(x.dtype, arch_of(x.device)),
        run=lambda c: launch_weight_grad(grad_y, x, atom_coeff, bases, weight, geo, config=c, splits=splits))
    launch = fit_forward_config(config, geo)
    c_in_g = geo.in_channels // geo.groups
    chunks = triton.cdiv(c_in_g, launch.BLOCK_C)
    if splits is None:
        splits = weight_grad_splits(geo, launch, _target_programs(x.device))
    partials = torch.empty(splits, geo.out_channels, chunks, launch.M_PAD, launch.BLOCK_C,
                           dtype=torch.float32, device=x.device)
    programs = splits * geo.groups * triton.cdiv(geo.out_channels // geo.groups, launch.BLOCK_O) * chunks
    check_int32_indexing("N*H_out*W_out", _num_out_pixels(geo), launch.BLOCK_P, programs)
    atom_conv2d_bwd_weight_kernel[(programs,)](
        **weight_grad_kernel_args(x, atom_coeff, bases, grad_y, partials, geo, launch),
        num_warps=launch.num_warps, num_stages=launch.num_stages)
    return unpack_weight(partials.sum(0), c_in_g, geo.num_atoms).to(weight.dtype, memory_format=torch.contiguous_format)


def launch_input_grad(grad_y, x, atom_coeff, bases, weight, geo: AtomConvGeometry, *,
                      config: ForwardConfig | None = None) -> torch.Tensor:
    """dx [N, C_in, H, W] in x's dtype and layout (x itself is not read). Validated inputs;
    `config` forces a launch config (fitted to the transposed geometry)."""
    dx = torch.empty_like(x, memory_format=output_layout(x))
    config = config or tuned_config(
        "atom_conv2d_bwd_input", x, geo, input_grad_candidates(), pick_input_grad_config(x.dtype, arch_of(x.device)),
        run=lambda c: launch_input_grad(grad_y, x, atom_coeff, bases, weight, geo, config=c))
    launch = fit_forward_config(config, transposed_geometry(geo))
    num_pixel_tiles = triton.cdiv(geo.batch * geo.in_size[0] * geo.in_size[1], launch.BLOCK_P)
    programs = num_pixel_tiles * geo.groups * triton.cdiv(geo.in_channels // geo.groups, launch.BLOCK_O)
    check_int32_indexing("N*H*W", geo.batch * geo.in_size[0] * geo.in_size[1], launch.BLOCK_P, programs)
    if programs:
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
    _check_runnable(x)
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
