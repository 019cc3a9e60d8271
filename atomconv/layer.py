"""`AtomConv2d`: a drop-in for `nn.Conv2d` whose per-pixel filters come from dynamic atoms
(docs/design.md §3)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .bases import MAX_BASES_PER_SCALE, fourier_bessel_bases
from .functional import atom_conv2d
from .op import BACKENDS
from .validation import as_pair, conv_output_size, padding_pair

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
GENERATOR_NORMS = ("batch", "group", "none")
GROUP_NORM_MAX_GROUPS = 32


def _positive_int(value, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_atom_options(num_atoms, bases_per_scale, generator_norm, generator_width, backend) -> int:
    """Check AtomConv2d's own options (those nn.Conv2d does not have); returns bases_per_scale
    resolved (None means num_atoms, the paper's choice)."""
    _positive_int(num_atoms, "num_atoms")
    if bases_per_scale is None:
        if num_atoms > MAX_BASES_PER_SCALE:
            raise ValueError(f"num_atoms={num_atoms} > {MAX_BASES_PER_SCALE} needs an explicit bases_per_scale "
                             f"(at most {MAX_BASES_PER_SCALE}); it defaults to num_atoms")
        bases_per_scale = num_atoms
    if _positive_int(bases_per_scale, "bases_per_scale") > MAX_BASES_PER_SCALE:
        raise ValueError(f"bases_per_scale must be an int in [1, {MAX_BASES_PER_SCALE}], got {bases_per_scale!r}")
    if generator_norm not in GENERATOR_NORMS:
        raise ValueError(f"generator_norm must be one of {GENERATOR_NORMS}, got {generator_norm!r}")
    if generator_width is not None:
        _positive_int(generator_width, "generator_width")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return bases_per_scale


def _norm(kind: str, channels: int, factory_kwargs: dict) -> nn.Module:
    """The generator's normalisation of `channels` feature maps."""
    if kind == "batch":
        return nn.BatchNorm2d(channels, **factory_kwargs)
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, GROUP_NORM_MAX_GROUPS), channels, **factory_kwargs)
    return nn.Identity()


