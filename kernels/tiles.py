"""The on-chip pieces the forward and backward kernels share (all `@triton.jit`).

Tiles. A program owns BLOCK_P consecutive output pixels of the batch (`pixel_tile`), one
thread per pixel: per-pixel values are [BLOCK_P] vectors, per-pixel-and-channel values
[BLOCK_C, BLOCK_P] tiles whose BLOCK_C channels sit in the thread's registers, so the atoms of
a pixel are never replicated across threads and loads of x along a row are coalesced. The
launchers keep BLOCK_P = 32 * num_warps. KH, KW, L and M are compile-time constants: every tap,
basis and atom loop is unrolled, and the atoms and Z of a pixel are tuples of registers, M
or M*KH*KW of them, without padding M to a power of two.

Stages (docs/design.md §1): `pixel_atoms` (stage 1, once per tile), `atom_times_features` (stage 2 of
one channel chunk), `coefficient_sum` (stage 3 of one chunk, tensor-core dots).

Index arithmetic. A tile may span samples, so each column's offsets include its pixel's sample
(n * stride_n) and the tensor pointers stay at the tensors' start (scalars). Offsets are made
with `offset`, int32 unless the launcher found a tensor whose extent passes 2**31 elements (WIDE,
then int64: Triton computes products of int32 values in int32 and wraps silently).

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
def pixel_tile(tile, N, H_out, W_out, BLOCK_P: tl.constexpr, TAP_GROUPS: tl.constexpr, PIXEL_RUN: tl.constexpr):
    """Pixel tile `tile` of the batch's N * H_out * W_out output pixels, taken sample after
    sample, so a tile may span samples (no sample ends in a part-empty tile: small images fill
    whole tiles, and the grid has no ragged tile per sample) -> for the TAP_GROUPS * BLOCK_P
    columns of the tile (column q holds pixel q % BLOCK_P; TAP_GROUPS = 1: one column per pixel):
    n (int64, the pixel's sample), pix (its index in the sample's H_out * W_out grid), oh, ow and
    the mask of the pixels inside the batch. PIXEL_RUN (`launch.pixel_run`; 0 or 1: none)
    divides H_out * W_out: n and the mask are then constant, and pix contiguous, over runs of that
    many pixels, which Triton is told, so that it moves a run in one wide access."""
    pixels = H_out * W_out
    first = tl.cast(tile, tl.int64) * BLOCK_P  # (past 2**31 in a large batch)
    first_n = first // pixels
    first_pix = (first - first_n * pixels).to(tl.int32)
    if PIXEL_RUN > 1:
        first_pix = tl.multiple_of(first_pix, PIXEL_RUN)
    if TAP_GROUPS == 1:
        lane = tl.arange(0, BLOCK_P)
    else:
        lane = tl.arange(0, TAP_GROUPS * BLOCK_P) % BLOCK_P
    # Samples past the tile's first: a small int32 division (first_pix + lane < pixels + BLOCK_P).
    later = (first_pix + lane) // pixels
    if PIXEL_RUN > 1:
        later = tl.max_constancy(later, PIXEL_RUN)
    pix = first_pix + lane - later * pixels
    if PIXEL_RUN > 1:
        pix = tl.max_contiguous(tl.multiple_of(pix, PIXEL_RUN), PIXEL_RUN)
    n = first_n + later
    return n, pix, pix // W_out, pix % W_out, n < N


@triton.jit
def pixel_offset(pix, oh, ow, stride_h, stride_w, FLAT: tl.constexpr, WIDE: tl.constexpr):
    """The offset of pixel (oh, ow) = pix in a tensor of one sample and channel. FLAT: the
    tensor's pixels are one run (stride_h = W * stride_w), so the offset is pix * stride_w, and
    Triton sees neighbouring pixels contiguous when stride_w is 1: it then loads and stores
    them with wide accesses (a [channels, pixels] tile of a 2-D offset takes one per element)."""
    if FLAT:
        return offset(pix, stride_w, WIDE)
    return offset(oh, stride_h, WIDE) + offset(ow, stride_w, WIDE)


@triton.jit
def column_tap(k: tl.constexpr, TAPS: tl.constexpr, TAP_GROUPS: tl.constexpr, BLOCK_P: tl.constexpr):
    """(t, exists): the tap index i*KW + j of the k-th tap of each column and whether that tap
    exists. Column q works on taps group*TAPS_PER_GROUP + k, group = q // BLOCK_P; with one
    group, t = k is a compile-time constant and always exists."""
    if TAP_GROUPS == 1:
        t = k
        exists = True
    else:
        t = (tl.arange(0, TAP_GROUPS * BLOCK_P) // BLOCK_P) * ((TAPS + TAP_GROUPS - 1) // TAP_GROUPS) + k
        exists = t < TAPS
    return t, exists


@triton.jit
def pixel_sum(values, TAP_GROUPS: tl.constexpr, BLOCK_P: tl.constexpr):
    """[TAP_GROUPS * BLOCK_P] per column -> [BLOCK_P] per pixel: the sum over a pixel's columns."""
    if TAP_GROUPS == 1:
        return values
    return tl.sum(tl.reshape(values, [TAP_GROUPS, BLOCK_P]), axis=0)


