"""What every launcher does around a Triton launch: refuse what no kernel runs, launch on the
inputs' device, and turn a PyTorch tensor's strides and numerics flags into kernel arguments.

Triton launches a kernel on torch's *current* CUDA device and its current stream, not on the
device its pointer arguments live on: `on_device_of` makes the inputs' device current for the
launch (and for timing it), so a model on cuda:1 runs on cuda:1 while cuda:0 is current.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_INT32 = 2**31 - 1


@triton.jit
def _probe():
    pass


INTERPRETING = isinstance(_probe, InterpretedFunction)
"""True when Triton interprets the kernels (TRITON_INTERPRET was set when `kernels` was first
imported: `@triton.jit` decides then). Tensors may then live on the CPU, and the kernels' dots
run on fp32 operands (the interpreter's 16-bit arithmetic is broken) that were first rounded to
the 16-bit dtype a GPU's tensor cores would read (`tiles.dot_operand`)."""


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("+")[0].split(".")[:2])


if INTERPRETING and _version(triton.__version__) < (3, 7) and _version(np.__version__) >= (2, 4):
    raise ImportError(f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) fails with numpy "
                      f"{np.__version__} ('only 0-dimensional arrays can be converted to Python scalars'): "
                      "install numpy<2.4 with it, or Triton 3.7 or newer")


@dataclass(frozen=True)
class Launch:
    """One launch of a kernel, exactly as a launcher makes it: the `@triton.jit` function, every
    argument by name (constexprs included), the grid and the launch options. The static report
    lists these for the static model (`perf.static_report.kernel_launches`)."""

    name: str
    fn: object
    args: dict
    grid: tuple[int, ...]
    num_warps: int
    num_stages: int
    loop_trips: tuple[float, ...] = ()
    """How many times the kernel's runtime loops run in a program, outermost first (an average
    where programs differ); its other loops are unrolled at compile time. For static estimates."""

    def run(self) -> None:
        self.fn[self.grid](**self.args, num_warps=self.num_warps, num_stages=self.num_stages)


def on_device_of(t: torch.Tensor):
    """The context to launch (or time) a kernel on t's device and that device's current stream:
    `torch.cuda.device(t.device)` for a CUDA tensor, nothing for a CPU one (the interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def check_runnable(x: torch.Tensor) -> None:
    """Refuse, with a message, the dtypes and devices the kernels do not run on."""
    if x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"the Triton path supports float16, bfloat16 and float32, got x of dtype {x.dtype}; "
                        "use backend='reference' for it")
    if x.device.type != "cuda" and not INTERPRETING:
        raise RuntimeError(f"the Triton path needs CUDA tensors, got x on {x.device} (set TRITON_INTERPRET=1 "
                           "before importing kernels to run it on the CPU with Triton's interpreter)")


def tf32_allowed() -> bool:
    """Whether PyTorch's own CUDA matmuls use TF32 for float32 (docs/design.md §6): the per-backend
    `fp32_precision` where torch has it (2.9 and newer; reading the legacy `allow_tf32` raises
    there once the new API was used), else the legacy flag."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", "none")
    return precision == "tf32" if precision != "none" else bool(matmul.allow_tf32)


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 dots use TF32 only where PyTorch's own matmuls would (docs/design.md §6); the interpreter only
    knows "ieee". The value does not matter for 16-bit dots."""
    if dtype == torch.float32 and tf32_allowed() and not INTERPRETING:
        return "tf32"
    return "ieee"


def strides(prefix: str, dims: str, t: torch.Tensor) -> dict[str, int]:
    """{"<prefix>_<dim>": stride} for each dimension of t, dims naming them in order."""
    return {f"{prefix}_{d}": s for d, s in zip(dims, t.stride())}


BASES_ROW_STRIDE = 16
"""Elements per row of Ψ as `row_padded_bases` lays it out, at least: a multiple of 16, so that Triton
knows every row starts 16-element aligned and reads a row in one vector load."""


def row_padded_bases(bases: torch.Tensor) -> torch.Tensor:
    """Ψ [L, KH, KW] as a view of the same shape whose rows are zero-padded to a stride of
    BASES_ROW_STRIDE (or KW rounded up to a power of two, if more): what `tiles.basis_row` reads,
    a row at a time, KW rounded up to a power of two wide. One small torch copy (L * KH * that
    stride elements)."""
    num_bases, kh, kw = bases.shape
    padded = bases.new_zeros(num_bases, kh, max(BASES_ROW_STRIDE, 1 << (kw - 1).bit_length()))
    padded[..., :kw] = bases
    return padded[..., :kw]


def pixel_tiles(batch: int, pixels: int, block_p: int) -> int:
    """How many tiles of block_p pixels cover `batch` samples of `pixels` pixels each, taken sample
    after sample (`tiles.pixel_tile`: a tile may span samples)."""
    return triton.cdiv(batch * pixels, block_p)


def check_int32_indexing(what: str, pixels_per_sample: int, block_p: int, programs: int) -> None:
    """The kernels index the pixels of one sample and the programs in int32 (tensor offsets are
    made wider, see `needs_wide_offsets`): refuse, with a message, a launch whose padded pixel
    count per sample or program count passes 2**31 (what: how the pixel count is made)."""
    padded_pixels = triton.cdiv(pixels_per_sample, block_p) * block_p
    if max(padded_pixels, programs) > MAX_INT32:
        raise ValueError(f"the Triton path indexes pixels and programs in int32: {what} = {pixels_per_sample} "
                         f"pixels per sample need {programs} programs of {block_p} pixels, over 2**31")


def needs_wide_offsets(*tensors: torch.Tensor) -> bool:
    """Whether the kernels' offsets into any of these [N, C, H, W] tensors (`tiles.offset`, int32
    unless WIDE; from the tensor's start, since a tile may span samples) can pass 2**31: its
    extent, with room for taps reaching up to an image beyond the edges (padding and dilation are
    bounded by the image size the validation accepts)."""
    for t in tensors:
        n, c, h, w = t.shape
        extent = (n - 1) * t.stride(0) + (c - 1) * t.stride(1) + 3 * (h * t.stride(2) + w * t.stride(3))
        if extent > MAX_INT32:
            return True
    return False


def pixel_run(t: torch.Tensor) -> int:
    """0 unless the pixels of each (sample, channel) of an NCHW tensor t form one run (stride_h
    is W * stride_w: contiguous NCHW, or any tensor of one row); else the largest power of two
    up to 8 that divides the run's length H * W, which a kernel's pixel tiles tell Triton
    (`tiles.pixel_tile`) so that it moves that many pixels per access."""
    _, _, h, w = t.shape
    if not (h == 1 or t.stride(2) == w * t.stride(3)):
        return 0
    return math.gcd(h * w, 8)
