"""AtomConv2d: output grid, parameters, and interop with the authors' Conv_DCFD layout."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from atomconv import AtomConv2d, fourier_bessel_bases
from perf.paper import paper_atom_conv2d


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
                                 dict(groups=3), dict(num_atoms=0), dict(backend="cuda")])
def test_bad_layer_arguments(bad):
    args = dict(in_channels=4, out_channels=8, kernel_size=3) | bad
    with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
        AtomConv2d(**args)


def test_bad_layer_input():
    layer = AtomConv2d(4, 8, 3)
    with pytest.raises(ValueError, match=r"x must be \[N, 4, H, W\]"):
        layer(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"x must be \[N, 4, H, W\]"):
        layer(torch.randn(4, 8, 8))


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
