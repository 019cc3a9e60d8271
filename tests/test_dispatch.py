"""Dispatch between backends: which kernels `atom_conv2d` runs, forward and backward."""

from __future__ import annotations

import os
import subprocess
import sys
from unittest import mock

import pytest
import torch

import atomconv.op
import kernels.backward
import kernels.forward
from atomconv import atom_conv2d

from helpers import output_size

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs a GPU or Triton's interpreter")


def _problem(dtype, requires_grad=False, seed=0):
    """x [2, 4, 7, 6], atom_coeff [2, 2*3, H_out, W_out], bases [3, 3, 3], weight [6, 2, 2], bias [6]:
    stride (2, 1), padding 1, dilation (1, 2), groups 2."""
    g = torch.Generator().manual_seed(seed)
    h_out, w_out = output_size((7, 6), 3, (2, 1), 1, (1, 2))
    shapes = [(2, 4, 7, 6), (2, 6, h_out, w_out), (3, 3, 3), (6, 2, 2), (6,)]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return [torch.randn(s, generator=g).to(device, dtype).requires_grad_(requires_grad) for s in shapes]


GEOMETRY = dict(stride=(2, 1), padding=1, dilation=(1, 2), groups=2)


def test_triton_backend_runs_the_kernel():
    args = _problem(torch.float32)
    with mock.patch.object(kernels.forward, "launch_forward", wraps=kernels.forward.launch_forward) as launch:
        y = atom_conv2d(*args, **GEOMETRY, backend="triton")
    assert launch.call_count == 1
    torch.testing.assert_close(y, atom_conv2d(*args, **GEOMETRY, backend="reference"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 1e-2)])
def test_triton_backward_runs_the_kernels_and_equals_reference(dtype, tol):
    fused_in = _problem(dtype, requires_grad=True)
    ref_in = _problem(dtype, requires_grad=True)
    grad_y = torch.randn(2, 6, 4, 4, generator=torch.Generator().manual_seed(9)).to(fused_in[0])
    y = atom_conv2d(*fused_in, **GEOMETRY, backend="triton")
    with mock.patch.object(kernels.backward, "launch_backward", wraps=kernels.backward.launch_backward) as launch, \
            mock.patch.object(atomconv.op, "atom_conv2d_reference_backward", side_effect=AssertionError("reference path used")):
        y.backward(grad_y)
    assert launch.call_count == 1
    atom_conv2d(*ref_in, **GEOMETRY, backend="reference").backward(grad_y)
    for fused, ref in zip(fused_in, ref_in):
        assert fused.grad.dtype == dtype
        torch.testing.assert_close(fused.grad, ref.grad, rtol=tol, atol=tol)


def test_triton_gradients_only_for_inputs_that_need_them():
    x, coeff, bases, weight, bias = _problem(torch.float32)
    weight.requires_grad_()
    atom_conv2d(x, coeff, bases, weight, None, **GEOMETRY, backend="triton").sum().backward()
    assert weight.grad is not None and x.grad is None and coeff.grad is None


def test_triton_backend_rejects_float64():
    with pytest.raises(TypeError, match="float64.*backend='reference'"):
        atom_conv2d(*_problem(torch.float64), **GEOMETRY, backend="triton")


def test_triton_backend_on_cpu_without_interpreter_says_so():
    code = ("import torch; from atomconv import atom_conv2d\n"
            "x = torch.randn(1, 2, 5, 5); c = torch.randn(1, 4, 3, 3); b = torch.randn(2, 3, 3); w = torch.randn(3, 2, 2)\n"
            "atom_conv2d(x, c, b, w, backend='triton')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "the Triton path needs CUDA tensors" in result.stderr and "TRITON_INTERPRET=1" in result.stderr


def test_every_launcher_asks_the_autotune_cache():
    """Forward and the three backward kernels each take their config from `autotune_cache`; the
    config it answers is the one launched (here: a non-default candidate, forced)."""
    import autotune_cache
    import kernels.configs

    asked = {}

    def answer(kernel, *, device, dtype, shape, candidates, default, benchmark=None, footprint=None):
        chosen = next(c for c in candidates if c != default)
        asked[kernel] = chosen
        return chosen

    fitted = []
    fit = kernels.configs.fit_tile_config

    def recording_fit(config, geo, **kwargs):
        fitted.append(config)
        return fit(config, geo, **kwargs)

    # (Candidates unpruned by the static report: float32 on "sm_80", the interpreter's arch, leaves
    # some kernels only their default.)
    with mock.patch.object(autotune_cache, "get_config", side_effect=answer), \
         mock.patch.object(kernels.configs, "_unspilled", side_effect=lambda kernel, candidates, *rest: candidates), \
         mock.patch.object(kernels.forward, "fit_tile_config", side_effect=recording_fit), \
         mock.patch.object(kernels.backward, "fit_tile_config", side_effect=recording_fit):
        args = _problem(torch.float32, requires_grad=True)
        atom_conv2d(*args, **GEOMETRY, backend="triton").sum().backward()
    assert set(asked) == {"atom_conv2d_fwd", "atom_conv2d_bwd_coeff_bases", "atom_conv2d_bwd_weight", "atom_conv2d_bwd_input"}
    assert sorted(map(repr, fitted)) == sorted(map(repr, asked.values()))
