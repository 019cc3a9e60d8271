"""How the benchmarks time and weigh a call on the CPU."""

from __future__ import annotations

from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils import benchmark


def cpu_time_ms(fn: Callable[[], object], min_run_time: float = 1.0) -> dict[str, float]:
    """Median, 20th and 80th percentile wall time of fn() in ms (torch.utils.benchmark)."""
    measurement = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    times = torch.tensor(measurement.times) * 1e3
    return {"median_ms": times.median().item(), "p20_ms": times.quantile(0.2).item(), "p80_ms": times.quantile(0.8).item()}


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes held by PyTorch's CPU allocator during fn(), above what was held before,
    as the profiler reports it: allocations per op and frees, replayed in time order.
    (Allocations freed inside a single op are invisible to it, so this is a lower bound.)"""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    deltas = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    held = peak = 0
    for _, delta in deltas:
        held += delta
        peak = max(peak, held)
    return peak
