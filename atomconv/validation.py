"""Input checks shared by every backend of the ACDA operator (docs/design.md §1, §4).

`validate_atom_conv2d` is the single place where arguments are checked. Every backend
(reference, Triton) calls it before touching data, so a bad call fails the same way,
with a message naming the argument, whatever the backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Largest stride, padding, dilation or kernel extent: the kernels index in int32, and nothing
# larger describes an image that fits in memory.
MAX_GEOMETRY_VALUE = 2**31 - 1
PADDING_STRINGS = ("valid", "same")


@dataclass(frozen=True)
class AtomConvGeometry:
    """Shapes and geometry of one call, all ints (pairs are (height, width))."""

    batch: int
    in_channels: int
    out_channels: int
    groups: int
    num_atoms: int  # M
    num_bases: int  # L
    in_size: tuple[int, int]  # (H, W)
    out_size: tuple[int, int]  # (H_out, W_out)
    kernel_size: tuple[int, int]  # (KH, KW)
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]


def as_pair(value, name: str, minimum: int) -> tuple[int, int]:
    """Normalise an int or a pair of ints, as `nn.Conv2d` accepts them, to a pair in
    [minimum, MAX_GEOMETRY_VALUE]."""
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    if max(pair) > MAX_GEOMETRY_VALUE:
        raise ValueError(f"{name} must be at most 2**31 - 1, got {value!r}")
    return pair


def padding_pair(padding, kernel_size: tuple[int, int], stride: tuple[int, int],
                 dilation: tuple[int, int]) -> tuple[int, int]:
    """`padding` as `nn.Conv2d` takes it (an int, a pair, "valid" or "same") -> the zeros added
    on each side, (pad_h, pad_w). "same" keeps the input size: stride 1 only, as in nn.Conv2d,
    and only where dilation * (K - 1) is even (symmetric padding; always so for odd kernels)."""
    if not isinstance(padding, str):
        return as_pair(padding, "padding", 0)
    if padding not in PADDING_STRINGS:
        raise ValueError(f"padding must be an int, a pair of ints, 'valid' or 'same', got {padding!r}")
    if padding == "valid":
        return (0, 0)
    if stride != (1, 1):
        raise ValueError(f"padding='same' is not supported for strided convolutions, got stride={stride}")
    total = tuple(d * (k - 1) for d, k in zip(dilation, kernel_size))
    if any(t % 2 for t in total):
        raise ValueError(f"padding='same' needs dilation * (kernel size - 1) even along each axis (the same zeros "
                         f"on both sides), got kernel {kernel_size} with dilation {dilation}")
    return (total[0] // 2, total[1] // 2)


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution along one axis, exactly as `nn.Conv2d` computes it."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def output_layout(t: torch.Tensor) -> torch.memory_format:
    """The layout an output shaped like t gets: channels_last for a channels_last 4-D t (a
    1-channel one counts as contiguous), contiguous otherwise; the kernels follow the same rule."""
    channels_last = t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def _check_tensor(t, name: str, rank: int, meaning: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        raise ValueError(f"{name} must have rank {rank} {meaning}, got shape {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def validate_atom_conv2d(
    x, atom_coeff, bases, weight, bias, stride, padding, dilation, groups
) -> AtomConvGeometry:
    """Check every argument of `atom_conv2d` and return the call's geometry.

    Shapes (docs/design.md §1): x [N, C_in, H, W], atom_coeff [N, M*L, H_out, W_out],
    bases [L, KH, KW], weight [C_out, C_in // groups, M], bias [C_out] or None. `padding` may
    also be "valid" or "same" (see `padding_pair`); the geometry holds the ints.
    Raises TypeError / ValueError naming the offending argument; never computes anything.
    """
    _check_tensor(x, "x", 4, "[N, C_in, H, W]")
    _check_tensor(atom_coeff, "atom_coeff", 4, "[N, M*L, H_out, W_out]")
    _check_tensor(bases, "bases", 3, "[L, KH, KW]")
    _check_tensor(weight, "weight", 3, "[C_out, C_in // groups, M]")
    named = [("atom_coeff", atom_coeff), ("bases", bases), ("weight", weight)]
    if bias is not None:
        _check_tensor(bias, "bias", 1, "[C_out]")
        named.append(("bias", bias))
    for name, t in named:
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; all tensors must share one dtype")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must share one device")

    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    stride = as_pair(stride, "stride", 1)
    dilation = as_pair(dilation, "dilation", 1)

    n, c_in, h, w = x.shape
    num_bases, kh, kw = bases.shape
    c_out, c_in_per_group, num_atoms = weight.shape
    if num_bases < 1 or kh < 1 or kw < 1:
        raise ValueError(f"bases must be a non-empty [L, KH, KW] tensor, got shape {tuple(bases.shape)}")
    padding = padding_pair(padding, (kh, kw), stride, dilation)
    if c_in < 1:
        raise ValueError(f"x must have at least one channel, got shape {tuple(x.shape)}")
    if h < 1 or w < 1:  # padding would otherwise make an output from nothing; nn.Conv2d refuses too
        raise ValueError(f"x must have a non-zero spatial size (H, W >= 1), got shape {tuple(x.shape)}")
    if c_out < 1:
        raise ValueError(f"weight must have at least one output channel (weight.shape[0] = C_out >= 1), got shape {tuple(weight.shape)}")
    if num_atoms < 1:
        raise ValueError(f"weight must have at least one atom (weight.shape[2] = M >= 1), got shape {tuple(weight.shape)}")
    if c_in % groups:
        raise ValueError(f"groups={groups} must divide the input channels of x ({c_in})")
    if c_out % groups:
        raise ValueError(f"groups={groups} must divide the output channels of weight ({c_out})")
    if c_in_per_group != c_in // groups:
        raise ValueError(
            f"weight must have shape [C_out, C_in // groups, M] = [{c_out}, {c_in // groups}, {num_atoms}] "
            f"for x with {c_in} channels and groups={groups}, got {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape[0] != c_out:
        raise ValueError(f"bias must have shape [C_out] = [{c_out}], got {tuple(bias.shape)}")

    out_size = tuple(
        conv_output_size(size, k, s, p, d)
        for size, k, s, p, d in zip((h, w), (kh, kw), stride, padding, dilation)
    )
    if min(out_size) < 1:
        raise ValueError(
            f"x's spatial size {(h, w)} is too small for kernel {(kh, kw)} with padding {padding} "
            f"and dilation {dilation}: the output would be {out_size}"
        )
    expected_coeff = (n, num_atoms * num_bases, *out_size)
    if tuple(atom_coeff.shape) != expected_coeff:
        raise ValueError(
            f"atom_coeff must have shape [N, M*L, H_out, W_out] = {list(expected_coeff)} "
            f"(M={num_atoms} atoms from weight, L={num_bases} bases, output grid {out_size}), "
            f"got {list(atom_coeff.shape)}"
        )
    return AtomConvGeometry(
        batch=n, in_channels=c_in, out_channels=c_out, groups=groups,
        num_atoms=num_atoms, num_bases=num_bases, in_size=(h, w), out_size=out_size,
        kernel_size=(kh, kw), stride=stride, padding=padding, dilation=dilation,
    )
