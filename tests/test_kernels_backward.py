"""The fused Triton backward (kernels.atom_conv2d_backward) against float64 reference gradients
and F.conv2d's, over the forward tests' geometry grid.

Without a GPU it runs through Triton's interpreter (tests/conftest.py switches it on);
the kernels compute in float32 (no float64), so their gradients are checked against autograd
through the float64 reference path on the same (rounded) inputs.
"""

import pytest
import torch
import torch.nn.functional as F
import triton

import kernels
from atomconv.reference import atom_conv2d_reference
from atomconv.validation import validate_atom_conv2d
from kernels import backward, configs, forward
from helpers import DEVICE, GEOMETRIES, REL_TOL, make_problem, static_atom_problem, to

NAMES = ("x", "atom_coeff", "bases", "weight")


def reference_grads(inputs, grad_y, kwargs):
    """Gradients of (x, atom_coeff, bases, weight) by autograd through the float64 CPU reference."""
    leaves = [t.detach().double().cpu().requires_grad_() for t in inputs[:4]]
    geo = validate_atom_conv2d(*leaves, None, **kwargs)
    return torch.autograd.grad(atom_conv2d_reference(*leaves, None, geo), leaves, grad_y.double().cpu())


def assert_grad_close(name, grad, expected, like, dtype):
    """grad has like's dtype and shape; its max error is within REL_TOL[dtype] of expected's max magnitude."""
    assert grad.dtype == dtype and grad.shape == like.shape, name
    err = (grad.double().cpu() - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= REL_TOL[dtype] * scale, f"d{name}: max error {err:.3g} vs max |grad| {scale:.3g}"


def assert_grads_close(grads, expected, inputs, dtype):
    for name, grad, ref, t in zip(NAMES, grads, expected, inputs):
        assert_grad_close(name, grad, ref, t, dtype)


def check(tensors, kwargs, dtype=torch.float32, grad_y=None):
    """All four kernel gradients at dtype (inputs rounded to it first) against the float64 reference."""
    inputs = to(tensors[:4], dtype)
    if grad_y is None:
        h_out, w_out = validate_atom_conv2d(*inputs, None, **kwargs).out_size
        g = torch.Generator().manual_seed(1)
        grad_y = torch.randn(inputs[0].shape[0], inputs[3].shape[0], h_out, w_out, generator=g).to(DEVICE, dtype)
    grads = kernels.atom_conv2d_backward(grad_y, *inputs, **kwargs)
    assert_grads_close(grads, reference_grads(inputs, grad_y, kwargs), inputs, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", GEOMETRIES, ids=lambda c: "k{4}-s{5}-p{6}-d{7}-g{8}".format(*c))
def test_gradients_match_float64_reference_over_geometries(case, dtype):
    n, c_in, c_out, hw, kernel, stride, padding, dilation, groups, bias, m, l = case
    check(*make_problem(n, c_in, c_out, hw, kernel, stride, padding, dilation, groups, bias, m, l), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("problem", [
    ((2, 20, 6, (7, 9), 3), dict(padding=1, groups=2, num_atoms=6, num_bases=6)),
    ((1, 6, 6, (9, 8), (3, 5)), dict(stride=2, padding=(2, 1), dilation=(1, 2), groups=6)),
], ids=["grouped", "depthwise-strided"])
def test_16_bit_gradients(dtype, problem):
    args, kwargs = problem
    check(*make_problem(*args, **kwargs), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gradients_with_more_atoms_than_one_wide_dot(dtype):
    """M = 10: in 16 bits the dβ kernel's dZ and the dα kernel's dα take two dots per chunk
    (`wide_dot_atoms` is 8), the second with two real atoms and six zero ones; in float32 one
    dot per atom."""
    tensors, kwargs = make_problem(1, 9, 5, (6, 7), 3, padding=1, num_atoms=10, num_bases=3)
    geo = validate_atom_conv2d(*tensors[:4], None, **kwargs)
    launch = configs.fit_tile_config(configs.DEFAULT, geo)
    assert backward.wide_dot_atoms(geo, launch, dtype) == (8 if dtype.itemsize == 2 else 1)
    check(tensors, kwargs, dtype)


def test_static_atoms_gradients_match_conv2d():
    """docs/design.md §1 oracle: with pixel-independent atoms, dx and dα are F.conv2d's gradients (dα via
    the static kernel Wt[o,c,i,j] = Σ_m α[o,c,m] Σ_l β[m,l] Ψ[l,i,j], differentiated in α)."""
    kernel, stride, padding, dilation, groups = (3, 5), (2, 1), (1, 2), (1, 2), 2
    x, atom_coeff, bases, weight, _, _ = static_atom_problem(2, 4, 6, (9, 11), kernel, stride, padding, dilation,
                                                              groups, dtype=torch.float32)
    beta = atom_coeff[0, :, 0, 0].view(weight.shape[2], bases.shape[0])
    x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_()
    y = F.conv2d(x64, torch.einsum("ocm,ml,lij->ocij", w64, beta.double(), bases.double()), None, stride, padding,
                 dilation, groups)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected_dx, expected_dw = torch.autograd.grad(y, (x64, w64), grad_y)
    inputs = to((x, atom_coeff, bases, weight), torch.float32)
    dx, _, _, dw = kernels.atom_conv2d_backward(grad_y.float().to(DEVICE), *inputs, stride, padding, dilation, groups)
    torch.testing.assert_close(dx.double().cpu(), expected_dx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw.double().cpu(), expected_dw, rtol=1e-5, atol=1e-4)


def test_expanded_and_strided_grad_output():
    """grad_y with stride 0 (the gradient of .sum()) and a transposed grad_y, read in place."""
    tensors, kwargs = make_problem(2, 4, 6, (7, 9), 3, padding=1, groups=2)
    check(tensors, kwargs, grad_y=torch.ones(1, device=DEVICE).expand(2, 6, 7, 9))
    check(tensors, kwargs, grad_y=torch.randn(2, 6, 9, 7, device=DEVICE).transpose(2, 3))


def test_channels_last_and_strided_inputs():
    tensors, kwargs = make_problem(2, 6, 4, (7, 9), 3, padding=1)
    x, atom_coeff, bases, weight = to(tensors[:4], torch.float32)
    inputs = (x.contiguous(memory_format=torch.channels_last), torch.cat([atom_coeff, atom_coeff], dim=1)[:, ::2],
              bases.transpose(1, 2).contiguous().transpose(1, 2), weight.permute(2, 0, 1).contiguous().permute(1, 2, 0))
    grad_y = torch.randn(2, 4, 7, 9, device=DEVICE)
    grads = kernels.atom_conv2d_backward(grad_y, *inputs, **kwargs)
    assert grads[0].is_contiguous(memory_format=torch.channels_last)
    assert_grads_close(grads, reference_grads(inputs, grad_y, kwargs), inputs, torch.float32)


def test_several_chunks_tiles_and_splits():
    """Small blocks: ragged channel chunks, several output-channel tiles and dZ dot steps per
    group, ragged pixel tiles, and a pixel split count that does not divide the tiles."""
    tensors, kwargs = make_problem(1, 22, 36, (5, 7), 3, padding=1, groups=2, num_atoms=3, num_bases=5)
    small = configs.TileConfig(num_warps=1, block_c=8, block_o=16)
    inputs = to(tensors[:4], torch.float32)
    geo = validate_atom_conv2d(*inputs, None, **kwargs)
    grad_y = torch.randn(1, 36, 5, 7, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    dx = backward.launch_input_grad(grad_y, *inputs, geo, config=small)
    dcoeff, dbases = backward.launch_coeff_grad(grad_y, *inputs, geo, bases_grad=True, config=small)
    dweight = backward.launch_weight_grad(grad_y, *inputs, geo, config=small, splits=2)
    assert triton.cdiv(5 * 7, 32) == 2  # pixel tiles of 32: the last one ragged
    assert not backward.dy_resident(geo, configs.fit_tile_config(small, geo))  # dyᵀ reloaded per chunk
    assert_grads_close((dx, dcoeff, dbases, dweight), reference_grads(inputs, grad_y, kwargs), inputs, torch.float32)


@pytest.mark.parametrize("channels_in, kernel_size, num_bases, dtype, chunks_per_program", [
    (20, 3, 5, torch.float16, 1), (30, 3, 5, torch.float16, 2), (44, 3, 12, torch.float16, 2),
    (60, 3, 12, torch.float16, 4), (60, 3, 12, torch.float32, 1), (30, 5, 5, torch.float16, 2)], ids=str)
def test_weight_grad_runs_of_chunks(channels_in, kernel_size, num_bases, dtype, chunks_per_program):
    """16-bit dα programs that own one chunk of three, two of four or six, and four of eight (the
    atoms of a pixel tile serve them all; the last chunk ragged), also with tap groups (5x5);
    float32 ones own one."""
    tensors, kwargs = make_problem(1, channels_in, 12, (6, 5), kernel_size, padding=kernel_size // 2, num_atoms=3,
                                   num_bases=num_bases)
    config = configs.TileConfig(num_warps=1, block_c=8, block_o=16)
    inputs = to(tensors[:4], dtype)
    geo = validate_atom_conv2d(*inputs, None, **kwargs)
    launch = configs.fit_tile_config(config, geo)
    assert configs.weight_grad_chunks(geo, launch, dtype) == chunks_per_program
    assert (launch.TAP_GROUPS > 1) == (kernel_size == 5)
    grad_y = torch.randn(1, 12, 6, 5, generator=torch.Generator().manual_seed(4)).to(DEVICE, dtype)
    dweight = backward.launch_weight_grad(grad_y, *inputs, geo, config=config, splits=1)
    assert_grad_close("weight", dweight, reference_grads(inputs, grad_y, kwargs)[3], inputs[3], dtype)


# Each backward launcher, run on (grad_y, x, atom_coeff, bases, weight, geometry) with a forced
# config: the gradients it returns and their positions in (x, atom_coeff, bases, weight).
LAUNCHERS = {
    "coeff": (lambda *args, config: backward.launch_coeff_grad(*args, bases_grad=True, config=config), (1, 2),
              configs.tile_candidates()),
    "weight": (lambda *args, config: [backward.launch_weight_grad(*args, config=config)], (3,),
               configs.tile_candidates()),
    "input": (lambda *args, config: [backward.launch_input_grad(*args, config=config)], (0,),
              configs.tile_candidates()),
}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_every_candidate_config(launcher):
    run, positions, candidates = LAUNCHERS[launcher]
    tensors, kwargs = make_problem(1, 10, 9, (5, 6), 3, padding=1, num_atoms=6, num_bases=3)
    inputs = to(tensors[:4], torch.float32)
    geo = validate_atom_conv2d(*inputs, None, **kwargs)
    grad_y = torch.randn(1, 9, 5, 6, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    expected = reference_grads(inputs, grad_y, kwargs)
    for config in candidates:
        for position, grad in zip(positions, run(grad_y, *inputs, geo, config=config)):
            assert_grad_close(NAMES[position], grad, expected[position], inputs[position], torch.float32)


def test_output_mask_skips_kernels(monkeypatch):
    """Only the asked-for gradients are computed, and each comes from its Triton kernel."""
    launched = []
    for name in ("atom_conv2d_bwd_coeff_kernel", "atom_conv2d_bwd_weight_kernel", "atom_conv2d_bwd_input_kernel"):
        kernel = getattr(backward, name)
        monkeypatch.setattr(backward, name, _Counting(kernel, name, launched))
    tensors, kwargs = make_problem(1, 3, 4, (5, 6), 3, padding=1)
    grad_y = torch.randn(1, 4, 5, 6, device=DEVICE)
    grads = kernels.atom_conv2d_backward(grad_y, *to(tensors[:4], torch.float32), **kwargs,
                                         output_mask=(False, False, True, True))
    assert grads[0] is None and grads[1] is None and grads[2] is not None and grads[3] is not None
    assert launched == ["atom_conv2d_bwd_coeff_kernel", "atom_conv2d_bwd_weight_kernel"]


class _Counting:
    """Stands in for a kernel: records its name when launched, then launches it."""

    def __init__(self, kernel, name, launched):
        self.kernel, self.name, self.launched = kernel, name, launched

    def __getitem__(self, grid):
        self.launched.append(self.name)
        return self.kernel[grid]


def test_bitwise_reproducible_in_deterministic_mode():
    tensors, kwargs = make_problem(2, 6, 5, (7, 8), 3, padding=1)
    inputs = to(tensors[:4], torch.float32)
    grad_y = torch.randn(2, 5, 7, 8, device=DEVICE)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = kernels.atom_conv2d_backward(grad_y, *inputs, **kwargs)
        second = kernels.atom_conv2d_backward(grad_y, *inputs, **kwargs)
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_empty_batch():
    tensors, kwargs = make_problem(0, 3, 4, (5, 6), 3, padding=1)
    inputs = to(tensors[:4], torch.float32)
    grad_y = torch.empty(0, 4, 5, 6, device=DEVICE)
    dx, dcoeff, dbases, dweight = kernels.atom_conv2d_backward(grad_y, *inputs, **kwargs)
    assert dx.shape == (0, 3, 5, 6) and dcoeff.shape == inputs[1].shape
    assert torch.count_nonzero(dbases) == 0 and torch.count_nonzero(dweight) == 0 and dweight.shape == inputs[3].shape


def test_bad_grad_output_is_refused():
    tensors, kwargs = make_problem(1, 3, 4, (5, 6), 3, padding=1)
    inputs = to(tensors[:4], torch.float32)
    with pytest.raises(ValueError, match=r"grad_y must have the output's shape"):
        kernels.atom_conv2d_backward(torch.zeros(1, 4, 5, 5, device=DEVICE), *inputs, **kwargs)
    with pytest.raises(TypeError, match=r"grad_y must have x's dtype"):
        kernels.atom_conv2d_backward(torch.zeros(1, 4, 5, 6, device=DEVICE, dtype=torch.float16), *inputs, **kwargs)


def test_weight_grad_splits_fill_the_target_within_the_pixel_tiles():
    tensors, kwargs = make_problem(2, 8, 8, (10, 10), 3, padding=1, groups=2)
    geo = validate_atom_conv2d(*tensors[:4], None, **kwargs)
    launch = configs.fit_tile_config(configs.TileConfig(num_warps=1, block_c=8, block_o=16), geo)
    assert (launch.BLOCK_O, launch.BLOCK_C, launch.BLOCK_P) == (16, 8, 32)  # one α tile per group: 2 in all
    assert configs.weight_grad_splits(geo, launch, torch.float32, target_programs=3) == 2
    # one per pixel tile: 200 pixels / 32
    assert configs.weight_grad_splits(geo, launch, torch.float32, target_programs=10**6) == 7
    assert configs.weight_grad_splits(geo, launch, torch.float32, target_programs=1) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("problem", [(5, 1, 2, 1, 1), (7, 1, 3, 1, 1), ((3, 7), 2, (1, 3), (2, 1), 2),
                                     ((3, 11), 1, (1, 5), 1, 1)],
                         ids=lambda p: "k{}-s{}-p{}-d{}-g{}".format(*p))
def test_taps_split_over_tap_groups(problem, dtype):
    """Large kernels: each pixel's taps split over several threads (tap groups) in dβ and dα,
    dΨ's partials included; the default config must really split here. The forward and dx run
    the first three by rows of taps instead (`configs.row_passes`), and split the taps of the
    last (M * KW = 66 atoms, more than a row may hold)."""
    kernel, stride, padding, dilation, groups = problem
    tensors, kwargs = make_problem(2, 4, 6, (9, 8), kernel, stride, padding, dilation, groups, num_atoms=6, num_bases=5)
    geo = validate_atom_conv2d(*tensors, **kwargs)
    default = configs.default_config()
    assert configs.fit_tile_config(default, geo).TAP_GROUPS > 1
    by_rows = configs.row_passes(geo)
    assert by_rows == (problem[0] != (3, 11))
    assert (forward.forward_tile_launch(default, geo).TAP_GROUPS == 1) == by_rows
    assert (backward.input_grad_tile_launch(default, geo).TAP_GROUPS == 1) == by_rows
    check(tensors, kwargs, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("problem", [((3, 1), 1, (1, 0), 1), ((2, 6), 1, (1, 2), 1), ((1, 6), 1, (0, 2), 1),
                                     ((1, 6), 2, (0, 2), 1), ((1, 5), 1, (0, 4), (1, 2))],
                         ids=lambda p: "k{}-s{}-p{}-d{}".format(*p))
def test_rows_of_bases_of_any_width(problem, dtype):
    """Rows of Ψ one value wide (read one value at a time) or not a power of two wide (one wider
    vector load, whose padding must not reach the atoms): in dα, and in dx where its taps are one
    row (1 x 6 and 1 x 5, as each pass of a kernel run by rows of taps), with unit stride (a tap's
    row, then its column, added to the addresses), stride 2 (per-pixel offsets) and a dilated row
    (a runtime column offset)."""
    kernel, stride, padding, dilation = problem
    tensors, kwargs = make_problem(2, 5, 6, (7, 6), kernel, stride, padding, dilation, num_atoms=5, num_bases=4)
    geo = validate_atom_conv2d(*tensors, **kwargs)
    # The row reads this test is for: dx's where the taps are one row, dα's wherever a row is wider than one.
    assert backward.input_grad_reads_rows_of_bases(
        geo, backward.input_grad_tile_launch(configs.default_config(), geo)) == (kernel[0] == 1)
    assert backward.weight_grad_reads_rows_of_bases(geo, configs.fit_tile_config(configs.default_config(), geo),
                                                    dtype) == (kernel[1] > 1 and dtype.itemsize == 2)
    check(tensors, kwargs, dtype)
