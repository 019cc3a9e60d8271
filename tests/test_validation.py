"""Every bad input gets a ValueError / TypeError naming the argument, before any computation."""

from __future__ import annotations

import pytest
import torch

from atomconv import atom_conv2d


def _good():
    """x [2, 4, 8, 8], atom_coeff [2, 3*5, 8, 8] (padding 1), bases [5, 3, 3], weight [6, 2, 3] (groups 2)."""
    return dict(x=torch.randn(2, 4, 8, 8), atom_coeff=torch.randn(2, 15, 8, 8), bases=torch.randn(5, 3, 3),
                weight=torch.randn(6, 2, 3), bias=torch.randn(6), stride=1, padding=1, dilation=1, groups=2)


def test_good_call_runs():
    assert atom_conv2d(**_good(), backend="reference").shape == (2, 6, 8, 8)


BAD = [
    (dict(x=torch.randn(4, 8, 8)), ValueError, r"x must have rank 4"),
    (dict(x=[[1.0]]), TypeError, r"x must be a torch.Tensor"),
    (dict(x=torch.randn(2, 4, 8, 8).long()), TypeError, r"x must be float16, bfloat16, float32 or float64"),
    (dict(atom_coeff=torch.randn(2, 15, 8)), ValueError, r"atom_coeff must have rank 4"),
    (dict(atom_coeff=torch.randn(2, 14, 8, 8)), ValueError, r"atom_coeff must have shape \[N, M\*L, H_out, W_out\] = \[2, 15, 8, 8\]"),
    (dict(atom_coeff=torch.randn(2, 15, 7, 8)), ValueError, r"atom_coeff must have shape .*output grid \(8, 8\)"),
    (dict(atom_coeff=torch.randn(3, 15, 8, 8)), ValueError, r"atom_coeff must have shape"),
    (dict(bases=torch.randn(5, 9)), ValueError, r"bases must have rank 3"),
    (dict(weight=torch.randn(6, 4, 3)), ValueError, r"weight must have shape \[C_out, C_in // groups, M\] = \[6, 2, 3\]"),
    (dict(weight=torch.randn(6, 2, 0)), ValueError, r"weight must have at least one atom"),
    (dict(weight=torch.randn(6, 8)), ValueError, r"weight must have rank 3"),
    (dict(bias=torch.randn(5)), ValueError, r"bias must have shape \[C_out\] = \[6\]"),
    (dict(bias=torch.randn(6, 1)), ValueError, r"bias must have rank 1"),
    (dict(groups=3), ValueError, r"groups=3 must divide the input channels"),
    (dict(groups=4, weight=torch.randn(6, 1, 3)), ValueError, r"groups=4 must divide the output channels"),
    (dict(groups=0), ValueError, r"groups must be a positive int"),
    (dict(stride=0), ValueError, r"stride must be >= 1"),
    (dict(stride=(1, 2, 3)), TypeError, r"stride must be an int or a pair"),
    (dict(padding=-1), ValueError, r"padding must be >= 0"),
    (dict(dilation=1.5), TypeError, r"dilation must be an int or a pair"),
    (dict(x=torch.randn(2, 4, 8, 8, dtype=torch.float64)), TypeError, r"atom_coeff has dtype torch.float32 but x has torch.float64"),
    (dict(bias=torch.randn(6, dtype=torch.float16)), TypeError, r"bias has dtype torch.float16"),
    (dict(x=torch.randn(2, 4, 1, 1), padding=0), ValueError, r"x's spatial size \(1, 1\) is too small"),
    (dict(stride=2**63), ValueError, r"stride must be at most 2\*\*31 - 1"),
    (dict(padding=2**40), ValueError, r"padding must be at most 2\*\*31 - 1"),
    (dict(dilation=(1, 2**31)), ValueError, r"dilation must be at most 2\*\*31 - 1"),
    (dict(x=torch.randn(2, 4, 0, 5), atom_coeff=torch.randn(2, 15, 2, 5), padding=2), ValueError,
     r"x must have a non-zero spatial size"),
    (dict(padding="full"), ValueError, r"padding must be an int, a pair of ints, 'valid' or 'same'"),
    (dict(padding="same", stride=2, atom_coeff=torch.randn(2, 15, 4, 4)), ValueError,
     r"padding='same' is not supported for strided convolutions"),
    (dict(padding="same", bases=torch.randn(5, 2, 3)), ValueError, r"padding='same' needs dilation \* \(kernel size - 1\) even"),
]


@pytest.mark.parametrize("change,error,message", BAD, ids=[m.split(" ")[0] + str(i) for i, (_, _, m) in enumerate(BAD)])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_bad_input_is_named(change, error, message, backend):
    with pytest.raises(error, match=message):
        atom_conv2d(**(_good() | change), backend=backend)


def test_device_mismatch_is_named():
    args = _good()
    args["weight"] = args["weight"].to("meta")
    with pytest.raises(ValueError, match=r"weight is on meta but x is on cpu"):
        atom_conv2d(**args)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        atom_conv2d(**_good(), backend="cudnn")


@pytest.mark.parametrize("change,message", [
    (dict(x=torch.randn(2, 0, 8, 8), weight=torch.randn(6, 0, 3), groups=1), r"x must have at least one channel"),
    (dict(weight=torch.randn(0, 2, 3), bias=None), r"weight must have at least one output channel"),
])
def test_zero_channels_are_named(change, message):
    with pytest.raises(ValueError, match=message):
        atom_conv2d(**(_good() | change))


def test_int32_indexing_limit_is_named():
    from kernels.launch import check_int32_indexing

    check_int32_indexing("N*H*W", 2**31 - 64, 64, 1000)  # fits
    with pytest.raises(ValueError, match=r"N\*H\*W = 2147483647 pixels per sample need"):
        check_int32_indexing("N*H*W", 2**31 - 1, 64, 1000)  # padded to a whole tile, it passes 2**31
    with pytest.raises(ValueError, match="over 2\\*\\*31"):
        check_int32_indexing("N*H_out*W_out", 1024, 64, 2**31)


@pytest.mark.parametrize("padding,expected", [("same", 1), ("valid", 0)])
def test_padding_strings_as_in_conv2d(padding, expected):
    args = _good() | dict(atom_coeff=torch.randn(2, 15, 8 - 2 + 2 * expected, 8 - 2 + 2 * expected))
    ours = atom_conv2d(**(args | dict(padding=padding)), backend="reference")
    torch.testing.assert_close(ours, atom_conv2d(**(args | dict(padding=expected)), backend="reference"), rtol=0, atol=0)


def test_meta_tensors_give_a_meta_result_as_conv2d_does():
    args = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in _good().items()}
    y = atom_conv2d(**args)
    assert y.device.type == "meta" and y.shape == (2, 6, 8, 8)
    assert torch.nn.functional.conv2d(args["x"], torch.randn(6, 2, 3, 3, device="meta"), groups=2).device.type == "meta"
