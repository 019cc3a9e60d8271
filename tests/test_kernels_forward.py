"""The fused Triton forward (kernels.atom_conv2d_forward) against the reference path and F.conv2d.

Without a GPU it runs through Triton's interpreter (tests/conftest.py switches it on);
shapes are tiny because the interpreter runs every program one after the other.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kernels
from atomconv.reference import atom_conv2d_reference
from atomconv.validation import validate_atom_conv2d
from kernels import configs, forward
from helpers import DEVICE, GEOMETRIES, REL_TOL, make_problem, static_atom_problem, to

REPO = Path(__file__).resolve().parents[1]
def reference(tensors, kwargs):
    """Reference output in float64 on the CPU."""
    tensors = tuple(None if t is None else t.double().cpu() for t in tensors)
    return atom_conv2d_reference(*tensors, validate_atom_conv2d(*tensors, **kwargs))


def assert_close(y, expected, dtype):
    assert y.dtype == dtype and y.shape == expected.shape
    err = (y.double().cpu() - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= REL_TOL[dtype] * scale, f"max error {err:.3g} vs max |y| {scale:.3g}"


def check(tensors, kwargs, dtype=torch.float32):
    """Run the fused forward at dtype (inputs rounded to it first) against the float64 reference."""
    inputs = to(tensors, dtype)
    y = kernels.atom_conv2d_forward(*inputs, **kwargs)
    assert_close(y, reference(inputs, kwargs), dtype)
    return y


@pytest.mark.parametrize("case", GEOMETRIES, ids=lambda c: "k{4}-s{5}-p{6}-d{7}-g{8}-bias{9}".format(*c))
def test_matches_reference_over_geometries(case):
    n, c_in, c_out, hw, kernel, stride, padding, dilation, groups, bias, m, l = case
    check(*make_problem(n, c_in, c_out, hw, kernel, stride, padding, dilation, groups, bias, m, l))


@pytest.mark.parametrize("hw, kernel, stride", [((5, 9), 5, 1), ((9, 4), 3, (1, 2)), ((3, 3), 3, 1)])
def test_one_row_or_column_of_output(hw, kernel, stride):
    tensors, kwargs = make_problem(2, 3, 4, hw, kernel, stride=stride)
    y = check(tensors, kwargs)
    assert 1 in y.shape[2:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("problem", [
    ((2, 20, 6, (7, 9), 3), dict(padding=1, groups=2, num_atoms=6, num_bases=6)),
    ((1, 6, 6, (9, 8), (3, 5)), dict(stride=2, padding=(2, 1), dilation=(1, 2), groups=6, bias=False)),
], ids=["grouped", "depthwise-strided"])
def test_dtypes(dtype, problem):
    args, kwargs = problem
    check(*make_problem(*args, **kwargs), dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_channels_last_16_bit(dtype):
    tensors, kwargs = make_problem(2, 6, 4, (7, 9), 3, padding=1)
    x, *rest = to(tensors, dtype)
    y = kernels.atom_conv2d_forward(x.contiguous(memory_format=torch.channels_last), *rest, **kwargs)
    assert_close(y, reference((x, *rest), kwargs), dtype)


def test_several_chunks_and_tiles():
    """Small blocks: several channel chunks (the last one ragged), output-channel tiles per group
    and pixel tiles (the last one ragged)."""
    tensors, kwargs = make_problem(2, 22, 40, (6, 7), 3, padding=1, groups=2, num_atoms=3, num_bases=5)
    small = configs.TileConfig(num_warps=1, block_c=8, block_o=16)
    geo = validate_atom_conv2d(*tensors, **kwargs)
    launch = configs.fit_tile_config(small, geo)
    assert (launch.BLOCK_C, launch.BLOCK_O, launch.BLOCK_P, launch.ATOMS_PER_DOT) == (8, 16, 32, 2)
    inputs = to(tensors, torch.float32)
    assert_close(forward.launch_forward(*inputs, geo, config=small), reference(inputs, kwargs), torch.float32)


def test_channels_last_input_and_output():
    tensors, kwargs = make_problem(2, 6, 4, (7, 9), 3, padding=1)
    x, *rest = to(tensors, torch.float32)
    x = x.contiguous(memory_format=torch.channels_last)
    y = kernels.atom_conv2d_forward(x, *rest, **kwargs)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, reference((x, *rest), kwargs), torch.float32)


def test_strided_inputs():
    """Every input a non-contiguous view: strides are passed to the kernel, nothing is copied."""
    tensors, kwargs = make_problem(2, 4, 6, (7, 9), 3, padding=1)
    x, atom_coeff, bases, weight, bias = to(tensors, torch.float32)
    views = (
        x.transpose(2, 3).contiguous().transpose(2, 3),
        torch.cat([atom_coeff, atom_coeff], dim=1)[:, ::2],
        bases.transpose(1, 2).contiguous().transpose(1, 2),
        weight.permute(2, 0, 1).contiguous().permute(1, 2, 0),
        torch.stack([bias, bias], dim=1)[:, 0],
    )
    assert not any(v.is_contiguous() for v in views)
    assert_close(kernels.atom_conv2d_forward(*views, **kwargs), reference(views, kwargs), torch.float32)


def test_static_atoms_match_conv2d():
    """docs/design.md §1 oracle: pixel-independent atoms make the operator a plain F.conv2d."""
    kernel, stride, padding, dilation, groups = (3, 5), (2, 1), (1, 2), (1, 2), 2
    x, atom_coeff, bases, weight, bias, static_weight = static_atom_problem(
        2, 4, 6, (9, 11), kernel, stride, padding, dilation, groups, dtype=torch.float32)
    x, atom_coeff, bases, weight, bias = to((x, atom_coeff, bases, weight, bias), torch.float32)
    y = kernels.atom_conv2d_forward(x, atom_coeff, bases, weight, bias, stride, padding, dilation, groups)
    expected = F.conv2d(x.double(), static_weight.double().to(DEVICE), bias.double(), stride, padding, dilation, groups)
    assert_close(y, expected.cpu(), torch.float32)


@pytest.mark.parametrize("config", configs.tile_candidates(), ids=lambda c: "-".join(map(str, c.as_dict().values())))
def test_every_candidate_config(config):
    tensors, kwargs = make_problem(1, 10, 9, (5, 6), 3, padding=1, num_atoms=6, num_bases=3)
    geo = validate_atom_conv2d(*tensors, **kwargs)
    inputs = to(tensors, torch.float32)
    assert_close(forward.launch_forward(*inputs, geo, config=config), reference(inputs, kwargs), torch.float32)


def test_the_triton_kernel_runs(monkeypatch):
    """The result comes from one launch of the Triton kernel, not from a fallback."""
    launches = []
    kernel = forward.atom_conv2d_fwd_kernel

    class CountingKernel:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(forward, "atom_conv2d_fwd_kernel", CountingKernel())
    check(*make_problem(1, 3, 4, (5, 6), 3, padding=1))
    assert len(launches) == 1


def test_empty_batch():
    tensors, kwargs = make_problem(0, 3, 4, (5, 6), 3, padding=1)
    y = kernels.atom_conv2d_forward(*to(tensors, torch.float32), **kwargs)
    assert y.shape == (0, 4, 5, 6) and y.dtype == torch.float32


def test_float64_is_refused():
    tensors, kwargs = make_problem(1, 3, 4, (5, 6), 3)
    with pytest.raises(TypeError, match="float16, bfloat16 and float32"):
        kernels.atom_conv2d_forward(*to(tensors, torch.float64), **kwargs)


def test_bad_input_is_validated():
    (x, atom_coeff, bases, weight, bias), kwargs = make_problem(1, 3, 4, (5, 6), 3)
    with pytest.raises(ValueError, match="atom_coeff"):
        kernels.atom_conv2d_forward(*to((x, atom_coeff[:, 1:], bases, weight, bias), torch.float32), **kwargs)


def test_cpu_tensors_without_interpreter_fail_clearly():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import torch, kernels\n"
        "x = torch.randn(1, 2, 5, 5)\n"
        "kernels.atom_conv2d_forward(x, torch.randn(1, 2, 3, 3), torch.randn(1, 3, 3), torch.randn(2, 2, 2))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert result.returncode != 0
    assert "RuntimeError: the Triton path needs CUDA tensors" in result.stderr


def test_fit_keeps_dots_at_least_16_wide():
    """Depthwise with few atoms still gets a 16-wide reduction (two atoms of 8 channels) and 16
    output channels per dot."""
    tensors, kwargs = make_problem(1, 4, 4, (5, 5), 3, groups=4, num_atoms=2)
    launch = configs.fit_tile_config(configs.tile_candidates()[0], validate_atom_conv2d(*tensors, **kwargs))
    assert launch.BLOCK_C * launch.ATOMS_PER_DOT >= 16 and launch.BLOCK_O >= 16


def test_the_default_is_a_candidate():
    assert configs.default_config() == configs.tile_candidates()[0]


LARGE_KERNEL_PROBLEMS = [  # (kernel, stride, padding, dilation, groups): M*KH*KW atoms too many for one thread
    (5, 1, 2, 1, 1),
    (7, 1, 3, 1, 1),
    ((3, 7), 2, (1, 3), (2, 1), 2),
    ((5, 3), 1, (2, 1), 1, 1),  # taller than wide: passes of rows of 3 taps
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("problem", LARGE_KERNEL_PROBLEMS, ids=lambda p: "k{}-s{}-p{}-d{}-g{}".format(*p))
def test_large_kernels_run_by_rows_of_taps(problem, dtype):
    """Large kernels whose rows of atoms fit a thread: one pass per row of taps, each adding its
    share of y (the default config must really run by rows here)."""
    kernel, stride, padding, dilation, groups = problem
    tensors, kwargs = make_problem(2, 4, 6, (9, 8), kernel, stride, padding, dilation, groups, num_atoms=6, num_bases=5)
    geo = validate_atom_conv2d(*tensors, **kwargs)
    assert configs.row_passes(geo)
    assert forward.forward_tile_launch(configs.default_config(), geo).TAP_GROUPS == 1
    check(tensors, kwargs, dtype)


NARROW_ROW_PROBLEMS = [  # (kernel, padding): rows of Ψ one value wide (read one by one), or of a width
    ((3, 1), (1, 0)),     # that is not a power of two (read in a wider vector load, whose padding
    ((2, 6), (1, 2)),     # must not reach the atoms)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("problem", NARROW_ROW_PROBLEMS, ids=lambda p: "k{}-p{}".format(*p))
def test_rows_of_bases_of_any_width(problem, dtype):
    kernel, padding = problem
    check(*make_problem(2, 5, 6, (7, 6), kernel, 1, padding, num_atoms=5, num_bases=4), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("problem", [((1, 11), 1, (0, 5), 1, 1), ((3, 11), 2, 1, (2, 1), 1)],
                         ids=lambda p: "k{}-s{}-p{}-d{}-g{}".format(*p))
def test_taps_split_over_tap_groups(problem, dtype):
    """Kernels too wide for even one row of atoms per thread (KW * M > 64): each pixel's taps are
    split over several threads (tap groups) and the dot sums their partial Z; the default config
    must really split here."""
    kernel, stride, padding, dilation, groups = problem
    tensors, kwargs = make_problem(1, 4, 6, (7, 13), kernel, stride, padding, dilation, groups, num_atoms=6,
                                   num_bases=5)
    geo = validate_atom_conv2d(*tensors, **kwargs)
    assert not configs.row_passes(geo)
    assert forward.forward_tile_launch(configs.default_config(), geo).TAP_GROUPS > 1
    check(tensors, kwargs, dtype)


@pytest.mark.parametrize("kernel_size, num_atoms, dtype, taps_per_sum", [
    (3, 6, torch.float16, 9),
    (3, 6, torch.bfloat16, None),  # (bfloat16's 8-bit mantissa: its sums stay in fp32)
    (3, 6, torch.float32, None),
    (5, 6, torch.float16, 5),      # row passes: one row of taps a sum
    (7, 6, torch.float16, 7),
    (7, 1, torch.float16, 49),     # 49 atoms fit a thread: no row passes, all 49 taps in one sum
])
def test_float16_sums_its_taps_in_half_where_a_sum_is_short(kernel_size, num_atoms, dtype, taps_per_sum):
    """HALF_SUMS, the launcher's choice: float16 only, and only where one sum of stage 2 (a column's
    taps in one pass) has at most HALF_SUM_TAPS terms."""
    from perf import static_report
    problem = dict(static_report.problem_at(kernel_size), num_atoms=num_atoms)
    run = static_report.kernel_launch("atom_conv2d_fwd", problem, dtype, configs.default_config())
    expected = taps_per_sum is not None and taps_per_sum <= forward.HALF_SUM_TAPS
    assert run.args["HALF_SUMS"] == expected
    if taps_per_sum is not None:
        kh, kw = run.args["KH"], run.args["KW"]
        taps = kw if run.args["ROW_PASSES"] else -(-kh * kw // run.args["TAP_GROUPS"])
        assert taps == taps_per_sum


@pytest.mark.parametrize("kernel_size, padding", [(3, 1), (7, 3)])
def test_float16_sums_in_half_stay_close_to_sums_in_fp32(kernel_size, padding, monkeypatch):
    """Summing stage 2 in float16 rounds once per tap: its error against the float64 reference may
    grow, but stays within the float16 tolerance and within 2x the same kernel's with fp32 sums
    (HALF_SUM_TAPS = 0 turns them off)."""
    tensors, kwargs = make_problem(1, 24, 8, (9, 9), kernel_size, padding=padding, num_atoms=6, num_bases=6, bias=False)
    inputs = to(tensors, torch.float16)
    expected = reference(inputs, kwargs)
    geo = validate_atom_conv2d(*inputs, **kwargs)
    assert forward.sums_taps_in_half(geo, forward.forward_tile_launch(configs.default_config(), geo), torch.float16)
    half = kernels.atom_conv2d_forward(*inputs, **kwargs)
    monkeypatch.setattr(forward, "HALF_SUM_TAPS", 0)
    single = kernels.atom_conv2d_forward(*inputs, **kwargs)
    assert_close(half, expected, torch.float16)
    errors = [(y.double().cpu() - expected).abs().max().item() for y in (half, single)]
    assert errors[0] <= 2 * errors[1], errors


def test_float16_sums_in_half_of_inputs_near_the_float16_max():
    """x near float16's largest value: the atoms are scaled to an L1 norm below 1, so no partial
    float16 sum of stage 2 passes max |x| (no Inf), and y is as accurate as elsewhere."""
    tensors, kwargs = make_problem(1, 8, 4, (6, 7), 3, padding=1, num_atoms=6, num_bases=6, bias=False)
    x, atom_coeff, bases, weight, bias = to(tensors, torch.float16)
    x = torch.where(x >= 0, 65000.0, -65000.0).to(x.dtype)
    # α scaled so that y itself fits float16 (max |y| about 1e4)
    weight = (weight * (1e4 / reference((x, atom_coeff, bases, weight, bias), kwargs).abs().max())).to(x.dtype)
    inputs = (x, atom_coeff, bases, weight, bias)
    y = kernels.atom_conv2d_forward(*inputs, **kwargs)
    assert torch.isfinite(y).all()
    assert_close(y, reference(inputs, kwargs), torch.float16)
