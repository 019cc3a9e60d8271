"""convert_conv2d: geometry, report, predicate, aliases and sharing, options, hooks, device/dtype,
training and checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from atomconv import AtomConv2d, ConversionReport, atom_conv2d, convert_conv2d

CONVERTIBLE = ["stem", "body.0", "body.2", "body.3", "body.4", "head.same", "head.reflect"]
NOT_CONVERTIBLE = {  # name -> a word of the reason
    "body.1": "min_kernel_size",  # 1×1
    "head.even": "odd",
    "head.oblong": "odd",
    "head.lazy": "subclass",
}


class Mixed(nn.Module):
    """x [N, 4, 12, 12] -> [N, 8, 6, 6], through every kind of conv the converter meets."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(4, 8, 3, padding=1, bias=False)
        self.body = nn.Sequential(
            nn.Conv2d(8, 8, 3, stride=2, padding=1),              # 3×3 strided: 12 -> 6
            nn.Conv2d(8, 8, 1),                                    # 1×1: left alone
            nn.Conv2d(8, 8, 5, padding=2, groups=4),              # 5×5 grouped
            nn.Conv2d(8, 8, 3, padding=(2, 1), dilation=(2, 1)),  # dilated, pair arguments
            nn.Conv2d(8, 8, 5, padding="valid"),                   # 6 -> 2, then back:
        )
        self.head = nn.ModuleDict({
            "same": nn.Conv2d(8, 8, 3, padding="same", dilation=2),
            "even": nn.Conv2d(8, 8, 2, padding=1, dilation=2),
            "oblong": nn.Conv2d(8, 8, (3, 5), padding=(1, 2)),
            "reflect": nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"),
            "lazy": nn.LazyConv2d(8, 3, padding=1),
        })

    def forward(self, x):
        x = self.body[:4](self.stem(x))
        x = F.pad(self.body[4](x), (2, 2, 2, 2))
        for layer in self.head.values():
            x = layer(x)
        return x


def _converted(**kwargs):
    torch.manual_seed(0)
    original = Mixed()
    report = ConversionReport()
    model = convert_conv2d(copy.deepcopy(original), report=report, **kwargs)
    return original, model, report


