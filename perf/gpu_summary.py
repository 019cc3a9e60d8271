"""The summary `python -m perf.gpu_session` ends with: the project's target ratios read off the
sweep, tuned against default configs, per-kernel times, test results and the machine."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pandas as pd
import torch

from .grids import GRIDS
from .report import ratio_table
from .sweep import rows_of

# (what, the sweep's headline K, direction, column, target): the GPU targets of the kernel issues.
TARGETS = (
    ("fused forward vs cuDNN conv2d, K=3", 3, "forward", "x_static_conv", ">= 0.8"),
    ("fused forward vs cuDNN conv2d, K=7", 7, "forward", "x_static_conv", ">= 1.2"),
    ("fused forward+backward vs paper, K=3", 3, "forward+backward", "x_paper", ">= 5"),
    ("fused forward+backward vs paper, K=7", 7, "forward+backward", "x_paper", ">= 5"),
    ("fused forward+backward peak memory / paper's, K=3", 3, "forward+backward", "mem_vs_paper", "<= 0.25"),
    ("fused forward+backward peak memory / paper's, K=7", 7, "forward+backward", "mem_vs_paper", "<= 0.25"),
)


def summarise(out: Path, device_name: str, results: dict[str, tuple[bool, float]], table: Path) -> str:
    """The markdown summary of a session whose steps wrote into `out` (the sweep's gpu.csv,
    kernel_times.json, tests.xml) and `table` (the exported tuned configs); results: (ok,
    seconds) by step. A part whose file is missing says so."""
    import triton

    parts = [f"# GPU session: {device_name}",
             f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}",
             "", "| step | result | seconds |", "|---|---|---|"]
    parts += [f"| {step} | {'ok' if ok else 'FAILED'} | {seconds:.0f} |" for step, (ok, seconds) in results.items()]
    for title, section in (("Tests", _tests(out / "tests.xml")), ("Targets", _targets(out / "gpu.csv")),
                           ("Per-kernel times (µs per call)", _kernel_times(out / "kernel_times.json")),
                           ("Tuned vs default config", _tuning(table))):
        parts += ["", f"## {title}", "", section]
    return "\n".join(parts) + "\n"


def _tests(path: Path) -> str:
    if not path.exists():
        return "(not run)"
    suite = ElementTree.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    lines = [", ".join(f"{v} {k}" for k, v in counts.items())]
    return "\n".join(lines + [f"- failed: {name}" for name in failed[:30]])


def _targets(path: Path) -> str:
    if not path.exists():
        return "(no sweep)"
    frame = pd.read_csv(path)
    frame["dtype"] = frame["dtype"].astype(str)
    grid = GRIDS["gpu"]
    ratios = ratio_table(frame, grid)
    lines = ["| ratio | measured | target |", "|---|---|---|"]
    for what, k, direction, column, target in TARGETS:
        label = grid.point("kernel_size", k).label()
        row = ratios[(ratios["point"] == label) & (ratios["direction"] == direction) & (ratios["impl"] == "fused")]
        value = row[column].iloc[0] if len(row) and column in row else math.nan
        lines.append(f"| {what} | {value:.3g} | {target} |")
    for k in (3, 7):
        measured = rows_of(frame, grid.point("kernel_size", k))
        fused = measured[measured["impl"] == "fused"].set_index("direction")["median_ms"]
        if {"forward", "forward+backward"} <= set(fused.index):
            backward = fused["forward+backward"] - fused["forward"]
            lines.append(f"| fused backward / forward, K={k} | {backward / fused['forward']:.3g} | <= 2.5 |")
    return "\n".join(lines)


def _kernel_times(path: Path) -> str:
    if not path.exists():
        return "(not run)"
    rows = pd.DataFrame(json.loads(path.read_text()))
    try:
        return rows.to_markdown(index=False, floatfmt=".1f")
    except ImportError:  # pandas needs tabulate for markdown
        return rows.to_string(index=False, float_format=lambda v: f"{v:.1f}")


def _tuning(table: Path) -> str:
    if not table.exists():
        return "(no table)"
    entries = json.loads(table.read_text())["entries"]
    lines = ["| kernel | shape | tuned config | ms | default ms | speed-up |", "|---|---|---|---|---|---|"]
    for e in entries:
        shape = ",".join(f"{k}={v}" for k, v in (e.get("shape") or {}).items())
        config = " ".join(f"{k}={v}" for k, v in e["config"].items())
        speedup = f"{e['default_ms'] / e['ms']:.2f}x" if e.get("ms") and e.get("default_ms") else "-"
        lines.append(f"| {e['kernel']} | {shape} | {config} | {e.get('ms', math.nan):.4f} | "
                     f"{e.get('default_ms') or math.nan:.4f} | {speedup} |")
    return "\n".join(lines)
