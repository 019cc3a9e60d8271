"""Numerics of the fused kernels that a GPU's tensor cores decide, checked where a CPU can see them.

Under Triton's interpreter the kernels round every dot operand to the 16-bit dtype a GPU's tensor
cores read (`kernels.tiles.dot_operand`), so the overflow of a float16 operand shows up here as it
would on a GPU. Inf inputs (x, Ψ or dy) must give ±Inf where the reference does: padding lanes
(atoms past M, channels past the group, pixels past the end, taps that do not exist in a tap
group) must not turn them into NaN (0 * Inf).
"""

import pytest
import torch

import kernels
from kernels import backward, configs
from atomconv.reference import atom_conv2d_reference
from atomconv.validation import validate_atom_conv2d
from helpers import DEVICE, REL_TOL

NAMES = ("x", "atom_coeff", "bases", "weight")
GEOMETRY = dict(stride=1, padding=0, dilation=1, groups=1)


def reference(inputs, kwargs, grad_y):
    """float64 reference output and gradients of (x, atom_coeff, bases, weight) on the given inputs."""
    leaves = [t.detach().double().cpu().requires_grad_() for t in inputs]
    y = atom_conv2d_reference(*leaves, None, validate_atom_conv2d(*leaves, None, **kwargs))
    return y.detach(), torch.autograd.grad(y, leaves, grad_y.double().cpu())


def fused(inputs, kwargs, grad_y):
    return kernels.atom_conv2d_forward(*inputs, **kwargs), kernels.atom_conv2d_backward(grad_y, *inputs, **kwargs)


def large_atoms_problem():
    """x = 1, Ψ = β = 300, α = 1e-4, 3x3, padding 1, float16: each atom tap is L * 300**2 = 3.6e5,
    Z reaches 3.2e6 (past float16's 65504), yet y <= C_in * M * L * 81 = 1296 and dx <= 1944."""
    n, c_in, c_out, hw, m, num_bases = 1, 2, 3, (5, 6), 2, 4
    x = torch.ones(n, c_in, *hw)
    atom_coeff = torch.full((n, m * num_bases, *hw), 300.0)
    bases = torch.full((num_bases, 3, 3), 300.0)
    weight = torch.full((c_out, c_in, m), 1e-4)
    grad_y = torch.ones(n, c_out, *hw)
    return [t.to(DEVICE, torch.float16) for t in (x, atom_coeff, bases, weight)], GEOMETRY | dict(padding=1), \
        grad_y.to(DEVICE, torch.float16)


def test_float16_atoms_too_large_for_float16_z_do_not_overflow():
    inputs, kwargs, grad_y = large_atoms_problem()
    y, grads = fused(inputs, kwargs, grad_y)
    expected_y, expected_grads = reference(inputs, kwargs, grad_y)
    assert expected_y.abs().max() < 1300 and expected_grads[0].abs().max() < 1950  # α is 1e-4 rounded to float16
    assert torch.isfinite(y).all() and torch.isfinite(grads[0]).all()
    torch.testing.assert_close(y.double().cpu(), expected_y, rtol=REL_TOL[torch.float16], atol=0)
    for name, grad, expected in zip(NAMES, grads, expected_grads):
        # dα sums 3e6-sized products over pixels: it overflows float16 as the true value does.
        torch.testing.assert_close(grad.double().cpu(), expected.to(torch.float16).double(),
                                   rtol=REL_TOL[torch.float16], atol=0, msg=lambda m: f"d{name}: {m}")


