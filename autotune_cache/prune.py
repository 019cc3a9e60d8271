"""Candidate pruning before any benchmark: what cannot fit the device, what is known to spill,
what compiles to the same launch as another candidate, and tiles far larger than the problem.

A kernel describes what one of its configs costs on one problem with a `Footprint` (see
`kernels.forward.forward_footprint` for the fused forward, `kernels.backward` for the backward
kernels); `prune_candidates` keeps the configs worth timing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Mapping, Sequence

import torch

from .configs import Config, config_dict
from .keys import dtype_name

MIN_RELATIVE_FILL = 0.5
"""A config whose tiles hold less than half the useful fraction of the best-filled config's
(mostly padding on a small problem) is not worth a benchmark."""


@dataclass(frozen=True)
class DeviceLimits:
    """What one program may use on a GPU: shared memory (the opt-in maximum per block, the
    figure Triton checks at launch), registers per thread (beyond it ptxas spills) and per block."""

    shared_bytes: int
    registers_per_thread: int = 255
    registers_per_block: int = 65536


@dataclass(frozen=True)
class Footprint:
    """What one config costs on one problem, as its kernel estimates it.

    launch: the launch parameters the config turns into on this problem (configs with equal
    launches compile to the same kernel, so only the first is timed). threads: per program.
    shared_bytes: shared memory per program. registers: a lower bound of the 32-bit registers
    per thread, from the tiles a thread holds live (compilers add addressing and temporaries).
    fill: the useful fraction of a program's tile elements (1.0 when nothing is padding).
    cost: the kernel's estimate of the launch's relative run time (its multiply-adds on CUDA
    cores, padding and recomputation included), to rank configs; None when it has none.
    """

    launch: Hashable
    threads: int
    shared_bytes: int
    registers: int
    fill: float
    cost: float | None = None


def device_limits(device: torch.device) -> DeviceLimits:
    """The limits of a CUDA device, as Triton's driver reports them."""
    from triton.runtime import driver

    index = torch.cuda.current_device() if device.index is None else device.index
    properties = driver.active.utils.get_device_properties(index)
    return DeviceLimits(shared_bytes=properties["max_shared_mem"], registers_per_block=properties["max_num_regs"])


def fits(footprint: Footprint, limits: DeviceLimits) -> bool:
    """Whether a config with this footprint launches without exceeding the device's shared
    memory or registers (registers: a certain spill counts as exceeding)."""
    return (footprint.shared_bytes <= limits.shared_bytes
            and footprint.registers <= limits.registers_per_thread
            and footprint.registers * footprint.threads <= limits.registers_per_block)


def prune_candidates(candidates: Sequence[Config], footprint: Callable[[Config], Footprint], limits: DeviceLimits,
                     known_spilling: Iterable[Mapping[str, int]] = (), keep: int | None = None) -> list[Config]:
    """The candidates worth benchmarking: those that fit the device, are not among
    `known_spilling` (configs the static report shows spilling, as dicts), launch differently
    from every earlier kept candidate, and whose fill is at least MIN_RELATIVE_FILL times the
    best fill among them, in their given order. With `keep`, only the first of those (the default
    where it fits: the baseline of a benchmark) and the keep - 1 others of lowest estimated cost
    remain (given order breaks ties and ranks unknown costs last). Empty only if nothing fits."""
    spilling = [dict(c) for c in known_spilling]
    kept: dict[Hashable, tuple[Config, Footprint]] = {}
    for config in candidates:
        cost = footprint(config)
        if config_dict(config) not in spilling and fits(cost, limits) and cost.launch not in kept:
            kept[cost.launch] = (config, cost)
    if not kept:
        return []
    best_fill = max(cost.fill for _, cost in kept.values())
    filled = [(config, cost) for config, cost in kept.values() if cost.fill >= MIN_RELATIVE_FILL * best_fill]
    if keep is None or len(filled) <= keep:
        return [config for config, _ in filled]
    first, rest = filled[0], filled[1:]
    ranked = sorted(range(len(rest)), key=lambda i: (math.inf if rest[i][1].cost is None else rest[i][1].cost, i))
    return [first[0]] + [rest[i][0] for i in sorted(ranked[: keep - 1])]


def spilling_configs(records: Iterable[Mapping], kernel: str, dtype: torch.dtype, arch: str, triton_version: str,
                     kernel_size: int) -> list[dict[str, int]]:
    """Configs that spill according to `python -m perf.static_report --json` records, for one
    kernel, dtype and arch: the `known_spilling` of `prune_candidates`. Only records compiled by
    the running Triton version count (another version allocates registers differently), and of
    those the ones compiled for the kernel size nearest `kernel_size` (spills grow with the taps).
    The report compiles representative problems, so this is a hint for other shapes, not a proof."""
    mine = [r for r in records if (r["kernel"], r["dtype"], r["arch"], r.get("triton")) ==
            (kernel, dtype_name(dtype), arch, triton_version) and isinstance(r.get("kernel_size"), int)]
    if not mine:
        return []
    nearest = min((r["kernel_size"] for r in mine), key=lambda k: (abs(k - kernel_size), k))
    return [dict(r["config"]) for r in mine if r["kernel_size"] == nearest and r["spill_bytes"] > 0]
