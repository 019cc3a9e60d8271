"""`convert_conv2d`: swap a network's `nn.Conv2d` layers for `AtomConv2d` of the same geometry."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

from torch import nn

from .layer import AtomConv2d, check_atom_options

# The hooks a module runs around its forward (and backward), by attribute: the replacement
# takes over these very dicts, so handles the user holds still remove the hooks.
_CALL_HOOK_ATTRIBUTES = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks", "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called", "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook",
)


@dataclass
class ConversionReport:
    """What `convert_conv2d` did, by qualified module name (as `model.named_modules(remove_duplicate=False)`
    gives it; "" is the model itself). A layer registered under several names appears under each."""

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
    if conv.weight.is_complex():
        return f"dtype {conv.weight.dtype} is complex; AtomConv2d is real-valued"
    return None


def _atom_conv_like(conv: nn.Conv2d, layer_options: dict) -> AtomConv2d:
    """A freshly initialised AtomConv2d with conv's geometry, padding mode, device, dtype,
    train/eval mode and hooks."""
    layer = AtomConv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride, conv.padding, conv.dilation,
        conv.groups, conv.bias is not None, conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype,
        **layer_options,
    ).train(conv.training)
    for attribute in _CALL_HOOK_ATTRIBUTES:
        setattr(layer, attribute, getattr(conv, attribute))
    return layer


def _conv_children(module: nn.Module, prefix: str) -> Iterator[tuple[nn.Module, str, str, nn.Conv2d]]:
    """(parent, attribute, qualified name, conv) for each nn.Conv2d below `module`, under every
    name it has (a module registered twice is met twice; `named_children()` would hide the
    second name), not looking inside AtomConv2d layers (their generators' convs belong to them)."""
    if isinstance(module, AtomConv2d):
        return
    for child_name, child in module._modules.items():
        if child is None:
            continue
        name = f"{prefix}.{child_name}" if prefix else child_name
        if isinstance(child, nn.Conv2d):
            yield module, child_name, name, child
        else:
            yield from _conv_children(child, name)


def convert_conv2d(
    model: nn.Module,
    *,
    num_atoms: int = 6,
    bases_per_scale: int | None = None,
    generator_norm: str = "batch",
    generator_width: int | None = None,
    backend: str = "auto",
    min_kernel_size: int = 3,
    predicate: Callable[[str, nn.Conv2d], bool] | None = None,
    report: ConversionReport | None = None,
) -> nn.Module:
    """Replace, in place, every eligible `nn.Conv2d` of `model` with an `AtomConv2d` of the same
    geometry: in/out channels, kernel, stride, padding (ints, "same" or "valid"), dilation,
    groups, bias and padding_mode, on the conv's device and dtype, in its train/eval mode, with
    its forward/backward hooks and pre-hooks. Returns the model, like
    `nn.SyncBatchNorm.convert_sync_batchnorm`: when `model` is itself a convertible nn.Conv2d,
    the returned module is its replacement, so always use the returned one.

    num_atoms, bases_per_scale, generator_norm, generator_width, backend: the new layers'
    own options (see `AtomConv2d`).
    Eligible: exactly `nn.Conv2d` (not a subclass), one odd kernel size K >= min_kernel_size,
    a real dtype, and `predicate(name, conv)` true (asked only of layers that are otherwise
    eligible, once for each name they have; None converts them all). A conv registered under
    several names or shared by several parents is converted once, to one shared AtomConv2d,
    and only if the predicate agrees for every name. The convs inside AtomConv2d layers
    already in the model (their generators) are not touched. Everything else is left as it is.
    `report`: a ConversionReport to fill with the names replaced and, for those left, why.

    The new layers are freshly initialised (from torch's global RNG): the conv's trained weights
    are NOT carried over. AtomConv2d parametrises its filters differently (static coefficients
    alpha [C_out, C_in // groups, num_atoms] over per-pixel atoms made by a generator network),
    so there is no weight copy that reproduces the conv; train the converted network, from
    scratch or by fine-tuning the layers around it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    layer_options = dict(num_atoms=num_atoms, bases_per_scale=bases_per_scale, generator_norm=generator_norm,
                         generator_width=generator_width, backend=backend)
    check_atom_options(**layer_options)
    if not isinstance(min_kernel_size, int) or isinstance(min_kernel_size, bool) or min_kernel_size < 3:
        raise ValueError(f"min_kernel_size must be an int >= 3 (AtomConv2d's smallest kernel is 3×3), got {min_kernel_size!r}")
    if predicate is not None and not callable(predicate):
        raise TypeError(f"predicate must be a callable (name, conv) -> bool or None, got {type(predicate).__name__}")
    if report is not None and not isinstance(report, ConversionReport):
        raise TypeError(f"report must be a ConversionReport or None, got {type(report).__name__}")
    report = ConversionReport() if report is None else report

    # Every place a conv sits, found before anything changes (the tree must not change while
    # it is walked); the model itself when it is a conv.
    places = [(None, None, "", model)] if isinstance(model, nn.Conv2d) else list(_conv_children(model, ""))
    names_of: dict[int, list[str]] = {}
    for _, _, name, conv in places:
        names_of.setdefault(id(conv), []).append(name)

    reasons: dict[str, str] = {}  # name -> why that place keeps its conv
    new_layers: dict[int, AtomConv2d] = {}  # id(conv) -> its one replacement
    for _, _, _, conv in places:
        if id(conv) in new_layers or any(n in reasons for n in names_of[id(conv)]):
            continue
        names = names_of[id(conv)]
        reason = _why_not_convertible(conv, min_kernel_size)
        refused = [] if reason is not None or predicate is None else [n for n in names if not predicate(n, conv)]
        if reason is None and not refused:
            new_layers[id(conv)] = _atom_conv_like(conv, layer_options)
            continue
        for name in names:
            if reason is not None:
                reasons[name] = reason
            elif name in refused:
                reasons[name] = "predicate returned False"
            else:
                reasons[name] = f"shared with {', '.join(refused)}, for which the predicate returned False"

    for parent, attribute, name, conv in places:
        if name in reasons:
            report.skipped[name] = reasons[name]
            continue
        report.replaced.append(name)
        if parent is None:
            return new_layers[id(conv)]
        setattr(parent, attribute, new_layers[id(conv)])
    return model
