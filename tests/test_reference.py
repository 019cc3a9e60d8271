"""The reference operator against oracles it did not write: F.conv2d with static atoms, a
per-pixel shift with one-hot atoms over identity bases, and gradcheck in float64."""

from __future__ import annotations

import functools
import itertools

import pytest
import torch
import torch.nn.functional as F

from atomconv import atom_conv2d
from atomconv import op
from atomconv.reference import atom_conv2d_reference, atom_conv2d_reference_backward, chunk_bytes, chunk_plan
from perf.measure import cpu_peak_bytes
from atomconv.validation import validate_atom_conv2d

from helpers import output_size, static_atom_problem

GEOMETRIES = [
    # kernel, stride, padding, dilation, groups, (H, W)
    *[(k, s, p, d, 1, (9, 8)) for k, s, p, d in itertools.product((1, 3, 5), (1, 2, 3), (0, 1, 3), (1, 2))
      if output_size((9, 8), k, s, p, d)[0] > 0 and output_size((9, 8), k, s, p, d)[1] > 0],
    (7, 1, 3, 1, 1, (11, 10)),
    (7, 2, 0, 1, 1, (13, 7)),
    ((3, 5), (1, 2), (2, 0), (2, 1), 1, (9, 11)),
    ((1, 3), 1, (0, 1), 1, 1, (5, 6)),
    (3, 1, 1, 1, 2, (7, 7)),
    (3, 2, 1, 1, 2, (9, 6)),
    (5, 1, 2, 2, 4, (10, 9)),  # depthwise: groups == C_in == 4
    (3, 3, 2, 2, 4, (8, 11)),
]


def _ids(geometry):
    k, s, p, d, g, hw = geometry
    return f"k{k}-s{s}-p{p}-d{d}-g{g}-{hw[0]}x{hw[1]}"


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=_ids)
def test_static_atoms_equal_conv2d(geometry):
    kernel, stride, padding, dilation, groups, hw = geometry
    x, coeff, bases, weight, bias, static_weight = static_atom_problem(2, 4, 8, hw, kernel, stride, padding, dilation, groups)
    y = atom_conv2d(x, coeff, bases, weight, bias, stride, padding, dilation, groups, backend="reference")
    expected = F.conv2d(x, static_weight, bias, stride, padding, dilation, groups)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed"])
def test_memory_layouts_of_x(layout):
    x, coeff, bases, weight, bias, static_weight = static_atom_problem(2, 6, 4, (9, 9), 3, 2, 1, 1, 2)
    if layout == "channels_last":
        x_in = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x_in = torch.stack([x, -x], dim=-1)[..., 0]  # every other element of a wider tensor
    else:
        x_in = x.transpose(2, 3).contiguous().transpose(2, 3)
    assert not x_in.is_contiguous()
    y = atom_conv2d(x_in, coeff, bases, weight, bias, 2, 1, 1, 2, backend="reference")
    torch.testing.assert_close(y, F.conv2d(x, static_weight, bias, 2, 1, 1, 2), rtol=1e-10, atol=1e-10)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_one_hot_atoms_on_identity_bases_shift_each_pixel():
    """A different tap at every pixel: y[n, o, h, w] = sum_c weight[o, c] * xp[n, c, tap(h, w)]."""
    g = torch.Generator().manual_seed(1)
    n, c_in, c_out, k, stride, padding, dilation = 2, 3, 5, 3, 2, 2, 2
    x = torch.randn(n, c_in, 9, 10, generator=g, dtype=torch.float64)
    h_out, w_out = output_size((9, 10), k, stride, padding, dilation)
    taps = torch.randint(0, k * k, (n, h_out, w_out), generator=g)
    coeff = F.one_hot(taps, k * k).permute(0, 3, 1, 2).to(torch.float64)  # M = 1, L = K*K
    bases = torch.eye(k * k, dtype=torch.float64).view(k * k, k, k)
    weight = torch.randn(c_out, c_in, 1, generator=g, dtype=torch.float64)
    y = atom_conv2d(x, coeff, bases, weight, None, stride, padding, dilation, backend="reference")

    xp = F.pad(x, (padding,) * 4)
    expected = torch.empty(n, c_out, h_out, w_out, dtype=torch.float64)
    for b, h, w in itertools.product(range(n), range(h_out), range(w_out)):
        i, j = divmod(int(taps[b, h, w]), k)
        expected[b, :, h, w] = weight[:, :, 0] @ xp[b, :, h * stride + i * dilation, w * stride + j * dilation]
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)