def test_float16_rows_of_taps_share_one_scale_per_pixel():
    """A 5x5 kernel with M = 3 runs by rows of taps in the forward and in dx. Ψ's last row is 10x
    the others, so its atoms need a smaller float16 power of two than the earlier rows had used
    (scale 2**-21 against 2**-18; Z of a row reaches 1.8e5 and 1.8e6): dx must rescale what the
    earlier rows added (29 % of it) when the last comes, and neither may overflow."""
    n, c_in, c_out, hw, m, num_bases = 1, 2, 3, (6, 7), 3, 4
    x = torch.ones(n, c_in, *hw)
    atom_coeff = torch.full((n, m * num_bases, *hw), 300.0)
    bases = torch.full((num_bases, 5, 5), 30.0)
    bases[:, -1, :] = 300.0
    weight = torch.full((c_out, c_in, m), 1e-4)
    inputs = [t.to(DEVICE, torch.float16) for t in (x, atom_coeff, bases, weight)]
    kwargs, grad_y = GEOMETRY | dict(padding=2), torch.ones(n, c_out, *hw).to(DEVICE, torch.float16)
    geo = validate_atom_conv2d(*inputs, None, **kwargs)
    default = configs.default_config()
    assert configs.row_passes(geo) and backward.input_grad_tile_launch(default, geo).TAP_GROUPS == 1
    y, grads = fused(inputs, kwargs, grad_y)
    expected_y, expected_grads = reference(inputs, kwargs, grad_y)
    assert expected_y.abs().max() < 1.6e3 and expected_grads[0].abs().max() < 2.3e3  # (float16: < 65504)
    torch.testing.assert_close(y.double().cpu(), expected_y, rtol=REL_TOL[torch.float16], atol=0)
    torch.testing.assert_close(grads[0].double().cpu(), expected_grads[0], rtol=REL_TOL[torch.float16], atol=0)


def positive_problem(dtype, inf_in, kernel_size=3):
    """Positive inputs (so no Inf can cancel) with one +Inf in x, in Ψ or in dy; M = 3 and C_in = 3
    leave padded atom and channel lanes in every tile, and a 5x5 kernel splits each pixel's taps
    over tap groups, with a tap that does not exist. Padding 0: no tap reads the zero padding,
    which would make 0 * Inf = NaN in the reference too."""
    g = torch.Generator().manual_seed(0)
    n, c_in, c_out, hw, m, num_bases = 2, 3, 5, (6, 7), 3, 4
    out_hw = (hw[0] - kernel_size + 1, hw[1] - kernel_size + 1)

    def uniform(*shape):
        return 0.1 + 0.9 * torch.rand(shape, generator=g)

    x, bases = uniform(n, c_in, *hw), uniform(num_bases, kernel_size, kernel_size)
    if inf_in == "x":
        x[1, 2, 3, 4] = float("inf")
    elif inf_in == "bases":
        bases[2, 1, 0] = float("inf")
    inputs = [x, uniform(n, m * num_bases, *out_hw), bases, uniform(c_out, c_in, m)]
    grad_y = uniform(n, c_out, *out_hw)
    if inf_in == "grad_y":
        grad_y[1, 2, out_hw[0] - 1, out_hw[1] - 1] = float("inf")
    return [t.to(DEVICE, dtype) for t in inputs], GEOMETRY, grad_y.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("inf_in", ["x", "bases", "grad_y"])
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_inf_stays_inf(dtype, inf_in, kernel_size):
    inputs, kwargs, grad_y = positive_problem(dtype, inf_in, kernel_size)
    y, grads = fused(inputs, kwargs, grad_y)
    expected_y, expected_grads = reference(inputs, kwargs, grad_y)
    assert torch.isinf(expected_y if inf_in != "grad_y" else expected_grads[1]).any()
    assert not torch.isnan(expected_y).any()
    tol = dict(rtol=REL_TOL[dtype], atol=0)
    torch.testing.assert_close(y.double().cpu(), expected_y.to(dtype).double(), **tol)
    for name, grad, expected in zip(NAMES, grads, expected_grads):
        assert not torch.isnan(expected).any()
        torch.testing.assert_close(grad.double().cpu(), expected.to(dtype).double(), **tol,
                                   msg=lambda m: f"d{name}: {m}")
