"""The text a sweep ends with: where it ran, the ratios at the grid's headline points, and
(without a GPU) the static kernel report's summary in place of fused timings."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

from .grids import LAYER_IMPLS, Grid
from .roofline import known_gpu
from .sweep import Machine, rows_of

FUSED_NOT_TIMED = ("fused: not timed: without a GPU Triton only runs in its interpreter, which is no performance "
                   "path; the static kernel report below stands in for it")


def header(grid: Grid, machine: Machine) -> str:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    lines = [f"{machine.label} ({machine.name}), {machine.date}, torch {torch.__version__}, triton {triton_version}",
             f"grid '{grid.name}': base {grid.base.label()}"]
    if machine.device.type == "cuda" and known_gpu(machine.label) is None:
        lines.append(f"no datasheet peaks for {machine.label!r} in perf/roofline.py: roofline omitted")
    return "\n".join(lines)


def ratio_table(frame: pd.DataFrame, grid: Grid) -> pd.DataFrame:
    """At each headline point and direction, per implementation: time, peak memory and
    x_static_conv = static conv time / its time (conv2d for the operator, layer_conv2d for
    layers), x_paper = paper time / its time, mem_vs_paper = its memory / paper's memory
    (operator implementations only), of_roofline = its throughput / the roofline bound."""
    rows = []
    for axis, value in grid.headline:
        problem = grid.point(axis, value)
        measured = rows_of(frame, problem)
        for direction in grid.directions:
            by_impl = measured[measured["direction"] == direction].set_index("impl")
            for impl, r in by_impl.iterrows():
                layer = impl in LAYER_IMPLS
                static = by_impl["median_ms"].get("layer_conv2d" if layer else "conv2d", math.nan)
                paper = by_impl.loc["paper"] if "paper" in by_impl.index and not layer else None
                rows.append({
                    "point": problem.label(), "direction": direction, "impl": impl,
                    "median_ms": r["median_ms"], "peak_MiB": r["peak_mem_bytes"] / 2**20,
                    "x_static_conv": static / r["median_ms"],
                    "x_paper": math.nan if paper is None else paper["median_ms"] / r["median_ms"],
                    "mem_vs_paper": math.nan if paper is None else r["peak_mem_bytes"] / paper["peak_mem_bytes"],
                    "of_roofline": r["throughput_px_s"] / r["roofline_px_s"],
                })
    return pd.DataFrame(rows).dropna(axis=1, how="all")


def format_ratios(table: pd.DataFrame) -> str:
    return table.to_string(index=False, float_format=lambda v: f"{v:.3g}", na_rep="-")


def summarise_static_report(records: list[dict]) -> str:
    """One line per compiled variant: registers, spills, shared memory and MMA count."""
    frame = pd.DataFrame(records)
    frame["config"] = frame["config"].map(lambda c: " ".join(f"{k}={v}" for k, v in c.items()))
    frame["shared_KiB"] = frame.pop("shared_bytes") / 1024
    columns = ["kernel", "arch", "dtype", "registers", "spill_bytes", "shared_KiB", "mma", "config"]
    return frame[columns].sort_values(["kernel", "arch", "dtype"]).to_string(index=False)


class StaticReportError(RuntimeError):
    """`python -m perf.static_report` failed."""


def run_static_report() -> list[dict]:
    """The records of `python -m perf.static_report --defaults-only`, run in a subprocess
    without TRITON_INTERPRET (it compiles for sm_80/sm_90 and needs no GPU, but the
    interpreter compiles nothing)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "static_report.json"
        done = subprocess.run([sys.executable, "-m", "perf.static_report", "--defaults-only", "--json", str(path)],
                              env=env, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise StaticReportError(f"exit {done.returncode}: {last}")
        return json.loads(path.read_text())


def static_report_summary() -> str:
    """The static report's summary, or one line saying it failed (the sweep goes on)."""
    try:
        records = run_static_report()
    except StaticReportError as error:
        return f"static kernel report failed ({error})"
    return ("static kernel report, default configs compiled for the GPUs without one "
            "(python -m perf.static_report --defaults-only):\n" + summarise_static_report(records))
