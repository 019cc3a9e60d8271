"""Fused Triton forward of the ACDA operator (SPEC §1): y from x, β, Ψ, α in one kernel.

Each program owns a tile of BLOCK_P output pixels (flattened over batch and output grid)
times BLOCK_O output channels of one group. It loops over the group's input channels in
chunks of BLOCK_C; per chunk, over the KH*KW taps:

1. basis_to_atom        atoms [M_PAD, BLOCK_P] of this tap, from β and Ψ;
2. atom_times_features  Z [M_PAD, BLOCK_C, BLOCK_P] += atoms x tap [BLOCK_C, BLOCK_P] (gathered
                        from x, zero padding by masks), in float32;

then, once every tap is in Z,
3. coefficient_sum      acc [BLOCK_O, BLOCK_P] += α chunk [BLOCK_O, BLOCK_K] @ Z as [BLOCK_K, BLOCK_P]
                        (BLOCK_K = M_PAD*BLOCK_C), one tensor-core dot, float32 accumulator.

Only y is written: atoms, taps and Z live on chip. Everything is laid out pixels-last
(transposed against SPEC's [pixel, channel] view): Triton then puts the 32 lanes of a warp
on pixels and the warps on pixels and channels, so each thread multiplies the taps it loaded
itself, keeps all M_PAD atoms of its channels in registers, and Z reshapes to the dot
operand without a permute. The atoms of a tap are computed spread over the warps and shared
through shared memory. They are rebuilt once per channel chunk: M_PAD*L multiply-adds per
pixel and tap against M_PAD*BLOCK_C for stage 2, so a wide chunk amortises them.

16-bit problems round Z to the input dtype for the tensor-core dot. In float16 each pixel's
atoms are first scaled by a power of two that bounds their L1 norm by 1, so Z cannot overflow
(|Z| <= max |x|); the accumulator is scaled back before the bias (exact: powers of two; see
`tiles`). Z rows that are padding are zeroed before the dot, so an Inf in x or Ψ stays ±Inf.

α is repacked by the launcher (`pack_weight`, a few KB) into [C_out, chunks, M_PAD, BLOCK_C]
with zeros for padded atoms and channels: each program then reads an α chunk as contiguous
rows with wide loads and no masks, instead of a strided gather that costs a 64-bit pointer
per element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

import autotune_cache

from atomconv.validation import AtomConvGeometry, output_layout, validate_atom_conv2d

from . import launch as launching
from .configs import (ForwardConfig, ForwardLaunch, arch_of, fit_forward_config, forward_candidates,
                      forward_shape_class, pick_forward_config, tuned_config)
from .launch import INTERPRETING, check_int32_indexing, check_runnable, dot_precision, strides
from .tiles import atom_l1, atom_times_features, coefficient_sum, offset, pixel_coords, pow2_scale


@triton.jit
def atom_conv2d_fwd_kernel(
    x_ptr, coeff_ptr, bases_ptr, w_ptr, bias_ptr, y_ptr,
    num_pixels, H, W, H_out, W_out, G, C_in_g, C_out_g, M, L, KH, KW,
    SH, SW, PH, PW, DH, DW,
    stride_x_n, stride_x_c, stride_x_h, stride_x_w,
    stride_coeff_n, stride_coeff_c, stride_coeff_h, stride_coeff_w,
    stride_bases_l, stride_bases_h, stride_bases_w,
    stride_bias,
    stride_y_n, stride_y_c, stride_y_h, stride_y_w,
    BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, M_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
):
    """x [N, C_in, H, W], β (coeff) [N, M*L, H_out, W_out], Ψ (bases) [L, KH, KW],
    α (w) packed [C_out, cdiv(C_in_g, BLOCK_C), M_PAD, BLOCK_C] contiguous (`pack_weight`),
    bias [C_out] or None -> y [N, C_out, H_out, W_out]; x, β, Ψ, bias and y with any strides.
    num_pixels = N*H_out*W_out (< 2**31, checked by the launcher).

    1-D grid of cdiv(num_pixels, BLOCK_P) * G * cdiv(C_out_g, BLOCK_O) programs; the
    output-channel tiles of one pixel tile are neighbours, so they find its x and β in L2.
    """
    BLOCK_K: tl.constexpr = M_PAD * BLOCK_C
    num_o_tiles = tl.cdiv(C_out_g, BLOCK_O)
    pid = tl.program_id(0)
    pid_p, pid_go = pid // (G * num_o_tiles), pid % (G * num_o_tiles)
    group, pid_o = pid_go // num_o_tiles, pid_go % num_o_tiles

    # Output pixels of this tile (coordinates int64, see tiles.offset).
    pix = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pix_mask = pix < num_pixels
    n, oh, ow = pixel_coords(pix, H_out, W_out)
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    x_pix = n * stride_x_n  # [BLOCK_P]

    # β pointers [M_PAD, BLOCK_P] at β[n, m*L, oh, ow]; atoms m >= M are masked to zero.
    atom = tl.arange(0, M_PAD)
    coeff_ptrs = coeff_ptr + offset(atom * L, stride_coeff_c)[:, None] \
        + (n * stride_coeff_n + oh * stride_coeff_h + ow * stride_coeff_w)[None, :]
    coeff_mask = (atom < M)[:, None] & pix_mask[None, :]

    # float16 Z would overflow for large atoms: scale each pixel's atoms by a power of two that
    # bounds their L1 norm by 1 (|Z| <= max |x| then), undone on the output (see tiles).
    atom_scale = tl.full([BLOCK_P], 1.0, tl.float32)
    inverse_scale = tl.full([BLOCK_P], 1.0, tl.float32)
    if y_ptr.dtype.element_ty == tl.float16:
        bound = tl.zeros([M_PAD, BLOCK_P], dtype=tl.float32)
        for i in range(KH):
            for j in range(KW):
                bound += atom_l1(coeff_ptrs, coeff_mask, bases_ptr + offset(i, stride_bases_h) + offset(j, stride_bases_w),
                                 stride_coeff_c, stride_bases_l, L, M_PAD, BLOCK_P)
        atom_scale, inverse_scale = pow2_scale(tl.max(bound, axis=0))

    # Output channels of this tile, inside the group and global; packed α rows.
    o_in_g = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_mask = o_in_g < C_out_g
    o_glob = group * C_out_g + o_in_g
    w_ptrs = w_ptr + offset(o_glob, tl.cdiv(C_in_g, BLOCK_C) * BLOCK_K)[:, None] + tl.arange(0, BLOCK_K)[None, :]

    chan = tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_O, BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C_in_g, BLOCK_C):
        chan_mask = c0 + chan < C_in_g
        x_chan = offset(group * C_in_g + c0 + chan, stride_x_c)
        z = atom_times_features(x_ptr + x_chan[:, None] + x_pix[None, :], chan_mask, ih0, iw0,
                                pix_mask, H, W, KH, KW, DH, DW, stride_x_h, stride_x_w, coeff_ptrs,
                                coeff_mask, atom_scale, bases_ptr, stride_coeff_c, stride_bases_l, stride_bases_h,
                                stride_bases_w, L, M_PAD, BLOCK_C, BLOCK_P)
        # Chunk c0 // BLOCK_C of every packed α row starts c0 * M_PAD elements in.
        acc = coefficient_sum(acc, z, (atom < M)[:, None, None] & chan_mask[None, :, None], w_ptrs + c0 * M_PAD,
                              o_mask[:, None], BLOCK_K, BLOCK_P, DOT_PRECISION, INTERPRETED)

    acc *= inverse_scale[None, :]
    if bias_ptr is not None:
        acc += tl.load(bias_ptr + offset(o_glob, stride_bias), mask=o_mask, other=0.0).to(tl.float32)[:, None]
    y_ptrs = y_ptr + offset(o_glob, stride_y_c)[:, None] \
        + (n * stride_y_n + oh * stride_y_h + ow * stride_y_w)[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=o_mask[:, None] & pix_mask[None, :])


def forward_kernel_args(x, atom_coeff, bases, weight, bias, y, geo: AtomConvGeometry,
                        launch: ForwardLaunch) -> dict[str, object]:
    """Every argument of `atom_conv2d_fwd_kernel`, by name, in order (constexprs included).
    The launcher and the static report both build the kernel's arguments here."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geo.kernel_size, geo.stride, geo.padding, geo.dilation
    h_out, w_out = geo.out_size
    return dict(
        x_ptr=x, coeff_ptr=atom_coeff, bases_ptr=bases, w_ptr=pack_weight(weight, launch),
        bias_ptr=bias, y_ptr=y,
        num_pixels=geo.batch * h_out * w_out, H=geo.in_size[0], W=geo.in_size[1], H_out=h_out, W_out=w_out,
        G=geo.groups, C_in_g=geo.in_channels // geo.groups, C_out_g=geo.out_channels // geo.groups,
        M=geo.num_atoms, L=geo.num_bases, KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw,
        **strides("stride_x", "nchw", x), **strides("stride_coeff", "nchw", atom_coeff),
        **strides("stride_bases", "lhw", bases),
        stride_bias=0 if bias is None else bias.stride(0), **strides("stride_y", "nchw", y),
        BLOCK_P=launch.BLOCK_P, BLOCK_O=launch.BLOCK_O, BLOCK_C=launch.BLOCK_C, M_PAD=launch.M_PAD,
        DOT_PRECISION=dot_precision(x.dtype), INTERPRETED=INTERPRETING,
    )


