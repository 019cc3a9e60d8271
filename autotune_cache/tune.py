"""Benchmarking, and the registry of kernels that `python -m autotune_cache tune` warms.

A kernel module registers a runner: a function that takes `atom_conv2d`'s arguments (x,
atom_coeff, bases, weight, bias, stride, padding, dilation, groups) and runs the kernel once
through its launcher, whose `get_config` call benchmarks and learns the config on a miss.
"""

from __future__ import annotations

from typing import Callable

WARMUP_MS = 25
REPEAT_MS = 100
"""Per candidate: enough runs of a kernel of 10 µs to 1 ms (hundreds to thousands) that the
median is stable to about a percent, short enough for a user's first call of a new shape."""

TUNERS: dict[str, Callable[..., object]] = {}


def time_launch(run: Callable[[], object]) -> float:
    """Median milliseconds of `run()` on the current CUDA device and stream (Triton's `do_bench`,
    which flushes the L2 cache between runs; the median resists a busy GPU's outliers)."""
    from triton.testing import do_bench

    return float(do_bench(run, warmup=WARMUP_MS, rep=REPEAT_MS, return_mode="median"))


def register_tuner(kernel: str, run: Callable[..., object]) -> None:
    """Make `tune` run `kernel` through `run(x, atom_coeff, bases, weight, bias, stride, padding,
    dilation, groups)`; registering a name again replaces its runner."""
    if not isinstance(kernel, str) or not kernel:
        raise ValueError(f"kernel must be a non-empty name, got {kernel!r}")
    if not callable(run):
        raise TypeError(f"run must be callable, got {type(run).__name__}")
    TUNERS[kernel] = run