def _pixel_varying_problem(dtype=torch.float64, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 11, 9, generator=g, dtype=dtype)
    coeff = torch.randn(3, 2 * 5, 6, 5, generator=g, dtype=dtype)  # M=2, L=5, stride 2, padding 1
    bases = torch.randn(5, 3, 3, generator=g, dtype=dtype)
    weight = torch.randn(6, 2, 2, generator=g, dtype=dtype)
    bias = torch.randn(6, generator=g, dtype=dtype)
    return x, coeff, bases, weight, bias


def _budgets(geo, backward):
    """Budgets that make chunk_plan take each of its shapes on geo (float64), with the plan's
    chunk count: whole problem, two samples, one sample, two rows, one row, three columns, one
    pixel (a budget below one pixel's temporaries)."""
    (h, w) = geo.out_size

    def cost(samples, rows, cols):
        return chunk_bytes(geo, 8, samples, rows, cols, backward=backward)

    return {"whole": (cost(geo.batch, h, w), 1), "two_samples": (cost(2, h, w), 2), "sample": (cost(1, h, w), 3),
            "two_rows": (cost(1, 2, w), 3 * 3), "row": (cost(1, 1, w), 3 * h), "three_columns": (cost(1, 1, 3), 3 * h * 2),
            "pixel": (1, 3 * h * w)}


