"""Launch configurations of the Triton kernels: the one place that says how a kernel is launched.

A *config* is what a tuner chooses (block sizes, warps, pipeline stages). It is fitted to a
problem (`fit_forward_config`) to give the constexprs the kernel is compiled with. Each launcher
asks `tuned_config` (the `autotune_cache`: learned or shipped per GPU, dtype and shape bucket,
else benchmarked once) and falls back to its `pick_*_config` default per (dtype, arch), which is
also what runs under the interpreter.

The backward kernels (kernels/backward.py) tile the same way as the forward (pixels x channels x
a reduction chunk of M_PAD x channels), so they take the same `ForwardConfig` and the same fit;
each has its own candidates, defaults and `pick_*_config`.
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

from .launch import KERNEL_DTYPES, on_device_of

ARCHS = ("sm_80", "sm_90")

# 16-bit tensor-core dots need every dimension >= 16 on NVIDIA GPUs.
MIN_DOT_SIZE = 16


@dataclass(frozen=True)
class ForwardConfig:
    """One launch configuration of the fused forward kernel.

    block_p: output pixels per program. block_o: output channels per program (inside one group).
    block_k: reduction width of one coefficient-sum dot, i.e. BLOCK_C input channels times M_PAD
    atoms; it fixes the size of the on-chip Z tile [block_k, block_p] whatever M is.
    """

    block_p: int
    block_o: int
    block_k: int
    num_warps: int
    num_stages: int

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class ForwardLaunch:
    """A config fitted to one problem: the kernel's constexprs and launch options."""

    BLOCK_P: int
    BLOCK_O: int
    BLOCK_C: int
    M_PAD: int
    num_warps: int
    num_stages: int


def pow2_at_least(n: int) -> int:
    """The smallest power of two >= n (Triton block shapes are powers of two)."""
    return 1 << max(0, n - 1).bit_length()


# Candidates a tuner tries (`python -m perf.static_report` shows what each compiles to). What a
# config trades: per thread it holds BLOCK_K * BLOCK_P / threads fp32 values of Z and
# BLOCK_O * BLOCK_P / threads of accumulator (plus, on sm_80, the dot's operands); a wide
# BLOCK_K rebuilds the atoms less often (once per chunk of BLOCK_K / M_PAD channels), a wide
# BLOCK_P reads each α chunk for more pixels, a wide BLOCK_O recomputes Z for fewer
# output-channel tiles.
# num_stages is 1 throughout: the channel loop holds the tap loops, which Triton's software
# pipeliner does not handle, so more stages compile to the same code.
_NARROW = (
    ForwardConfig(block_p=64, block_o=32, block_k=256, num_warps=8, num_stages=1),
    ForwardConfig(block_p=128, block_o=32, block_k=128, num_warps=8, num_stages=1),
    ForwardConfig(block_p=64, block_o=16, block_k=256, num_warps=4, num_stages=1),
    ForwardConfig(block_p=32, block_o=32, block_k=128, num_warps=4, num_stages=1),
)
_WIDE = (
    ForwardConfig(block_p=128, block_o=64, block_k=128, num_warps=8, num_stages=1),
    ForwardConfig(block_p=32, block_o=64, block_k=256, num_warps=4, num_stages=1),
    ForwardConfig(block_p=64, block_o=64, block_k=64, num_warps=4, num_stages=1),
    ForwardConfig(block_p=128, block_o=64, block_k=64, num_warps=8, num_stages=1),
    ForwardConfig(block_p=128, block_o=128, block_k=128, num_warps=8, num_stages=1),
)

