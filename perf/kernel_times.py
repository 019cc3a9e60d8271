"""Per-kernel GPU times of one forward and one backward of the perf problem, by profiling.

Every CUDA kernel a direction launches (our Triton kernels and any torch op the launchers run,
such as the sums of partials) is timed by `torch.profiler` over REPEATS calls and reported per
call, next to the whole direction timed with `do_bench` and a static `F.conv2d` of the same
channels (cuDNN) as the anchor. Problem: N=32, C_in=C_out=64, 56x56, M=6, L=6*(K//2), float16,
"same" padding, as the static report and the issue targets use.

    python -m perf.kernel_times --k 3 7 --json FILE   (rows added to FILE's, if it exists)
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

REPEATS = 10


def perf_inputs(kernel_size: int, device="cuda", dtype=torch.float16) -> dict[str, torch.Tensor]:
    """Random inputs of the perf problem at one kernel size (α scaled to keep y of order one)."""
    from atomconv import fourier_bessel_bases

    g = torch.Generator().manual_seed(0)
    n, c, hw, m = 32, 64, 56, 6
    bases = fourier_bessel_bases(kernel_size, 6)

    def rand(*shape, scale=1.0):
        return (torch.randn(shape, generator=g) * scale).to(device, dtype)

    return dict(x=rand(n, c, hw, hw), atom_coeff=rand(n, m * bases.shape[0], hw, hw), bases=bases.to(device, dtype),
                weight=rand(c, c, m, scale=(c * m) ** -0.5), bias=rand(c))


def _profiled_us(fn) -> dict[str, float]:
    """Mean µs per call of every CUDA kernel fn() launches, by kernel name."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPEATS):
            fn()
        torch.cuda.synchronize()
    totals = collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time
    return {name: us / REPEATS for name, us in totals.items()}


def time_kernels(kernel_sizes=(3, 7)) -> list[dict]:
    """Rows {kernel_size, direction, what, us}: each kernel of each direction, the direction as a
    whole (`do_bench`, "total"), and cuDNN's conv of the same shape ("cudnn conv2d")."""
    import kernels
    from triton.testing import do_bench

    rows = []
    for k in kernel_sizes:
        t = perf_inputs(k)
        args = (t["x"], t["atom_coeff"], t["bases"], t["weight"])
        geometry = (1, k // 2, 1, 1)
        y = kernels.atom_conv2d_forward(*args, t["bias"], *geometry)
        grad_y = torch.randn_like(y)
        directions = {
            "forward": lambda: kernels.atom_conv2d_forward(*args, t["bias"], *geometry),
            "backward": lambda: kernels.atom_conv2d_backward(grad_y, *args, *geometry),
        }
        static_weight = torch.randn(64, 64, k, k, device="cuda", dtype=torch.float16) * (64 * k * k) ** -0.5
        x_leaf = t["x"].clone().requires_grad_()
        w_leaf = static_weight.clone().requires_grad_()
        conv_y = F.conv2d(x_leaf, w_leaf, None, 1, k // 2)
        static = {
            "forward": lambda: F.conv2d(t["x"], static_weight, None, 1, k // 2),
            "backward": lambda: torch.autograd.grad(conv_y, (x_leaf, w_leaf), grad_y, retain_graph=True),
        }
        for direction, fn in directions.items():
            for name, us in sorted(_profiled_us(fn).items(), key=lambda kv: -kv[1]):
                rows.append({"kernel_size": k, "direction": direction, "what": name, "us": us})
            rows.append({"kernel_size": k, "direction": direction, "what": "total", "us": 1e3 * do_bench(fn)})
            rows.append({"kernel_size": k, "direction": direction, "what": "cudnn conv2d",
                         "us": 1e3 * do_bench(static[direction])})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, nargs="+", default=[3, 7], help="kernel sizes")
    parser.add_argument("--json", type=Path, required=True, help="add the rows to this file")
    args = parser.parse_args(argv)
    rows = json.loads(args.json.read_text()) if args.json.exists() else []
    for k in args.k:  # written after each kernel size: a later one timing out keeps the earlier rows
        rows += time_kernels(kernel_sizes=(k,))
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
