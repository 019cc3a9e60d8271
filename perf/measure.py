"""How the benchmarks time and weigh a call: on the CPU and on a CUDA GPU.

Timings are in ms: median, 20th and 80th percentile. Peak memory is in bytes above what was
held before the call (the inputs), the call's own result included.
"""

from __future__ import annotations

import os
from typing import Callable

# torch 2.13's profiler (Kineto) prints two "USDT" lines to stderr per profiled call; a log level
# above USDT's (5) keeps them out of the sweep's progress display. Read when Kineto starts.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import torch  # noqa: E402
from torch._C._profiler import _EventType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils import benchmark  # noqa: E402


def cpu_time_ms(fn: Callable[[], object], min_run_time: float = 1.0) -> dict[str, float]:
    """Wall time of fn() with torch.utils.benchmark, on as many threads as torch uses (the
    Timer's own default is one thread)."""
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    times = torch.tensor(timer.blocked_autorange(min_run_time=min_run_time).times, dtype=torch.float64) * 1e3
    # All three interpolated alike (Tensor.median takes the lower middle value, so with few
    # blocks it could fall below the 20th percentile).
    median, p20, p80 = times.quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64)).tolist()
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80}


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes held by PyTorch's CPU allocator during fn(), above what was held before.

    The profiler records every allocation and free of the allocator with its size and time
    (the events torch's own memory profiler reads); replaying them in time order gives the
    exact peak, temporaries freed inside an op included. (Summing each op's self memory
    instead misplaces the frees of ops that call other ops, such as custom ops.)"""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    changes, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            changes.append((event.start_time_ns, event.extra_fields.alloc_size))
    held = peak = 0
    for _, size in sorted(changes):
        held += size
        peak = max(peak, held)
    return peak


def cuda_time_ms(fn: Callable[[], object]) -> dict[str, float]:
    """GPU time of fn() with triton.testing.do_bench (warm-up, L2 flushed before every run)."""
    from triton.testing import do_bench

    median, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8])
    return {"median_ms": median, "p20_ms": p20, "p80_ms": p80}


def cuda_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of torch.cuda.max_memory_allocated during fn(), above what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before
