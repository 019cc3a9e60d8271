"""AtomConv2d: output grid, nn.Conv2d's arguments, meta-device init, generator options,
parameters, and interop with the authors' Conv_DCFD layout."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from atomconv import AtomConv2d, fourier_bessel_bases
from perf.paper import paper_atom_conv2d

CONV2D_ATTRIBUTES = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "padding_mode")


@pytest.mark.parametrize(
    "kernel,stride,padding,dilation",
    [g for g in itertools.product((3, 5), (1, 2, 3), (0, 1, 2, 3), (1, 2))] + [(3, (1, 2), (2, 0), (2, 1)), (7, 2, 3, 1)],
)
@pytest.mark.parametrize("hw", [(9, 9), (10, 7)])
def test_output_grid_equals_conv2d(kernel, stride, padding, dilation, hw):
    """Odd and even sizes, every stride/padding/dilation: the same grid as nn.Conv2d."""
    torch.manual_seed(0)
    layer = AtomConv2d(3, 4, kernel, stride, padding, dilation, num_atoms=2).eval()
    conv = nn.Conv2d(3, 4, kernel, stride, padding, dilation)
    x = torch.randn(2, 3, *hw)
    try:
        expected = conv(x).shape
    except RuntimeError:
        with pytest.raises(ValueError, match="too small"):
            layer(x)
        return
    assert layer(x).shape == expected


def test_generator_matches_paper_for_same_padding():
    layer = AtomConv2d(8, 16, 5, stride=2, padding=2)
    first = layer.generator[0]
    assert (first.kernel_size, first.stride, first.padding) == ((3, 3), (2, 2), (1, 1))
    assert [type(m) for m in layer.generator] == [nn.Conv2d, nn.BatchNorm2d, nn.Tanh, nn.Conv2d, nn.BatchNorm2d, nn.Tanh]
    assert layer.generator[0].out_channels == max(64, 6 * 12 // 2)
    assert layer.generator[3].out_channels == 6 * 12


def test_parameters_and_initialisation():
    torch.manual_seed(0)
    layer = AtomConv2d(32, 512, 3, groups=4, num_atoms=5, bases_per_scale=4)
    assert layer.weight.shape == (512, 8, 5)
    assert layer.bases.shape == (4, 3, 3) and not layer.bases.requires_grad
    assert "bases" in dict(layer.named_buffers())
    torch.testing.assert_close(layer.bases, fourier_bessel_bases(3, 4))
    assert layer.weight.std().item() == pytest.approx((2 / 512) ** 0.5, rel=0.05)
    assert torch.count_nonzero(layer.bias) == 0
    assert AtomConv2d(4, 4, 3, bias=False).bias is None
    text = repr(layer)
    for part in ("32, 512", "kernel_size=(3, 3)", "groups=4", "num_atoms=5", "num_bases=4", "backend='auto'"):
        assert part in text


def test_layer_trains():
    torch.manual_seed(0)
    layer = AtomConv2d(3, 4, 3, padding=1, num_atoms=2)
    x, target = torch.randn(4, 3, 8, 8), torch.randn(4, 4, 8, 8)
    optimiser = torch.optim.SGD(layer.parameters(), lr=0.05)
    losses = []
    for _ in range(15):
        loss = ((layer(x) - target) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert all(p.grad is not None for p in layer.parameters())


@pytest.mark.parametrize("bad", [dict(kernel_size=4), dict(kernel_size=(3, 5)), dict(kernel_size=1),
                                 dict(groups=3), dict(num_atoms=0), dict(num_atoms=True), dict(backend="cuda"),
                                 dict(stride=2**63), dict(padding=2**40), dict(dilation=(1, 2**31)),
                                 dict(generator_norm="layer"), dict(generator_width=0), dict(bases_per_scale=7)])
def test_bad_layer_arguments(bad):
    args = dict(in_channels=4, out_channels=8, kernel_size=3) | bad
    with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
        AtomConv2d(**args)


def test_bad_layer_input():
    layer = AtomConv2d(4, 8, 3, padding=2)
    with pytest.raises(ValueError, match=r"x must be \[N, 4, H, W\] or \[4, H, W\]"):
        layer(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"x must be \[N, 4, H, W\] or \[4, H, W\]"):
        layer(torch.randn(3, 8, 8))
    with pytest.raises(ValueError, match=r"x must be \[N, 4, H, W\] or \[4, H, W\]"):
        layer(torch.randn(8, 8))
    with pytest.raises(ValueError, match=r"x must be \[N, 4, H, W\], got \(4, 8, 8\)"):
        layer.atom_coefficients(torch.randn(4, 8, 8))
    with pytest.raises(RuntimeError):  # nn.Conv2d refuses a zero spatial size even where padding makes room
        nn.Conv2d(4, 8, 3, padding=2)(torch.randn(2, 4, 0, 5))
    with pytest.raises(ValueError, match=r"x must have a non-zero spatial size"):
        layer(torch.randn(2, 4, 0, 5))


def _with_static_atoms(layer: AtomConv2d, seed: int = 1):
    """Make the layer's generator emit one set of atom coefficients everywhere; returns the static
    kernel [C_out, C_in/G, K, K] its operator then amounts to (an nn.Conv2d weight)."""
    g = torch.Generator().manual_seed(seed)
    beta = torch.randn(layer.num_atoms * layer.bases.shape[0], generator=g, dtype=layer.bases.dtype)
    layer.generator.register_forward_hook(lambda module, args, out: beta.view(1, -1, 1, 1).expand(out.shape))
    return torch.einsum("ocm,ml,lij->ocij", layer.weight.detach(), beta.view(layer.num_atoms, -1), layer.bases)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("kernel,stride,padding,dilation", [
    (3, 1, 1, 1), (3, 2, (2, 1), 1), (5, 1, "same", 1), (3, 1, "same", 2), (5, 1, "valid", 1), (3, (1, 2), 2, (2, 1)),
])
def test_conv2d_arguments_have_conv2d_semantics(padding_mode, kernel, stride, padding, dilation):
    """padding ints/"same"/"valid", every padding_mode, against nn.Conv2d with the static kernel
    that pixel-independent atoms make; attributes named and valued as nn.Conv2d's."""
    torch.manual_seed(0)
    args = (4, 6, kernel, stride, padding, dilation, 2, True, padding_mode, "cpu", torch.float64)
    layer, conv = AtomConv2d(*args, num_atoms=3), nn.Conv2d(*args)
    for name in CONV2D_ATTRIBUTES:
        assert getattr(layer, name) == getattr(conv, name), name
    with torch.no_grad():
        conv.weight.copy_(_with_static_atoms(layer))
        conv.bias.copy_(torch.randn(6))
        layer.bias.copy_(conv.bias)
        x = torch.randn(2, 4, 9, 8, dtype=torch.float64)
        torch.testing.assert_close(layer(x), conv(x))