@pytest.mark.parametrize("shape", ["whole", "two_samples", "sample", "two_rows", "row", "three_columns", "pixel"])
def test_chunked_equals_one_chunk(shape):
    args = _pixel_varying_problem()  # 3 samples, 6 x 5 outputs
    geo = validate_atom_conv2d(*args, 2, 1, 1, 2)
    grad_y = torch.randn(3, 6, *geo.out_size, dtype=torch.float64)
    whole = atom_conv2d_reference(*args, geo, max_chunk_bytes=None)
    whole_grads = atom_conv2d_reference_backward(grad_y, *args[:4], geo, (True,) * 4, max_chunk_bytes=None)
    for backward in (False, True):
        budget, chunks = _budgets(geo, backward)[shape]
        plan = chunk_plan(geo, 8, budget, backward=backward)
        assert len(plan) == chunks and sum(c.pixels for c in plan) == 3 * 6 * 5
        if shape != "pixel":
            assert all(chunk_bytes(geo, 8, c.n1 - c.n0, c.r1 - c.r0, c.c1 - c.c0, backward=backward,
                                   ) <= budget for c in plan)
        if backward:
            grads = atom_conv2d_reference_backward(grad_y, *args[:4], geo, (True,) * 4, max_chunk_bytes=budget)
            for name, g, e in zip(("x", "atom_coeff", "bases", "weight"), grads, whole_grads):
                torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12, msg=lambda m: f"d {name}: {m}")
        else:
            torch.testing.assert_close(atom_conv2d_reference(*args, geo, max_chunk_bytes=budget), whole,
                                       rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("geometry", GEOMETRIES[::3], ids=_ids)
@pytest.mark.parametrize("max_chunk_bytes", [None, 1])
def test_hand_written_backward_equals_autograd_of_forward(geometry, max_chunk_bytes):
    kernel, stride, padding, dilation, groups, hw = geometry
    x, coeff, bases, weight, _, _ = static_atom_problem(2, 4, 8, hw, kernel, stride, padding, dilation, groups)
    coeff = torch.randn_like(coeff)  # atoms that change from pixel to pixel
    geo = validate_atom_conv2d(x, coeff, bases, weight, None, stride, padding, dilation, groups)
    grad_y = torch.randn(2, 8, *geo.out_size, dtype=torch.float64)
    _, vjp = torch.func.vjp(lambda *a: atom_conv2d_reference(*a, None, geo), x, coeff, bases, weight)
    expected = vjp(grad_y)
    got = atom_conv2d_reference_backward(grad_y, x, coeff, bases, weight, geo, (True,) * 4, max_chunk_bytes=max_chunk_bytes)
    for name, g, e in zip(("x", "atom_coeff", "bases", "weight"), got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10, msg=lambda m: f"d {name}: {m}")


@pytest.mark.parametrize("needs", [(True, False, False, False), (False, True, False, False),
                                   (False, False, True, False), (False, False, False, True)])
def test_hand_written_backward_computes_only_what_is_asked(needs):
    args = _pixel_varying_problem()[:4]
    geo = validate_atom_conv2d(*args, None, 2, 1, 1, 2)
    grad_y = torch.randn(3, 6, *geo.out_size[::-1], dtype=torch.float64).transpose(2, 3)  # not contiguous
    every = atom_conv2d_reference_backward(grad_y, *args, geo, (True,) * 4)
    only = atom_conv2d_reference_backward(grad_y, *args, geo, needs)
    for want, g, full in zip(needs, only, every):
        if want:
            torch.testing.assert_close(g, full, rtol=0, atol=0)
        else:
            assert g is None


@pytest.mark.parametrize("rows_per_chunk", [None, 4])
def test_gradcheck_every_input(rows_per_chunk):
    args = [t.requires_grad_() for t in _pixel_varying_problem()]
    geo = validate_atom_conv2d(*args, 2, 1, 1, 2)
    max_chunk_bytes = rows_per_chunk and chunk_bytes(geo, 8, 1, rows_per_chunk, geo.out_size[1],
                                                     backward=False)  # 2 chunks a sample
    assert torch.autograd.gradcheck(lambda *a: atom_conv2d_reference(*a, geo, max_chunk_bytes=max_chunk_bytes), args)


def test_gradcheck_dilated_non_square_through_public_api():
    g = torch.Generator().manual_seed(3)
    d = torch.float64
    x = torch.randn(2, 3, 7, 8, generator=g, dtype=d, requires_grad=True)
    bases = torch.randn(4, 3, 2, generator=g, dtype=d, requires_grad=True)
    h_out, w_out = output_size((7, 8), (3, 2), (1, 2), (0, 1), (2, 1))
    coeff = torch.randn(2, 3 * 4, h_out, w_out, generator=g, dtype=d, requires_grad=True)
    weight = torch.randn(5, 3, 3, generator=g, dtype=d, requires_grad=True)
    fn = lambda *a: atom_conv2d(*a, None, (1, 2), (0, 1), (2, 1), backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, coeff, bases, weight))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_low_precision_dtypes(dtype, tol):
    args64 = _pixel_varying_problem()
    y64 = atom_conv2d(*args64, 2, 1, 1, 2, backend="reference")
    y = atom_conv2d(*(t.to(dtype) for t in args64), 2, 1, 1, 2, backend="reference")
    assert y.dtype == dtype
    # Inputs are rounded to `dtype` first, so compare with float64 on the rounded inputs.
    y_rounded = atom_conv2d(*(t.to(dtype).double() for t in args64), 2, 1, 1, 2, backend="reference")
    torch.testing.assert_close(y.double(), y_rounded, rtol=tol, atol=tol * y64.abs().max().item())


def test_empty_batch_has_gradients():
    x, coeff, bases, weight, bias = (t.requires_grad_() for t in _pixel_varying_problem())
    y = atom_conv2d(x[:0], coeff[:0], bases, weight, bias, 2, 1, 1, 2)
    assert y.shape == (0, 6, 6, 5)
    y.sum().backward()
    assert torch.count_nonzero(weight.grad) == 0 and torch.count_nonzero(bias.grad) == 0


def test_auto_backend_on_cpu_is_reference():
    args = _pixel_varying_problem()
    torch.testing.assert_close(
        atom_conv2d(*args, 2, 1, 1, 2), atom_conv2d(*args, 2, 1, 1, 2, backend="reference"), rtol=0, atol=0
    )