def pack_weight(weight: torch.Tensor, launch: ForwardLaunch) -> torch.Tensor:
    """α [C_out, C_in_g, M] -> [C_out, cdiv(C_in_g, BLOCK_C), M_PAD, BLOCK_C] contiguous, zero
    where the channel or the atom is padding: chunk j of row o is α[o, j*BLOCK_C + c, m] at
    column m*BLOCK_C + c, the order of Z's rows in the kernel."""
    c_out, c_in_g, m = weight.shape
    chunks = triton.cdiv(c_in_g, launch.BLOCK_C)
    packed = weight.new_zeros(c_out, chunks * launch.BLOCK_C, launch.M_PAD)
    packed[:, :c_in_g, :m] = weight
    return packed.view(c_out, chunks, launch.BLOCK_C, launch.M_PAD).transpose(2, 3).contiguous()


def atom_conv2d_forward(x, atom_coeff, bases, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Fused forward (SPEC §1, §4): always Triton, no autograd.

    x [N, C_in, H, W], atom_coeff [N, M*L, H_out, W_out], bases [L, KH, KW],
    weight [C_out, C_in // groups, M], bias [C_out] or None -> y [N, C_out, H_out, W_out],
    in x's dtype (float16, bfloat16 or float32; float64 raises TypeError, the reference path
    serves it), channels_last when x is. Inputs may have any strides; the kernel runs on x's
    device.
    """
    geo = validate_atom_conv2d(x, atom_coeff, bases, weight, bias, stride, padding, dilation, groups)
    return launch_forward(x, atom_coeff, bases, weight, bias, geo)


def launch_forward(x, atom_coeff, bases, weight, bias, geo: AtomConvGeometry, *,
                   config: ForwardConfig | None = None) -> torch.Tensor:
    """Run the kernel on validated inputs (see `atom_conv2d_forward`), on x's device; `config`
    forces a launch config instead of the one `tuned_config` chooses."""
    check_runnable(x)
    y = torch.empty((geo.batch, geo.out_channels, *geo.out_size), dtype=x.dtype, device=x.device,
                    memory_format=output_layout(x))
    if y.numel() == 0:
        return y
    if config is None:
        arch, shape = arch_of(x.device), autotune_cache.layer_shape(geo)
        config = tuned_config(
            "atom_conv2d_fwd", x, geo, forward_candidates(forward_shape_class(geo)), pick_forward_config(x.dtype, arch),
            run=lambda c: launch_forward(x, atom_coeff, bases, weight, bias, geo, config=c),
            footprint=lambda c: autotune_cache.forward_footprint(fit_forward_config(c, geo), shape, x.dtype, arch),
        )
    launch = fit_forward_config(config, geo)
    with launching.on_device_of(x):
        atom_conv2d_fwd_kernel[_grid(geo, launch)](**forward_kernel_args(x, atom_coeff, bases, weight, bias, y, geo,
                                                                         launch),
                                                   num_warps=launch.num_warps, num_stages=launch.num_stages)
    return y


def _grid(geo: AtomConvGeometry, launch: ForwardLaunch) -> tuple[int]:
    """(programs,): pixel tiles x groups x output-channel tiles. Pixel indices are int32 in the
    kernel, so the padded pixel count must stay below 2**31."""
    num_pixels = geo.batch * geo.out_size[0] * geo.out_size[1]
    num_pixel_tiles = triton.cdiv(num_pixels, launch.BLOCK_P)
    programs = num_pixel_tiles * geo.groups * triton.cdiv(geo.out_channels // geo.groups, launch.BLOCK_O)
    check_int32_indexing("N*H_out*W_out", num_pixels, launch.BLOCK_P, programs)
    return (programs,)


autotune_cache.register_tuner("atom_conv2d_fwd", atom_conv2d_forward)
