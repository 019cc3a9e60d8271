"""Reference path vs the paper's algorithm vs a static F.conv2d on the CPU, side by side.

    python -m perf.reference_vs_paper [--out perf/results/cpu]

Forward only, float32, N=8, C_in=C_out=64, 56x56, M=6, Fourier–Bessel bases, padding K//2;
the reference path with its default chunking and as one chunk. Writes a CSV and prints it.
"""

from __future__ import annotations

import argparse
import functools
import platform
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from atomconv import fourier_bessel_bases
from atomconv.reference import DEFAULT_MAX_CHUNK_BYTES, atom_conv2d_reference
from atomconv.validation import validate_atom_conv2d

from .measure import cpu_peak_bytes, cpu_time_ms
from .paper import paper_atom_conv2d


def cases(kernel_size: int, batch=8, channels=64, size=56, num_atoms=6):
    """{name: fn} for one kernel size, on shared random inputs."""
    g = torch.Generator().manual_seed(0)
    bases = fourier_bessel_bases(kernel_size, num_atoms)
    pad = kernel_size // 2
    x = torch.randn(batch, channels, size, size, generator=g)
    coeff = torch.randn(batch, num_atoms * bases.shape[0], size, size, generator=g)
    weight = torch.randn(channels, channels, num_atoms, generator=g)
    static = torch.randn(channels, channels, kernel_size, kernel_size, generator=g)
    geo = validate_atom_conv2d(x, coeff, bases, weight, None, 1, pad, 1, 1)
    reference = functools.partial(atom_conv2d_reference, x, coeff, bases, weight, None, geo)
    return {
        "conv2d": lambda: F.conv2d(x, static, None, 1, pad),
        "paper": lambda: paper_atom_conv2d(x, coeff, bases, weight.reshape(channels, -1, 1, 1), None, 1, pad),
        f"reference (chunks <= {DEFAULT_MAX_CHUNK_BYTES >> 20} MiB)": reference,
        "reference (one chunk)": functools.partial(reference, max_chunk_bytes=None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("perf/results/cpu"))
    args = parser.parse_args()
    rows = []
    with torch.no_grad():
        for k in (3, 7):
            for name, fn in cases(k).items():
                rows.append({"impl": name, "kernel_size": k, **cpu_time_ms(fn), "peak_mem_MiB": cpu_peak_bytes(fn) / 2**20})
    table = pd.DataFrame(rows)
    for k, group in table.groupby("kernel_size"):
        paper = group.set_index("impl").loc["paper"]
        table.loc[group.index, "time_vs_paper"] = group["median_ms"] / paper["median_ms"]
        table.loc[group.index, "mem_vs_paper"] = group["peak_mem_MiB"] / paper["peak_mem_MiB"]
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "reference_vs_paper.csv", index=False)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))


if __name__ == "__main__":
    main()