def _static_conv_oracle(layer: AtomConv2d, conv: nn.Conv2d, x: torch.Tensor):
    """The layer's operator with pixel-independent atoms, and F.conv2d with the ORIGINAL conv's
    geometry arguments (strings included) on the static kernel those atoms make."""
    g = torch.Generator().manual_seed(1)
    m, num_bases = layer.num_atoms, layer.bases.shape[0]
    beta = torch.randn(m, num_bases, generator=g, dtype=x.dtype)
    h_out, w_out = conv(x).shape[2:]
    atom_coeff = beta.reshape(1, -1, 1, 1).expand(len(x), -1, h_out, w_out)
    bases, weight = layer.bases.to(x.dtype), layer.weight.detach().to(x.dtype)
    bias = None if layer.bias is None else layer.bias.detach().to(x.dtype)
    ours = atom_conv2d(x, atom_coeff, bases, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)
    static_weight = torch.einsum("ocm,ml,lij->ocij", weight, beta, bases)
    expected = F.conv2d(x, static_weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    return ours, expected


def test_replaces_eligible_convs_with_the_same_geometry():
    original, model, report = _converted(num_atoms=3)
    assert report.replaced == CONVERTIBLE
    assert set(report.skipped) == set(NOT_CONVERTIBLE)
    for name, word in NOT_CONVERTIBLE.items():
        assert word in report.skipped[name]
        assert type(model.get_submodule(name)) is type(original.get_submodule(name))
    for name in CONVERTIBLE:
        conv, layer = original.get_submodule(name), model.get_submodule(name)
        assert isinstance(layer, AtomConv2d)
        assert (layer.in_channels, layer.out_channels, layer.groups) == (conv.in_channels, conv.out_channels, conv.groups)
        assert (layer.kernel_size, layer.stride, layer.dilation) == (conv.kernel_size, conv.stride, conv.dilation)
        assert (layer.padding, layer.padding_mode) == (conv.padding, conv.padding_mode)
        assert layer.weight.shape == (conv.out_channels, conv.in_channels // conv.groups, 3)
        assert (layer.bias is None) == (conv.bias is None)
        if layer.bias is not None:
            assert layer.bias.shape == conv.bias.shape
        x = torch.randn(2, conv.in_channels, 11, 12, dtype=torch.float64)
        ours, expected = _static_conv_oracle(layer, conv.double(), x)
        torch.testing.assert_close(ours, expected)
        assert layer(x.float()).shape == expected.shape
    assert "replaced 7" in str(report) and "head.lazy" in str(report)


def test_output_shape_kept_and_other_layers_untouched():
    original, model, _ = _converted()
    replaced_or_lazy = tuple(f"{n}." for n in [*CONVERTIBLE, "head.lazy"])  # lazy: not initialised yet
    kept = {k: v for k, v in original.state_dict().items() if not k.startswith(replaced_or_lazy)}
    assert len(kept) == 6
    state = model.state_dict()
    for key, value in kept.items():
        assert torch.equal(state[key], value), key
    x = torch.randn(2, 4, 12, 12)
    assert model(x).shape == original(x).shape == (2, 8, 6, 6)


def test_predicate_is_asked_only_about_eligible_layers_and_honoured():
    asked = []

    def only_unstrided(name, conv):
        asked.append(name)
        return conv.stride == (1, 1)

    _, model, report = _converted(predicate=only_unstrided)
    assert asked == CONVERTIBLE
    assert report.skipped["body.0"] == "predicate returned False"
    assert type(model.body[0]) is nn.Conv2d
    assert report.replaced == [n for n in CONVERTIBLE if n != "body.0"]


def test_min_kernel_size():
    _, model, report = _converted(min_kernel_size=5)
    assert report.replaced == ["body.2", "body.4"]
    assert "smaller than min_kernel_size=5" in report.skipped["stem"]


def test_keeps_dtype_device_and_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3).to("meta")).double().eval()
    model[1].train()
    model = convert_conv2d(model, num_atoms=2)
    first, second = model
    floating = [t for t in [*first.parameters(), *first.buffers()] if t.is_floating_point()]
    assert all(t.dtype == torch.float64 and t.device.type == "cpu" for t in floating)
    assert all(t.device.type == "meta" for t in [*second.parameters(), *second.buffers()])
    assert not first.training and not first.generator.training and second.training
    assert first(torch.randn(1, 3, 6, 6, dtype=torch.float64)).dtype == torch.float64


def test_model_that_is_a_conv_shared_convs_and_existing_atom_layers():
    conv = nn.Conv2d(3, 3, 3, padding=1)
    report = ConversionReport()
    new = convert_conv2d(conv, report=report)
    assert isinstance(new, AtomConv2d) and report.replaced == [""]

    shared = nn.Conv2d(3, 3, 3, padding=1)
    model = nn.ModuleDict({"a": nn.Sequential(shared), "b": nn.Sequential(shared), "atom": AtomConv2d(3, 3, 3)})
    before = copy.deepcopy(model["atom"].generator)
    report = ConversionReport()
    model = convert_conv2d(model, report=report)
    assert report.replaced == ["a.0", "b.0"] and report.skipped == {}
    assert model["a"][0] is model["b"][0] and isinstance(model["a"][0], AtomConv2d)
    assert [type(m) for m in model["atom"].generator] == [type(m) for m in before]  # its own convs stay convs


@pytest.mark.parametrize("bad,error,word", [
    (dict(model=torch.zeros(1)), TypeError, "model"),
    (dict(num_atoms=0), ValueError, "num_atoms"),
    (dict(min_kernel_size=1), ValueError, "min_kernel_size"),
    (dict(predicate="stem"), TypeError, "predicate"),
    (dict(num_atoms=True), ValueError, "num_atoms"),
    (dict(bases_per_scale=7), ValueError, "bases_per_scale"),
    (dict(generator_norm="layer"), ValueError, "generator_norm"),
    (dict(generator_width=0), ValueError, "generator_width"),
    (dict(backend="cudnn"), ValueError, "backend"),
    (dict(report={}), TypeError, "report"),
])
def test_bad_arguments(bad, error, word):
    args = dict(model=nn.Conv2d(1, 1, 3)) | bad
    with pytest.raises(error, match=word):
        convert_conv2d(args.pop("model"), **args)


