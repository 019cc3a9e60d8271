"""The on-chip pieces the forward and backward kernels share (all `@triton.jit`).

Tiles. A program owns BLOCK_P consecutive output pixels of one sample (`pixel_tile`), one
thread per pixel: per-pixel values are [BLOCK_P] vectors, per-pixel-and-channel values
[BLOCK_C, BLOCK_P] tiles whose BLOCK_C channels sit in the thread's registers, so the atoms of
a pixel are never replicated across threads and loads of x along a row are coalesced. The
launchers keep BLOCK_P = 32 * num_warps. KH, KW, L and M are compile-time constants: every tap,
basis and atom loop is unrolled, and the atoms and Z of a pixel are tuples of registers, M
or M*KH*KW of them, without padding M to a power of two.

Stages (SPEC §1): `pixel_atoms` (stage 1, once per tile), `atom_times_features` (stage 2 of
one channel chunk), `coefficient_sum` (stage 3 of one chunk, tensor-core dots).

Index arithmetic. Each program first moves its tensor pointers to its sample (int64: batch *
stride overflows int32 on large tensors); offsets inside a sample are made with `offset`,
int32 unless the launcher found a tensor whose sample extent passes 2**31 elements (WIDE, then
int64: Triton computes products of int32 values in int32 and wraps silently).

Numerics of the tensor-core dots. A 16-bit problem rounds Z (and the backward's U, the
atom-weighted sum of dy) to the input dtype for its dot. In float16 that overflows where the
result does not: atoms of size 5e5 make |Z| = 5e6 while α = 1e-4 brings y back to 1e3. So the
atoms of a pixel are first multiplied by a power of two `pow2_scale(bound)` with bound >= the
L1 norm of the pixel's atoms: then |scaled Z| <= max |x| < 65504 (x is float16 itself), and the
accumulator is multiplied back by the inverse power of two at the end. Powers of two are exact,
so nothing changes but the range. `dot_operand` rounds a tile to the dtype the dot reads and,
under the interpreter, widens it back to fp32 for the interpreter's dot: CPU tests then see the
same rounding, and the same overflows, as a GPU.
"""

import triton
import triton.language as tl


@triton.jit
def offset(index, stride, WIDE: tl.constexpr):
    """index * stride: int64 when WIDE, else int32 (the launcher checks that it fits)."""
    if WIDE:
        return tl.cast(index, tl.int64) * stride
    return index * stride


@triton.jit
def pixel_tile(pid_p, H_out, W_out, BLOCK_P: tl.constexpr):
    """Program id over (sample, pixel tile) -> n (int64 scalar), oh, ow [BLOCK_P] and the mask of
    the pixels inside the sample's H_out * W_out grid."""
    tiles = tl.cdiv(H_out * W_out, BLOCK_P)
    n, tile = pid_p // tiles, pid_p % tiles
    pix = tile * BLOCK_P + tl.arange(0, BLOCK_P)
    return n.to(tl.int64), pix // W_out, pix % W_out, pix < H_out * W_out


