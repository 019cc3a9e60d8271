"""Benchmarking, and the registry of kernels that `python -m autotune_cache tune` warms.

A kernel module registers a runner: a function that takes `atom_conv2d`'s arguments (x,
atom_coeff, bases, weight, bias, stride, padding, dilation, groups) and runs the kernel once
through its launcher, whose `get_config` call benchmarks and learns the config on a miss.
"""

from __future__ import annotations

from typing import Callable

WARMUP_MS = 10
REPEAT_MS = 40
"""Per candidate: short runs, since tuning happens on a user's first call of a new shape."""

TUNERS: dict[str, Callable[..., object]] = {}


def time_launch(run: Callable[[], object]) -> float:
    """Mean milliseconds of `run()` on the current CUDA stream (Triton's `do_bench`, which
    flushes the L2 cache between runs)."""
    from triton.testing import do_bench

    return float(do_bench(run, warmup=WARMUP_MS, rep=REPEAT_MS))


def register_tuner(kernel: str, run: Callable[..., object]) -> None:
    """Make `tune` run `kernel` through `run(x, atom_coeff, bases, weight, bias, stride, padding,
    dilation, groups)`; registering a name again replaces its runner."""
    if not isinstance(kernel, str) or not kernel:
        raise ValueError(f"kernel must be a non-empty name, got {kernel!r}")
    if not callable(run):
        raise TypeError(f"run must be callable, got {type(run).__name__}")
    TUNERS[kernel] = run
