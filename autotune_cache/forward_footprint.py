"""Resource model of the fused forward kernel (`kernels/forward.py`) for candidate pruning.

Checked against `python -m perf.static_report` (Triton 3.9, sm_80 and sm_90, the report's
N=32, C=64, 56x56, M=6, K=3 problem, every candidate and dtype): the shared-memory figure is
exact, and the register figure, a lower bound, never exceeded the compiled registers plus
spilled words. It does not model num_stages > 1 (the kernel's channel loop is not pipelined,
see `kernels/configs.py`).
"""

from __future__ import annotations

import math
from typing import Mapping, Protocol

import torch

from .prune import Footprint


class ForwardLaunchLike(Protocol):
    """`kernels.configs.ForwardLaunch`: a config fitted to a problem."""

    BLOCK_P: int
    BLOCK_O: int
    BLOCK_C: int
    M_PAD: int
    num_warps: int
    num_stages: int


def forward_footprint(launch: ForwardLaunchLike, shape: Mapping[str, int], dtype: torch.dtype, arch: str) -> Footprint:
    """What `launch` costs on a problem of `shape` (`keys.layer_shape`), in `dtype`, on `arch`
    ("sm_80" or "sm_90").

    Shared memory: the coefficient-sum dot's operands, α [BLOCK_O, BLOCK_K] and Z [BLOCK_K, BLOCK_P]
    in the input dtype (BLOCK_K = M_PAD * BLOCK_C). Registers per thread, at least: Z and the
    accumulator [BLOCK_O, BLOCK_P] in fp32, one tap [BLOCK_C, BLOCK_P] and the atoms
    [M_PAD, BLOCK_P] in fp32, and for 16-bit dtypes on sm_80, whose mma.sync reads operands from
    registers, both dot operands again (wgmma on sm_90 reads them from shared memory; float32
    dots may run as FMA loops that stream their operands, so they are not counted).
    """
    threads = 32 * launch.num_warps
    block_k = launch.M_PAD * launch.BLOCK_C
    p, o, c = launch.BLOCK_P, launch.BLOCK_O, launch.BLOCK_C
    operands = (o + p) * block_k

    def per_thread(elements: float) -> int:
        return math.ceil(elements / threads)

    registers = per_thread(block_k * p) + per_thread(o * p) + per_thread(c * p) + per_thread(launch.M_PAD * p)
    if arch == "sm_80" and dtype.itemsize == 2:
        registers += per_thread(operands / 2)  # two 16-bit values per 32-bit register
    fill = (_fill(shape["pixels"], p) * _fill(shape["c_out_g"], o) * _fill(shape["c_in_g"], c))
    launch_key = (p, o, c, launch.M_PAD, launch.num_warps, launch.num_stages)
    # Stage 2's multiply-adds on the padded tiles, redone for every output-channel tile.
    cost = (padded(shape["pixels"], p) * padded(shape["c_out_g"], o) / o * padded(shape["c_in_g"], c)
            * shape["taps"] * launch.M_PAD)
    return Footprint(launch=launch_key, threads=threads, shared_bytes=operands * dtype.itemsize,
                     registers=registers, fill=fill, cost=cost)


def padded(extent: int, block: int) -> int:
    """`extent` rounded up to whole blocks of `block`."""
    return math.ceil(extent / block) * block


def _fill(extent: int, block: int) -> float:
    """Useful fraction of the tiles that cover `extent` elements in blocks of `block`."""
    return extent / padded(extent, block)