def _small_classifier():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 5, stride=2, padding=2, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 4, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )


def test_converted_network_trains():
    torch.manual_seed(0)
    report = ConversionReport()
    model = convert_conv2d(_small_classifier(), num_atoms=2, report=report)
    assert report.replaced == ["0", "3"]
    x, target = torch.randn(8, 3, 10, 10), torch.randint(0, 4, (8,))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(model(x), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model[0].parameters())


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = convert_conv2d(_small_classifier(), num_atoms=2)
    x = torch.randn(4, 3, 10, 10)
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()  # move the BN statistics off their init
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    path = tmp_path / "converted.pt"
    torch.save(model.state_dict(), path)

    torch.manual_seed(1)
    fresh = convert_conv2d(_small_classifier(), num_atoms=2)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert not torch.equal(fresh(x), model(x))
        fresh.load_state_dict(torch.load(path, weights_only=True))
        assert torch.equal(fresh(x), model(x))


def test_returns_the_module_like_convert_sync_batchnorm():
    model = _small_classifier()
    assert convert_conv2d(model) is model is nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(model[0], AtomConv2d)


def test_a_conv_under_two_names_in_one_parent_is_converted_under_both():
    conv = nn.Conv2d(3, 3, 3, padding=1)
    model = nn.Module()
    model.first, model.second = conv, conv  # named_children() lists this module once
    report = ConversionReport()
    model = convert_conv2d(model, report=report)
    assert report.replaced == ["first", "second"] and report.skipped == {}
    assert isinstance(model.first, AtomConv2d) and model.first is model.second


def test_a_shared_conv_stays_shared_when_the_predicate_refuses_one_name():
    shared = nn.Conv2d(3, 3, 3, padding=1)
    model = nn.ModuleDict({"a": nn.Sequential(shared), "b": nn.Sequential(shared)})
    report = ConversionReport()
    model = convert_conv2d(model, predicate=lambda name, conv: name == "b.0", report=report)
    assert model["a"][0] is model["b"][0] is shared
    assert report.replaced == [] and report.skipped == {
        "a.0": "predicate returned False", "b.0": "shared with a.0, for which the predicate returned False"}


def test_layer_options_reach_the_new_layers():
    model = convert_conv2d(nn.Sequential(nn.Conv2d(4, 8, 5, padding=2)), num_atoms=3, bases_per_scale=2,
                           generator_norm="group", generator_width=16, backend="reference")
    layer = model[0]
    assert (layer.num_atoms, layer.bases.shape, layer.backend) == (3, (4, 5, 5), "reference")
    assert layer.generator[0].out_channels == 16 and isinstance(layer.generator[1], nn.GroupNorm)


def test_complex_convs_are_left_with_a_reason():
    report = ConversionReport()
    model = convert_conv2d(nn.Sequential(nn.Conv2d(2, 2, 3, dtype=torch.complex64)), report=report)
    assert type(model[0]) is nn.Conv2d and "complex" in report.skipped["0"]


def test_hooks_and_pre_hooks_move_to_the_replacement():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    calls = []
    model[0].register_forward_pre_hook(lambda module, args: calls.append(("pre", type(module).__name__)))
    handle = model[0].register_forward_hook(lambda module, args, out: calls.append(("post", tuple(out.shape))))
    model[0].register_forward_pre_hook(lambda module, args, kwargs: calls.append(("pre-kw", len(kwargs))), with_kwargs=True)
    model = convert_conv2d(model, num_atoms=2)
    model(torch.randn(1, 3, 6, 6))
    assert calls == [("pre", "AtomConv2d"), ("pre-kw", 0), ("post", (1, 4, 6, 6))]
    handle.remove()  # a handle taken before the conversion still removes its hook
    calls.clear()
    model(torch.randn(1, 3, 6, 6))
    assert calls == [("pre", "AtomConv2d"), ("pre-kw", 0)]
