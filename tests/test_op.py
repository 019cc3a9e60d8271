"""The registered op `atomconv::atom_conv2d`: opcheck, gradients through it, torch.compile,
autocast, determinism. Triton runs in its interpreter on the CPU (conftest switches it on)."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from atomconv import AtomConv2d, atom_conv2d
from atomconv.op import atom_conv2d_backward_op, atom_conv2d_op

from helpers import train_step

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs a GPU or Triton's interpreter")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GEOMETRY = dict(stride=(2, 1), padding=1, dilation=(1, 2), groups=2)
OP_GEOMETRY = ([2, 1], [1, 1], [1, 2], 2)


def _problem(dtype=torch.float32, requires_grad=True, bias=True, seed=0):
    """x [2, 4, 7, 6], atom_coeff [2, 2*3, 4, 4], bases [3, 3, 3], weight [6, 2, 2], bias [6] or None
    (the output grid of GEOMETRY is 4 x 4)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(2, 4, 7, 6), (2, 6, 4, 4), (3, 3, 3), (6, 2, 2)] + ([(6,)] if bias else [])
    tensors = [torch.randn(s, generator=g).to(DEVICE, dtype).requires_grad_(requires_grad) for s in shapes]
    return tensors if bias else [*tensors, None]


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last-no-bias"])
def test_opcheck(backend, layout):
    x, atom_coeff, bases, weight, bias = _problem(bias=layout == "contiguous")
    if layout != "contiguous":
        x = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(atom_conv2d_op, (x, atom_coeff, bases, weight, bias, *OP_GEOMETRY, backend))


def test_opcheck_backward_op():
    x, atom_coeff, bases, weight, _ = _problem(requires_grad=False)
    grad_y = torch.randn(2, 6, 4, 4, device=DEVICE)
    for mask in ([True, True, True, True], [False, True, False, True]):
        args = (grad_y, x, atom_coeff, bases, weight, *OP_GEOMETRY, "triton", mask)
        torch.library.opcheck(atom_conv2d_backward_op, args)