# The config used when no tuning data exists, per (dtype, arch); each compiles without spills
# with Triton 3.6 and 3.9 alike. sm_80's mma.sync holds the dot's operands in registers, so its
# reduction chunk is narrower than sm_90's, whose wgmma reads them from shared memory. float32
# dots are not on tensor cores unless TF32 is allowed, and their operands take registers too.
_SM80_16BIT = ForwardConfig(block_p=32, block_o=64, block_k=128, num_warps=4, num_stages=1)
_SM90_16BIT = ForwardConfig(block_p=64, block_o=64, block_k=256, num_warps=8, num_stages=1)
DEFAULT_FORWARD: dict[tuple[torch.dtype, str], ForwardConfig] = {
    (torch.float16, "sm_80"): _SM80_16BIT,
    (torch.bfloat16, "sm_80"): _SM80_16BIT,
    (torch.float32, "sm_80"): ForwardConfig(block_p=64, block_o=64, block_k=256, num_warps=8, num_stages=1),
    (torch.float16, "sm_90"): _SM90_16BIT,
    (torch.bfloat16, "sm_90"): _SM90_16BIT,
    (torch.float32, "sm_90"): ForwardConfig(block_p=64, block_o=64, block_k=128, num_warps=8, num_stages=1),
}


def forward_shape_class(geo: AtomConvGeometry) -> str:
    """The shape class that selects the candidate list: output channels per group decide
    BLOCK_O, the dimension that most changes which tile shape wins."""
    return "narrow" if geo.out_channels // geo.groups <= 32 else "wide"


def forward_candidates(shape_class: str) -> tuple[ForwardConfig, ...]:
    """Configs a tuner tries for a shape class; the defaults are always among them."""
    own = {"narrow": _NARROW, "wide": _WIDE}[shape_class]
    return tuple(dict.fromkeys((*DEFAULT_FORWARD.values(), *own)))


def all_forward_candidates() -> tuple[ForwardConfig, ...]:
    """Every config any shape class may launch (for tests and the static report)."""
    return tuple(dict.fromkeys(c for cls in ("narrow", "wide") for c in forward_candidates(cls)))


STATIC_REPORT = Path(__file__).with_name("static_report.json")
"""`python -m perf.static_report --json kernels/static_report.json`, committed: what every candidate
compiles to on sm_80 and sm_90. Regenerate it when a kernel or a candidate list changes."""


@functools.lru_cache(maxsize=None)
def _unspilled(kernel: str, candidates: tuple[ForwardConfig, ...], default: ForwardConfig, dtype: torch.dtype,
               arch: str, kernel_size: int) -> tuple[ForwardConfig, ...]:
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


def tuned_config(kernel: str, x: torch.Tensor, geo: AtomConvGeometry, candidates: Sequence[ForwardConfig],
                 default: ForwardConfig, run: Callable[[ForwardConfig], object],
                 footprint: Callable[[ForwardConfig], object] | None = None) -> ForwardConfig:
    """The config `kernel` (a static report kernel name) launches with for this problem: the
    autotune cache's entry for x's GPU, dtype and shape bucket, else the fastest of the
    candidates left after pruning (spilling ones first) when `run(config)` (one launch) is
    benchmarked once, else `default`. Always `default` under the interpreter."""
    candidates = _unspilled(kernel, tuple(candidates), default, x.dtype, arch_of(x.device), max(geo.kernel_size))

    def benchmark(config: ForwardConfig) -> float:
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


def pick_forward_config(dtype: torch.dtype, arch: str) -> ForwardConfig:
    """The forward's (dtype, arch) default: launched when the autotune cache knows nothing better."""
    return DEFAULT_FORWARD[dtype, arch]


