"""The ONNX export of AtomConv2d, checked and timed under onnxruntime on the CPU.

    python -m perf.onnx_export [--threads T] [--batch N] [--channels C] [--size S] [--kernel K]

Exports one `AtomConv2d(C, C, K, padding=K // 2)` layer (eval mode, default options: M=6, batch
norm generator) and its operator alone (`atom_conv2d` with fixed atom coefficients) with
`torch.onnx.export`, runs both in onnxruntime's CPU provider, and prints the largest |difference|
from eager PyTorch (the reference backend) and the median times of both, side by side, with T
threads for each (default 1). Defaults: N=8, C=64, 56×56, K=3, float32.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from atomconv import AtomConv2d, atom_conv2d

from .measure import cpu_time_ms


class Operator(nn.Module):
    """atom_conv2d of the layer's bases and weight with fixed atom coefficients: x -> y."""

    def __init__(self, layer: AtomConv2d, atom_coeff: torch.Tensor):
        super().__init__()
        self.layer, self.atom_coeff = layer, atom_coeff
        self.eval()

    def forward(self, x):
        layer = self.layer
        return atom_conv2d(x, self.atom_coeff, layer.bases, layer.weight, layer.bias, layer.stride, layer.padding,
                           layer.dilation, layer.groups)


def check(model: nn.Module, x: torch.Tensor, threads: int, folder: Path) -> dict[str, float]:
    """Export model, run it in onnxruntime: max |onnx - eager| and both median times (ms)."""
    import onnxruntime as ort

    path = folder / "model.onnx"
    torch.onnx.export(model, (x,), path, dynamo=True, verbose=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    with torch.no_grad():
        expected = model(x)
        (got,) = session.run(None, feed)
        eager = cpu_time_ms(lambda: model(x))
    onnx = cpu_time_ms(lambda: session.run(None, feed))
    return {"max_abs_error": (torch.from_numpy(got) - expected).abs().max().item(),
            "max_abs_output": expected.abs().max().item(),
            "eager_ms": eager["median_ms"], "onnxruntime_ms": onnx["median_ms"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.onnx_export", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="threads for torch and for onnxruntime (default 1)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=56)
    parser.add_argument("--kernel", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n, c, s, k = args.batch, args.channels, args.size, args.kernel
    layer = AtomConv2d(c, c, k, padding=k // 2).eval()
    x = torch.randn(n, c, s, s)
    with torch.no_grad():
        atom_coeff = layer.atom_coefficients(x)
    print(f"N={n} C_in=C_out={c} {s}x{s} K={k} M={layer.num_atoms} L={layer.bases.shape[0]} float32, "
          f"{args.threads} thread(s) for torch and onnxruntime", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in (("layer (generator + operator)", layer), ("operator alone", Operator(layer, atom_coeff))):
            r = check(model, x, args.threads, Path(tmp))
            print(f"{name}: max |onnxruntime - eager| = {r['max_abs_error']:.3g} (max |y| = {r['max_abs_output']:.3g}); "
                  f"onnxruntime {r['onnxruntime_ms']:.1f} ms, eager reference {r['eager_ms']:.1f} ms (median)",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