@triton.jit
def pixel_sums(rows, COUNT: tl.constexpr, TAP_GROUPS: tl.constexpr, BLOCK_P: tl.constexpr):
    """`pixel_sum` of each of a tuple of COUNT rows [TAP_GROUPS * BLOCK_P] per column, as a tuple of
    COUNT rows [BLOCK_P] per pixel, in one reduction: the rows stacked in a tile (zero rows up to
    a power of two) cross shared memory together, behind one barrier, not one each."""
    if TAP_GROUPS == 1:
        return rows
    WIDTH: tl.constexpr = 1 << (COUNT - 1).bit_length()
    tile = columns_tile(rows + (tl.zeros_like(rows[0]),) * (WIDTH - COUNT), WIDTH, TAP_GROUPS * BLOCK_P)
    sums = tl.sum(tl.reshape(tile, [TAP_GROUPS, BLOCK_P, WIDTH]), axis=0)  # [BLOCK_P, WIDTH]
    return tile_rows(tl.permute(sums, (1, 0)), WIDTH, BLOCK_P)[:COUNT]


@triton.jit
def to_columns(values, TAP_GROUPS: tl.constexpr, BLOCK_P: tl.constexpr):
    """[BLOCK_P] per pixel -> [TAP_GROUPS * BLOCK_P] per column (each pixel's value in its columns)."""
    if TAP_GROUPS == 1:
        return values
    return tl.reshape(tl.broadcast_to(values[None, :], [TAP_GROUPS, BLOCK_P]), [TAP_GROUPS * BLOCK_P])


@triton.jit
def rows_to_columns(tile, TAP_GROUPS: tl.constexpr, BLOCK_P: tl.constexpr, WIDTH: tl.constexpr):
    """[BLOCK_P, WIDTH], a row per pixel -> [TAP_GROUPS * BLOCK_P, WIDTH], a row per column (each
    pixel's row in its columns)."""
    if TAP_GROUPS == 1:
        return tile
    return tl.reshape(tl.broadcast_to(tile[None, :, :], [TAP_GROUPS, BLOCK_P, WIDTH]), [TAP_GROUPS * BLOCK_P, WIDTH])