def fit_forward_config(config: ForwardConfig, geo: AtomConvGeometry) -> ForwardLaunch:
    """Fit a config to a problem: pad M to a power of two, and shrink the channel blocks to
    the group's channels, but never below the smallest tensor-core dot."""
    m_pad = pow2_at_least(geo.num_atoms)
    c_in_g, c_out_g = geo.in_channels // geo.groups, geo.out_channels // geo.groups
    block_c = max(1, min(config.block_k // m_pad, pow2_at_least(c_in_g)))
    block_c = max(block_c, MIN_DOT_SIZE // m_pad)  # padded channels are masked to zero
    block_o = max(MIN_DOT_SIZE, min(config.block_o, pow2_at_least(c_out_g)))
    return ForwardLaunch(
        BLOCK_P=max(MIN_DOT_SIZE, config.block_p), BLOCK_O=block_o, BLOCK_C=block_c, M_PAD=m_pad,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


# --- Backward kernels -------------------------------------------------------------------------
# What the fields mean for each (see kernels/backward.py):
#   dβ (coeff grad): block_p output pixels; block_o output channels one dZ dot reduces over;
#                    block_k = M_PAD x input channels of one dZ chunk [block_k, block_p].
#   dα (weight grad): block_p pixels per step of the pixel reduction (the dot's reduction);
#                    block_o output channels and block_k = M_PAD x input channels of the α tile.
#   dx (input grad): fitted to the transposed geometry (`backward.transposed_geometry`):
#                    block_p input pixels; block_o input channels; block_k = M_PAD x output
#                    channels of one U chunk [block_k, block_p].
# Per thread, dβ holds dZ (block_k * block_p / threads fp32) plus its accumulator of M_PAD * L_PAD
# per pixel; dα holds Z and the α tile's accumulator; dx holds U and dx's accumulator.
_COEFF_GRAD = (
    ForwardConfig(block_p=32, block_o=32, block_k=128, num_warps=4, num_stages=1),
    ForwardConfig(block_p=16, block_o=32, block_k=128, num_warps=4, num_stages=1),
    ForwardConfig(block_p=32, block_o=32, block_k=64, num_warps=4, num_stages=1),
    ForwardConfig(block_p=64, block_o=32, block_k=64, num_warps=8, num_stages=1),
)
_WEIGHT_GRAD = (
    ForwardConfig(block_p=32, block_o=64, block_k=128, num_warps=4, num_stages=1),
    ForwardConfig(block_p=32, block_o=32, block_k=128, num_warps=4, num_stages=1),
    ForwardConfig(block_p=16, block_o=64, block_k=128, num_warps=4, num_stages=1),
    ForwardConfig(block_p=64, block_o=64, block_k=64, num_warps=8, num_stages=1),
    ForwardConfig(block_p=64, block_o=128, block_k=128, num_warps=8, num_stages=1),
)
_INPUT_GRAD = _WIDE + _NARROW  # the forward's tiles, on the transposed problem

# Defaults: each compiles without spills for sm_80 and sm_90 at K=3, 5 and 7 (the static report's
# problems). Wide output-channel tiles (block_o=64) let the dα kernel rebuild each Z tile once for
# C_out <= 64, as the forward does.
_COEFF_16BIT = ForwardConfig(block_p=64, block_o=64, block_k=128, num_warps=8, num_stages=1)
_COEFF_FP32 = {"sm_80": ForwardConfig(block_p=32, block_o=32, block_k=64, num_warps=4, num_stages=1),
               "sm_90": ForwardConfig(block_p=64, block_o=64, block_k=128, num_warps=8, num_stages=1)}
DEFAULT_COEFF_GRAD: dict[tuple[torch.dtype, str], ForwardConfig] = {
    (dtype, arch): _COEFF_FP32[arch] if dtype == torch.float32 else _COEFF_16BIT
    for dtype in KERNEL_DTYPES for arch in ARCHS
}
# Reducing dΨ as well holds β [M_PAD, L_PAD, BLOCK_P] and dΨ's partial in registers besides:
# narrower pixel tiles (the dβ defaults spill at K=7).
DEFAULT_COEFF_BASES_GRAD: dict[tuple[torch.dtype, str], ForwardConfig] = {
    (dtype, arch): ForwardConfig(block_p=32, block_o=32 if dtype == torch.float32 else 64,
                                 block_k=64 if dtype == torch.float32 else 128, num_warps=8, num_stages=1)
    for dtype in KERNEL_DTYPES for arch in ARCHS
}
_WEIGHT_16BIT = ForwardConfig(block_p=64, block_o=64, block_k=128, num_warps=8, num_stages=1)
_WEIGHT_FP32 = ForwardConfig(block_p=32, block_o=64, block_k=64, num_warps=4, num_stages=1)
DEFAULT_WEIGHT_GRAD: dict[tuple[torch.dtype, str], ForwardConfig] = {
    (dtype, arch): _WEIGHT_FP32 if dtype == torch.float32 else _WEIGHT_16BIT
    for dtype in KERNEL_DTYPES for arch in ARCHS
}
# The forward's defaults, but for float32 on sm_90, whose forward default spills in dx with Triton 3.6.
DEFAULT_INPUT_GRAD: dict[tuple[torch.dtype, str], ForwardConfig] = {
    **DEFAULT_FORWARD,
    (torch.float32, "sm_90"): ForwardConfig(block_p=64, block_o=64, block_k=64, num_warps=4, num_stages=1),
}


def _defaults_first(defaults: dict, own: tuple[ForwardConfig, ...]) -> tuple[ForwardConfig, ...]:
    return tuple(dict.fromkeys((*defaults.values(), *own)))


def coeff_grad_candidates() -> tuple[ForwardConfig, ...]:
    """Configs a tuner tries for the dβ kernel; the defaults are among them."""
    return tuple(dict.fromkeys((*DEFAULT_COEFF_GRAD.values(), *DEFAULT_COEFF_BASES_GRAD.values(), *_COEFF_GRAD)))


def weight_grad_candidates() -> tuple[ForwardConfig, ...]:
    """Configs a tuner tries for the dα kernel; the defaults are among them."""
    return _defaults_first(DEFAULT_WEIGHT_GRAD, _WEIGHT_GRAD)


def input_grad_candidates() -> tuple[ForwardConfig, ...]:
    """Configs a tuner tries for the dx kernel; the defaults are among them."""
    return _defaults_first(DEFAULT_INPUT_GRAD, _INPUT_GRAD)


def pick_coeff_grad_config(dtype: torch.dtype, arch: str, bases_grad: bool) -> ForwardConfig:
    """The dβ kernel's (dtype, arch) default, with or without the dΨ reduction: launched when the
    autotune cache knows nothing better."""
    return (DEFAULT_COEFF_BASES_GRAD if bases_grad else DEFAULT_COEFF_GRAD)[dtype, arch]


def pick_weight_grad_config(dtype: torch.dtype, arch: str) -> ForwardConfig:
    """The dα kernel's (dtype, arch) default: launched when the autotune cache knows nothing better."""
    return DEFAULT_WEIGHT_GRAD[dtype, arch]


def pick_input_grad_config(dtype: torch.dtype, arch: str) -> ForwardConfig:
    """The dx kernel's (dtype, arch) default: launched when the autotune cache knows nothing better."""
    return DEFAULT_INPUT_GRAD[dtype, arch]


def weight_grad_splits(geo: AtomConvGeometry, launch: ForwardLaunch, target_programs: int) -> int:
    """How many programs share the pixel reduction of one α tile in the dα kernel: enough for
    about target_programs programs in all, at most one per pixel tile, at least one. Each split
    writes one float32 partial of α, so the scratch is about target_programs α tiles."""
    c_in_g, c_out_g = geo.in_channels // geo.groups, geo.out_channels // geo.groups
    alpha_tiles = geo.groups * _cdiv(c_out_g, launch.BLOCK_O) * _cdiv(c_in_g, launch.BLOCK_C)
    pixel_tiles = _cdiv(geo.batch * geo.out_size[0] * geo.out_size[1], launch.BLOCK_P)
    return max(1, min(pixel_tiles, _cdiv(target_programs, alpha_tiles)))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
