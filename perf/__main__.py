"""Throughput and memory sweeps of the ACDA implementations against static convolution.

    python -m perf [--quick | --grid {gpu,cpu,quick}] [--out DIR]

Writes under DIR (default perf_out/<device>/ in the working directory, ignored by git):
<grid>.csv (one row per measurement), <grid>_throughput.png, <grid>_memory.png and
<grid>_report.txt (the printed summary). The results committed under perf/results/<device>/
are written there on purpose, with `--out perf/results/<device>`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from . import report
from .grids import GRIDS
from .plots import METRICS, plot_metric
from .sweep import describe_machine, run_grid

DEFAULT_OUT = Path("perf_out")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf", description=__doc__.splitlines()[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--grid", choices=sorted(GRIDS), help="named grid (default: gpu with CUDA, cpu without)")
    which.add_argument("--quick", action="store_true", help="the small grid 'quick': under a minute on a quiet 2-core CPU")
    parser.add_argument("--out", type=Path, help=f"output folder (default: {DEFAULT_OUT}/<device>/)")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    grid = GRIDS["quick" if args.quick else args.grid or ("gpu" if device.type == "cuda" else "cpu")]
    machine = describe_machine(device)
    out = args.out or DEFAULT_OUT / machine.name
    out.mkdir(parents=True, exist_ok=True)
    print(report.header(grid, machine), flush=True)
    if device.type != "cuda":
        print(report.FUSED_NOT_TIMED, flush=True)

    frame = run_grid(grid, machine)
    frame.to_csv(out / f"{grid.name}.csv", index=False)
    for metric in METRICS:
        plot_metric(frame, grid, machine, metric, out / f"{grid.name}_{metric}.png")

    parts = [report.header(grid, machine), report.format_ratios(report.ratio_table(frame, grid))]
    if device.type != "cuda":
        parts += [report.FUSED_NOT_TIMED, report.static_report_summary()]
    text = "\n\n".join(parts) + "\n"
    (out / f"{grid.name}_report.txt").write_text(text)
    print(text)
    print(f"wrote {out}/{grid.name}.csv, {grid.name}_{{{','.join(METRICS)}}}.png, {grid.name}_report.txt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
