"""Launch configurations of the Triton kernels: the one place that says how a kernel is launched.

A *config* (`TileConfig`) is what a tuner chooses: warps (one output pixel per thread, so
BLOCK_P = 32 * num_warps pixels per program), the channel chunk BLOCK_C that one pass of the
CUDA-core stage holds in registers, the channel tile BLOCK_O of the tensor-core stage, and
pipeline stages. `fit_tile_config` fits it to a problem: the constexprs the kernel is compiled
with (`TileLaunch`). Each launcher asks `tuned_config` (the `autotune_cache`: learned or shipped
per GPU, dtype and shape bucket, else benchmarked once) and falls back to its `pick_*_config`
default per (dtype, arch), which is also what runs under the interpreter.

What the channel fields mean for each kernel:
- forward, dα: block_c input channels per chunk (Z of M atoms: M * block_c registers per thread),
  block_o output channels per program;
- dβ: block_c input channels per chunk (dZ: M * block_c registers), block_o output channels per
  step of dZ's dot (its reduction);
- dx (the transposed problem): block_c output channels per chunk (U: M * block_c registers),
  block_o input channels per program.
"""

from __future__ import annotations

import functools
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

import autotune_cache

from atomconv.validation import AtomConvGeometry

from .launch import KERNEL_DTYPES, on_device_of, pixel_tiles

ARCHS = ("sm_80", "sm_90")
MIN_DOT_SIZE = 16
"""16-bit tensor-core dots reduce over at least 16 (and Triton 3.6 asks it of 32-bit ones too)."""


@dataclass(frozen=True)
class TileConfig:
    """One launch configuration of a kernel (see the module doc for what block_c and block_o are)."""

    num_warps: int
    block_c: int
    block_o: int
    num_stages: int = 1

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class TileLaunch:
    """A config fitted to one problem: the kernel's constexprs and launch options. A tile has
    32 * num_warps columns (one per thread): BLOCK_P pixels times TAP_GROUPS groups of taps,
    each column holding the atoms of one pixel's taps of one group. ATOMS_PER_DOT atoms share
    one stage-3 dot when TAP_GROUPS * BLOCK_C alone is below MIN_DOT_SIZE."""

    BLOCK_P: int
    TAP_GROUPS: int
    BLOCK_C: int
    BLOCK_O: int
    ATOMS_PER_DOT: int
    num_warps: int
    num_stages: int

    def padded_atoms(self, num_atoms: int) -> int:
        """M_DOT: num_atoms rounded up to ATOMS_PER_DOT, the atoms a channel chunk of packed α holds
        (`forward.pack_weight`, dα's partials)."""
        return self.ATOMS_PER_DOT * _cdiv(num_atoms, self.ATOMS_PER_DOT)


def pow2_at_least(n: int) -> int:
    """The smallest power of two >= n (Triton block shapes are powers of two)."""
    return 1 << max(0, n - 1).bit_length()


ATOM_REGISTERS = 64
"""At most this many atoms per thread (fp32 registers held for the whole program): a kernel
whose M * KH * KW atoms of a pixel are more splits each pixel's taps over TAP_GROUPS threads."""


def tap_groups(geo: AtomConvGeometry, columns: int) -> int:
    """The fewest tap groups (a power of two) that keep each column's atoms within
    ATOM_REGISTERS, while a tile keeps MIN_DOT_SIZE pixels (the dots' column count)."""
    taps, groups = geo.kernel_size[0] * geo.kernel_size[1], 1
    while _cdiv(taps, groups) * geo.num_atoms > ATOM_REGISTERS and columns // (2 * groups) >= MIN_DOT_SIZE:
        groups *= 2
    return groups


def row_passes(geo: AtomConvGeometry) -> bool:
    """Whether the forward kernel runs one pass per row of taps (`forward.atom_conv2d_fwd_kernel`):
    where a pixel's M*KH*KW atoms are more than ATOM_REGISTERS but one row's M*KW are not."""
    (kh, kw), m = geo.kernel_size, geo.num_atoms
    return kh * kw * m > ATOM_REGISTERS and kw * m <= ATOM_REGISTERS


