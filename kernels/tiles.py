"""The on-chip pieces the forward and backward kernels share (all `@triton.jit`).

Index arithmetic. Pixel and program indices are int32 (the launchers check that they stay
below 2**31); every offset into a tensor is int64. A coordinate times a stride passes 2**31 on
large tensors and Triton computes products of int32 values in int32 (wrapping silently), so
offsets are made only with `offset` (coordinate x stride in int64) and `pixel_coords` (a flat
pixel index split into int64 (n, row, col)).

Stages (SPEC §1) on tiles laid out pixels-last: `basis_to_atom` (stage 1 for one tap),
`load_taps` (one tap of x, zero padding by masks), `atom_times_features` (stage 2 of one
channel chunk) and `coefficient_sum` (stage 3 of one chunk, a tensor-core dot).

Numerics of the tensor-core dots. A 16-bit problem rounds Z (and the backward's U, the
atom-weighted sum of dy) to the input dtype for its dot. In float16 that overflows where the
result does not: atoms of size 5e5 make |Z| = 5e6 while α = 1e-4 brings y back to 1e3. So the
atoms of a pixel are first multiplied by a power of two `pow2_scale(bound)` with bound >= the
L1 norm of the pixel's atoms (`atom_l1`): then |scaled Z| <= max |x| < 65504 (x is float16
itself), and the accumulator is multiplied back by the inverse power of two at the end.
Powers of two are exact, so nothing changes but the range. `dot_operand` rounds a tile to the
dtype the dot reads and, under the interpreter, widens it back to fp32 for the interpreter's
dot: CPU tests then see the same rounding, and the same overflows, as a GPU.
"""

import triton
import triton.language as tl


@triton.jit
def offset(index, stride):
    """index * stride in int64: the offset of a coordinate along a tensor dimension."""
    return tl.cast(index, tl.int64) * stride