def test_chunks_that_read_only_padding():
    """Row chunks whose input window lies wholly below the image (padding 3 on a 2-row image)."""
    x, coeff, bases, weight, bias, static_weight = static_atom_problem(1, 2, 3, (2, 3), (1, 3), 1, 3, 1, 1)
    geo = validate_atom_conv2d(x, coeff, bases, weight, bias, 1, 3, 1, 1)
    y = atom_conv2d_reference(x, coeff, bases, weight, bias, geo, max_chunk_bytes=1)
    torch.testing.assert_close(y, F.conv2d(x, static_weight, bias, 1, 3), rtol=1e-12, atol=1e-12)


# --- memory: every temporary within max_chunk_bytes ------------------------------------------

def _float32_problem(n, c, hw, kernel, stride=1, groups=1, m=3, num_bases=6, seed=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, *hw, generator=g)
    coeff = torch.randn(n, m * num_bases, *output_size(hw, kernel, stride, kernel // 2, 1), generator=g)
    bases = torch.randn(num_bases, kernel, kernel, generator=g)
    weight = torch.randn(c, c // groups, m, generator=g)
    bias = torch.randn(c, generator=g)
    geo = validate_atom_conv2d(x, coeff, bases, weight, bias, stride, kernel // 2, 1, groups)
    return x, coeff, bases, weight, bias, geo


BUDGET = 256 * 1024


@pytest.mark.parametrize("case", ["32x32", "64x64", "128x128", "3x4096", "64x64-stride2", "64x64-groups2"])
def test_temporaries_stay_within_the_budget(case):
    """Peak bytes the CPU allocator holds (replayed from the profiler's allocation events) above
    the inputs, less the outputs, forward and backward, at sizes where the budget binds: row
    chunks at the square sizes (128x128 needs 2 MiB for one sample), column pieces of one row
    for the 4096-wide image (a row alone needs over 1 MiB)."""
    size, _, variant = case.partition("-")
    hw = tuple(int(v) for v in size.split("x"))
    stride, groups = (2, 1) if variant == "stride2" else (1, 2) if variant == "groups2" else (1, 1)
    x, coeff, bases, weight, bias, geo = _float32_problem(1, 8, hw, 3, stride, groups)
    grad_y = torch.randn(1, 8, *geo.out_size)
    for backward in (False, True):
        plan = chunk_plan(geo, 4, BUDGET, backward=backward)
        assert len(plan) > 1 and (hw[0] > 3 or all(c.r1 - c.r0 == 1 and c.c1 - c.c0 < hw[1] for c in plan))
    with torch.no_grad():
        forward = cpu_peak_bytes(lambda: atom_conv2d_reference(x, coeff, bases, weight, bias, geo, max_chunk_bytes=BUDGET))
        backward = cpu_peak_bytes(lambda: atom_conv2d_reference_backward(
            grad_y, x, coeff, bases, weight, geo, (True, True, True, True), max_chunk_bytes=BUDGET))
    y_bytes = grad_y.nbytes
    grads_bytes = coeff.nbytes + x.nbytes + bases.nbytes + weight.nbytes
    assert forward - y_bytes <= BUDGET and backward - grads_bytes <= BUDGET, (forward, backward)


def test_the_op_backward_makes_no_full_size_copy(monkeypatch):
    """Through the registered op (what training runs): its backward returns d x in x's layout
    with no second full-size copy, so the peak is the gradients plus one chunk's temporaries."""
    monkeypatch.setattr(op, "atom_conv2d_reference_backward",
                        functools.partial(atom_conv2d_reference_backward, max_chunk_bytes=BUDGET))
    x, coeff, bases, weight, bias, geo = _float32_problem(2, 8, (128, 128), 3)  # x: 1 MiB
    grad_y = torch.randn(2, 8, 128, 128)
    args = (grad_y, x, coeff, bases, weight, [1, 1], [1, 1], [1, 1], 1, "reference", [True, True, False, True])
    peak = cpu_peak_bytes(lambda: torch.ops.atomconv.atom_conv2d_backward(*args))
    assert peak - (x.nbytes + coeff.nbytes + 2 * weight.nbytes) <= BUDGET < x.nbytes