def even_chunks(geo: AtomConvGeometry, launch: TileLaunch, *, transposed: bool = False) -> bool:
    """A kernel's EVEN_C: every channel chunk of BLOCK_C is full, so no channel needs a mask. The
    chunks run over a group's input channels, or its output channels where `transposed` (dx)."""
    channels = geo.out_channels if transposed else geo.in_channels
    return (channels // geo.groups) % launch.BLOCK_C == 0


def fit_tile_config(config: TileConfig, geo: AtomConvGeometry, *, transposed: bool = False,
                    by_rows: bool = False) -> TileLaunch:
    """Fit a config to a problem: channel blocks shrink to the group's channels (powers of two),
    but a chunk keeps at least 8 channels (two atoms make a dot of 16) and a tile at least 16;
    taps split into `tap_groups`, or none with `by_rows` (a kernel that holds one row of taps at
    a time). `transposed`: the dx kernel's fit, whose chunks run over output channels and tiles
    over input channels."""
    c_chunk, c_tile = geo.in_channels // geo.groups, geo.out_channels // geo.groups
    if transposed:
        c_chunk, c_tile = c_tile, c_chunk
    block_c = max(MIN_DOT_SIZE // 2, min(config.block_c, pow2_at_least(c_chunk)))
    groups = 1 if by_rows else tap_groups(geo, 32 * config.num_warps)
    return TileLaunch(
        BLOCK_P=32 * config.num_warps // groups, TAP_GROUPS=groups, BLOCK_C=block_c,
        BLOCK_O=max(MIN_DOT_SIZE, min(config.block_o, pow2_at_least(c_tile))),
        ATOMS_PER_DOT=2 if groups * block_c < MIN_DOT_SIZE else 1, num_warps=config.num_warps,
        num_stages=config.num_stages,
    )


# Candidates a tuner tries, and the defaults (the first of each list); `python -m perf.static_report`
# shows what each compiles to. What a config trades: per thread it holds the M*KH*KW atoms of
# its pixel, M*block_c values of Z (or dZ, U) and block_o of accumulator, all fp32; 4 warps leave
# room for 2 CTAs per SM; a wide block_c reads α (and runs the dot) in fewer, larger steps.
_CANDIDATES = (
    TileConfig(num_warps=4, block_c=8, block_o=64),
    TileConfig(num_warps=4, block_c=16, block_o=64),
    TileConfig(num_warps=4, block_c=8, block_o=32),
    TileConfig(num_warps=8, block_c=8, block_o=64),
    TileConfig(num_warps=4, block_c=8, block_o=128),
)
DEFAULT = _CANDIDATES[0]


def tile_candidates() -> tuple[TileConfig, ...]:
    """Configs a tuner tries for every kernel (the forward and the three backward ones); the
    default comes first."""
    return _CANDIDATES


def default_config() -> TileConfig:
    """The config every kernel launches with when the autotune cache knows nothing better, the
    same for every kernel, dtype and arch. In 16 bits, at K=3, it compiles without spills for the
    forward and dβ, and with a few hundred bytes of spills for dx and dα. In float32 it spills up
    to a few KB. The static report (kernels/static_report.json) has the numbers."""
    return DEFAULT


STATIC_REPORT = Path(__file__).with_name("static_report.json")
"""`python -m perf.static_report --json kernels/static_report.json`, committed: what every candidate
compiles to on sm_80 and sm_90. Regenerate it when a kernel or a candidate list changes."""


@functools.lru_cache(maxsize=None)
def _unspilled(kernel: str, candidates: tuple[TileConfig, ...], default: TileConfig, dtype: torch.dtype,
               arch: str, kernel_size: int) -> tuple[TileConfig, ...]:
    """The candidates, less those the committed static report shows spilling for this kernel,
    dtype, arch and (nearest) kernel size when compiled by the running Triton version (a hint,
    not a proof: it compiles representative problems). The default stays."""
    import triton

    try:
        records = json.loads(STATIC_REPORT.read_text())
    except (OSError, ValueError) as error:
        warnings.warn(f"atomconv: cannot read {STATIC_REPORT} ({error}); spilling candidates are not pruned",
                      RuntimeWarning, stacklevel=2)
        records = []
    spilling = autotune_cache.spilling_configs(records, kernel, dtype, arch, triton.__version__, kernel_size)
    return tuple(c for c in candidates if c == default or c.as_dict() not in spilling)


def tuned_config(kernel: str, x: torch.Tensor, geo: AtomConvGeometry, candidates: Sequence[TileConfig],
                 default: TileConfig, run: Callable[[TileConfig], object],
                 footprint: Callable[[TileConfig], object] | None = None) -> TileConfig:
    """The config `kernel` (a static report kernel name) launches with for this problem: the
    autotune cache's entry for x's GPU, dtype and shape bucket, else the fastest of the
    candidates left after pruning (spilling ones first) when `run(config)` (one launch) is
    benchmarked once, else `default`. Always `default` under the interpreter."""
    candidates = _unspilled(kernel, tuple(candidates), default, x.dtype, arch_of(x.device), max(geo.kernel_size))

    def benchmark(config: TileConfig) -> float:
        with on_device_of(x):  # do_bench times on the current device's stream
            return autotune_cache.time_launch(lambda: run(config))

    return autotune_cache.get_config(
        kernel, device=x.device, dtype=x.dtype, shape=autotune_cache.layer_shape(geo), candidates=candidates,
        default=default, benchmark=benchmark, footprint=footprint,
    )


def arch_of(device: torch.device) -> str:
    """"sm_90" for Hopper and newer, else "sm_80"; CPU (the interpreter) counts as "sm_80"."""
    if device.type != "cuda":
        return "sm_80"
    return "sm_90" if torch.cuda.get_device_capability(device)[0] >= 9 else "sm_80"


MAX_WEIGHT_GRAD_CHUNKS = 4
"""Channel chunks one dα program owns at most: each holds its own dα accumulators (at K=7 a
kernel with eight had not finished compiling and being modelled after 13 minutes)."""


def weight_grad_chunks(geo: AtomConvGeometry, launch: TileLaunch, dtype: torch.dtype) -> int:
    """How many consecutive channel chunks one dα program owns. It makes a pixel tile's atoms
    (stage 1: M*L*KH*KW multiply-adds per pixel) once for all of them, then each chunk's Z (stage 2:
    BLOCK_C*M*KH*KW): enough chunks that stage 2 is at least twice stage 1 (CHUNKS*BLOCK_C >= 2L),
    a power of two that divides the chunk count, at most MAX_WEIGHT_GRAD_CHUNKS. One in float32,
    whose dot operands take twice the registers (two chunks: 14.8 KB of spills at K=3 on sm_90,
    not 2.2 KB)."""
    if dtype.itemsize > 2:
        return 1
    chunks = _cdiv(geo.in_channels // geo.groups, launch.BLOCK_C)
    wanted = min(MAX_WEIGHT_GRAD_CHUNKS, pow2_at_least(_cdiv(2 * geo.num_bases, launch.BLOCK_C)))
    per_program = 1
    while per_program < wanted and chunks % (2 * per_program) == 0:
        per_program *= 2
    return per_program


def weight_grad_programs(geo: AtomConvGeometry, launch: TileLaunch, dtype: torch.dtype) -> int:
    """The dα kernel's programs per split: one per group, output-channel tile and run of
    `weight_grad_chunks` input-channel chunks."""
    c_in_g, c_out_g = geo.in_channels // geo.groups, geo.out_channels // geo.groups
    return (geo.groups * _cdiv(c_out_g, launch.BLOCK_O) * _cdiv(c_in_g, launch.BLOCK_C)
            // weight_grad_chunks(geo, launch, dtype))


def weight_grad_splits(geo: AtomConvGeometry, launch: TileLaunch, dtype: torch.dtype, target_programs: int) -> int:
    """How many programs share the pixel reduction of one program's α tiles in the dα kernel:
    enough for about target_programs programs in all, at most one per pixel tile, at least one.
    Each split writes a float32 partial of the whole α, so the scratch, splits x |α| floats,
    grows as programs own more chunks (`weight_grad_chunks`)."""
    programs_per_split = weight_grad_programs(geo, launch, dtype)
    tiles = pixel_tiles(geo.batch, geo.out_size[0] * geo.out_size[1], launch.BLOCK_P)
    return max(1, min(tiles, _cdiv(target_programs, programs_per_split)))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)