@triton.jit
def tap_geometry(oh, ow, pix_mask, H, W, SH, SW, PH, PW, DH, DW, stride_x_h, stride_x_w, KH: tl.constexpr,
                 KW: tl.constexpr, TAP_GROUPS: tl.constexpr, BLOCK_P: tl.constexpr, WIDE: tl.constexpr):
    """(row_offsets, column_offsets, masks): for each of a column's taps (`column_tap`), the
    offset of its input pixel from the corner of the pixel's window, x[n, c, oh*SH - PH, ow*SW -
    PW], as a row part plus a column part, and whether that pixel is inside the image (false for
    padding, for pixels past the end and for taps that do not exist). With one tap group the
    parts are scalars (constants where DH, DW and the strides are 1), and a row pointer is
    shared by the row's taps; with more, the offset is all in the row part (per column)."""
    TAPS: tl.constexpr = KH * KW
    row_offsets = ()
    column_offsets = ()
    masks = ()
    for k in tl.static_range((TAPS + TAP_GROUPS - 1) // TAP_GROUPS):
        t, exists = column_tap(k, TAPS, TAP_GROUPS, BLOCK_P)
        ih = oh * SH - PH + (t // KW) * DH
        iw = ow * SW - PW + (t % KW) * DW
        inside = pix_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        if TAP_GROUPS == 1:
            row_offsets = row_offsets + (offset((t // KW) * DH, stride_x_h, WIDE),)
            column_offsets = column_offsets + (offset((t % KW) * DW, stride_x_w, WIDE),)
        else:
            row_offsets = row_offsets + (offset((t // KW) * DH, stride_x_h, WIDE)
                                         + offset((t % KW) * DW, stride_x_w, WIDE),)
            column_offsets = column_offsets + (0,)
            inside = inside & exists
        masks = masks + (inside,)
    return row_offsets, column_offsets, masks


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
def column_blocks(t, COUNT: tl.constexpr, ROWS: tl.constexpr, WIDTH: tl.constexpr):
    """t [ROWS, COUNT * WIDTH] (COUNT a power of two) as the tuple of its COUNT blocks of WIDTH
    columns [ROWS, WIDTH], in order, by halving."""
    blocks = (t,)
    for level in tl.static_range(COUNT.bit_length() - 1):
        halves = ()
        for b in tl.static_range(len(blocks)):
            low, high = tl.split(tl.permute(tl.reshape(blocks[b], [ROWS, 2, COUNT * WIDTH // (2 * len(blocks))]),
                                            (0, 2, 1)))
            halves = halves + (low, high)
        blocks = halves
    return blocks


@triton.jit
def joined_columns(blocks, COUNT: tl.constexpr, ROWS: tl.constexpr, WIDTH: tl.constexpr):
    """The inverse of `column_blocks`: COUNT tiles [ROWS, WIDTH] side by side, [ROWS, COUNT * WIDTH]."""
    for level in tl.static_range(COUNT.bit_length() - 1):
        pairs = ()
        for b in tl.static_range(len(blocks) // 2):
            pairs = pairs + (tl.reshape(tl.permute(tl.join(blocks[2 * b], blocks[2 * b + 1]), (0, 2, 1)),
                                        [ROWS, WIDTH << (level + 1)]),)
        blocks = pairs
    return blocks[0]


@triton.jit
def add_at(values, i: tl.constexpr, term):
    """The tuple `values` with values[i] += term."""
    return values[:i] + (values[i] + term,) + values[i + 1:]


@triton.jit
def fma_at(values, i: tl.constexpr, a, b):
    """The tuple `values` with values[i] = a * b + values[i], rounded once (`tl.fma`)."""
    return values[:i] + (tl.fma(a, b, values[i]),) + values[i + 1:]


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
def basis_at_tap(bases_ptr, l, t, exists, stride_bases_l, stride_bases_h, stride_bases_w, KW: tl.constexpr,
                 TAP_GROUPS: tl.constexpr):
    """Ψ[l, t] fp32 for each column's tap t (`column_tap`: a scalar with one tap group, else a
    vector, 0 where the tap does not exist)."""
    psi_ptr = bases_ptr + l * stride_bases_l + (t // KW) * stride_bases_h + (t % KW) * stride_bases_w
    if TAP_GROUPS == 1:
        return tl.load(psi_ptr).to(tl.float32)
    return tl.load(psi_ptr, mask=exists, other=0.0).to(tl.float32)


@triton.jit
def basis_row(row_ptr, stride_bases_w, mask, KW: tl.constexpr, COLUMNS: tl.constexpr):
    """A row of Ψ (row_ptr at Ψ[l, i, 0], from `launch.row_padded_bases`, KW > 1) for each of
    COLUMNS columns: the tuple of its values [COLUMNS] fp32, KW rounded up to a power of two of
    them (those past KW are padding), 0 where mask [COLUMNS] is false (None: no mask). Every
    thread reads the whole row in one vector load (the same line for all), not KW narrow ones."""
    ROW: tl.constexpr = 1 << (KW - 1).bit_length()
    ptrs = row_ptr + (tl.arange(0, ROW) * stride_bases_w)[None, :] + tl.zeros([COLUMNS, 1], tl.int32)
    if mask is None:
        row = tl.load(ptrs)
    else:
        row = tl.load(ptrs, mask=mask[:, None], other=0.0)
    return tile_rows(tl.permute(row.to(tl.float32), (1, 0)), ROW, COLUMNS)


@triton.jit
def basis_coefficients(coeff_ptr, coeff_pix, mask, l, stride_coeff_c, M: tl.constexpr, L: tl.constexpr,
                       WIDE: tl.constexpr):
    """The tuple of the M coefficients β[m*L + l] fp32 of basis l at each column's pixel
    (coeff_ptr at the sample's β, coeff_pix the column's pixel in it), 0 where mask is false."""
    betas = ()
    for m in tl.static_range(M):
        betas = betas + (tl.load(coeff_ptr + offset(m * L + l, stride_coeff_c, WIDE) + coeff_pix, mask=mask,
                                 other=0.0).to(tl.float32),)
    return betas


@triton.jit
def pixel_atoms(coeff_ptr, coeff_pix, coeff_mask, stride_coeff_c, bases_ptr, stride_bases_l, stride_bases_h,
                stride_bases_w, M: tl.constexpr, L: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                TAP_GROUPS: tl.constexpr, BLOCK_P: tl.constexpr, ROWS_OF_PSI: tl.constexpr,
                WIDE: tl.constexpr):
    """Stage 1 for a tile: the tuple of TAPS_PER_GROUP * M atoms [TAP_GROUPS * BLOCK_P] fp32 of
    each column's taps, entry k*M + m = A[m, t, p] = Σ_l β[m*L + l, p] · Ψ[l, t] with t the
    column's k-th tap (`column_tap`). coeff_ptr points at the sample's β, coeff_pix at each
    column's pixel within it; columns where coeff_mask is false, and taps that do not exist, get
    zero atoms. ROWS_OF_PSI (the launcher's choice, with one tap group and KW > 1 only): each row of
    Ψ is read in one vector load of KW rounded up to a power of two (`basis_row`; Ψ must be
    `launch.row_padded_bases`), else a value at a time (Ψ with any strides)."""
    tl.static_assert(not ROWS_OF_PSI or (TAP_GROUPS == 1 and KW > 1), "rows of Ψ: one tap group, KW > 1")
    TAPS: tl.constexpr = KH * KW
    PER_GROUP: tl.constexpr = (TAPS + TAP_GROUPS - 1) // TAP_GROUPS
    COLUMNS: tl.constexpr = TAP_GROUPS * BLOCK_P
    atoms = (tl.zeros([COLUMNS], tl.float32),) * (PER_GROUP * M)
    # Bases outermost: each β and Ψ value is used as soon as it is loaded (Ψ[l, t] by every atom),
    # so only the atoms stay live, not all L*KH*KW of Ψ (the register pressure of a large kernel).
    # Ψ per column, masked like β (0 * an Inf Ψ would be NaN there): a kernel that loops over
    # pixel tiles cannot hoist (and hold in registers) all L*KH*KW of it.
    for l in tl.static_range(L):
        betas = basis_coefficients(coeff_ptr, coeff_pix, coeff_mask, l, stride_coeff_c, M, L, WIDE)
        if ROWS_OF_PSI:
            for i in tl.static_range(KH):
                psi_row = basis_row(bases_ptr + l * stride_bases_l + i * stride_bases_h, stride_bases_w, coeff_mask,
                                    KW, COLUMNS)
                for j in tl.static_range(KW):
                    for m in tl.static_range(M):
                        atoms = add_at(atoms, (i * KW + j) * M + m, betas[m] * psi_row[j])
        else:
            for k in tl.static_range(PER_GROUP):
                t, exists = column_tap(k, TAPS, TAP_GROUPS, BLOCK_P)
                psi_ptrs = bases_ptr + l * stride_bases_l + (t // KW) * stride_bases_h + (t % KW) * stride_bases_w
                psi_mask = coeff_mask
                if TAP_GROUPS > 1:
                    psi_mask = psi_mask & exists
                psi = tl.load(psi_ptrs + tl.zeros([COLUMNS], tl.int32), mask=psi_mask, other=0.0).to(tl.float32)
                for m in tl.static_range(M):
                    atoms = add_at(atoms, k * M + m, betas[m] * psi)
    # A tap that does not exist has no atom (its β times a zero Ψ would be NaN for an Inf β).
    return existing_taps_only(atoms, M, TAPS, TAP_GROUPS, BLOCK_P)


@triton.jit
def existing_taps_only(values, M: tl.constexpr, TAPS: tl.constexpr, TAP_GROUPS: tl.constexpr,
                       BLOCK_P: tl.constexpr):
    """A tuple of per-column values of each column's taps (entry k*M + m for its k-th tap,
    `column_tap`, as `pixel_atoms` makes them) with zeros for the taps that do not exist."""
    if TAP_GROUPS == 1:
        return values
    zeroed = ()
    for k in tl.static_range((TAPS + TAP_GROUPS - 1) // TAP_GROUPS):
        t, exists = column_tap(k, TAPS, TAP_GROUPS, BLOCK_P)
        for m in tl.static_range(M):
            zeroed = zeroed + (tl.where(exists, values[k * M + m], 0.0),)
    return zeroed


@triton.jit
def atom_l1_bound(atoms, M: tl.constexpr, PER_GROUP: tl.constexpr, TAP_GROUPS: tl.constexpr, BLOCK_P: tl.constexpr):
    """[BLOCK_P] fp32: the largest L1 norm (over all its taps) of a pixel's atoms, from the
    columns' atoms (`pixel_atoms`)."""
    bound = tl.zeros([BLOCK_P], tl.float32)
    for m in tl.static_range(M):
        norm = tl.zeros([TAP_GROUPS * BLOCK_P], tl.float32)
        for k in tl.static_range(PER_GROUP):
            norm += tl.abs(atoms[k * M + m])
        bound = tl.maximum(bound, pixel_sum(norm, TAP_GROUPS, BLOCK_P))
    return bound


@triton.jit
def atom_l1_bound_by_bases(coeff_ptr, coeff_pix, mask, stride_coeff_c, bases_ptr, stride_bases_l, stride_bases_h,
                           stride_bases_w, M: tl.constexpr, L: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                           WIDE: tl.constexpr):
    """[BLOCK_P] fp32, at least the largest L1 norm of a pixel's atoms without making them: by the
    triangle inequality, ||A_m||_1 <= Σ_l |β[m*L + l]| · ||Ψ_l||_1 (β as `basis_coefficients`
    loads it, 0 where mask is false)."""
    TAPS: tl.constexpr = KH * KW
    tap = tl.arange(0, 1 << (TAPS - 1).bit_length())
    bounds = ()
    for l in tl.static_range(L):
        psi = tl.load(bases_ptr + l * stride_bases_l + (tap // KW) * stride_bases_h + (tap % KW) * stride_bases_w,
                      mask=tap < TAPS, other=0.0).to(tl.float32)
        norm = tl.sum(tl.abs(psi), axis=0)
        betas = basis_coefficients(coeff_ptr, coeff_pix, mask, l, stride_coeff_c, M, L, WIDE)
        if l == 0:
            for m in tl.static_range(M):
                bounds = bounds + (tl.abs(betas[m]) * norm,)
        else:
            for m in tl.static_range(M):
                bounds = add_at(bounds, m, tl.abs(betas[m]) * norm)
    bound = bounds[0]
    for m in tl.static_range(1, M):
        bound = tl.maximum(bound, bounds[m])
    return bound


@triton.jit
def scaled_atoms(atoms, scale, COUNT: tl.constexpr):
    """Every atom multiplied by scale ([TAP_GROUPS * BLOCK_P] or a scalar)."""
    scaled = ()
    for k in tl.static_range(COUNT):
        scaled = scaled + (atoms[k] * scale,)
    return scaled


@triton.jit
def half_atoms(atoms, COUNT: tl.constexpr):
    """Every atom rounded to float16, for stage 2 to sum in float16 (`atom_times_features`)."""
    rounded = ()
    for k in tl.static_range(COUNT):
        rounded = rounded + (atoms[k].to(tl.float16),)
    return rounded


@triton.jit
def scaled_to_unit_l1(atoms, M: tl.constexpr, PER_GROUP: tl.constexpr, TAP_GROUPS: tl.constexpr,
                      BLOCK_P: tl.constexpr):
    """(atoms, inverse): the atoms of each pixel multiplied by the power of two s[p] that keeps
    the L1 norm of every atom of that pixel below 1, and 1 / s [BLOCK_P] (see the module doc)."""
    scale, inverse = pow2_scale(atom_l1_bound(atoms, M, PER_GROUP, TAP_GROUPS, BLOCK_P))
    return scaled_atoms(atoms, to_columns(scale, TAP_GROUPS, BLOCK_P), PER_GROUP * M), inverse


@triton.jit
def atom_times_features(x_ptrs, stride_x_c, channels_left, taps, atoms, M: tl.constexpr, PER_GROUP: tl.constexpr,
                        EVEN_C: tl.constexpr, BLOCK_C: tl.constexpr, COLUMNS: tl.constexpr, WIDE: tl.constexpr):
    """Stage 2 for one channel chunk: the tuple of M * BLOCK_C rows [COLUMNS] of Z, entry
    m * BLOCK_C + c: Z[m][c, q] = Σ_k A[m, t_k, q] · x[c, tap t_k of q] over the column's taps, x
    zero outside the image (the padding) and for channels c >= channels_left (unless EVEN_C: none
    are). x_ptrs [COLUMNS] point at x[n, the chunk's first channel, oh*SH - PH, ow*SW - PW] (the
    corner of each pixel's window); taps as `tap_geometry`, atoms as `pixel_atoms` make them.

    Z has the atoms' dtype: fp32, or float16 for float16 atoms (`half_atoms`), whose products with
    x are summed in float16, one rounding each (`tl.fma`, two per HFMA2 instruction; x as loaded).

    Each channel is loaded and summed as a row [COLUMNS] of its own, and a caller stacks rows
    into the tile its dot reads (`rows_tile`, `columns_tile`): a column's channels then stay in
    its thread with any Triton (a 2-D load lets Triton 3.6 spread a pixel's channels over
    threads, and move every atom)."""
    row_offsets, column_offsets, masks = taps
    HALF: tl.constexpr = atoms[0].dtype == tl.float16  # (`half_atoms`)
    z_rows = (tl.zeros([COLUMNS], atoms[0].dtype),) * (M * BLOCK_C)  # entry m*BLOCK_C + c: Z[m][c, :]
    for c in tl.static_range(BLOCK_C):
        x_chan = x_ptrs + offset(c, stride_x_c, WIDE)
        for k in tl.static_range(PER_GROUP):
            tap_mask = masks[k]
            if not EVEN_C:
                # (compared as a vector: the interpreter's bool scalar & vector is int32)
                tap_mask = tap_mask & (tl.full([COLUMNS], c, tl.int32) < channels_left)
            x_tap = tl.load(x_chan + row_offsets[k] + column_offsets[k], mask=tap_mask, other=0.0)
            if HALF:
                for m in tl.static_range(M):
                    z_rows = fma_at(z_rows, m * BLOCK_C + c, atoms[k * M + m], x_tap)
            else:
                x_tap = x_tap.to(tl.float32)
                for m in tl.static_range(M):
                    z_rows = add_at(z_rows, m * BLOCK_C + c, atoms[k * M + m] * x_tap)
    return z_rows


@triton.jit
def rows_tile(rows, ROWS: tl.constexpr, COLS: tl.constexpr):
    """The inverse of `tile_rows`: a tuple of ROWS rows [COLS] (ROWS a power of two) as one tile
    [ROWS, COLS] whose rows stay in the threads that hold them (`columns_tile`, transposed)."""
    return tl.permute(columns_tile(rows, ROWS, COLS), (1, 0))


@triton.jit
def columns_tile(rows, ROWS: tl.constexpr, COLS: tl.constexpr):
    """A tuple of ROWS rows [COLS] (ROWS a power of two) as the tile [COLS, ROWS] of their
    columns, by joining halves: rows i and i + n/2 of n, so that the joined axes, read in order,
    spell each row's index (and a thread's registers hold its columns' rows in order)."""
    items = rows
    for level in tl.static_range(ROWS.bit_length() - 1):
        joined = ()
        for i in tl.static_range(ROWS >> (level + 1)):
            joined = joined + (tl.join(items[i], items[i + (ROWS >> (level + 1))]),)
        items = joined
    return tl.reshape(items[0], [COLS, ROWS])


@triton.jit
def stacked_by_group(z, TAP_GROUPS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Z [BLOCK_C, TAP_GROUPS * BLOCK_P] (a column per pixel and tap group) -> [TAP_GROUPS *
    BLOCK_C, BLOCK_P]: the groups' partial sums of a pixel stacked along the dot's reduction, row
    r*BLOCK_C + c = Z[c, r*BLOCK_P + p], so a dot with α repeated per group sums them."""
    if TAP_GROUPS == 1:
        return z
    return tl.reshape(tl.permute(tl.reshape(z, [BLOCK_C, TAP_GROUPS, BLOCK_P]), (1, 0, 2)),
                      [TAP_GROUPS * BLOCK_C, BLOCK_P])


@triton.jit
def packed_weight_tile(w_ptr, tile, tiles, M: tl.constexpr, ATOMS_PER_DOT: tl.constexpr, BLOCK_O: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    """(w_ptr, w_chunk) in α packed as `forward.pack_weight` packs it: where the program of tile
    `tile` (one of `tiles` per chunk, its group times its output-channel tile) finds its block
    [M_DOT, BLOCK_O, BLOCK_C] of the first chunk, and how many elements on the next chunk's is."""
    M_DOT: tl.constexpr = (M + ATOMS_PER_DOT - 1) // ATOMS_PER_DOT * ATOMS_PER_DOT
    BLOCK: tl.constexpr = M_DOT * BLOCK_O * BLOCK_C
    return w_ptr + tile * BLOCK, tiles * BLOCK


@triton.jit
def coefficient_sum(acc, z, w_ptr, chan_mask, M: tl.constexpr, EVEN_C: tl.constexpr,
                    ATOMS_PER_DOT: tl.constexpr, TAP_GROUPS: tl.constexpr, BLOCK_C: tl.constexpr,
                    BLOCK_P: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """Stage 3 for one chunk: acc [BLOCK_O, BLOCK_P] fp32 += Σ_m α_m [BLOCK_O, BLOCK_C] @ Z[m]
    summed over the tap groups, on tensor cores: one dot per atom of α_m repeated per group and
    the stacked Z (`stacked_by_group`), z the rows of Z (`atom_times_features`). w_ptr points at
    the chunk's α of the tile, [M_DOT, BLOCK_O, BLOCK_C] contiguous (`forward.pack_weight`, zero
    in padding rows, so the loads need no mask). A 16-bit dot reduces over at
    least 16: when TAP_GROUPS * BLOCK_C is fewer, a dot takes ATOMS_PER_DOT = 2 atoms at once (zero
    rows stand in for the partner of the last of an odd M; its packed α columns are zero).

    Z rows of channels past the group (chan_mask false; only in a ragged last chunk, not EVEN_C)
    are zeroed first: their zero α would turn an Inf there (an Inf atom times 0) into NaN.
    """
    dtype: tl.constexpr = w_ptr.dtype.element_ty
    BLOCK_O: tl.constexpr = acc.shape[0]
    PER_DOT: tl.constexpr = ATOMS_PER_DOT
    ROWS: tl.constexpr = TAP_GROUPS * BLOCK_C
    w_rows = tl.arange(0, BLOCK_O) * BLOCK_C
    columns = tl.arange(0, PER_DOT * ROWS)  # of α: atom columns // ROWS, channel columns % BLOCK_C
    for k in tl.static_range(0, M, PER_DOT):
        if PER_DOT == 1:
            operand = stacked_by_group(rows_tile(z[k * BLOCK_C:(k + 1) * BLOCK_C], BLOCK_C, TAP_GROUPS * BLOCK_P),
                                       TAP_GROUPS, BLOCK_C, BLOCK_P)
        else:  # (TAP_GROUPS is 1: `configs.fit_tile_config` pairs atoms only then)
            rows = z[k * BLOCK_C:(k + 2) * BLOCK_C]
            if k + 1 == M:
                rows = rows + (tl.zeros([BLOCK_P], z[0].dtype),) * BLOCK_C
            operand = rows_tile(rows, 2 * BLOCK_C, BLOCK_P)
        if operand.dtype == dtype and dtype.primitive_bitwidth == 16 and not INTERPRETED:
            # An identity Triton cannot see through (a PTX move of each 16-bit pair, which ptxas
            # drops): Triton (3.6 and 3.9) otherwise folds the transpose of a 16-bit tile of registers
            # into the dot's shared-memory operand and aborts ("Illegal shared layout"). The `+ 0.0`
            # that did this before cost 8 HADD2 a dot and held more registers (3x3 forward, sm_90,
            # Triton 3.9: 201 -> 163).
            operand = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [operand], dtype=operand.dtype,
                                                is_pure=True, pack=2)
        if not EVEN_C:
            rows_ok = tl.reshape(tl.broadcast_to(chan_mask[None, :], [PER_DOT * TAP_GROUPS, BLOCK_C]), [PER_DOT * ROWS])
            operand = tl.where(rows_ok[:, None], operand, 0.0)
        w_columns = (k + columns // ROWS) * (BLOCK_O * BLOCK_C) + columns % BLOCK_C
        w = tl.load(w_ptr + w_rows[:, None] + w_columns[None, :])
        acc = tl.dot(dot_operand(w, dtype, INTERPRETED), dot_operand(operand, dtype, INTERPRETED), acc,
                     input_precision=DOT_PRECISION)
    return acc
