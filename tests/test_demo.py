"""The demo: its data, what its figure measures, and a tiny end-to-end run (in-process)."""

from __future__ import annotations

import pytest
import torch

from atomconv import AtomConv2d
from atomconv.demo import (
    IMAGE_SIZE, QUICK_SPLIT, build_atom_cnn, build_cnn, count_parameters, load_digits_split, main, scale_energy_and_atoms,
)


def test_digits_split():
    x_train, y_train, x_test, y_test = load_digits_split(seed=0, quick=False)
    assert x_train.shape == (1437, 1, IMAGE_SIZE, IMAGE_SIZE) and x_test.shape == (360, 1, IMAGE_SIZE, IMAGE_SIZE)
    assert y_train.dtype == torch.int64 and set(y_test.tolist()) == set(range(10))
    assert abs(x_train.mean().item()) < 1e-5 and abs(x_train.std().item() - 1) < 1e-5
    quick = load_digits_split(seed=0, quick=True)
    assert (len(quick[0]), len(quick[2])) == QUICK_SPLIT


def test_scale_energy_and_atoms_against_a_direct_sum():
    """energy[n, s, h, w] = sum_m ||sum_{l in scale s} beta[m, l] Psi_l||^2, computed here pixel
    by pixel from the layer's own beta and bases; atoms = sum_l beta[m, l] Psi_l."""
    torch.manual_seed(0)
    layer = AtomConv2d(2, 3, 7, padding=3, num_atoms=2, bases_per_scale=4)  # 3 scales of 4 bases
    x = torch.randn(1, 2, 5, 6)
    energy, atoms = scale_energy_and_atoms(layer, x)
    assert energy.shape == (1, 3, 5, 6) and atoms.shape == (1, 5, 6, 2, 7, 7)
    with torch.no_grad():
        beta = layer.atom_coefficients(x).view(2, 12, 5, 6)  # [M, L, H, W]
    for h, w in [(0, 0), (2, 3), (4, 5)]:
        for s in range(3):
            atoms_of_scale = torch.einsum("ml,lij->mij", beta[:, 4 * s : 4 * s + 4, h, w], layer.bases[4 * s : 4 * s + 4])
            torch.testing.assert_close(energy[0, s, h, w], atoms_of_scale.square().sum())
        torch.testing.assert_close(atoms[0, h, w], torch.einsum("ml,lij->mij", beta[:, :, h, w], layer.bases))


@pytest.fixture
def deterministic(monkeypatch):
    """Deterministic algorithms for the repeat below: on CUDA, cuDNN's conv backward (the
    demo's nn.Conv2d layers and generators) is not deterministic by default. Our kernels are
    (no atomics)."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    was = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(was[0], warn_only=was[1])


def test_demo_runs_end_to_end_and_repeats_for_a_seed(tmp_path, capsys, deterministic):
    out = main(["--quick", "--out", str(tmp_path / "out"), "--seed", "1"])
    printed = capsys.readouterr()

    figure = (tmp_path / "out" / "demo_atoms.png").read_bytes()
    assert figure.startswith(b"\x89PNG") and len(figure) > 20_000
    assert out["max_difference"] == 0 and "(identical)" in printed.out
    reloaded, _ = build_atom_cnn()
    reloaded.load_state_dict(torch.load(out["checkpoint"], weights_only=True))

    results = out["results"]
    assert results["nn.Conv2d"]["parameters"] == count_parameters(build_cnn())
    assert results["AtomConv2d"]["parameters"] == count_parameters(reloaded)
    for name, r in results.items():
        assert 0 <= r["accuracy"] <= 1 and r["train_seconds"] > 0
        assert f"{name} CNN" in printed.out and f"{r['parameters']:,}" in printed.out
    assert "replaced 3 nn.Conv2d layer(s)" in printed.out and "left 9: kernel (1, 1)" in printed.out
    steps = -(-QUICK_SPLIT[0] // 64)
    assert f"{steps}/{steps} steps" in printed.err  # the progress line reached its end

    again = main(["--quick", "--out", str(tmp_path / "again"), "--seed", "1"])
    capsys.readouterr()
    assert [r["accuracy"] for r in again["results"].values()] == [r["accuracy"] for r in results.values()]
    first, second = (torch.load(run["checkpoint"], weights_only=True) for run in (out, again))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_demo_rejects_zero_epochs(tmp_path):
    with pytest.raises(SystemExit):
        main(["--epochs", "0", "--out", str(tmp_path)])
