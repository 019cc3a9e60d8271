"""Small builders shared by the tests."""

from __future__ import annotations

import torch

from atomconv.validation import as_pair, conv_output_size


def output_size(hw, kernel, stride, padding, dilation):
    """(H_out, W_out) as nn.Conv2d computes them, for ints or pairs."""
    args = [as_pair(v, "", 0) for v in (kernel, stride, padding, dilation)]
    return tuple(conv_output_size(s, *a) for s, *a in zip(hw, *args))


def static_atom_problem(n, c_in, c_out, hw, kernel, stride, padding, dilation, groups, num_atoms=3, num_bases=4,
                        dtype=torch.float64, seed=0):
    """Inputs whose atoms do not depend on the pixel, and the static kernel they amount to:
    returns (x, atom_coeff, bases, weight, bias, static_weight [C_out, C_in/G, KH, KW])."""
    g = torch.Generator().manual_seed(seed)
    kh, kw = as_pair(kernel, "", 1)
    x = torch.randn(n, c_in, *hw, generator=g, dtype=dtype)
    bases = torch.randn(num_bases, kh, kw, generator=g, dtype=dtype)
    beta = torch.randn(num_atoms, num_bases, generator=g, dtype=dtype)
    weight = torch.randn(c_out, c_in // groups, num_atoms, generator=g, dtype=dtype)
    bias = torch.randn(c_out, generator=g, dtype=dtype)
    h_out, w_out = output_size(hw, kernel, stride, padding, dilation)
    atom_coeff = beta.reshape(1, -1, 1, 1).expand(n, -1, h_out, w_out).contiguous()
    static_weight = torch.einsum("ocm,ml,lij->ocij", weight, beta, bases)
    return x, atom_coeff, bases, weight, bias, static_weight


# Problems for the Triton kernels' tests (forward and backward).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Largest |y - reference| allowed, relative to max |reference| (float64). In the interpreter only
# the output is rounded to the dtype (worst seen: 4.4e-4 float16, 6.2e-3 bfloat16); on a GPU Z is
# also rounded to the input dtype before the tensor-core dot.
REL_TOL = (
    {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}
    if torch.cuda.is_available()
    else {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}
)


def make_problem(n, c_in, c_out, hw, kernel, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 num_atoms=3, num_bases=4, seed=0):
    """Random float64 CPU inputs (x, atom_coeff, bases, weight, bias or None) and the call's kwargs."""
    g = torch.Generator().manual_seed(seed)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    h_out, w_out = output_size(hw, kernel, stride, padding, dilation)
    tensors = (
        torch.randn(n, c_in, *hw, generator=g, dtype=torch.float64),
        torch.randn(n, num_atoms * num_bases, h_out, w_out, generator=g, dtype=torch.float64),
        torch.randn(num_bases, kh, kw, generator=g, dtype=torch.float64),
        torch.randn(c_out, c_in // groups, num_atoms, generator=g, dtype=torch.float64),
        torch.randn(c_out, generator=g, dtype=torch.float64) if bias else None,
    )
    return tensors, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)


def to(tensors, dtype):
    """The tensors (None stays None) on the test device, in dtype."""
    return tuple(None if t is None else t.to(device=DEVICE, dtype=dtype) for t in tensors)


# (n, c_in, c_out, (H, W), kernel, stride, padding, dilation, groups, bias, M, L): odd sizes
# throughout, so no dimension is a multiple of a block size.
GEOMETRIES = [
    (2, 3, 5, (7, 9), 1, 1, 0, 1, 1, True, 3, 1),
    (2, 4, 6, (7, 9), 3, 1, 1, 1, 1, True, 3, 4),
    (1, 5, 3, (9, 8), 5, 1, 2, 1, 1, False, 2, 6),
    (2, 3, 4, (8, 7), (2, 3), 1, (0, 1), 1, 1, True, 3, 4),
    (1, 4, 4, (9, 10), (3, 1), (2, 1), (1, 0), 1, 1, True, 5, 3),
    (2, 3, 5, (11, 10), 3, 2, 0, 1, 1, True, 3, 4),
    (1, 3, 2, (12, 13), 3, 3, 2, 1, 1, True, 4, 2),
    (1, 2, 3, (9, 11), 3, 1, 2, 2, 1, False, 3, 4),
    (1, 3, 3, (10, 9), 3, (1, 2), 1, (2, 1), 1, True, 3, 3),
    (2, 4, 6, (7, 8), 3, 1, 1, 1, 2, True, 3, 4),
    (1, 6, 4, (8, 7), 3, 2, 1, 1, 2, False, 6, 2),
    (2, 5, 5, (7, 9), 3, 1, 1, 1, 5, True, 3, 4),  # depthwise
    (1, 4, 8, (6, 7), 5, 1, 2, 2, 4, True, 2, 3),  # depthwise, channel multiplier 2
    (1, 3, 4, (9, 8), 7, 1, 3, 1, 1, True, 2, 6),  # 7x7, padding 3
    (1, 2, 3, (5, 6), 3, 2, 3, 1, 1, False, 3, 2),  # padding wider than the kernel's reach
]


def train_step(model, optimizer, x):
    """One SGD-style step on the loss mean(model(x)**2); returns the loss (detached)."""
    optimizer.zero_grad()
    loss = model(x).square().mean()
    loss.backward()
    optimizer.step()
    return loss.detach()
