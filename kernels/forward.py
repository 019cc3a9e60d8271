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
from triton.runtime.interpreter import InterpretedFunction

from atomconv.validation import AtomConvGeometry, output_layout, validate_atom_conv2d

from .configs import (KERNEL_DTYPES, ForwardConfig, ForwardLaunch, arch_of, fit_forward_config, forward_candidates,
                      forward_shape_class, pick_forward_config, tf32_allowed, tuned_config)


@triton.jit
def _basis_to_atom(coeff_ptrs, coeff_mask, bases_ptr, stride_coeff_l, stride_bases_l, L,
                   M_PAD: tl.constexpr, BLOCK_P: tl.constexpr):
    """Stage 1 for one tap: atoms [M_PAD, BLOCK_P] fp32, A[m, p] = Σ_l β[m*L + l, p] · Ψ[l].

    coeff_ptrs [M_PAD, BLOCK_P] point at β[n, m*L, oh, ow]; bases_ptr at Ψ[0, i, j].
    Atoms m >= M come out zero (masked β).
    """
    atoms = tl.zeros([M_PAD, BLOCK_P], dtype=tl.float32)
    for l in range(L):
        beta = tl.load(coeff_ptrs + l * stride_coeff_l, mask=coeff_mask, other=0.0).to(tl.float32)
        psi = tl.load(bases_ptr + l * stride_bases_l).to(tl.float32)
        atoms += beta * psi
    return atoms