class AtomConv2d(nn.Module):
    """Adaptive convolution: y = atom_conv2d(x, generator(x), bases, weight, bias, ...).

    x [N, C_in, H, W] or unbatched [C_in, H, W] -> y [N, C_out, H_out, W_out] (or
    [C_out, H_out, W_out]), with H_out, W_out exactly as `nn.Conv2d` with the same arguments.
    The arguments up to `dtype` are nn.Conv2d's, with its meaning: `padding` an int, a pair,
    "valid" or "same" (stride 1 only); `padding_mode` "zeros", "reflect", "replicate" or
    "circular" (the input is padded first, as nn.Conv2d does); the attributes `in_channels`,
    `out_channels`, `kernel_size`, `stride`, `padding`, `dilation`, `groups`, `padding_mode`
    hold them as nn.Conv2d holds them. The kernel is one odd size K >= 3.

    Owns `weight` alpha [C_out, C_in // groups, M], `bias` [C_out] or None, the buffer
    `bases` Psi [L, K, K] (Fourier–Bessel, L = bases_per_scale * (K // 2)), and `generator`,
    the light-weight network that predicts the atoms' coefficients beta [N, M*L, H_out, W_out]
    from x: Conv3x3(C_in -> width, stride) -> norm -> Tanh -> Conv3x3(width -> M*L) -> norm -> Tanh.

    Own options (keyword-only):
      num_atoms: M, the atoms per pixel.
      bases_per_scale: Fourier–Bessel bases taken from each scale (at most 6); None: num_atoms.
      generator_norm: "batch" (BatchNorm2d, the paper's layer: outputs depend on the batch in
        training mode), "group" (GroupNorm with gcd(channels, 32) groups: per sample), or
        "none" (no normalisation; the convs keep their biases).
      generator_width: the generator's hidden channels; None: max(64, M*L // 2), the paper's.
      backend: "auto", "triton" or "reference", as for `atom_conv2d`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        num_atoms: int = 6,
        bases_per_scale: int | None = None,
        generator_norm: str = "batch",
        generator_width: int | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        kh, kw = as_pair(kernel_size, "kernel_size", 1)
        if kh != kw or kh % 2 == 0 or kh < 3:
            raise ValueError(f"kernel_size must be one odd size >= 3 (Fourier–Bessel bases are square), got {kernel_size!r}")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            _positive_int(value, name)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
        self.bases_per_scale = check_atom_options(num_atoms, bases_per_scale, generator_norm, generator_width, backend)
        factory_kwargs = {"device": device, "dtype": dtype}

        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = (kh, kw)
        self.stride = as_pair(stride, "stride", 1)
        self.dilation = as_pair(dilation, "dilation", 1)
        pad_h, pad_w = self._padding_pair = padding_pair(padding, self.kernel_size, self.stride, self.dilation)
        self.padding = padding if isinstance(padding, str) else (pad_h, pad_w)
        self.padding_mode = padding_mode
        self.num_atoms, self.generator_norm, self.backend = num_atoms, generator_norm, backend
        # Other padding modes pad the input first (F.pad order: left, right, top, bottom) and
        # then convolve without padding, as nn.Conv2d does.
        self._input_padding = (pad_w, pad_w, pad_h, pad_h) if padding_mode != "zeros" else None
        self._op_padding = (pad_h, pad_w) if padding_mode == "zeros" else (0, 0)

        num_coeff = num_atoms * self.bases_per_scale * (kh // 2)
        self.generator_width = max(64, num_coeff // 2) if generator_width is None else generator_width
        # The generator's first conv is centred on the same input pixel as the main conv's
        # window, so its output lands on the main conv's output grid for any geometry:
        # pad = padding - dilation * (K - 1) / 2 + 1 (= 1, as in the paper, for padding K//2,
        # dilation 1). A negative pad is a crop of the input, done in forward().
        self._generator_pad = tuple(p - d * (kh - 1) // 2 + 1 for p, d in zip(self._op_padding, self.dilation))
        width = self.generator_width
        self.generator = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, stride=self.stride, padding=tuple(max(p, 0) for p in self._generator_pad),
                      **factory_kwargs),
            _norm(generator_norm, width, factory_kwargs),
            nn.Tanh(),
            nn.Conv2d(width, num_coeff, 3, padding=1, **factory_kwargs),
            _norm(generator_norm, num_coeff, factory_kwargs),
            nn.Tanh(),
        )
        self.register_buffer("bases", torch.empty(num_coeff // num_atoms, kh, kw, **factory_kwargs))
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, num_atoms, **factory_kwargs))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory_kwargs)) if bias else None
        self._reset_bases_and_coefficients()  # the generator's layers initialised themselves when built

    def reset_parameters(self) -> None:
        """Re-initialise everything: the generator's convs and norms (as torch initialises
        them), the `bases` buffer (rebuilt, so this also fills a layer made on the meta device
        and then materialised with `to_empty()`), `weight` and `bias`."""
        for module in self.generator:
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        self._reset_bases_and_coefficients()

    def _reset_bases_and_coefficients(self) -> None:
        """Bases rebuilt; weight Kaiming-normal (fan_out, ReLU gain) over the paper's coef shape
        [C_out, C_in*M, 1, 1], i.e. std sqrt(2 / C_out); bias zero."""
        with torch.no_grad():
            self.bases.copy_(fourier_bessel_bases(self.kernel_size[0], self.bases_per_scale))
        nn.init.kaiming_normal_(self.weight.view(self.out_channels, -1, 1, 1), mode="fan_out", nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _check_input(self, x, allowed_ranks: tuple[int, ...]) -> None:
        """x must have rank in allowed_ranks, C_in channels, and an output grid of at least 1×1."""
        shapes = " or ".join({4: f"[N, {self.in_channels}, H, W]", 3: f"[{self.in_channels}, H, W]"}[r] for r in allowed_ranks)
        if not isinstance(x, torch.Tensor) or x.dim() not in allowed_ranks or x.shape[-3] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be {shapes}, got {shape}")
        in_size = x.shape[-2:]
        if min(in_size) < 1:
            raise ValueError(f"x must have a non-zero spatial size (H, W >= 1), got shape {tuple(x.shape)}")
        out_size = [conv_output_size(*a) for a in zip(in_size, self.kernel_size, self.stride, self._padding_pair,
                                                      self.dilation)]
        if min(out_size) < 1:
            raise ValueError(f"x's spatial size {tuple(in_size)} is too small for {self}: the output would be {out_size}")

    def _pad_input(self, x: torch.Tensor) -> torch.Tensor:
        """x padded by padding_mode when it is not "zeros" (the op then pads nothing)."""
        return x if self._input_padding is None else F.pad(x, self._input_padding, mode=self.padding_mode)

    def _generate(self, x_padded: torch.Tensor) -> torch.Tensor:
        """The generator on x as the op sees it (already padded for non-zero padding modes)."""
        crop_h, crop_w = (max(-p, 0) for p in self._generator_pad)
        if crop_h or crop_w:
            x_padded = F.pad(x_padded, (-crop_w, -crop_w, -crop_h, -crop_h))
        return self.generator(x_padded)

    def atom_coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C_in, H, W] -> beta [N, M*L, H_out, W_out], channel m*L + l."""
        self._check_input(x, (4,))
        return self._generate(self._pad_input(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, (4, 3))
        if x.dim() == 3:  # unbatched, as nn.Conv2d takes it
            return self.forward(x.unsqueeze(0)).squeeze(0)
        x = self._pad_input(x)
        return atom_conv2d(
            x, self._generate(x), self.bases, self.weight, self.bias,
            self.stride, self._op_padding, self.dilation, self.groups, backend=self.backend,
        )

    def extra_repr(self) -> str:
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}")
        if self.padding_mode != "zeros":
            text += f", padding_mode={self.padding_mode!r}"
        return text + (f", num_atoms={self.num_atoms}, num_bases={self.bases.shape[0]}, "
                       f"generator_norm={self.generator_norm!r}, backend={self.backend!r}")

    def load_official_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of the authors' `Conv_DCFD` layer: `coef` [C_out, C_in*M, 1, 1]
        (channel c*M + m), `bias`, `bases` [L, K*K], `bases_net.{0,1,3,4}.*` (the generator).
        Needs generator_norm="batch" (theirs). Raises ValueError naming the tensor and both
        shapes on any mismatch, and the key of any value that is not a tensor."""
        if self.generator_norm != "batch":
            raise ValueError(f"the authors' layer normalises its generator with batch norm; this layer has "
                             f"generator_norm={self.generator_norm!r}: build it with generator_norm='batch' to load it")
        c_out, c_in_g, m = self.weight.shape
        official_shapes = {"coef": (c_out, c_in_g * m, 1, 1), "bases": (self.bases.shape[0], math.prod(self.kernel_size))}
        ours = {"coef": "weight", "bases": "bases"}
        for name, tensor in self.generator.state_dict().items():
            ours[f"bases_net.{name}"] = f"generator.{name}"
            official_shapes[f"bases_net.{name}"] = tuple(tensor.shape)
        if self.bias is not None:
            ours["bias"] = "bias"
            official_shapes["bias"] = (c_out,)
        missing = sorted(set(official_shapes) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(official_shapes))
        if missing or unexpected:
            raise ValueError(f"official state dict does not fit this layer: missing {missing}, unexpected {unexpected}")
        translated = {}
        own_state = self.state_dict()
        for name, shape in official_shapes.items():
            tensor = state_dict[name]
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"official state dict value {name!r} must be a tensor, got {type(tensor).__name__}")
            if tuple(tensor.shape) != shape:
                raise ValueError(f"official tensor {name!r} must have shape {list(shape)} for this layer, got {list(tensor.shape)}")
            translated[ours[name]] = tensor.reshape(own_state[ours[name]].shape)
        self.load_state_dict(translated, strict=True)
