"""Static report: compile every kernel x candidate config x dtype for sm_80 and sm_90, no GPU needed.

    python -m perf.static_report [--json FILE] [--defaults-only]

One record per variant (SPEC §4): kernel, arch, dtype, config, default, shared_bytes,
registers, spill_bytes, mma; and what it was compiled with and for: `triton` (the version) and
`kernel_size` (the problem). The kernels: the fused forward (`atom_conv2d_fwd`) and the three
backward kernels, dβ (`atom_conv2d_bwd_coeff`, and `atom_conv2d_bwd_coeff_bases`: the same
kernel compiled to also reduce dΨ), dα (`atom_conv2d_bwd_weight`) and dx
(`atom_conv2d_bwd_input`). Kernels are compiled for the project's performance problem (N=32,
C_in=C_out=64, 56x56, M=6, "same" padding) at each kernel size of KERNEL_SIZES, with the
specialisation the launcher's real arguments get at run time (16-byte divisible pointers and
ints, ints equal to 1 folded to constants), taken from Triton's own argument binder.
Registers and spills come from the bundled `cuobjdump --dump-resource-usage` (REG, STACK),
the MMA count from its SASS (HMMA on sm_80, HGMMA or HMMA on sm_90). Must run without
TRITON_INTERPRET: the interpreter compiles nothing.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default; set to silence triton 3.9's warning

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from kernels import backward, configs, forward, launch  # noqa: E402

from .grids import Problem  # noqa: E402

ARCH_NUMBERS = {"sm_80": 80, "sm_90": 90}
SHARED_LIMIT_BYTES = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
MMA_OPCODES = re.compile(r"\b(?:HMMA|HGMMA)\b")
RESOURCE_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)")
KERNEL_SIZES = (3, 5, 7)
"""The kernel sizes the report compiles for: register pressure grows with the taps (K=7 spills
where K=3 does not), so pruning by the report uses the records of the nearest kernel size."""


@dataclass(frozen=True)
class Variant:
    """One kernel compiled with one config for one dtype and problem: its argument values by
    name (tensors may be empty CPU tensors, only dtype, strides and alignment matter) and the
    launch options."""

    kernel: str
    fn: triton.runtime.JITFunction
    dtype: torch.dtype
    config: configs.ForwardConfig
    kernel_size: int
    args: dict[str, object]
    num_warps: int
    num_stages: int


def perf_problem(dtype: torch.dtype, kernel_size: int):
    """The project's performance shape at one kernel size K: N=32, C_in=C_out=64, 56x56, M=6,
    L = 6 * (K // 2), padding K // 2, bias, contiguous NCHW. Returns x, atom_coeff, bases,
    weight, bias, y (or dy), geometry; the tensors are empty (on the meta device: nothing is
    allocated)."""
    geo = Problem(batch=32, channels=64, size=56, kernel_size=kernel_size, num_atoms=6, dtype=dtype).geometry()
    (h, w), (kh, kw), m, num_bases = geo.in_size, geo.kernel_size, geo.num_atoms, geo.num_bases
    make = functools.partial(torch.empty, dtype=dtype, device="meta")
    return (make(geo.batch, geo.in_channels, h, w), make(geo.batch, m * num_bases, *geo.out_size),
            make(num_bases, kh, kw), make(geo.out_channels, geo.in_channels, m), make(geo.out_channels),
            make(geo.batch, geo.out_channels, *geo.out_size), geo)


def forward_variants(dtype: torch.dtype, kernel_size: int) -> Iterator[Variant]:
    """The fused forward on the performance shape, every candidate config."""
    x, atom_coeff, bases, weight, bias, y, geo = perf_problem(dtype, kernel_size)
    for config in configs.all_forward_candidates():
        launch = configs.fit_forward_config(config, geo)
        args = forward.forward_kernel_args(x, atom_coeff, bases, weight, bias, y, geo, launch)
        yield Variant("atom_conv2d_fwd", forward.atom_conv2d_fwd_kernel, dtype, config, kernel_size, args,
                      launch.num_warps, launch.num_stages)


def coeff_grad_variants(dtype: torch.dtype, kernel_size: int, bases_grad: bool) -> Iterator[Variant]:
    """The dβ kernel (and dΨ with bases_grad) on the performance shape, every candidate config."""
    x, atom_coeff, bases, weight, _, dy, geo = perf_problem(dtype, kernel_size)
    dbases = torch.empty(1, *bases.shape, dtype=torch.float32, device="meta") if bases_grad else None
    for config in configs.coeff_grad_candidates():
        launch = configs.fit_forward_config(config, geo)
        args = backward.coeff_grad_kernel_args(x, atom_coeff, bases, weight, dy, atom_coeff, dbases, geo, launch)
        yield Variant("atom_conv2d_bwd_coeff_bases" if bases_grad else "atom_conv2d_bwd_coeff",
                      backward.atom_conv2d_bwd_coeff_kernel, dtype, config, kernel_size, args, launch.num_warps,
                      launch.num_stages)


def weight_grad_variants(dtype: torch.dtype, kernel_size: int) -> Iterator[Variant]:
    """The dα kernel on the performance shape, every candidate config (132 SMs' worth of splits)."""
    x, atom_coeff, bases, weight, _, dy, geo = perf_problem(dtype, kernel_size)
    for config in configs.weight_grad_candidates():
        launch = configs.fit_forward_config(config, geo)
        partials = torch.empty(configs.weight_grad_splits(geo, launch, 2 * 132), 1, dtype=torch.float32,
                               device="meta")
        args = backward.weight_grad_kernel_args(x, atom_coeff, bases, dy, partials, geo, launch)
        yield Variant("atom_conv2d_bwd_weight", backward.atom_conv2d_bwd_weight_kernel, dtype, config, kernel_size,
                      args, launch.num_warps, launch.num_stages)


def input_grad_variants(dtype: torch.dtype, kernel_size: int) -> Iterator[Variant]:
    """The dx kernel on the performance shape, every candidate config."""
    x, atom_coeff, bases, weight, _, dy, geo = perf_problem(dtype, kernel_size)
    for config in configs.input_grad_candidates():
        launch = configs.fit_forward_config(config, backward.transposed_geometry(geo))
        args = backward.input_grad_kernel_args(atom_coeff, bases, weight, dy, x, geo, launch)
        yield Variant("atom_conv2d_bwd_input", backward.atom_conv2d_bwd_input_kernel, dtype, config, kernel_size,
                      args, launch.num_warps, launch.num_stages)


KERNELS: dict[str, Callable[[torch.dtype, int], Iterator[Variant]]] = {
    "atom_conv2d_fwd": forward_variants,
    "atom_conv2d_bwd_coeff": functools.partial(coeff_grad_variants, bases_grad=False),
    "atom_conv2d_bwd_coeff_bases": functools.partial(coeff_grad_variants, bases_grad=True),
    "atom_conv2d_bwd_weight": weight_grad_variants,
    "atom_conv2d_bwd_input": input_grad_variants,
}
DEFAULTS: dict[str, dict] = {
    "atom_conv2d_fwd": configs.DEFAULT_FORWARD,
    "atom_conv2d_bwd_coeff": configs.DEFAULT_COEFF_GRAD,
    "atom_conv2d_bwd_coeff_bases": configs.DEFAULT_COEFF_BASES_GRAD,
    "atom_conv2d_bwd_weight": configs.DEFAULT_WEIGHT_GRAD,
    "atom_conv2d_bwd_input": configs.DEFAULT_INPUT_GRAD,
}


def _ast_source(variant: Variant, target: GPUTarget) -> ASTSource:
    """The source Triton's runtime would compile for these arguments: its own binder gives the
    signature and specialisation, its own packing turns them into constexprs and attrs."""
    backend = make_backend(target)
    binder = create_function_from_signature(variant.fn.signature, variant.fn.params, backend)
    bound_args, specialization, options = binder(**variant.args)
    _, signature, constexprs, attrs = variant.fn._pack_args(backend, {}, bound_args, specialization, options)
    return ASTSource(variant.fn, signature, constexprs, attrs)


def _cuobjdump(*args: str) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return subprocess.run([str(tool), *args], check=True, capture_output=True, text=True).stdout


def compile_variant(variant: Variant, arch: str) -> dict:
    """Compile one variant for one arch and measure it: the report's record."""
    target = GPUTarget("cuda", ARCH_NUMBERS[arch], 32)
    compiled = triton.compile(_ast_source(variant, target), target=target,
                              options={"num_warps": variant.num_warps, "num_stages": variant.num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        registers, stack = map(int, RESOURCE_RE.search(_cuobjdump("--dump-resource-usage", str(cubin))).groups())
        mma = len(MMA_OPCODES.findall(_cuobjdump("-sass", str(cubin))))
    return {
        "kernel": variant.kernel,
        "arch": arch,
        "dtype": str(variant.dtype).removeprefix("torch."),
        "config": variant.config.as_dict(),
        "default": DEFAULTS[variant.kernel][variant.dtype, arch] == variant.config,
        "shared_bytes": compiled.metadata.shared,
        "registers": registers,
        "spill_bytes": stack,
        "mma": mma,
        "triton": triton.__version__,
        "kernel_size": variant.kernel_size,
    }


def build_report(archs=configs.ARCHS, dtypes=configs.KERNEL_DTYPES, kernel_sizes=KERNEL_SIZES,
                 defaults_only: bool = False) -> list[dict]:
    """Records for every kernel x candidate config x dtype x kernel size x arch (only the
    defaults if asked)."""
    if launch.INTERPRETING:
        raise RuntimeError("the static report compiles for GPUs: run it without TRITON_INTERPRET=1")
    records = []
    for kernel, variants in KERNELS.items():
        for dtype in dtypes:
            for kernel_size in kernel_sizes:
                print(f"static report: compiling {kernel} {str(dtype).removeprefix('torch.')} K={kernel_size} for "
                      f"{', '.join(archs)} ({len(records)} variants so far)", file=sys.stderr, flush=True)
                for variant in variants(dtype, kernel_size):
                    for arch in archs:
                        if defaults_only and DEFAULTS[kernel][dtype, arch] != variant.config:
                            continue
                        records.append(compile_variant(variant, arch))
    return records


def format_table(records: list[dict]) -> str:
    import pandas as pd

    frame = pd.DataFrame(records)
    frame["config"] = frame["config"].map(lambda c: " ".join(f"{k}={v}" for k, v in c.items()))
    frame["shared_limit"] = frame["arch"].map(SHARED_LIMIT_BYTES)
    return frame.sort_values(["kernel", "kernel_size", "arch", "dtype", "default"],
                             ascending=[True, True, True, True, False]).to_string(index=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the records to this file")
    parser.add_argument("--defaults-only", action="store_true", help="compile only the default configs")
    args = parser.parse_args(argv)
    records = build_report(defaults_only=args.defaults_only)
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    print(format_table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
