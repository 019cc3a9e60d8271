"""`AtomConv2d`: a drop-in for `nn.Conv2d` whose per-pixel filters come from dynamic atoms (SPEC §3)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .bases import MAX_BASES_PER_SCALE, fourier_bessel_bases
from .functional import BACKENDS, atom_conv2d
from .validation import as_pair, conv_output_size


class AtomConv2d(nn.Module):
    """Adaptive convolution: y = atom_conv2d(x, generator(x), bases, weight, bias, ...).

    x [N, C_in, H, W] -> y [N, C_out, H_out, W_out], with H_out, W_out exactly as
    `nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups)`.

    Owns `weight` alpha [C_out, C_in // groups, M], `bias` [C_out] or None, the buffer
    `bases` Psi [L, K, K] (Fourier–Bessel, L = bases_per_scale * (K // 2)), and `generator`,
    the light-weight network that predicts the atoms' coefficients beta [N, M*L, H_out, W_out]
    from x: Conv3x3(C_in -> inter, stride) -> BN -> Tanh -> Conv3x3(inter -> M*L) -> BN -> Tanh,
    inter = max(64, M*L // 2).
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
        num_atoms: int = 6,
        bases_per_scale: int | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        kh, kw = as_pair(kernel_size, "kernel_size", 1)
        if kh != kw or kh % 2 == 0 or kh < 3:
            raise ValueError(f"kernel_size must be one odd size >= 3 (Fourier–Bessel bases are square), got {kernel_size!r}")
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("groups", groups)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        if not isinstance(num_atoms, int) or num_atoms < 1:
            raise ValueError(f"num_atoms must be a positive int, got {num_atoms!r}")
        if bases_per_scale is None and num_atoms > MAX_BASES_PER_SCALE:
            raise ValueError(f"num_atoms={num_atoms} > {MAX_BASES_PER_SCALE} needs an explicit bases_per_scale "
                             f"(at most {MAX_BASES_PER_SCALE}); it defaults to num_atoms")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = (kh, kw)
        self.stride = as_pair(stride, "stride", 1)
        self.padding = as_pair(padding, "padding", 0)
        self.dilation = as_pair(dilation, "dilation", 1)
        self.num_atoms = num_atoms
        self.backend = backend

        self.register_buffer("bases", fourier_bessel_bases(kh, num_atoms if bases_per_scale is None else bases_per_scale))
        num_coeff = num_atoms * self.bases.shape[0]
        inter = max(64, num_coeff // 2)
        # The generator's first conv is centred on the same input pixel as the main conv's
        # window, so its output lands on the main conv's output grid for any geometry:
        # pad = padding - dilation * (K - 1) / 2 + 1 (= 1, as in the paper, for padding K//2,
        # dilation 1). A negative pad is a crop of the input, done in forward().
        self._generator_pad = tuple(p - d * (kh - 1) // 2 + 1 for p, d in zip(self.padding, self.dilation))
        self.generator = nn.Sequential(
            nn.Conv2d(in_channels, inter, 3, stride=self.stride, padding=tuple(max(p, 0) for p in self._generator_pad)),
            nn.BatchNorm2d(inter),
            nn.Tanh(),
            nn.Conv2d(inter, num_coeff, 3, padding=1),
            nn.BatchNorm2d(num_coeff),
            nn.Tanh(),
        )
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, num_atoms))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal (fan_out, ReLU gain) over the paper's coef shape [C_out, C_in*M, 1, 1],
        i.e. std sqrt(2 / C_out); bias zero."""
        nn.init.kaiming_normal_(self.weight.view(self.out_channels, -1, 1, 1), mode="fan_out", nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def atom_coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, C_in, H, W] -> beta [N, M*L, H_out, W_out], channel m*L + l."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be [N, {self.in_channels}, H, W], got {shape}")
        out_size = [conv_output_size(*a) for a in zip(x.shape[2:], self.kernel_size, self.stride, self.padding, self.dilation)]
        if min(out_size) < 1:
            raise ValueError(f"x's spatial size {tuple(x.shape[2:])} is too small for {self}: the output would be {out_size}")
        crop_h, crop_w = (max(-p, 0) for p in self._generator_pad)
        if crop_h or crop_w:
            x = F.pad(x, (-crop_w, -crop_w, -crop_h, -crop_h))
        return self.generator(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return atom_conv2d(
            x, self.atom_coefficients(x), self.bases, self.weight, self.bias,
            self.stride, self.padding, self.dilation, self.groups, backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}, "
            f"num_atoms={self.num_atoms}, num_bases={self.bases.shape[0]}, backend={self.backend!r}"
        )

    def load_official_state_dict(self, state_dict: dict) -> None:
        """Load a state dict of the authors' `Conv_DCFD` layer: `coef` [C_out, C_in*M, 1, 1]
        (channel c*M + m), `bias`, `bases` [L, K*K], `bases_net.{0,1,3,4}.*` (the generator).
        Raises ValueError naming the tensor and both shapes on any mismatch."""
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
        for name, shape in official_shapes.items():
            tensor = state_dict[name]
            if tuple(tensor.shape) != shape:
                raise ValueError(f"official tensor {name!r} must have shape {list(shape)} for this layer, got {list(tensor.shape)}")
            own = self.state_dict()[ours[name]]
            translated[ours[name]] = tensor.reshape(own.shape)
        self.load_state_dict(translated, strict=True)