@triton.jit
def load_taps(x_ptrs, chan_mask, pix_mask, ih, iw, H, W, stride_x_h, stride_x_w):
    """One tap of a channel chunk: x[n, c, ih, iw] as [BLOCK_C, BLOCK_P] fp32, zero where
    (ih, iw) [BLOCK_P] falls outside the image (the padding). x_ptrs [BLOCK_C, BLOCK_P] point
    at x[n, c, 0, 0]."""
    tap_ok = pix_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return tl.load(x_ptrs + (ih * stride_x_h + iw * stride_x_w)[None, :],
                   mask=chan_mask[:, None] & tap_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _atom_times_features(x_ptrs, chan_mask, ih0, iw0, pix_mask, H, W, KH, KW, DH, DW,
                         stride_x_h, stride_x_w, coeff_ptrs, coeff_mask, bases_ptr, stride_coeff_l,
                         stride_bases_l, stride_bases_h, stride_bases_w, L,
                         M_PAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Stage 2 for one channel chunk: Z [M_PAD, BLOCK_C, BLOCK_P] fp32,
    Z[m, c, p] = Σ_taps A[m, p, tap] · x_tap[c, p], every tap summed before stage 3.

    x_ptrs [BLOCK_C, BLOCK_P] point at x[n, c, 0, 0]; ih0, iw0 [BLOCK_P] int64 are the input
    coordinates of tap (0, 0); taps outside the image read as zero (the padding).
    """
    z = tl.zeros([M_PAD, BLOCK_C, BLOCK_P], dtype=tl.float32)
    for i in range(KH):
        for j in range(KW):
            taps = load_taps(x_ptrs, chan_mask, pix_mask, ih0 + i * DH, iw0 + j * DW, H, W, stride_x_h, stride_x_w)
            atoms = _basis_to_atom(coeff_ptrs, coeff_mask, bases_ptr + i * stride_bases_h + j * stride_bases_w,
                                   stride_coeff_l, stride_bases_l, L, M_PAD, BLOCK_P)
            z += atoms[:, None, :] * taps[None, :, :]
    return z


@triton.jit
def _coefficient_sum(acc, z, w_ptrs, w_mask, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, FP32_DOTS: tl.constexpr):
    """Stage 3 for one channel chunk: acc [BLOCK_O, BLOCK_P] fp32 += α [BLOCK_O, BLOCK_K] @ Z [BLOCK_K, BLOCK_P],
    w_ptrs [BLOCK_O, BLOCK_K] pointing at a packed α chunk (column k = m*BLOCK_C + c).

    On a GPU, 16-bit problems round Z to the input dtype so the dot runs on tensor cores;
    FP32_DOTS (the interpreter, whose bfloat16 arithmetic is broken) keeps both in fp32.
    """
    w = tl.load(w_ptrs, mask=w_mask, other=0.0)
    dot_dtype: tl.constexpr = tl.float32 if FP32_DOTS else w_ptrs.dtype.element_ty
    z = tl.reshape(z, [BLOCK_K, BLOCK_P]).to(dot_dtype)
    return tl.dot(w.to(dot_dtype), z, acc, input_precision=DOT_PRECISION)


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
    DOT_PRECISION: tl.constexpr, FP32_DOTS: tl.constexpr,
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

    # Output pixels of this tile; offsets into x, β and y are int64 (batch * stride and
    # channel * stride overflow int32 on large tensors).
    pix = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pix_mask = pix < num_pixels
    n = (pix // (H_out * W_out)).to(tl.int64)
    oh = ((pix // W_out) % H_out).to(tl.int64)
    ow = (pix % W_out).to(tl.int64)
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    x_pix = n * stride_x_n  # [BLOCK_P]

    # β pointers [M_PAD, BLOCK_P] at β[n, m*L, oh, ow]; atoms m >= M are masked to zero.
    atom = tl.arange(0, M_PAD)
    coeff_ptrs = coeff_ptr + (atom * L).to(tl.int64)[:, None] * stride_coeff_c \
        + (n * stride_coeff_n + oh * stride_coeff_h + ow * stride_coeff_w)[None, :]
    coeff_mask = (atom < M)[:, None] & pix_mask[None, :]

    # Output channels of this tile, inside the group and global; packed α rows.
    o_in_g = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    o_mask = o_in_g < C_out_g
    o_glob = group * C_out_g + o_in_g
    w_ptrs = w_ptr + (o_glob * (tl.cdiv(C_in_g, BLOCK_C) * BLOCK_K))[:, None] + tl.arange(0, BLOCK_K)[None, :]

    chan = tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_O, BLOCK_P], dtype=tl.float32)
    for c0 in range(0, C_in_g, BLOCK_C):
        x_chan = (group * C_in_g + c0 + chan).to(tl.int64) * stride_x_c
        z = _atom_times_features(x_ptr + x_chan[:, None] + x_pix[None, :], c0 + chan < C_in_g, ih0, iw0,
                                 pix_mask, H, W, KH, KW, DH, DW, stride_x_h, stride_x_w, coeff_ptrs,
                                 coeff_mask, bases_ptr, stride_coeff_c, stride_bases_l, stride_bases_h,
                                 stride_bases_w, L, M_PAD, BLOCK_C, BLOCK_P)
        # Chunk c0 // BLOCK_C of every packed α row starts c0 * M_PAD elements in.
        acc = _coefficient_sum(acc, z, w_ptrs + c0 * M_PAD, o_mask[:, None], BLOCK_K, BLOCK_P,
                               DOT_PRECISION, FP32_DOTS)

    if bias_ptr is not None:
        acc += tl.load(bias_ptr + o_glob * stride_bias, mask=o_mask, other=0.0).to(tl.float32)[:, None]
    y_ptrs = y_ptr + o_glob.to(tl.int64)[:, None] * stride_y_c \
        + (n * stride_y_n + oh * stride_y_h + ow * stride_y_w)[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=o_mask[:, None] & pix_mask[None, :])


INTERPRETING = isinstance(atom_conv2d_fwd_kernel, InterpretedFunction)
"""True when Triton interprets the kernels (TRITON_INTERPRET was set when this module was
imported, `@triton.jit` decided then): tensors may live on the CPU, dots run in fp32."""

_MAX_INT32 = 2**31 - 1


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots use TF32 only where PyTorch's own matmuls would (SPEC §6); the interpreter
    only knows "ieee". The value does not matter for 16-bit dots."""
    if dtype == torch.float32 and tf32_allowed() and not INTERPRETING:
        return "tf32"
    return "ieee"


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
        **_strides("stride_x", "nchw", x), **_strides("stride_coeff", "nchw", atom_coeff),
        **_strides("stride_bases", "lhw", bases),
        stride_bias=0 if bias is None else bias.stride(0), **_strides("stride_y", "nchw", y),
        BLOCK_P=launch.BLOCK_P, BLOCK_O=launch.BLOCK_O, BLOCK_C=launch.BLOCK_C, M_PAD=launch.M_PAD,
        DOT_PRECISION=_dot_precision(x.dtype), FP32_DOTS=INTERPRETING,
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


def _strides(prefix: str, dims: str, t: torch.Tensor) -> dict[str, int]:
    """{"<prefix>_<dim>": stride} for each dimension of t, dims naming them in order."""
    return {f"{prefix}_{d}": s for d, s in zip(dims, t.stride())}


def atom_conv2d_forward(x, atom_coeff, bases, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """Fused forward (SPEC §1, §4): always Triton, no autograd.

    x [N, C_in, H, W], atom_coeff [N, M*L, H_out, W_out], bases [L, KH, KW],
    weight [C_out, C_in // groups, M], bias [C_out] or None -> y [N, C_out, H_out, W_out],
    in x's dtype (float16, bfloat16 or float32; float64 raises TypeError, the reference path
    serves it), channels_last when x is. Inputs may have any strides.
    """
    geo = validate_atom_conv2d(x, atom_coeff, bases, weight, bias, stride, padding, dilation, groups)
    return launch_forward(x, atom_coeff, bases, weight, bias, geo)


def launch_forward(x, atom_coeff, bases, weight, bias, geo: AtomConvGeometry, *,
                   config: ForwardConfig | None = None) -> torch.Tensor:
    """Run the kernel on validated inputs (see `atom_conv2d_forward`); `config` forces a launch
    config instead of the one `tuned_config` chooses."""
    _check_runnable(x)
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
    atom_conv2d_fwd_kernel[_grid(geo, launch)](**forward_kernel_args(x, atom_coeff, bases, weight, bias, y, geo, launch),
                                               num_warps=launch.num_warps, num_stages=launch.num_stages)
    return y


def _check_runnable(x: torch.Tensor) -> None:
    """Refuse, with a message, the dtypes and devices the kernel does not run on."""
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"the Triton path supports float16, bfloat16 and float32, got x of dtype {x.dtype}; "
                        "use backend='reference' for it")
    if x.device.type != "cuda" and not INTERPRETING:
        raise RuntimeError(f"the Triton path needs CUDA tensors, got x on {x.device} (set TRITON_INTERPRET=1 "
                           "before importing kernels to run it on the CPU with Triton's interpreter)")


def _grid(geo: AtomConvGeometry, launch: ForwardLaunch) -> tuple[int]:
    """(programs,): pixel tiles x groups x output-channel tiles. Pixel indices are int32 in the
    kernel, so the padded pixel count must stay below 2**31."""
    num_pixels = geo.batch * geo.out_size[0] * geo.out_size[1]
    num_pixel_tiles = triton.cdiv(num_pixels, launch.BLOCK_P)
    programs = num_pixel_tiles * geo.groups * triton.cdiv(geo.out_channels // geo.groups, launch.BLOCK_O)
    check_int32_indexing("N*H_out*W_out", num_pixels, launch.BLOCK_P, programs)
    return (programs,)


def check_int32_indexing(what: str, num_pixels: int, block_p: int, programs: int) -> None:
    """The kernels index pixels and programs in int32: refuse, with a message, a launch whose
    padded pixel count or program count passes 2**31 (what: how the pixel count is made)."""
    padded_pixels = triton.cdiv(num_pixels, block_p) * block_p
    if max(padded_pixels, programs) > _MAX_INT32:
        raise ValueError(f"the Triton path indexes pixels and programs in int32: {what} = {num_pixels} "
                         f"needs {programs} programs of {block_p} pixels, over 2**31")


autotune_cache.register_tuner("atom_conv2d_fwd", atom_conv2d_forward)
