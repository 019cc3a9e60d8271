"""Static report: what every kernel compiles to for sm_80 and sm_90, and what it would issue, no GPU needed.

    python -m perf.static_report [--json FILE] [--defaults-only] [--k 3 5 7] [--jobs N]
                                                                    every variant, compiled
    python -m perf.static_report --estimate [--k 3 7] [--json FILE] per kernel of one forward and one
                                                                    backward: warp-instructions per
                                                                    output pixel and lower bounds

Records, one per variant: kernel, arch, dtype, config, default, shared_bytes, registers,
spill_bytes, mma; and what it was compiled with and for: `triton` (the version) and `kernel_size`.
The kernels: the fused forward (`atom_conv2d_fwd`) and the backward kernels dx
(`atom_conv2d_bwd_input`), dβ (`atom_conv2d_bwd_coeff`, and `atom_conv2d_bwd_coeff_bases`: the same
kernel compiled to also reduce dΨ) and dα (`atom_conv2d_bwd_weight`). They are compiled for the
project's performance problem (`PROBLEM`: N=32, C_in=C_out=64, 56x56, M=6, "same" padding, float16,
contiguous NCHW) at each kernel size of KERNEL_SIZES, with the specialisation the launcher's real
arguments get at run time (16-byte divisible pointers and ints, ints equal to 1 folded to
constants), taken from Triton's own argument binder. Registers and spills come from the bundled
`cuobjdump --dump-resource-usage` (REG, STACK), the MMA count from its SASS (HMMA on sm_80, HGMMA
or HMMA on sm_90). Must run without TRITON_INTERPRET: the interpreter compiles nothing.

`kernel_launches(problem, direction, dtype, arch)` lists every Triton launch one forward or one
backward of a problem makes, exactly as the launchers make them (`kernels.launch.Launch`): the
contract a static performance model reads. The estimate (`perf.sass_estimate`) counts the SASS of
each launch, loop bodies times their trip counts, into warp-instructions per output pixel, and
turns them into the bounds that need no address emulation (issue slots, FMA pipe, tensor cores,
DRAM) on an H100 SXM.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the default; set to silence triton 3.9's warning

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from atomconv.validation import validate_atom_conv2d  # noqa: E402
from kernels import backward, configs, forward, launch  # noqa: E402

from .grids import BASES_PER_SCALE  # noqa: E402

ARCH_NUMBERS = {"sm_80": 80, "sm_90": 90}
SHARED_LIMIT_BYTES = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
MMA_OPCODES = re.compile(r"\b(?:HMMA|HGMMA)\b")
RESOURCE_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)")
KERNEL_SIZES = (3, 5, 7)
CANDIDATE_KERNEL_SIZES = (3,)
"""Kernel sizes at which every candidate is compiled (the defaults: at every one of KERNEL_SIZES)."""
"""The kernel sizes the report compiles for: register pressure grows with the taps (K=7 spills
where K=3 does not), so pruning by the report uses the records of the nearest kernel size."""
PROBLEM = dict(batch=32, channels_in=64, channels_out=64, height=56, width=56, kernel_size=3, num_atoms=6,
               stride=1, padding=1, dilation=1, groups=1)
KERNELS = ("atom_conv2d_fwd", "atom_conv2d_bwd_input", "atom_conv2d_bwd_coeff", "atom_conv2d_bwd_coeff_bases",
           "atom_conv2d_bwd_weight")
WEIGHT_GRAD_PROGRAMS = 2 * 132
"""The dα kernel's program target on an H100 SXM (two per SM, as the launcher aims for on a GPU)."""