@triton.jit
def pixel_coords(pix, H, W):
    """Flat pixel indices [BLOCK] over [N, H, W] (int32) -> (n, row, col), each int64."""
    n = pix // (H * W)
    return n.to(tl.int64), ((pix // W) % H).to(tl.int64), (pix % W).to(tl.int64)


@triton.jit
def dot_operand(t, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """A tile as a tensor-core dot with `dtype` operands reads it: an fp32 tile rounded to dtype
    (to nearest even), a tile already in dtype as it is. Under the interpreter the operand is
    then widened to fp32 for the interpreter's own dot (its 16-bit arithmetic is broken), and
    bfloat16 is rounded on the bits (its own conversion truncates)."""
    if t.dtype == dtype:
        operand = t
    elif INTERPRETED and dtype == tl.bfloat16:
        bits = t.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        operand = tl.where(t == t, rounded, t)  # NaN stays NaN
    else:
        operand = t.to(dtype)
    if INTERPRETED:
        operand = operand.to(tl.float32)
    return operand


@triton.jit
def pow2_scale(bound):
    """(s, 1 / s), powers of two with s * bound < 1 for 0 <= bound < 2**125 (s = 2**125 for a
    zero bound, 2**-126 from 2**125 up and for Inf), from bound's exponent bits, so exact. (The
    atoms of float16 inputs are bounded by L * K**2 * 65504**2 < 2**45.)"""
    biased = (bound.to(tl.int32, bitcast=True) >> 23) & 0xFF  # bound in [2**(e-127), 2**(e-126))
    biased = tl.minimum(tl.maximum(biased, 1), 252)
    return ((253 - biased) << 23).to(tl.float32, bitcast=True), ((biased + 1) << 23).to(tl.float32, bitcast=True)


@triton.jit
def atom_l1(coeff_ptrs, coeff_mask, bases_ptr, stride_coeff_l, stride_bases_l, L,
            M_PAD: tl.constexpr, BLOCK_P: tl.constexpr):
    """[M_PAD, BLOCK_P] fp32 bound of one tap's atoms, Σ_l |β[m*L + l, p]| · |Ψ[l]| >= |A[m, p]|
    (arguments as `basis_to_atom`); summed over the taps it bounds the L1 norm of the atoms."""
    bound = tl.zeros([M_PAD, BLOCK_P], dtype=tl.float32)
    for l in range(L):
        beta = tl.load(coeff_ptrs + offset(l, stride_coeff_l), mask=coeff_mask, other=0.0).to(tl.float32)
        psi = tl.load(bases_ptr + offset(l, stride_bases_l)).to(tl.float32)
        bound += tl.where(coeff_mask, tl.abs(beta) * tl.abs(psi), 0.0)  # masked β: 0, even for an Inf Ψ
    return bound


@triton.jit
def basis_to_atom(coeff_ptrs, coeff_mask, bases_ptr, stride_coeff_l, stride_bases_l, L,
                  M_PAD: tl.constexpr, BLOCK_P: tl.constexpr):
    """Stage 1 for one tap: atoms [M_PAD, BLOCK_P] fp32, A[m, p] = Σ_l β[m*L + l, p] · Ψ[l].

    coeff_ptrs [M_PAD, BLOCK_P] point at β[n, m*L, oh, ow]; bases_ptr at Ψ[0, i, j].
    Atoms m >= M come out zero (masked β) unless Ψ holds an Inf: callers mask what they sum.
    """
    atoms = tl.zeros([M_PAD, BLOCK_P], dtype=tl.float32)
    for l in range(L):
        beta = tl.load(coeff_ptrs + offset(l, stride_coeff_l), mask=coeff_mask, other=0.0).to(tl.float32)
        psi = tl.load(bases_ptr + offset(l, stride_bases_l)).to(tl.float32)
        atoms += beta * psi
    return atoms


@triton.jit
def load_taps(x_ptrs, chan_mask, pix_mask, ih, iw, H, W, stride_x_h, stride_x_w):
    """One tap of a channel chunk: x[n, c, ih, iw] as [BLOCK_C, BLOCK_P] fp32, zero where
    (ih, iw) [BLOCK_P] (int64) falls outside the image (the padding). x_ptrs [BLOCK_C, BLOCK_P]
    point at x[n, c, 0, 0]."""
    tap_ok = pix_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return tl.load(x_ptrs + (ih * stride_x_h + iw * stride_x_w)[None, :],
                   mask=chan_mask[:, None] & tap_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def atom_times_features(x_ptrs, chan_mask, ih0, iw0, pix_mask, H, W, KH, KW, DH, DW,
                        stride_x_h, stride_x_w, coeff_ptrs, coeff_mask, atom_scale, bases_ptr, stride_coeff_l,
                        stride_bases_l, stride_bases_h, stride_bases_w, L,
                        M_PAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Stage 2 for one channel chunk: Z [M_PAD, BLOCK_C, BLOCK_P] fp32,
    Z[m, c, p] = Σ_taps atom_scale[p] · A[m, p, tap] · x_tap[c, p], every tap summed before stage 3.

    x_ptrs [BLOCK_C, BLOCK_P] point at x[n, c, 0, 0]; ih0, iw0 [BLOCK_P] int64 are the input
    coordinates of tap (0, 0); taps outside the image read as zero (the padding). atom_scale
    [BLOCK_P] is a power of two (see `pow2_scale`), or 1.
    """
    z = tl.zeros([M_PAD, BLOCK_C, BLOCK_P], dtype=tl.float32)
    for i in range(KH):
        for j in range(KW):
            taps = load_taps(x_ptrs, chan_mask, pix_mask, ih0 + i * DH, iw0 + j * DW, H, W, stride_x_h, stride_x_w)
            atoms = basis_to_atom(coeff_ptrs, coeff_mask,
                                  bases_ptr + offset(i, stride_bases_h) + offset(j, stride_bases_w),
                                  stride_coeff_l, stride_bases_l, L, M_PAD, BLOCK_P)
            z += (atoms * atom_scale[None, :])[:, None, :] * taps[None, :, :]
    return z


@triton.jit
def coefficient_sum(acc, z, z_ok, w_ptrs, w_mask, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """Stage 3 for one chunk: acc [BLOCK_O, BLOCK_P] fp32 += α [BLOCK_O, BLOCK_K] @ Z [BLOCK_K, BLOCK_P],
    z [M_PAD, BLOCK_C, BLOCK_P] as [BLOCK_K, BLOCK_P] (row m*BLOCK_C + c), w_ptrs [BLOCK_O, BLOCK_K]
    pointing at a packed α chunk (column k = m*BLOCK_C + c; w_mask says which rows are real).

    Z rows that are padding (z_ok [M_PAD, BLOCK_C, 1] false: atoms m >= M, channels past the
    group) are zeroed first: their zero α would still turn an Inf there into NaN (0 * Inf).
    """
    w = tl.load(w_ptrs, mask=w_mask, other=0.0)
    z = tl.reshape(tl.where(z_ok, z, 0.0), [BLOCK_K, BLOCK_P])
    dtype: tl.constexpr = w_ptrs.dtype.element_ty
    return tl.dot(dot_operand(w, dtype, INTERPRETED), dot_operand(z, dtype, INTERPRETED), acc,
                  input_precision=DOT_PRECISION)
