"""Run a grid: every implementation on every point in every direction, timed and weighed,
as one tidy table (one row per measurement)."""

from __future__ import annotations

import datetime
import math
import platform
import re
import sys
from dataclasses import dataclass

import pandas as pd
import torch

from .cases import Case, build_case
from .grids import Grid, Problem
from .measure import cpu_peak_bytes, cpu_time_ms, cuda_peak_bytes, cuda_time_ms
from .roofline import fused_forward_bound_s, known_gpu

COLUMNS = [
    "impl", "direction", "dtype", "device", "batch", "channels_in", "channels_out", "height", "width", "kernel_size",
    "num_atoms", "num_bases", "groups", "median_ms", "p20_ms", "p80_ms", "throughput_px_s", "tflops",
    "peak_mem_bytes", "roofline_px_s",
]
# A backward computes two gradients, each about the work of the forward: the usual convention.
BACKWARD_WORK_FACTOR = 3


@dataclass(frozen=True)
class Machine:
    """Where a sweep runs: `name` goes into paths and the CSV, `label` into titles."""

    device: torch.device
    name: str  # "cpu", "nvidia-h100-80gb-hbm3"
    label: str  # "NVIDIA H100 80GB HBM3", "CPU x86_64, 2 threads"
    date: str  # ISO date of the run


def describe_machine(device: torch.device) -> Machine:
    if device.type == "cuda":
        label = torch.cuda.get_device_name(device)
    else:
        threads = torch.get_num_threads()
        label = f"CPU {platform.machine()}, {threads} thread{'s' if threads > 1 else ''}"
    name = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    return Machine(device, name, label, datetime.date.today().isoformat())


def problem_columns(problem: Problem) -> dict[str, object]:
    """The CSV columns that identify a problem (shared by its rows and by lookups)."""
    return {
        "dtype": str(problem.dtype).removeprefix("torch."), "batch": problem.batch,
        "channels_in": problem.channels, "channels_out": problem.channels, "height": problem.size,
        "width": problem.size, "kernel_size": problem.kernel_size, "num_atoms": problem.num_atoms,
        "num_bases": problem.num_bases, "groups": problem.groups,
    }


def rows_of(frame: pd.DataFrame, problem: Problem) -> pd.DataFrame:
    """The rows of `frame` measured on `problem`."""
    columns = problem_columns(problem)
    return frame[(frame[list(columns)] == pd.Series(columns)).all(axis=1)]


def timed_call(case: Case, direction: str):
    """The call to time: a forward without autograd, or a forward and the gradients of every
    leaf in case.wrt against a seeded random output gradient."""
    if direction == "forward":
        def forward():
            with torch.no_grad():
                return case.run()
        return forward
    y = case.run().detach()
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y)

    def forward_backward():
        return torch.autograd.grad(case.run(), case.wrt, grad_y)
    return forward_backward


def measure(fn, device: torch.device, cpu_min_run_time_s: float) -> dict[str, float]:
    """Median/p20/p80 ms and peak bytes of fn() on `device`."""
    if device.type == "cuda":
        return {**cuda_time_ms(fn), "peak_mem_bytes": cuda_peak_bytes(fn)}
    return {**cpu_time_ms(fn, cpu_min_run_time_s), "peak_mem_bytes": cpu_peak_bytes(fn)}


def timed_impls(grid: Grid, device: torch.device) -> tuple[str, ...]:
    """The grid's implementations that mean something on `device`: the fused path only on a GPU
    (on a CPU Triton only interprets, which is no performance path)."""
    return tuple(impl for impl in grid.impls if impl != "fused" or device.type == "cuda")


def run_grid(grid: Grid, machine: Machine) -> pd.DataFrame:
    """Measure the grid on machine.device; a one-line progress display goes to stderr."""
    device = machine.device
    impls = timed_impls(grid, device)
    gpu = known_gpu(machine.label) if device.type == "cuda" else None
    points = grid.points()
    total, done, rows = len(points) * len(impls) * len(grid.directions), 0, []
    for problem in points:
        geo = problem.geometry()
        pixels = geo.batch * geo.out_size[0] * geo.out_size[1]
        for impl in impls:
            for direction in grid.directions:
                done += 1
                _progress(done, total, f"{impl} {direction} | {problem.label()}")
                try:
                    case = build_case(impl, problem, device, requires_grad=direction != "forward")
                    stats = measure(timed_call(case, direction), device, grid.cpu_min_run_time_s)
                except torch.OutOfMemoryError:
                    _progress(done, total, f"{impl} {direction} | {problem.label()}: out of memory, skipped", keep=True)
                    continue
                seconds = stats["median_ms"] * 1e-3
                work = case.macs_per_pixel * pixels * (1 if direction == "forward" else BACKWARD_WORK_FACTOR)
                bound = math.nan
                if gpu is not None and impl == "fused" and direction == "forward":
                    bound = pixels / fused_forward_bound_s(geo, problem.dtype, gpu)
                rows.append({
                    "impl": impl, "direction": direction, "device": machine.name, **problem_columns(problem), **stats,
                    "throughput_px_s": pixels / seconds, "tflops": 2 * work / seconds / 1e12, "roofline_px_s": bound,
                })
    return pd.DataFrame(rows, columns=COLUMNS)


def _progress(done: int, total: int, what: str, keep: bool = False) -> None:
    """One status line, rewritten in place on a terminal (unless `keep`), one line per step in a log."""
    line = f"[{done:>3}/{total}] {what}"
    if sys.stderr.isatty():
        print(line[:120].ljust(120), end="\n" if keep or done == total else "\r", file=sys.stderr, flush=True)
    else:
        print(line, file=sys.stderr, flush=True)
