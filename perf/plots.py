"""Plots of a sweep: one figure per metric, one row of panels per direction, one column per
grid axis (the base problem with one parameter varied), one line per implementation."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402  (Pillow comes with matplotlib)
from matplotlib.ticker import EngFormatter, FuncFormatter, LogLocator, NullFormatter, NullLocator  # noqa: E402

from .grids import AXES, LAYER_IMPLS, Grid  # noqa: E402
from .sweep import Machine, rows_of  # noqa: E402

# (column, y label, scale to the plotted unit, tick labels): "200k px/s", "0.5 MiB"
METRICS = {
    "throughput": ("throughput_px_s", "throughput (output px / s)", 1.0, EngFormatter(sep="")),
    "memory": ("peak_mem_bytes", "peak memory above inputs (MiB)", 2.0**-20, FuncFormatter(lambda v, _: f"{v:g}")),
}
LOG2_AXES = ("resolution", "channels")  # values that double


def axis_rows(frame: pd.DataFrame, grid: Grid, axis: str) -> pd.DataFrame:
    """The rows measured on the points of one axis, with the varied value as column `x`."""
    parts = [rows_of(frame, grid.point(axis, value)).assign(x=value) for value in grid.axes[axis]]
    return pd.concat(parts)


def plot_metric(frame: pd.DataFrame, grid: Grid, machine: Machine, metric: str, path: Path) -> None:
    """Write one PNG of `metric` ("throughput" or "memory"), log scale, to `path`. The
    throughput figure also draws the fused forward's roofline bound where the CSV has one."""
    column, ylabel, scale, formatter = METRICS[metric]
    directions = [d for d in grid.directions if d in set(frame["direction"])]
    impls = [i for i in grid.impls if i in set(frame["impl"])]
    colours = dict(zip(impls, plt.get_cmap("tab10").colors))
    fig, panels = plt.subplots(len(directions), len(grid.axes), figsize=(3.6 * len(grid.axes), 3.0 * len(directions) + 1),
                               squeeze=False, layout="constrained")
    for row, direction in enumerate(directions):
        for col, axis in enumerate(grid.axes):
            ax = panels[row, col]
            rows = axis_rows(frame, grid, axis)
            rows = rows[rows["direction"] == direction]
            for impl in impls:
                line = rows[rows["impl"] == impl].sort_values("x")
                layer = impl in LAYER_IMPLS
                ax.plot(line["x"], line[column] * scale, label=impl, color=colours[impl],
                        marker="s" if layer else "o", linestyle="--" if layer else "-")
            if metric == "throughput":
                bound = rows[rows["impl"] == "fused"].dropna(subset=["roofline_px_s"]).sort_values("x")
                if len(bound):
                    ax.plot(bound["x"], bound["roofline_px_s"], color="black", linestyle=":",
                            label="roofline bound (fused forward)")
            ax.set_yscale("log")
            # Ticks at 1, 2 and 5 times powers of ten, so that a panel spanning less than a decade has labels too.
            ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
            ax.yaxis.set_major_formatter(formatter)
            ax.yaxis.set_minor_formatter(NullFormatter())
            if axis in LOG2_AXES:
                ax.set_xscale("log", base=2)
                ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticks(grid.axes[axis], labels=[str(v) for v in grid.axes[axis]])
            ax.set_xlabel(AXES[axis][1])
            ax.set_title(direction, fontsize="medium")
            ax.grid(True, which="both", alpha=0.3)
        panels[row, 0].set_ylabel(ylabel)
    labels = {}
    for ax in panels.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            labels.setdefault(label, handle)
    fig.legend(labels.values(), labels.keys(), loc="outside lower center", ncols=min(len(labels), 7))
    fig.suptitle(f"ACDA {metric}: {machine.label}, {machine.date}\n"
                 f"grid '{grid.name}', base {grid.base.label()}; each column varies one parameter")
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=72)
    plt.close(fig)
    # A 64-colour palette looks the same on these plots at a quarter of the bytes: they are committed.
    Image.open(png).convert("RGB").quantize(colors=64).save(path, optimize=True)
