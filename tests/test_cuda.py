"""What only a CUDA GPU can show: the fused kernels compiled for it (not interpreted) against the
reference over the whole geometry grid in every dtype, torch.compile with Inductor, CUDA
autocast, CUDA-graph capture, and tuning end to end. Every test here is marked `cuda` (skipped
without a GPU; `python -m pytest -m cuda` runs just these, as `python -m perf.gpu_session` does).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import kernels
from atomconv import AtomConv2d, atom_conv2d
from atomconv.reference import atom_conv2d_reference
from atomconv.validation import validate_atom_conv2d
from helpers import GEOMETRIES, REL_TOL, make_problem, train_step

pytestmark = pytest.mark.cuda
REPO = Path(__file__).resolve().parents[1]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NAMES = ("x", "atom_coeff", "bases", "weight")


def _reference_and_grads(inputs, kwargs, grad_y):
    leaves = [t.detach().double().cpu().requires_grad_() for t in inputs[:4]]
    bias = None if inputs[4] is None else inputs[4].double().cpu()
    y = atom_conv2d_reference(*leaves, bias, validate_atom_conv2d(*leaves, bias, **kwargs))
    return y.detach(), torch.autograd.grad(y, leaves, grad_y.double().cpu())


def _assert_close(name, got, expected, dtype):
    assert got.dtype == dtype and got.shape == expected.shape, name
    err = (got.double().cpu() - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= REL_TOL[dtype] * scale, f"{name}: max error {err:.3g} vs max |value| {scale:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GEOMETRIES, ids=lambda c: "k{4}-s{5}-p{6}-d{7}-g{8}-bias{9}".format(*c))
def test_fused_forward_and_every_gradient_match_the_reference(case, dtype):
    n, c_in, c_out, hw, kernel, stride, padding, dilation, groups, bias, m, l = case
    tensors, kwargs = make_problem(n, c_in, c_out, hw, kernel, stride, padding, dilation, groups, bias, m, l)
    inputs = [None if t is None else t.to("cuda", dtype) for t in tensors]
    y = kernels.atom_conv2d_forward(*inputs, **kwargs)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to("cuda", dtype)
    grads = kernels.atom_conv2d_backward(grad_y, *inputs[:4], **kwargs)
    expected_y, expected_grads = _reference_and_grads(inputs, kwargs, grad_y)
    _assert_close("y", y, expected_y, dtype)
    for name, grad, expected in zip(NAMES, grads, expected_grads):
        _assert_close(f"d{name}", grad, expected, dtype)


def _network():
    torch.manual_seed(0)
    return nn.Sequential(
        AtomConv2d(3, 8, 3, padding=1, num_atoms=4), nn.ReLU(),
        AtomConv2d(8, 8, 5, stride=2, padding=2, groups=2, num_atoms=3),
    ).cuda()


def test_compile_fullgraph_with_inductor_equals_eager():
    eager = _network()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(2, 3, 17, 15, device="cuda")
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-4, atol=1e-4)
    losses = [train_step(m, torch.optim.SGD(p.parameters(), lr=0.1), x)
              for m, p in ((eager, eager), (compiled, compiled_model))]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p_compiled, p_eager, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_autocast_runs_the_kernels_in_the_autocast_dtype(dtype):
    model = _network()
    x = torch.randn(2, 3, 17, 15, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        y = model(x)
    assert y.dtype == dtype
    y.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        reference = copy.deepcopy(model).double()(x.double())
    err = (y.double() - reference).abs().max().item()
    assert err <= 5 * REL_TOL[dtype] * reference.abs().max().item()


def test_cuda_graph_capture_of_a_forward_and_a_training_step():
    model = _network()
    x = torch.randn(2, 3, 17, 15, device="cuda")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture: compiles the kernels, tunes nothing
        for _ in range(2):
            train_step(model, optimizer, x)
    torch.cuda.current_stream().wait_stream(side)

    model.eval()
    forward_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(forward_graph):
        y = model(x)
    forward_graph.replay()
    torch.testing.assert_close(y, model(x))

    model.train()
    step_graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=False)
    with torch.cuda.graph(step_graph):
        loss = model(x).square().mean()
        loss.backward()
        optimizer.step()
    before = [p.detach().clone() for p in model.parameters()]
    step_graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(loss) and any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


TUNE_ONE_SHAPE = """
import json, sys, torch, autotune_cache, kernels
cache = autotune_cache.default_cache()
x = torch.randn(2, 16, 20, 20, device="cuda", dtype=torch.float16)
beta = torch.randn(2, 6 * 6, 20, 20, device="cuda", dtype=torch.float16)
bases = torch.randn(6, 3, 3, device="cuda", dtype=torch.float16)
weight = torch.randn(16, 16, 6, device="cuda", dtype=torch.float16)
y = kernels.atom_conv2d_forward(x, beta, bases, weight, None, 1, 1, 1, 1)
kernels.atom_conv2d_backward(torch.randn_like(y), x, beta, bases, weight, 1, 1, 1, 1)
torch.cuda.synchronize()
print(json.dumps({"benchmarks": cache.benchmarks_run}))
"""


def test_tuning_end_to_end_a_second_process_reuses_the_learned_file(tmp_path):
    env = {**os.environ, "ATOMCONV_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    env.pop("ATOMCONV_AUTOTUNE")

    def run():
        done = subprocess.run([sys.executable, "-c", TUNE_ONE_SHAPE], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])["benchmarks"]

    assert run() >= 4  # the forward and the three backward kernels benchmarked once each
    [learned] = (tmp_path / "autotune").glob("*.json")
    kernels_learned = {e["kernel"] for e in json.loads(learned.read_text())["entries"]}
    assert {"atom_conv2d_fwd", "atom_conv2d_bwd_input", "atom_conv2d_bwd_weight"} <= kernels_learned
    assert run() == 0  # the second process finds every config in the learned file
