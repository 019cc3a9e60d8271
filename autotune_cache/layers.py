"""Layer shapes to tune: parsed from the command line or collected from a model's AtomConv2d layers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from atomconv import AtomConv2d
from atomconv.bases import MAX_BASES_PER_SCALE
from atomconv.validation import conv_output_size



@dataclass(frozen=True)
class LayerShape:
    """One ACDA layer call: x [batch, in_channels, *in_size] convolved with square
    kernel_size x kernel_size filters made of num_atoms atoms over num_bases bases."""

    batch: int
    in_channels: int
    out_channels: int
    in_size: tuple[int, int]
    kernel_size: int
    num_atoms: int
    num_bases: int
    groups: int = 1
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    def out_size(self) -> tuple[int, int]:
        return tuple(conv_output_size(s, self.kernel_size, st, p, d)
                     for s, st, p, d in zip(self.in_size, self.stride, self.padding, self.dilation))

    def describe(self) -> str:
        (h, w), (sh, sw) = self.in_size, self.stride
        return (f"N={self.batch} C_in={self.in_channels} C_out={self.out_channels} {h}x{w} K={self.kernel_size} "
                f"M={self.num_atoms} L={self.num_bases} groups={self.groups} stride={sh},{sw}")


def parse_shape(text: str) -> LayerShape:
    """'N,C_in,C_out,H,W,K,M[,groups]' -> a stride-1, 'same'-padded layer with AtomConv2d's
    default bases (min(M, 6) per scale, K // 2 scales)."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (7, 8) or min(values) < 1:
        raise ValueError(f"--shape must be N,C_in,C_out,H,W,K,M[,groups] of positive ints, got {text!r}")
    n, c_in, c_out, h, w, k, m, *groups = values
    groups = groups[0] if groups else 1
    if c_in % groups or c_out % groups:
        raise ValueError(f"--shape {text!r}: groups={groups} must divide C_in={c_in} and C_out={c_out}")
    return LayerShape(n, c_in, c_out, (h, w), k, m, min(m, MAX_BASES_PER_SCALE) * max(1, k // 2), groups,
                      padding=(k // 2, k // 2))


def parse_input_size(text: str) -> tuple[int, ...]:
    """'N,C,H,W' -> (N, C, H, W)."""
    try:
        size = tuple(int(v) for v in text.split(","))
    except ValueError:
        size = ()
    if len(size) != 4 or min(size) < 1:
        raise ValueError(f"--input-size must be N,C,H,W of positive ints, got {text!r}")
    return size


def model_layer_shapes(model: nn.Module, input_size: tuple[int, ...]) -> list[tuple[str, LayerShape]]:
    """(name, shape) of every AtomConv2d call when `model` runs on an input of `input_size`.

    The model runs on the meta device (no memory, no arithmetic), each AtomConv2d replaced by a
    stub that records its input and returns an output of the right shape. The model is moved to
    the meta device: pass a model that is not needed afterwards.
    """
    found: list[tuple[str, LayerShape]] = []

    def stub(name: str, layer: AtomConv2d):
        def forward(x: torch.Tensor) -> torch.Tensor:
            kh, _ = layer.kernel_size
            shape = LayerShape(x.shape[0], layer.in_channels, layer.out_channels, tuple(x.shape[2:]), kh,
                               layer.num_atoms, layer.bases.shape[0], layer.groups, layer.stride, layer.padding,
                               layer.dilation)
            found.append((name, shape))
            return x.new_empty(x.shape[0], layer.out_channels, *shape.out_size())
        return forward

    model = model.to("meta")
    for name, module in model.named_modules():
        if isinstance(module, AtomConv2d):
            module.forward = stub(name, module)
    with torch.no_grad():
        model(torch.empty(input_size, device="meta"))
    return found


def layer_inputs(layer: LayerShape, dtype: torch.dtype, device: torch.device) -> dict[str, object]:
    """Random arguments of `atom_conv2d` for one layer call (by name)."""
    k = layer.kernel_size
    return dict(
        x=torch.randn(layer.batch, layer.in_channels, *layer.in_size, dtype=dtype, device=device),
        atom_coeff=torch.randn(layer.batch, layer.num_atoms * layer.num_bases, *layer.out_size(), dtype=dtype,
                               device=device),
        bases=torch.randn(layer.num_bases, k, k, dtype=dtype, device=device),
        weight=torch.randn(layer.out_channels, layer.in_channels // layer.groups, layer.num_atoms, dtype=dtype,
                           device=device),
        bias=torch.randn(layer.out_channels, dtype=dtype, device=device),
        stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
    )
