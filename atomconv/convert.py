"""`convert_conv2d`: swap a network's `nn.Conv2d` layers for `AtomConv2d` of the same geometry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from .layer import AtomConv2d


@dataclass
class ConversionReport:
    """What `convert_conv2d` did, by qualified module name (as `model.named_modules()` gives it;
    "" is the model itself). A layer registered under several names appears under each."""

    replaced: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it was left alone

    def __str__(self) -> str:
        lines = [f"replaced {len(self.replaced)} nn.Conv2d layer(s) with AtomConv2d: {', '.join(self.replaced) or '-'}"]
        lines += [f"  left {name or '<model>'}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


def _why_not_convertible(conv: nn.Conv2d, min_kernel_size: int) -> str | None:
    """The reason `conv` cannot become an AtomConv2d, or None when it can."""
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is a subclass of nn.Conv2d; only nn.Conv2d itself is converted"
    kh, kw = conv.kernel_size
    if kh != kw or kh % 2 == 0:
        return f"kernel {conv.kernel_size} is not one odd size (Fourier–Bessel bases are square and centred)"
    if kh < min_kernel_size:
        return f"kernel {conv.kernel_size} is smaller than min_kernel_size={min_kernel_size}"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}; AtomConv2d pads with zeros only"
    return None


def _int_padding(conv: nn.Conv2d) -> tuple[int, int]:
    """conv.padding as a pair of ints; "valid" is 0 and "same" (stride 1, odd kernel) is
    dilation * (K - 1) / 2 on each side, which is exactly what nn.Conv2d pads."""
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        return tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))
    return tuple(conv.padding)


def _atom_conv_like(conv: nn.Conv2d, num_atoms: int) -> AtomConv2d:
    """A freshly initialised AtomConv2d with conv's geometry, device, dtype and train/eval mode."""
    layer = AtomConv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size[0], stride=conv.stride, padding=_int_padding(conv),
        dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, num_atoms=num_atoms,
    )
    return layer.to(device=conv.weight.device, dtype=conv.weight.dtype).train(conv.training)


def _conv_children(module: nn.Module, prefix: str):
    """(parent, attribute, qualified name, conv) for each nn.Conv2d below `module`, not looking
    inside AtomConv2d layers (their generators' convs belong to them)."""
    if isinstance(module, AtomConv2d):
        return
    for child_name, child in module.named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        if isinstance(child, nn.Conv2d):
            yield module, child_name, name, child
        else:
            yield from _conv_children(child, name)


def convert_conv2d(
    model: nn.Module,
    *,
    num_atoms: int = 6,
    min_kernel_size: int = 3,
    predicate: Callable[[str, nn.Conv2d], bool] | None = None,
) -> tuple[nn.Module, ConversionReport]:
    """Replace, in place, every eligible `nn.Conv2d` of `model` with an `AtomConv2d` of the same
    geometry: in/out channels, kernel, stride, padding ("same"/"valid" become ints), dilation,
    groups and bias, on the conv's device and dtype, in its train/eval mode.

    Eligible: exactly `nn.Conv2d` (not a subclass), one odd kernel size K >= min_kernel_size,
    padding_mode "zeros", and `predicate(name, conv)` true (asked only of layers that are
    otherwise eligible; None converts them all). The convs inside AtomConv2d layers already in
    the model (their generators) are not touched. Everything else is left as it is and listed in
    the report with the reason. A conv shared by several parents is replaced by one shared
    AtomConv2d. Returns (model, report); when `model` is itself a convertible nn.Conv2d the
    returned model is its replacement, so always use the returned one.

    The new layers are freshly initialised (from torch's global RNG): the conv's trained weights
    are NOT carried over. AtomConv2d parametrises its filters differently (static coefficients
    alpha [C_out, C_in // groups, num_atoms] over per-pixel atoms made by a generator network),
    so there is no weight copy that reproduces the conv; train the converted network, from
    scratch or by fine-tuning the layers around it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(num_atoms, int) or isinstance(num_atoms, bool) or num_atoms < 1:
        raise ValueError(f"num_atoms must be a positive int, got {num_atoms!r}")
    if not isinstance(min_kernel_size, int) or isinstance(min_kernel_size, bool) or min_kernel_size < 3:
        raise ValueError(f"min_kernel_size must be an int >= 3 (AtomConv2d's smallest kernel is 3×3), got {min_kernel_size!r}")
    if predicate is not None and not callable(predicate):
        raise TypeError(f"predicate must be a callable (name, conv) -> bool or None, got {type(predicate).__name__}")

    report = ConversionReport()
    new_layers: dict[int, AtomConv2d] = {}  # id(conv) -> its replacement, so shared convs stay shared

    def replacement(name: str, conv: nn.Conv2d) -> AtomConv2d | None:
        if id(conv) not in new_layers:
            reason = _why_not_convertible(conv, min_kernel_size)
            if reason is None and predicate is not None and not predicate(name, conv):
                reason = "predicate returned False"
            if reason is not None:
                report.skipped[name] = reason
                return None
            new_layers[id(conv)] = _atom_conv_like(conv, num_atoms)
        report.replaced.append(name)
        return new_layers[id(conv)]

    if isinstance(model, nn.Conv2d):
        new = replacement("", model)
        return (model if new is None else new), report
    # Collect first, replace after: the module tree must not change while it is being walked.
    for parent, child_name, name, conv in list(_conv_children(model, "")):
        new = replacement(name, conv)
        if new is not None:
            setattr(parent, child_name, new)
    return model, report