def test_reference_backend_gradcheck_through_the_op():
    """The reference backend's backward inside the op (torch.func.vjp) against finite differences."""
    inputs = _problem(torch.float64)
    assert torch.autograd.gradcheck(lambda *t: atom_conv2d(*t, **GEOMETRY, backend="reference"), inputs, fast_mode=True)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_triton_gradients_equal_reference_through_the_op(dtype, tol):
    fused, ref = _problem(dtype), _problem(dtype)
    grad_y = torch.randn(2, 6, 4, 4, generator=torch.Generator().manual_seed(9)).to(DEVICE, dtype)
    atom_conv2d(*fused, **GEOMETRY, backend="triton").backward(grad_y)
    atom_conv2d(*ref, **GEOMETRY, backend="reference").backward(grad_y)
    for f, r in zip(fused, ref):
        assert f.grad.dtype == dtype
        torch.testing.assert_close(f.grad, r.grad, rtol=tol, atol=tol * r.grad.abs().max().item())


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_expanded_and_transposed_grad_output(backend):
    inputs = _problem()
    y = atom_conv2d(*inputs, **GEOMETRY, backend=backend)
    expanded = torch.autograd.grad(y.sum(), inputs, retain_graph=True)  # grad_y is a stride-0 expansion of 1
    transposed_grad = torch.randn(2, 6, 4, 4, device=DEVICE).transpose(2, 3)
    transposed = torch.autograd.grad(y, inputs, transposed_grad)
    ref = _problem()
    y_ref = atom_conv2d(*ref, **GEOMETRY, backend="reference")
    for got, grad_y in ((expanded, torch.ones_like(y_ref)), (transposed, transposed_grad.contiguous())):
        for g, r in zip(got, torch.autograd.grad(y_ref, ref, grad_y, retain_graph=True)):
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def _network(backend):
    torch.manual_seed(0)
    return nn.Sequential(
        AtomConv2d(3, 4, 3, padding=1, num_atoms=2, bases_per_scale=3, backend=backend), nn.ReLU(),
        AtomConv2d(4, 4, 3, stride=2, padding=1, groups=2, num_atoms=2, bases_per_scale=3, backend=backend),
    ).to(DEVICE)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_compile_fullgraph_forward_and_training_step_equal_eager(backend):
    eager = _network(backend)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-6, atol=1e-6)
    losses = [train_step(m, torch.optim.SGD(p.parameters(), lr=0.1), x)
              for m, p in ((eager, eager), (compiled, compiled_model))]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-6)
    for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p_compiled, p_eager, rtol=1e-5, atol=1e-6, msg=name)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in compiled_model.parameters())


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compile_with_inductor_on_cpu_forward_and_training_step_equal_eager():
    """torch.compile's default backend (inductor, C++ codegen on the CPU) around the op: the
    forward and one SGD step match eager (in float64, so that inductor's reordered float sums
    around the generator stay far below the tolerance)."""
    if DEVICE != "cpu":
        pytest.skip("the CPU inductor check")
    torch._dynamo.reset()
    eager = _network("auto").double()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    x = torch.randn(2, 3, 6, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(compiled(x), eager(x))
    losses = [train_step(m, torch.optim.SGD(p.parameters(), lr=0.1), x)
              for m, p in ((eager, eager), (compiled, compiled_model))]
    torch.testing.assert_close(losses[1], losses[0])
    for (name, p_eager), p_compiled in zip(eager.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(p_compiled, p_eager, msg=name)


def test_compile_sees_one_op_per_layer():
    """Dynamo traces the network as one graph in which each layer's ACDA is the registered op."""
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    model = _network("triton")
    torch.compile(model, fullgraph=True, backend=counter)(torch.randn(1, 3, 5, 5, device=DEVICE))
    graph = counter.graphs[0].graph
    targets = [node.target for node in graph.nodes if node.op == "call_function"]
    assert counter.frame_count == 1
    assert sum(t is torch.ops.atomconv.atom_conv2d.default for t in targets) == 2


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_cpu_autocast_casts_once_like_conv2d(backend):
    """Under CPU autocast the inputs are cast to the autocast dtype (bfloat16 by default), as for
    nn.Conv2d; gradients reach the float32 leaves in float32."""
    x, atom_coeff, bases, weight, bias = _problem(torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y = atom_conv2d(x, atom_coeff, bases, weight, bias, **GEOMETRY, backend=backend)
        assert y.dtype == nn.Conv2d(4, 6, 3).to(DEVICE)(x).dtype == torch.bfloat16
    low = [t.detach().to(torch.bfloat16) for t in (x, atom_coeff, bases, weight, bias)]
    torch.testing.assert_close(y, atom_conv2d(*low, **GEOMETRY, backend=backend), rtol=0, atol=0)
    y.float().sum().backward()
    assert x.grad.dtype == weight.grad.dtype == torch.float32


def test_autocast_leaves_float64_alone():
    inputs = _problem(torch.float64, requires_grad=False)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert atom_conv2d(*inputs, **GEOMETRY, backend="reference").dtype == torch.float64


def test_compiled_autocast_matches_eager():
    model = _network("triton")
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 6, 5, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y_eager, y_compiled = model(x), compiled(x)
    assert y_compiled.dtype == torch.bfloat16
    torch.testing.assert_close(y_compiled, y_eager)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_deterministic_mode_gives_identical_gradients(backend):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = []
        for _ in range(2):
            inputs = _problem()
            atom_conv2d(*inputs, **GEOMETRY, backend=backend).square().sum().backward()
            runs.append([t.grad for t in inputs])
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_op_refuses_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        atom_conv2d_op(*_problem(requires_grad=False), *OP_GEOMETRY, "cudnn")


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_double_backward_fails_at_create_graph_and_says_why(backend):
    inputs = _problem()
    y = atom_conv2d(*inputs, **GEOMETRY, backend=backend)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        torch.autograd.grad(y.square().sum(), inputs[0], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported"):
        atom_conv2d(*inputs, **GEOMETRY, backend=backend).sum().backward(create_graph=True)


@pytest.mark.parametrize("transform", [torch.func.grad, torch.func.jacrev])
def test_torch_func_transforms_say_they_are_unsupported(transform):
    x, atom_coeff, bases, weight, bias = _problem(requires_grad=False)
    with pytest.raises(RuntimeError, match="torch.func transforms that differentiate .* are not supported"):
        transform(lambda x: atom_conv2d(x, atom_coeff, bases, weight, bias, **GEOMETRY).sum())(x)