def problem_at(kernel_size: int) -> dict:
    """PROBLEM at one kernel size, with "same" padding."""
    return PROBLEM | {"kernel_size": kernel_size, "padding": kernel_size // 2}


def problem_tensors(problem: dict, dtype: torch.dtype):
    """Empty meta tensors (nothing is allocated) of a problem: x, atom_coeff, bases, weight, bias,
    y (or dy) contiguous NCHW, L = BASES_PER_SCALE * (K // 2), and the call's geometry."""
    p, k = problem, problem["kernel_size"]
    num_bases = BASES_PER_SCALE * (k // 2)
    make = functools.partial(torch.empty, dtype=dtype, device="meta")
    x = make(p["batch"], p["channels_in"], p["height"], p["width"])
    bases = make(num_bases, k, k)
    weight = make(p["channels_out"], p["channels_in"] // p["groups"], p["num_atoms"])
    bias = make(p["channels_out"])
    h_out, w_out = ((size + 2 * p["padding"] - p["dilation"] * (k - 1) - 1) // p["stride"] + 1
                    for size in (p["height"], p["width"]))
    atom_coeff = make(p["batch"], p["num_atoms"] * num_bases, h_out, w_out)
    geo = validate_atom_conv2d(x, atom_coeff, bases, weight, bias, p["stride"], p["padding"], p["dilation"], p["groups"])
    return x, atom_coeff, bases, weight, bias, make(p["batch"], p["channels_out"], h_out, w_out), geo


def kernel_launch(kernel: str, problem: dict, dtype: torch.dtype, config: configs.TileConfig) -> launch.Launch:
    """The launch `kernel` makes on `problem` with `config`, built by its launcher's own code."""
    x, atom_coeff, bases, weight, bias, y, geo = problem_tensors(problem, dtype)
    if kernel == "atom_conv2d_bwd_input":
        return backward.input_grad_launch(atom_coeff, bases, weight, y, x, geo,
                                          backward.input_grad_tile_launch(config, geo))
    if kernel == "atom_conv2d_fwd":
        return forward.forward_launch(x, atom_coeff, bases, weight, bias, y, geo, forward.forward_tile_launch(config, geo))
    fitted = configs.fit_tile_config(config, geo)
    if kernel in ("atom_conv2d_bwd_coeff", "atom_conv2d_bwd_coeff_bases"):
        programs = launch.pixel_tiles(geo.batch, geo.out_size[0] * geo.out_size[1], fitted.BLOCK_P)
        dbases = torch.empty(programs, geo.num_bases, geo.kernel_size[0] * geo.kernel_size[1], device="meta")
        return backward.coeff_grad_launch(x, atom_coeff, bases, weight, y, atom_coeff, 
                                          dbases if kernel.endswith("bases") else None, geo, fitted)
    if kernel == "atom_conv2d_bwd_weight":
        splits = configs.weight_grad_splits(geo, fitted, dtype, WEIGHT_GRAD_PROGRAMS)
        partials = torch.empty(splits, geo.out_channels, triton.cdiv(geo.in_channels // geo.groups, fitted.BLOCK_C),
                               fitted.padded_atoms(geo.num_atoms), fitted.BLOCK_C, device="meta")
        return backward.weight_grad_launch(x, atom_coeff, bases, y, partials, geo, fitted)
    raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def kernel_launches(problem: dict, direction: str, dtype: torch.dtype, arch: str) -> list[launch.Launch]:
    """Every Triton launch of one forward or one backward (`direction`) of `problem` (a dict as
    PROBLEM), as the launchers make them with the default config (`configs.default_config`, the
    same for every arch, so `arch` is the model's contract only), which they use where no tuning
    data exists. The backward is `AtomConv2d`'s: dx, dβ and dα (its bases are
    a buffer, so no dΨ). Besides these launches the launchers run torch ops the model cannot see:
    `pack_weight` (a copy of α, a few KB), `row_padded_bases` (a copy of Ψ with rows padded to 16
    elements or more, L*KH*16 at KW <= 16, where a kernel reads Ψ by rows: its ROWS_OF_PSI; on
    this problem the forward at every K, dα in 16 bits at K=3, dx at K=5), the sum of dα's partials (splits x |α| floats)
    and d bias (a sum over dy, |y| bytes read)."""
    config = configs.default_config()
    kernels = {"forward": ("atom_conv2d_fwd",),
               "backward": ("atom_conv2d_bwd_input", "atom_conv2d_bwd_coeff", "atom_conv2d_bwd_weight")}
    if direction not in kernels:
        raise ValueError(f"direction must be 'forward' or 'backward', got {direction!r}")
    return [kernel_launch(kernel, problem, dtype, config) for kernel in kernels[direction]]


def ast_source(run: launch.Launch, target: GPUTarget) -> ASTSource:
    """The source Triton's runtime would compile for these arguments: its own binder gives the
    signature and specialisation, its own packing turns them into constexprs and attrs."""
    backend = make_backend(target)
    binder = create_function_from_signature(run.fn.signature, run.fn.params, backend)
    bound_args, specialization, options = binder(**run.args)
    _, signature, constexprs, attrs = run.fn._pack_args(backend, {}, bound_args, specialization, options)
    return ASTSource(run.fn, signature, constexprs, attrs)


def cuobjdump(*args: str) -> str:
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return subprocess.run([str(tool), *args], check=True, capture_output=True, text=True).stdout


def compile_launch(run: launch.Launch, arch: str) -> dict:
    """Compile one launch for one arch: {"sass", "registers", "spill_bytes", "shared_bytes"}."""
    target = GPUTarget("cuda", ARCH_NUMBERS[arch], 32)
    compiled = triton.compile(ast_source(run, target), target=target,
                              options={"num_warps": run.num_warps, "num_stages": run.num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        registers, stack = map(int, RESOURCE_RE.search(cuobjdump("--dump-resource-usage", str(cubin))).groups())
        sass = cuobjdump("-sass", str(cubin))
    return {"sass": sass, "registers": registers, "spill_bytes": stack, "shared_bytes": compiled.metadata.shared}


def record(kernel: str, arch: str, dtype: torch.dtype, config: configs.TileConfig, kernel_size: int) -> dict:
    """The report's record of one variant (with the Triton version and kernel size)."""
    compiled = compile_launch(kernel_launch(kernel, problem_at(kernel_size), dtype, config), arch)
    return {
        "kernel": kernel, "arch": arch, "dtype": str(dtype).removeprefix("torch."), "config": config.as_dict(),
        "default": config == configs.default_config(), "shared_bytes": compiled["shared_bytes"],
        "registers": compiled["registers"], "spill_bytes": compiled["spill_bytes"],
        "mma": len(MMA_OPCODES.findall(compiled["sass"])), "triton": triton.__version__, "kernel_size": kernel_size,
    }


def build_report(archs=configs.ARCHS, dtypes=configs.KERNEL_DTYPES, kernel_sizes=KERNEL_SIZES,
                 defaults_only: bool = False, jobs: int = 1) -> list[dict]:
    """Records for every kernel x dtype x kernel size x arch of the defaults and, at the kernel
    sizes of CANDIDATE_KERNEL_SIZES among kernel_sizes (unless defaults_only), of every candidate
    config; a progress line per kernel, dtype and kernel size on stderr. `jobs` processes compile
    side by side (a 7x7 backward kernel takes minutes)."""
    if launch.INTERPRETING:
        raise RuntimeError("the static report compiles for GPUs: run it without TRITON_INTERPRET=1")
    variants = []
    for kernel in KERNELS:
        for dtype in dtypes:
            for kernel_size in kernel_sizes:
                print(f"static report: compiling {kernel} {str(dtype).removeprefix('torch.')} K={kernel_size} for "
                      f"{', '.join(archs)} ({len(variants)} variants so far)", file=sys.stderr, flush=True)
                for config in configs.tile_candidates():
                    for arch in archs:
                        default = config == configs.default_config()
                        if default or (not defaults_only and kernel_size in CANDIDATE_KERNEL_SIZES):
                            variants.append((kernel, arch, dtype, config, kernel_size))
    if jobs == 1:
        return [record(*variant) for variant in variants]
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_record, variants))


def _record(variant: tuple) -> dict:
    return record(*variant)


def format_table(records: list[dict]) -> str:
    import pandas as pd

    frame = pd.DataFrame(records)
    frame["config"] = frame["config"].map(lambda c: " ".join(f"{k}={v}" for k, v in c.items()))
    frame["shared_limit"] = frame["arch"].map(SHARED_LIMIT_BYTES)
    return frame.sort_values(["kernel", "kernel_size", "arch", "dtype", "default"],
                             ascending=[True, True, True, True, False]).to_string(index=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the records (or the estimate) to this file")
    parser.add_argument("--defaults-only", action="store_true", help="compile only the default configs")
    parser.add_argument("--estimate", action="store_true",
                        help="warp-instructions per pixel and bounds of each launch of a forward and a backward")
    parser.add_argument("--k", type=int, nargs="+",
                        help="kernel sizes (default: 3, what kernels/static_report.json holds; with --estimate 3 7)")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    args = parser.parse_args(argv)
    if args.estimate:
        from .sass_estimate import estimate_problem, format_estimates

        estimates = [row for k in args.k or (3, 7) for row in estimate_problem(problem_at(k), torch.float16)]
        if args.json:
            args.json.write_text(json.dumps(estimates, indent=1))
        print(format_estimates(estimates))
        return 0
    records = build_report(kernel_sizes=tuple(args.k or CANDIDATE_KERNEL_SIZES), defaults_only=args.defaults_only,
                           jobs=args.jobs)
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    print(format_table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