@triton.jit
def tile_rows(t, ROWS: tl.constexpr, COLS: tl.constexpr):
    """t [ROWS, COLS] (ROWS a power of two, its rows in one thread) as the tuple of its ROWS rows
    [COLS], by halving: a sum over the rows is then a chain of multiply-adds, where `tl.sum`
    over a tile's rows costs a multiply and an add per row."""
    rows = (tl.permute(t, (1, 0)),)
    for level in tl.static_range(ROWS.bit_length()):
        if len(rows) < ROWS:
            halves = ()
            for r in tl.static_range(len(rows)):
                if 2 * len(rows) == ROWS:
                    low, high = tl.split(rows[r])
                else:
                    low, high = tl.split(tl.permute(tl.reshape(rows[r], [COLS, 2, ROWS // len(rows) // 2]), (0, 2, 1)))
                halves = halves + (low, high)
            rows = halves
    return rows


@triton.jit
def add_at(values, i: tl.constexpr, term):
    """The tuple `values` with values[i] += term."""
    return values[:i] + (values[i] + term,) + values[i + 1:]


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
def pixel_atoms(coeff_ptr, coeff_pix, coeff_mask, stride_coeff_c, bases_ptr, stride_bases_l, stride_bases_h,
                stride_bases_w, M: tl.constexpr, L: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                BLOCK_P: tl.constexpr, WIDE: tl.constexpr):
    """Stage 1 for a tile of pixels: the tuple of M*KH*KW atoms [BLOCK_P] fp32, entry
    (i*KW + j)*M + m = A[m, i, j, p] = Σ_l β[m*L + l, p] · Ψ[l, i, j]. coeff_ptr points at the
    sample's β, coeff_pix [BLOCK_P] at each pixel within it; pixels where coeff_mask is false get
    zero atoms."""
    atoms = (tl.zeros([BLOCK_P], tl.float32),) * (KH * KW * M)
    for m in tl.static_range(M):
        for l in tl.static_range(L):
            beta = tl.load(coeff_ptr + offset(m * L + l, stride_coeff_c, WIDE) + coeff_pix, mask=coeff_mask,
                           other=0.0).to(tl.float32)
            for t in tl.static_range(KH * KW):
                psi = tl.load(bases_ptr + l * stride_bases_l + (t // KW) * stride_bases_h
                              + (t % KW) * stride_bases_w).to(tl.float32)
                atoms = add_at(atoms, t * M + m, beta * psi)
    return atoms


@triton.jit
def atom_l1_bound(atoms, M: tl.constexpr, TAPS: tl.constexpr, BLOCK_P: tl.constexpr):
    """[BLOCK_P] fp32: the largest L1 norm (over the taps) of a pixel's atoms."""
    bound = tl.zeros([BLOCK_P], tl.float32)
    for m in tl.static_range(M):
        norm = tl.zeros([BLOCK_P], tl.float32)
        for t in tl.static_range(TAPS):
            norm += tl.abs(atoms[t * M + m])
        bound = tl.maximum(bound, norm)
    return bound


@triton.jit
def scaled_atoms(atoms, scale, TAPS_M: tl.constexpr):
    """Every atom multiplied by scale ([BLOCK_P] or a scalar)."""
    scaled = ()
    for k in tl.static_range(TAPS_M):
        scaled = scaled + (atoms[k] * scale,)
    return scaled


@triton.jit
def scaled_to_unit_l1(atoms, M: tl.constexpr, TAPS: tl.constexpr, BLOCK_P: tl.constexpr):
    """(atoms, inverse): the atoms of each pixel multiplied by the power of two s[p] that keeps
    the L1 norm of every atom of that pixel below 1, and 1 / s [BLOCK_P] (see the module doc)."""
    scale, inverse = pow2_scale(atom_l1_bound(atoms, M, TAPS, BLOCK_P))
    return scaled_atoms(atoms, scale, TAPS * M), inverse


@triton.jit
def atom_times_features(x_ptrs, chan_mask, oh, ow, pix_mask, H, W, SH, SW, PH, PW, DH, DW,
                        stride_x_h, stride_x_w, atoms, M: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                        BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, WIDE: tl.constexpr):
    """Stage 2 for one channel chunk: the tuple of M tiles Z[m] [BLOCK_C, BLOCK_P] fp32,
    Z[m][c, p] = Σ_(i,j) A[m, i, j, p] · x[c, oh*SH - PH + i*DH, ow*SW - PW + j*DW] with x zero
    outside the image (the padding). x_ptrs [BLOCK_C, BLOCK_P] point at x[n, c, oh*SH, ow*SW];
    atoms as `pixel_atoms` makes them."""
    z = (tl.zeros([BLOCK_C, BLOCK_P], tl.float32),) * M
    for i in tl.static_range(KH):
        ih = oh * SH - PH + i * DH
        row_ok = pix_mask & (ih >= 0) & (ih < H)
        x_row = x_ptrs + offset(i * DH - PH, stride_x_h, WIDE)
        for j in tl.static_range(KW):
            iw = ow * SW - PW + j * DW
            tap_ok = row_ok & (iw >= 0) & (iw < W)
            x_tap = tl.load(x_row + offset(j * DW - PW, stride_x_w, WIDE), mask=chan_mask[:, None] & tap_ok[None, :],
                            other=0.0).to(tl.float32)
            for m in tl.static_range(M):
                z = add_at(z, m, atoms[(i * KW + j) * M + m][None, :] * x_tap)
    return z


@triton.jit
def coefficient_sum(acc, z, w_ptr, w_rows, o_mask, chan_mask, M: tl.constexpr, EVEN_C: tl.constexpr,
                    ATOMS_PER_DOT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """Stage 3 for one chunk: acc [BLOCK_O, BLOCK_P] fp32 += Σ_m α_m [BLOCK_O, BLOCK_C] @ Z[m]
    [BLOCK_C, BLOCK_P], on tensor cores. w_ptr points at the chunk's block of the packed α
    (`forward.pack_weight`: atom m's BLOCK_C columns start m*BLOCK_C in), w_rows [BLOCK_O] are
    the offsets of the tile's rows (o_mask: rows inside the group). A 16-bit dot reduces over at
    least 16: with fewer channels a dot takes ATOMS_PER_DOT = 2 atoms at once (a zero tile stands
    in for the partner of the last of an odd M; its packed α columns are zero too).

    Z rows of channels past the group (chan_mask false; only in a ragged last chunk, not EVEN_C)
    are zeroed first: their zero α would turn an Inf there (an Inf atom times 0) into NaN.
    """
    dtype: tl.constexpr = w_ptr.dtype.element_ty
    PER_DOT: tl.constexpr = ATOMS_PER_DOT
    columns = tl.arange(0, PER_DOT * BLOCK_C)
    for k in tl.static_range(0, M, PER_DOT):
        if PER_DOT == 1:
            operand = z[k]
        else:
            partner = z[k + 1] if k + 1 < M else tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
            operand = tl.reshape(tl.permute(tl.join(z[k], partner), (2, 0, 1)), [2 * BLOCK_C, BLOCK_P])
        if not EVEN_C:
            rows_ok = tl.reshape(tl.broadcast_to(chan_mask[None, :], [PER_DOT, BLOCK_C]), [PER_DOT * BLOCK_C])
            operand = tl.where(rows_ok[:, None], operand, 0.0)
        w = tl.load(w_ptr + w_rows[:, None] + (k * BLOCK_C + columns)[None, :], mask=o_mask[:, None], other=0.0)
        acc = tl.dot(dot_operand(w, dtype, INTERPRETED), dot_operand(operand, dtype, INTERPRETED), acc,
                     input_precision=DOT_PRECISION)
    return acc
