"""Fused Triton forward of the ACDA operator (docs/design.md §1): y from x, β, Ψ, α in one kernel.

A program owns BLOCK_P = 32 * num_warps consecutive output pixels of the batch (one thread per
pixel; a tile may span samples) and BLOCK_O output channels of one group:

1. `pixel_atoms`          the M*KH*KW atoms of each pixel, once per tile, in registers
                          (M*L*KH*KW multiply-adds per pixel);
2. `atom_times_features`  per chunk of BLOCK_C input channels, Z[m] [BLOCK_C, BLOCK_P] =
                          Σ_taps A[m, tap] · x_tap, fp32 on CUDA cores (C*M*KH*KW multiply-adds
                          per pixel: the arithmetic floor of this algorithm);
3. `coefficient_sum`      acc [BLOCK_O, BLOCK_P] += α_m [BLOCK_O, BLOCK_C] @ Z[m], one
                          tensor-core dot per atom (two below 16 channels), so M needs no
                          padding to a power of two; the bias is added once at the end.

Only y is written: atoms, taps and Z live in registers (and the dot operands in shared memory).
KH, KW, L and M are compile-time constants (one compiled variant per layer shape), so tap and
basis loops unroll and each tap's address is the row pointer plus a constant.

α is repacked by the launcher (`pack_weight`, a few KB, one torch copy) into one contiguous
block [M_DOT, BLOCK_O, BLOCK_C] per chunk and output-channel tile: a dot reads its tile of α in
whole 128-byte lines, at offsets known at compile time (a warp-wide load of rows a chunk row
apart touched 16 lines for 4 lines' worth), zeros standing in for padded rows, channels and
atoms.

Numerics: in float16 each pixel's atoms are first scaled by a power of two that bounds their L1
norm by 1, so Z cannot overflow (|Z| <= max |x|); the accumulator is scaled back before the bias
(exact: powers of two; see `tiles`). Z rows that are padding are zeroed before the dot, so an
Inf in x or Ψ stays ±Inf.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

import autotune_cache

from atomconv.validation import AtomConvGeometry, output_layout, validate_atom_conv2d

from . import launch as launching
from .configs import (TileConfig, TileLaunch, arch_of, even_chunks, fit_tile_config, row_passes, tile_candidates,
                      default_config, tuned_config)
from .launch import INTERPRETING, Launch, check_runnable, dot_precision, pixel_run, needs_wide_offsets, strides
from .tiles import (atom_l1_bound_by_bases, atom_times_features, coefficient_sum, half_atoms, offset,
                    packed_weight_tile, pixel_atoms, pixel_offset, pixel_tile, pow2_scale, scaled_atoms,
                    scaled_to_unit_l1, tap_geometry)


@triton.jit
def atom_conv2d_fwd_kernel(
    x_ptr, coeff_ptr, bases_ptr, w_ptr, bias_ptr, y_ptr,
    N, H, W, H_out, W_out, G, C_in_g, C_out_g,
    SH, SW, PH, PW, DH, DW,
    stride_x_n, stride_x_c, stride_x_h, stride_x_w,
    stride_coeff_n, stride_coeff_c, stride_coeff_h, stride_coeff_w,
    stride_bases_l, stride_bases_h, stride_bases_w,
    stride_bias,
    stride_y_n, stride_y_c, stride_y_h, stride_y_w,
    M: tl.constexpr, L: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    BLOCK_P: tl.constexpr, TAP_GROUPS: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
    ATOMS_PER_DOT: tl.constexpr, ROW_PASSES: tl.constexpr, ROWS_OF_PSI: tl.constexpr, HALF_SUMS: tl.constexpr,
    EVEN_C: tl.constexpr, FLAT_Y: tl.constexpr, WIDE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    """x [N, C_in, H, W], β (coeff) [N, M*L, H_out, W_out], Ψ (bases) [L, KH, KW], α (w) packed
    [cdiv(C_in_g, BLOCK_C), G, cdiv(C_out_g, BLOCK_O), M_DOT, BLOCK_O, BLOCK_C] contiguous
    (`pack_weight`), bias [C_out] or
    None -> y [N, C_out, H_out, W_out]; x, β, bias and y with any strides, Ψ too unless
    ROWS_OF_PSI (`reads_rows_of_bases`): then its rows are padded as `launch.row_padded_bases` pads
    them (`tiles.basis_row` reads past KW).

    1-D grid of cdiv(N*H_out*W_out, BLOCK_P) * G * cdiv(C_out_g, BLOCK_O) programs; the
    output-channel tiles of one pixel tile are neighbours, so they find its x and β in L2.
    EVEN_C: C_in_g is a multiple of BLOCK_C. FLAT_Y: `launch.pixel_run` of y (nonzero: one run).
    WIDE: int64 offsets (`launch.needs_wide_offsets`).

    ROW_PASSES (`row_passes`: kernels whose atoms would not fit a thread's registers): stages 1-3
    run once per row of taps, in a loop at run time, each pass adding its taps' share of y (y is
    linear in the taps). A pass holds the M*KW atoms of one row, so a tile keeps one thread per
    pixel (no tap groups), and the compiled loop body is one row's, not KH rows'.

    HALF_SUMS (`sums_taps_in_half`, float16 only): stage 2 sums its taps in float16 (HFMA2, two
    multiply-adds an instruction) from the scaled atoms rounded to float16.
    """
    PER_GROUP: tl.constexpr = (KH * KW + TAP_GROUPS - 1) // TAP_GROUPS
    num_o_tiles = tl.cdiv(C_out_g, BLOCK_O)
    pid = tl.program_id(0)
    pid_p, pid_go = pid // (G * num_o_tiles), pid % (G * num_o_tiles)
    group, pid_o = pid_go // num_o_tiles, pid_go % num_o_tiles
    n, _, oh, ow, pix_mask = pixel_tile(pid_p, N, H_out, W_out, BLOCK_P, TAP_GROUPS, 1)  # per column
    # Per column, at its sample (as pointers: with the sample in the offsets, Triton 3.6 spills).
    x_ptr += n * stride_x_n + offset(group * C_in_g, stride_x_c, WIDE)
    coeff_ptr += n * stride_coeff_n
    coeff_pix = offset(oh, stride_coeff_h, WIDE) + offset(ow, stride_coeff_w, WIDE)
    # Output channels of this tile (inside the group) and their packed α rows.
    o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_mask = o < C_out_g
    num_chunks = tl.cdiv(C_in_g, BLOCK_C)
    w_ptr, w_chunk = packed_weight_tile(w_ptr, pid_go, G * num_o_tiles, M, ATOMS_PER_DOT, BLOCK_O, BLOCK_C)
    x_col = offset(ow * SW - PW, stride_x_w, WIDE)  # of each pixel's window corner
    acc = tl.zeros([BLOCK_O, BLOCK_P], dtype=tl.float32)
    if ROW_PASSES:
        if y_ptr.dtype.element_ty == tl.float16:
            scale, inverse_scale = pow2_scale(atom_l1_bound_by_bases(coeff_ptr, coeff_pix, pix_mask, stride_coeff_c,
                                                                     bases_ptr, stride_bases_l, stride_bases_h,
                                                                     stride_bases_w, M, L, KH, KW, WIDE))
        for i in range(KH):
            # Row i of the taps as a kernel of its own: 1 x KW, padding PH - i*DH rows.
            atoms = pixel_atoms(coeff_ptr, coeff_pix, pix_mask, stride_coeff_c, bases_ptr + i * stride_bases_h,
                                stride_bases_l, stride_bases_h, stride_bases_w, M, L, 1, KW, 1, BLOCK_P, ROWS_OF_PSI, WIDE)
            if y_ptr.dtype.element_ty == tl.float16:
                atoms = scaled_atoms(atoms, scale, M * KW)
            if HALF_SUMS:
                atoms = half_atoms(atoms, M * KW)
            taps = tap_geometry(oh, ow, pix_mask, H, W, SH, SW, PH - i * DH, PW, DH, DW, stride_x_h, stride_x_w, 1,
                                KW, 1, BLOCK_P, WIDE)
            x_row = x_ptr + offset(oh * SH - PH + i * DH, stride_x_h, WIDE) + x_col
            acc = chunks_times_coefficients(acc, x_row, stride_x_c, C_in_g, num_chunks, taps, atoms, w_ptr, w_chunk,
                                            M, KW, EVEN_C, ATOMS_PER_DOT, 1, BLOCK_C, BLOCK_P,
                                            WIDE, DOT_PRECISION, INTERPRETED)
    else:
        atoms = pixel_atoms(coeff_ptr, coeff_pix, pix_mask, stride_coeff_c, bases_ptr, stride_bases_l, stride_bases_h,
                            stride_bases_w, M, L, KH, KW, TAP_GROUPS, BLOCK_P, ROWS_OF_PSI, WIDE)
        if y_ptr.dtype.element_ty == tl.float16:
            atoms, inverse_scale = scaled_to_unit_l1(atoms, M, PER_GROUP, TAP_GROUPS, BLOCK_P)
        if HALF_SUMS:
            atoms = half_atoms(atoms, M * PER_GROUP)
        taps = tap_geometry(oh, ow, pix_mask, H, W, SH, SW, PH, PW, DH, DW, stride_x_h, stride_x_w, KH, KW,
                            TAP_GROUPS, BLOCK_P, WIDE)
        x_corner = x_ptr + offset(oh * SH - PH, stride_x_h, WIDE) + x_col
        acc = chunks_times_coefficients(acc, x_corner, stride_x_c, C_in_g, num_chunks, taps, atoms, w_ptr, w_chunk,
                                        M, PER_GROUP, EVEN_C, ATOMS_PER_DOT, TAP_GROUPS,
                                        BLOCK_C, BLOCK_P, WIDE, DOT_PRECISION, INTERPRETED)

    if y_ptr.dtype.element_ty == tl.float16:
        acc *= inverse_scale[None, :]
    o_glob = group * C_out_g + o
    if bias_ptr is not None:
        acc += tl.load(bias_ptr + o_glob * stride_bias, mask=o_mask, other=0.0).to(tl.float32)[:, None]
    n, pix, oh, ow, pix_mask = pixel_tile(pid_p, N, H_out, W_out, BLOCK_P, 1, FLAT_Y)  # per pixel
    y_ptrs = y_ptr + offset(o_glob, stride_y_c, WIDE)[:, None] \
        + (n * stride_y_n + pixel_offset(pix, oh, ow, stride_y_h, stride_y_w, FLAT_Y, WIDE))[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=o_mask[:, None] & pix_mask[None, :])


@triton.jit
def chunks_times_coefficients(acc, x_ptrs, stride_x_c, C_in_g, num_chunks, taps, atoms, w_ptr, w_chunk,
                              M: tl.constexpr, PER_GROUP: tl.constexpr, EVEN_C: tl.constexpr,
                              ATOMS_PER_DOT: tl.constexpr, TAP_GROUPS: tl.constexpr, BLOCK_C: tl.constexpr,
                              BLOCK_P: tl.constexpr, WIDE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                              INTERPRETED: tl.constexpr):
    """Stages 2 and 3 over every channel chunk of the group: acc [BLOCK_O, BLOCK_P] += Σ_c,m α Z for
    the taps that `taps` and `atoms` give (x_ptrs [COLUMNS] at x[n, the group's first channel,
    oh*SH - PH, ow*SW - PW], the corner of each pixel's window; w_ptr at the first chunk's α of
    the program's tile, the next w_chunk elements on, `pack_weight`)."""
    chan = tl.arange(0, BLOCK_C)
    for chunk in range(num_chunks):
        chan_mask = chunk * BLOCK_C + chan < C_in_g
        z = atom_times_features(x_ptrs + offset(chunk * BLOCK_C, stride_x_c, WIDE), stride_x_c,
                                C_in_g - chunk * BLOCK_C, taps, atoms, M, PER_GROUP, EVEN_C, BLOCK_C,
                                TAP_GROUPS * BLOCK_P, WIDE)
        acc = coefficient_sum(acc, z, w_ptr + chunk * w_chunk, chan_mask, M, EVEN_C, ATOMS_PER_DOT, TAP_GROUPS,
                              BLOCK_C, BLOCK_P, DOT_PRECISION, INTERPRETED)
    return acc


def forward_kernel_args(x, atom_coeff, bases, weight, bias, y, geo: AtomConvGeometry,
                        launch: TileLaunch) -> dict[str, object]:
    """Every argument of `atom_conv2d_fwd_kernel`, by name, in order (constexprs included).
    The launcher and the static report both build the kernel's arguments here."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geo.kernel_size, geo.stride, geo.padding, geo.dilation
    c_in_g = geo.in_channels // geo.groups
    rows_of_bases = reads_rows_of_bases(geo, launch)
    if rows_of_bases:
        bases = launching.row_padded_bases(bases)
    return dict(
        x_ptr=x, coeff_ptr=atom_coeff, bases_ptr=bases, w_ptr=pack_weight(weight, geo.groups, launch),
        bias_ptr=bias, y_ptr=y,
        N=geo.batch, H=geo.in_size[0], W=geo.in_size[1], H_out=geo.out_size[0], W_out=geo.out_size[1],
        G=geo.groups, C_in_g=c_in_g, C_out_g=geo.out_channels // geo.groups,
        SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw,
        **strides("stride_x", "nchw", x), **strides("stride_coeff", "nchw", atom_coeff),
        **strides("stride_bases", "lhw", bases),
        stride_bias=0 if bias is None else bias.stride(0), **strides("stride_y", "nchw", y),
        M=geo.num_atoms, L=geo.num_bases, KH=kh, KW=kw,
        BLOCK_P=launch.BLOCK_P, TAP_GROUPS=launch.TAP_GROUPS, BLOCK_O=launch.BLOCK_O, BLOCK_C=launch.BLOCK_C,
        ATOMS_PER_DOT=launch.ATOMS_PER_DOT, ROW_PASSES=row_passes(geo), ROWS_OF_PSI=rows_of_bases,
        HALF_SUMS=sums_taps_in_half(geo, launch, x.dtype), EVEN_C=even_chunks(geo, launch), FLAT_Y=pixel_run(y),
        WIDE=needs_wide_offsets(x, atom_coeff, y),
        DOT_PRECISION=dot_precision(x.dtype), INTERPRETED=INTERPRETING,
    )


def reads_rows_of_bases(geo: AtomConvGeometry, launch: TileLaunch) -> bool:
    """The forward kernel's ROWS_OF_PSI: whether stage 1 reads Ψ a row at a time (`tiles.basis_row`),
    from a copy whose rows the launcher pads. Wherever it can, with one tap group and KW > 1 (7x7,
    sm_90 fp16, static model: Ψ's loads 28 -> 1 requests per pixel, bound 151 -> 144 us)."""
    return launch.TAP_GROUPS == 1 and geo.kernel_size[1] > 1


HALF_SUM_TAPS = 9
"""At most this many taps in one float16 sum of stage 2 (`sums_taps_in_half`)."""


def sums_taps_in_half(geo: AtomConvGeometry, launch: TileLaunch, dtype: torch.dtype) -> bool:
    """The forward kernel's HALF_SUMS: whether stage 2 sums Z = Σ_t A x over its taps in float16,
    for float16 inputs whose sums (a column's taps in one pass: a row of taps in row passes,
    else its tap group's) have at most HALF_SUM_TAPS terms. Each term is below max |x| (the
    atoms are scaled to an L1 norm below 1), so nothing overflows; rounding each step adds an
    error that grows with the terms (y's max error, relative to max |y|, on random data: 3.2e-4
    summed in fp32, 4.7e-4 in fp16 over 9 taps, 1.4e-3 over 49). Static model, 3x3, sm_90: the
    bound 26.4 -> 22.3 us (stage 2's 432 FFMA a chunk become 216 HFMA2, x's 72 widenings go)."""
    (kh, kw) = geo.kernel_size
    taps = kw if row_passes(geo) else triton.cdiv(kh * kw, launch.TAP_GROUPS)
    return dtype == torch.float16 and taps <= HALF_SUM_TAPS


def pack_weight(weight: torch.Tensor, groups: int, launch: TileLaunch) -> torch.Tensor:
    """α [C_out, C_in_g, M] -> [cdiv(C_in_g, BLOCK_C), G, tiles, M_DOT, BLOCK_O, BLOCK_C]
    contiguous (tiles = cdiv(C_out_g, BLOCK_O) per group, M_DOT: M rounded up to ATOMS_PER_DOT),
    zero where the channel, the atom or the row is padding: the block of chunk j, group g, tile t
    and atom m holds α[g*C_out_g + t*BLOCK_O + i, j*BLOCK_C + c, m] at row i, column c. So what a
    program reads of one chunk is contiguous, [M_DOT, BLOCK_O, BLOCK_C], and each dot's tile of it
    is read in whole lines at offsets known at compile time."""
    rows_g = weight.shape[0] // groups
    tiles = triton.cdiv(rows_g, launch.BLOCK_O)
    packed = zero_padded_weight(weight.view(groups, rows_g, *weight.shape[1:]), tiles * launch.BLOCK_O, launch)
    g, _, chunks, block_c, m_dot = packed.shape
    packed = packed.view(g, tiles, launch.BLOCK_O, chunks, block_c, m_dot)
    return packed.permute(3, 0, 1, 5, 2, 4).contiguous()


def zero_padded_weight(weight: torch.Tensor, rows: int, launch: TileLaunch) -> torch.Tensor:
    """α per group [G, R, C_in_g, M] -> [G, rows, chunks, BLOCK_C, M_DOT], zeros past R, C_in_g, M."""
    g, r, c_in_g, m = weight.shape
    chunks = triton.cdiv(c_in_g, launch.BLOCK_C)
    m_dot = launch.padded_atoms(m)
    padded = weight.new_zeros(g, rows, chunks * launch.BLOCK_C, m_dot)
    padded[:, :r, :c_in_g, :m] = weight
    return padded.view(g, rows, chunks, launch.BLOCK_C, m_dot)


def forward_footprint(launch: TileLaunch, geo: AtomConvGeometry, dtype: torch.dtype, arch: str, *,
                      by_rows: bool = False) -> autotune_cache.Footprint:
    """What a config costs on a problem, for candidate pruning. Registers per thread, at least:
    the atoms (M*KH*KW, or one row's M*KW for a kernel that runs `by_rows` of taps), Z (M*BLOCK_C)
    and the accumulator (BLOCK_O, one pixel per thread), fp32.
    Shared memory: the stage-3 dot's operands, α [BLOCK_O, K] and Z [K, BLOCK_P] in the input
    dtype (K = ATOMS_PER_DOT * BLOCK_C). Cost: stage 2 on the padded channel tiles, redone for every
    output-channel tile, plus stage 1 per output-channel tile."""
    (kh, kw), m = geo.kernel_size, geo.num_atoms
    c_in_g, c_out_g = geo.in_channels // geo.groups, geo.out_channels // geo.groups
    pixels = geo.out_size[0] * geo.out_size[1]
    k = launch.ATOMS_PER_DOT * launch.BLOCK_C
    registers = m * (kw if by_rows else kh * kw) + m * launch.BLOCK_C + launch.BLOCK_O
    padded_pixels = launch.BLOCK_P * launching.pixel_tiles(geo.batch, pixels, launch.BLOCK_P)
    o_tiles = geo.groups * triton.cdiv(c_out_g, launch.BLOCK_O)
    padded_c = launch.BLOCK_C * triton.cdiv(c_in_g, launch.BLOCK_C)
    cost = padded_pixels * o_tiles * m * kh * kw * (padded_c + geo.num_bases)
    fill = geo.batch * pixels / padded_pixels * c_in_g / padded_c * c_out_g / (launch.BLOCK_O * triton.cdiv(c_out_g, launch.BLOCK_O))
    return autotune_cache.Footprint(launch=launch, threads=32 * launch.num_warps,
                                    shared_bytes=(launch.BLOCK_O + launch.BLOCK_P) * k * dtype.itemsize,
                                    registers=registers, fill=fill, cost=cost)


def atom_conv2d_forward(x, atom_coeff, bases, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Fused forward (docs/design.md §1): always Triton, no autograd.

    x [N, C_in, H, W], atom_coeff [N, M*L, H_out, W_out], bases [L, KH, KW],
    weight [C_out, C_in // groups, M], bias [C_out] or None -> y [N, C_out, H_out, W_out],
    in x's dtype (float16, bfloat16 or float32; float64 raises TypeError, the reference path
    serves it), channels_last when x is. Inputs may have any strides; the kernel runs on x's
    device.
    """
    geo = validate_atom_conv2d(x, atom_coeff, bases, weight, bias, stride, padding, dilation, groups)
    return launch_forward(x, atom_coeff, bases, weight, bias, geo)


def launch_forward(x, atom_coeff, bases, weight, bias, geo: AtomConvGeometry, *,
                   config: TileConfig | None = None) -> torch.Tensor:
    """Run the kernel on validated inputs (see `atom_conv2d_forward`), on x's device; `config`
    forces a launch config instead of the one `tuned_config` chooses."""
    check_runnable(x)
    y = torch.empty((geo.batch, geo.out_channels, *geo.out_size), dtype=x.dtype, device=x.device,
                    memory_format=output_layout(x))
    if y.numel() == 0:
        return y
    if config is None:
        arch = arch_of(x.device)
        config = tuned_config(
            "atom_conv2d_fwd", x, geo, tile_candidates(), default_config(),
            run=lambda c: launch_forward(x, atom_coeff, bases, weight, bias, geo, config=c),
            footprint=lambda c: forward_footprint(forward_tile_launch(c, geo), geo, x.dtype, arch,
                                                  by_rows=row_passes(geo)),
        )
    with launching.on_device_of(x):
        forward_launch(x, atom_coeff, bases, weight, bias, y, geo, forward_tile_launch(config, geo)).run()
    return y


def forward_tile_launch(config: TileConfig, geo: AtomConvGeometry) -> TileLaunch:
    """The forward kernel's fit of a config: no tap groups where it runs by rows of taps."""
    return fit_tile_config(config, geo, by_rows=row_passes(geo))


def forward_launch(x, atom_coeff, bases, weight, bias, y, geo: AtomConvGeometry, launch: TileLaunch) -> Launch:
    """The one kernel launch of a forward, as `launch_forward` makes it."""
    return Launch("atom_conv2d_fwd", atom_conv2d_fwd_kernel,
                  forward_kernel_args(x, atom_coeff, bases, weight, bias, y, geo, launch),
                  (forward_programs(geo, launch),), launch.num_warps, launch.num_stages,
                  loop_trips=((geo.kernel_size[0],) if row_passes(geo) else ())
                  + (triton.cdiv(geo.in_channels // geo.groups, launch.BLOCK_C),))


def forward_programs(geo: AtomConvGeometry, launch: TileLaunch) -> int:
    """Pixel tiles (of the batch) x groups x output-channel tiles; program ids and pixel indices
    inside a sample are int32."""
    pixels = geo.out_size[0] * geo.out_size[1]
    programs = (launching.pixel_tiles(geo.batch, pixels, launch.BLOCK_P) * geo.groups
                * triton.cdiv(geo.out_channels // geo.groups, launch.BLOCK_O))
    launching.check_int32_indexing("H_out*W_out", pixels, launch.BLOCK_P, programs)
    return programs


autotune_cache.register_tuner("atom_conv2d_fwd", atom_conv2d_forward)