def test_same_padding_with_stride_is_refused_as_conv2d_refuses_it():
    with pytest.raises(ValueError, match="padding='same' is not supported for strided convolutions"):
        nn.Conv2d(4, 4, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding='same' is not supported for strided convolutions"):
        AtomConv2d(4, 4, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding must be an int, a pair of ints, 'valid' or 'same'"):
        AtomConv2d(4, 4, 3, padding="full")
    with pytest.raises(ValueError, match="padding_mode must be one of"):
        AtomConv2d(4, 4, 3, padding_mode="mirror")


def test_unbatched_input_as_conv2d():
    torch.manual_seed(0)
    layer = AtomConv2d(4, 6, 3, padding=1, num_atoms=2).eval()
    x = torch.randn(4, 7, 9)
    y = layer(x)
    assert y.shape == nn.Conv2d(4, 6, 3, padding=1)(x).shape == (6, 7, 9)
    torch.testing.assert_close(y, layer(x[None])[0], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_device_and_dtype_arguments(dtype):
    layer = AtomConv2d(4, 6, 3, padding=1, num_atoms=2, device="cpu", dtype=dtype)
    conv = nn.Conv2d(4, 6, 3, padding=1, device="cpu", dtype=dtype)
    tensors = [*layer.parameters(), *layer.buffers()]
    assert {t.dtype for t in tensors if t.is_floating_point()} == {p.dtype for p in conv.parameters()} == {dtype}
    torch.testing.assert_close(layer.bases, fourier_bessel_bases(3, 2).to(dtype))
    assert layer(torch.randn(2, 4, 5, 5, dtype=dtype)).dtype == dtype
    meta = AtomConv2d(4, 6, 3, device="meta")
    assert all(t.device.type == "meta" for t in [*meta.parameters(), *meta.buffers()])


def test_meta_init_then_to_empty_and_reset_parameters_equals_a_fresh_layer():
    """Deferred init: everything, the bases buffer included, is made on meta; to_empty() and
    reset_parameters() then give exactly the layer built directly (same RNG draws)."""
    args = dict(in_channels=4, out_channels=6, kernel_size=5, padding=2, num_atoms=3)
    with torch.device("meta"):
        deferred = AtomConv2d(**args)
    assert all(t.device.type == "meta" for t in [*deferred.parameters(), *deferred.buffers()])
    deferred.to_empty(device="cpu")
    torch.manual_seed(0)
    deferred.reset_parameters()
    torch.manual_seed(0)
    direct = AtomConv2d(**args)
    state = direct.state_dict()
    assert state.keys() == deferred.state_dict().keys()
    for name, tensor in deferred.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    torch.testing.assert_close(deferred.bases, fourier_bessel_bases(5, 3), rtol=0, atol=0)


def test_reset_parameters_resets_the_generator_too():
    layer = AtomConv2d(4, 6, 3, padding=1, num_atoms=2)
    layer(torch.randn(2, 4, 6, 6))  # moves the batch norms' running statistics
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(7.0)
        layer.bases.fill_(7.0)
    layer.reset_parameters()
    assert torch.equal(layer.generator[1].running_mean, torch.zeros(layer.generator_width))
    assert not any(torch.all(p == 7.0) for p in layer.parameters())
    torch.testing.assert_close(layer.bases, fourier_bessel_bases(3, 2), rtol=0, atol=0)


@pytest.mark.parametrize("norm,kind", [("batch", nn.BatchNorm2d), ("group", nn.GroupNorm), ("none", nn.Identity)])
def test_generator_norm_options(norm, kind):
    torch.manual_seed(0)
    layer = AtomConv2d(4, 6, 3, padding=1, num_atoms=6, generator_norm=norm, generator_width=24, dtype=torch.float64)
    assert [type(layer.generator[i]) for i in (1, 4)] == [kind, kind]
    assert layer.generator[0].out_channels == 24 and layer.generator[3].in_channels == 24
    if norm == "group":
        assert (layer.generator[1].num_groups, layer.generator[4].num_groups) == (8, 4)  # gcd(24, 32), gcd(36, 32)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    alone = layer(x[:1])
    if norm == "batch":  # training-mode batch norm mixes the samples: the paper's layer
        assert not torch.allclose(layer(x)[:1], alone)
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            layer(torch.randn(1, 4, 1, 1, dtype=torch.float64))
    else:  # per-sample: a sample's output does not depend on the rest of the batch
        torch.testing.assert_close(layer(x)[:1], alone)
        assert layer(torch.randn(1, 4, 1, 1, dtype=torch.float64)).shape == (1, 6, 1, 1)


def _official_state_dict(c_in, c_out, k, m, gen):
    """A random state dict in Conv_DCFD's layout (bases from this package: they are a buffer there too)."""
    num_bases = m * (k // 2)
    inter = max(64, m * num_bases // 2)
    sd = {"coef": torch.randn(c_out, c_in * m, 1, 1, generator=gen), "bias": torch.randn(c_out, generator=gen),
          "bases": torch.randn(num_bases, k * k, generator=gen)}
    for idx, (cin, cout) in ((0, (c_in, inter)), (3, (inter, m * num_bases))):
        sd[f"bases_net.{idx}.weight"] = torch.randn(cout, cin, 3, 3, generator=gen) * 0.1
        sd[f"bases_net.{idx}.bias"] = torch.randn(cout, generator=gen)
        bn = f"bases_net.{idx + 1}."
        sd[bn + "weight"], sd[bn + "bias"] = torch.rand(cout, generator=gen) + 0.5, torch.randn(cout, generator=gen)
        sd[bn + "running_mean"], sd[bn + "running_var"] = torch.randn(cout, generator=gen), torch.rand(cout, generator=gen) + 0.5
        sd[bn + "num_batches_tracked"] = torch.tensor(7)
    return sd


@pytest.mark.parametrize("kernel,stride,hw", [(3, 1, (8, 8)), (5, 2, (10, 12))])
def test_load_official_state_dict_reproduces_the_papers_layer(kernel, stride, hw):
    gen = torch.Generator().manual_seed(0)
    c_in, c_out, m = 5, 7, 3
    sd = _official_state_dict(c_in, c_out, kernel, m, gen)
    layer = AtomConv2d(c_in, c_out, kernel, stride, padding=kernel // 2, num_atoms=m)
    layer.load_official_state_dict(sd)
    layer.eval()
    x = torch.randn(2, c_in, *hw, generator=gen)

    # The paper's forward, built only from the official tensors.
    bases_net = nn.Sequential(nn.Conv2d(c_in, sd["bases_net.0.weight"].shape[0], 3, stride=stride, padding=1),
                              nn.BatchNorm2d(sd["bases_net.0.weight"].shape[0]), nn.Tanh(),
                              nn.Conv2d(*sd["bases_net.3.weight"].shape[1::-1], 3, padding=1),
                              nn.BatchNorm2d(sd["bases_net.3.weight"].shape[0]), nn.Tanh())
    bases_net.load_state_dict({k.removeprefix("bases_net."): v for k, v in sd.items() if k.startswith("bases_net.")})
    bases_net.eval()
    bases = sd["bases"].view(-1, kernel, kernel)
    expected = paper_atom_conv2d(x, bases_net(x), bases, sd["coef"], sd["bias"], stride, kernel // 2)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)


def test_load_official_state_dict_refuses_other_generator_norms():
    layer = AtomConv2d(5, 7, 3, padding=1, num_atoms=3, generator_norm="group")
    with pytest.raises(ValueError, match="generator_norm='batch'"):
        layer.load_official_state_dict(_official_state_dict(5, 7, 3, 3, torch.Generator().manual_seed(0)))


def test_load_official_state_dict_names_mismatches():
    gen = torch.Generator().manual_seed(0)
    layer = AtomConv2d(5, 7, 3, padding=1, num_atoms=3)
    sd = _official_state_dict(5, 7, 3, 3, gen)
    with pytest.raises(ValueError, match=r"'coef' must have shape \[7, 15, 1, 1\].*got \[7, 10, 1, 1\]"):
        layer.load_official_state_dict(sd | {"coef": torch.randn(7, 10, 1, 1)})
    with pytest.raises(ValueError, match=r"'bases_net.4.running_var' must have shape \[9\] for this layer, got \[8\]"):
        layer.load_official_state_dict(sd | {"bases_net.4.running_var": torch.randn(8)})
    with pytest.raises(ValueError, match=r"missing \['bias'\]"):
        layer.load_official_state_dict({k: v for k, v in sd.items() if k != "bias"})
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        layer.load_official_state_dict(sd | {"extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"value 'bias' must be a tensor, got list"):
        layer.load_official_state_dict(sd | {"bias": [0.0] * 7})
    with pytest.raises(ValueError, match=r"value 'bases_net.1.num_batches_tracked' must be a tensor, got int"):
        layer.load_official_state_dict(sd | {"bases_net.1.num_batches_tracked": 7})


@pytest.mark.parametrize("bad,message", [
    (dict(groups=0), "groups must be a positive int"), (dict(groups=2.0), "groups must be a positive int"),
    (dict(in_channels=0), "in_channels must be a positive int"),
    (dict(num_atoms=8), "num_atoms=8 > 6 needs an explicit bases_per_scale"),
])
def test_bad_layer_arguments_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        AtomConv2d(**(dict(in_channels=4, out_channels=8, kernel_size=3) | bad))


def test_more_than_six_atoms_with_explicit_bases_per_scale():
    assert AtomConv2d(4, 8, 5, num_atoms=8, bases_per_scale=6).bases.shape == (12, 5, 5)
