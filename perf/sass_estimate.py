"""Warp-instructions per output pixel and lower bounds of the project's kernels on an H100 SXM, from
their SASS, no GPU needed (`python -m perf.static_report --estimate`).

Every instruction of a program's SASS counts once, except inside loops: a backward branch closes
a loop, loops nest by containment, and each launch says how many times its runtime loops run
(`kernels.launch.Launch.loop_trips`, outermost first; every other loop is unrolled at compile
time). Predicated-off instructions still issue, so they count. Times the programs of the grid,
over the problem's output pixels: warp-instructions per pixel. The bounds are those that need no
address emulation: issue slots (132 SMs x 4 schedulers, one warp-instruction per clock, the
busiest SM running ceil(programs / 132) programs), the FMA pipe (FP32 at 4 and IMAD at 2
warp-instructions per clock per SM), tensor cores (HGMMA FLOPs at 989.5 TFLOP/s) and DRAM (every
tensor argument read or written once at 3.35 TB/s). L1, shared-memory and L2 traffic depend on
addresses and are not estimated here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

SMS, SCHEDULERS, CLOCK_HZ = 132, 4, 1.98e9
TENSOR_FLOPS, DRAM_BYTES_S = 989.5e12, 3.35e12
LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z0-9_]+)((?:\.[A-Za-z0-9_]+)*)\s*([^;]*);")
FP32_OPS = {"FFMA", "FMUL", "FADD", "FFMA32I", "FMUL32I", "FADD32I"}


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str
    modifiers: tuple[str, ...]
    operands: str


def parse_sass(sass: str) -> list[Instruction]:
    """The instructions of one kernel's `cuobjdump -sass` text, in address order."""
    found = []
    for match in LINE.finditer(sass):
        address, _, opcode, modifiers, operands = match.groups()
        found.append(Instruction(int(address, 16), opcode, tuple(m for m in modifiers.split(".") if m), operands))
    return found


def loop_weights(instructions: list[Instruction], loop_trips: tuple[float, ...]) -> list[float]:
    """How many times each instruction runs per program: the product of the trip counts of the
    loops around it. Loops are the ranges closed by backward branches; the nesting depth of a
    loop picks its trip count from loop_trips (outermost first)."""
    loops = []
    for ins in instructions:
        target = re.match(r"\s*`?\(?\.?L?_?x?_?(?:0x)?([0-9a-f]+)", ins.operands)
        if ins.opcode == "BRA" and target:
            destination = int(target.group(1), 16)
            if destination < ins.address:  # (a branch to itself is the trap after EXIT)
                loops.append((destination, ins.address))
    depth = {loop: sum(1 for other in loops if other != loop and other[0] <= loop[0] and loop[1] <= other[1])
             for loop in loops}
    levels = max(depth.values()) + 1 if loops else 0
    if levels != len(loop_trips):
        raise ValueError(f"the SASS has loops nested {levels} deep, the launch gives "
                         f"{len(loop_trips)} trip counts")
    weights = []
    for ins in instructions:
        weight = 1.0
        for loop in loops:
            if loop[0] <= ins.address <= loop[1]:
                weight *= loop_trips[depth[loop]]
        weights.append(weight)
    return weights


def estimate_launch(run, compiled: dict, output_pixels: int) -> dict:
    """Warp-instructions per output pixel, by class, and the bounds in µs of one launch (see the
    module doc); compiled as `perf.static_report.compile_launch` returns it, for sm_90."""
    instructions = parse_sass(compiled["sass"])
    weights = loop_weights(instructions, run.loop_trips)
    programs = math.prod(run.grid)
    warps = run.num_warps
    total = fp32 = imad = flops = 0.0
    for ins, weight in zip(instructions, weights):
        if ins.opcode in ("NOP",):
            continue
        total += weight
        if ins.opcode in FP32_OPS:
            fp32 += weight
        elif ins.opcode.startswith("IMAD") or ins.opcode == "IMUL":
            imad += weight
        elif ins.opcode == "HGMMA":
            m, n, k = map(int, re.match(r"(\d+)x(\d+)x(\d+)", ins.modifiers[0]).groups())
            flops += weight * 2 * m * n * k / 4  # issued by each of the 4 warps of a warpgroup
    # per warp of a program -> every warp of the grid
    total, fp32, imad, flops = (v * warps * programs for v in (total, fp32, imad, flops))
    wave_factor = math.ceil(programs / SMS) / (programs / SMS)
    per_sm_s = wave_factor / SMS / CLOCK_HZ
    dram = sum(t.numel() * t.element_size() for t in run.args.values() if isinstance(t, torch.Tensor))
    bounds = {
        "issue": total / SCHEDULERS * per_sm_s,
        "FMA pipe": max((fp32 + imad) / 4, imad / 2) * per_sm_s,
        "tensor": flops / TENSOR_FLOPS,
        "DRAM": dram / DRAM_BYTES_S,
    }
    limiter = max(bounds, key=bounds.get)
    return {"kernel": run.name, "inst_per_px": total / output_pixels, "fp32_per_px": fp32 / output_pixels,
            "registers": compiled["registers"], "spill_bytes": compiled["spill_bytes"],
            "bounds_us": {k: v * 1e6 for k, v in bounds.items()}, "bound_us": bounds[limiter] * 1e6, "limiter": limiter}


def estimate_problem(problem: dict, dtype: torch.dtype) -> list[dict]:
    """One row per launch of a forward and a backward of `problem` (`static_report.kernel_launches`),
    compiled for sm_90, plus a total per direction."""
    from .static_report import compile_launch, kernel_launches

    output_pixels = problem["batch"] * _out(problem, "height") * _out(problem, "width")
    rows = []
    for direction in ("forward", "backward"):
        launches = [estimate_launch(run, compile_launch(run, "sm_90"), output_pixels)
                    for run in kernel_launches(problem, direction, dtype, "sm_90")]
        for row in launches:
            rows.append({"kernel_size": problem["kernel_size"], "direction": direction, **row})
        rows.append({"kernel_size": problem["kernel_size"], "direction": direction, "kernel": "total",
                     "inst_per_px": sum(r["inst_per_px"] for r in launches),
                     "bound_us": sum(r["bound_us"] for r in launches)})
    return rows


def _out(problem: dict, size: str) -> int:
    k = problem["kernel_size"]
    return (problem[size] + 2 * problem["padding"] - problem["dilation"] * (k - 1) - 1) // problem["stride"] + 1


def format_estimates(rows: list[dict]) -> str:
    """The estimates as a table, one line per launch and per direction's total."""
    lines = [f"{'K':>2} {'direction':9} {'kernel':28} {'inst/px':>8} {'FP32/px':>8} {'regs':>5} {'spill':>6} "
             f"{'issue':>7} {'FMA':>7} {'TC':>7} {'DRAM':>7} {'bound us':>9} limiter"]
    for r in rows:
        b = r.get("bounds_us", {})
        cells = [f"{b[k]:7.2f}" if k in b else f"{'':7}" for k in ("issue", "FMA pipe", "tensor", "DRAM")]
        lines.append(f"{r['kernel_size']:>2} {r['direction']:9} {r['kernel']:28} {r['inst_per_px']:8.1f} "
                     f"{r.get('fp32_per_px', float('nan')):8.1f} {r.get('registers', ''):>5} {r.get('spill_bytes', ''):>6} "
                     f"{' '.join(cells)} {r['bound_us']:9.2f} {r.get('limiter', '')}")
    return "\n".join(lines)
