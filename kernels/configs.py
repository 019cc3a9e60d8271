"""Launch configurations of the Triton kernels: the one place that says how a kernel is launched.

A *config* is what a tuner chooses (block sizes, warps, pipeline stages). It is fitted to a
problem (`fit_forward_config`) to give the constexprs the kernel is compiled with. Until tuning
data exists (a later issue adds benchmarking and a persistent cache on top of
`pick_forward_config`), the launcher uses one default config per (dtype, arch).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from atomconv.validation import AtomConvGeometry

ARCHS = ("sm_80", "sm_90")
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

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


def _pow2_at_least(n: int) -> int:
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
    (torch.float32, "sm_80"): ForwardConfig(block_p=32, block_o=32, block_k=128, num_warps=4, num_stages=1),
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


def arch_of(device: torch.device) -> str:
    """"sm_90" for Hopper and newer, else "sm_80"; CPU (the interpreter) counts as "sm_80"."""
    if device.type != "cuda":
        return "sm_80"
    return "sm_90" if torch.cuda.get_device_capability(device)[0] >= 9 else "sm_80"


def pick_forward_config(dtype: torch.dtype, arch: str) -> ForwardConfig:
    """The config to launch with. No tuning data yet: the (dtype, arch) default (the tuning
    cache will add the problem's shape class to the key)."""
    return DEFAULT_FORWARD[dtype, arch]


def fit_forward_config(config: ForwardConfig, geo: AtomConvGeometry) -> ForwardLaunch:
    """Fit a config to a problem: pad M to a power of two, and shrink the channel blocks to
    the group's channels, but never below the smallest tensor-core dot."""
    m_pad = _pow2_at_least(geo.num_atoms)
    c_in_g, c_out_g = geo.in_channels // geo.groups, geo.out_channels // geo.groups
    block_c = max(1, min(config.block_k // m_pad, _pow2_at_least(c_in_g)))
    block_c = max(block_c, MIN_DOT_SIZE // m_pad)  # padded channels are masked to zero
    block_o = max(MIN_DOT_SIZE, min(config.block_o, _pow2_at_least(c_out_g)))
    return ForwardLaunch(
        BLOCK_P=max(MIN_DOT_SIZE, config.block_p), BLOCK_O=block_o, BLOCK_C=block_c, M_PAD=m_pad,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
