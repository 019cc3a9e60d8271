"""Deployment: the backend chosen when the op runs (not when traced), torch.export round trip in a
fresh process, ONNX export in standard operators checked against onnxruntime, jit.trace/script."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from unittest import mock

import pytest
import torch
from torch import nn

import atomconv.op
from atomconv import AtomConv2d
from atomconv.op import resolve_backend

OP = torch.ops.atomconv.atom_conv2d.default


def _network(generator_norm="batch"):
    """x [N, 3, H, W] -> [N, 4, H/2, W/2]: two AtomConv2d layers (3×3, then strided 5×5) with
    narrow generators (4 channels), eval mode."""
    torch.manual_seed(0)
    options = dict(num_atoms=2, generator_norm=generator_norm, generator_width=4)
    return nn.Sequential(
        AtomConv2d(3, 4, 3, padding=1, **options), nn.ReLU(),
        AtomConv2d(4, 4, 5, stride=2, padding=2, groups=2, bases_per_scale=3, **options),
    ).eval()


def test_resolve_backend():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert [resolve_backend("auto", cuda, d) for d in (torch.float16, torch.bfloat16, torch.float32)] == ["triton"] * 3
    assert resolve_backend("auto", cpu, torch.float32) == "reference"
    assert resolve_backend("reference", cuda, torch.float32) == "reference"
    assert resolve_backend("triton", cpu, torch.float64) == "triton"  # explicit: the op's own checks refuse it later
    atomconv.op._warned_reference_on_cuda.discard(torch.float64)
    with pytest.warns(UserWarning, match="CUDA tensors of dtype torch.float64 on the reference"):
        assert resolve_backend("auto", cuda, torch.float64) == "reference"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        assert resolve_backend("auto", cuda, torch.float64) == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve_backend("cudnn", cpu, torch.float32)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="runs the Triton path: needs a GPU or Triton's interpreter")
def test_export_records_auto_and_the_backend_is_chosen_when_the_program_runs():
    """An ExportedProgram made on the CPU carries backend="auto"; which backend runs is decided
    each time it runs (here, made to answer "triton", as it would for CUDA tensors)."""
    model, x = _network(), torch.randn(2, 3, 8, 8)
    program = torch.export.export(model, (x,))
    ops = [node for node in program.graph.nodes if node.target is OP]
    assert len(ops) == 2 and all(node.args[-1] == "auto" for node in ops)
    import kernels.forward

    with mock.patch.object(atomconv.op, "resolve_backend", return_value="triton") as resolve, \
            mock.patch.object(kernels.forward, "launch_forward", wraps=kernels.forward.launch_forward) as launch:
        y = program.module()(x)
    assert resolve.call_args_list == [mock.call("auto", x.device, x.dtype)] * 2 and launch.call_count == 2
    with torch.no_grad():
        torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace.*` is deprecated:DeprecationWarning")
def test_jit_trace_records_auto():
    model, x = _network(), torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks become constants, as expected
        traced = torch.jit.trace(model, (x,))
    ops = [node for node in traced.inlined_graph.nodes() if node.kind() == "atomconv::atom_conv2d"]
    assert len(ops) == 2 and all(list(node.inputs())[-1].toIValue() == "auto" for node in ops)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_jit_script_is_not_supported():
    """As the README says: TorchScript cannot compile AtomConv2d's Python; use torch.export."""
    with pytest.raises(RuntimeError):
        torch.jit.script(_network())


def test_which_backend_ran_is_logged(caplog):
    model, x = _network(), torch.randn(1, 3, 6, 6)
    with caplog.at_level(logging.DEBUG, logger="atomconv"):
        model(x)
    assert [r.getMessage() for r in caplog.records if r.name == "atomconv"] == [
        "atomconv::atom_conv2d ran backend='reference' on cpu torch.float32"] * 2


def test_torch_export_round_trip_in_a_fresh_process(tmp_path):
    """Save an ExportedProgram, load and run it in a new interpreter (which imports atomconv to
    register the op, and nothing else of ours), and get the same output."""
    model, x = _network(), torch.randn(2, 3, 9, 7)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "net.pt2")
    with torch.no_grad():
        torch.save({"x": x, "y": model(x)}, tmp_path / "io.pt")
    code = (
        "import sys, torch, atomconv\n"
        "program = torch.export.load(sys.argv[1] + '/net.pt2')\n"
        "io = torch.load(sys.argv[1] + '/io.pt')\n"
        "y = program.module()(io['x'])\n"
        "torch.testing.assert_close(y, io['y'], rtol=0, atol=0)\n"
        "print('round trip ok', tuple(y.shape))\n"
    )
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120,
                            env=env)
    assert result.returncode == 0, result.stderr
    assert "round trip ok (2, 4, 5, 4)" in result.stdout


# What the ONNX graph of AtomConv2d layers may contain: the generator's convs, norms and tanh, and
# the operator's pad, slices, multiply-adds and matrix products (with the reshapes between).
ONNX_OPS = {"Conv", "BatchNormalization", "Tanh", "Relu", "Pad", "Slice", "Mul", "Add", "MatMul", "Reshape",
            "Transpose", "Constant", "Cast"}


@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated:FutureWarning")
@pytest.mark.parametrize("generator_norm", ["batch", "group"])
def test_onnx_export_in_standard_operators_runs_in_onnxruntime(tmp_path, generator_norm):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = _network(generator_norm)
    n, (h, w) = 2, (9, 7)
    x = torch.randn(n, 3, h, w)
    path = tmp_path / "net.onnx"
    torch.onnx.export(model, (x,), path, dynamo=True, verbose=False)

    graph = onnx.shape_inference.infer_shapes(onnx.load(path)).graph
    ops = {node.op_type for node in graph.node}
    allowed = ONNX_OPS | ({"GroupNormalization", "InstanceNormalization"} if generator_norm == "group" else set())
    assert "Slice" in ops and "MatMul" in ops and ops <= allowed, ops - allowed
    # No unfolded input: no value in the graph is as large as N*C_in*K²*H_out*W_out of either layer
    # (the operator's largest are Z, N*M*C_in*H_out*W_out, and the atoms, N*M*K²*H_out*W_out, with M=2 < C_in).
    unfolded = min(n * 3 * 9 * h * w, n * 4 * 25 * ((h + 1) // 2) * ((w + 1) // 2))
    sizes = [
        torch.Size([d.dim_value for d in v.type.tensor_type.shape.dim]).numel() for v in graph.value_info
    ]
    assert sizes and max(sizes) < unfolded

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(torch.from_numpy(y), expected, rtol=1e-5, atol=1e-5)
