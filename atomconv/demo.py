"""`python -m atomconv.demo`: train a small CNN with AtomConv2d next to the same CNN with nn.Conv2d.

Data: scikit-learn's handwritten digits (1797 images, 8×8, shipped inside the package, no
download), upsampled to 16×16 so the per-pixel maps have some room. The AtomConv2d network
is the nn.Conv2d one passed through `convert_conv2d`. Prints test accuracy, parameter count
and training time of both, saves the AtomConv2d network's checkpoint and reloads it into a
fresh network (outputs must be identical), and draws what its first layer adapts per pixel.
Runs on the GPU when there is one (with bfloat16 autocast), otherwise on the CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .convert import ConversionReport, convert_conv2d
from .layer import AtomConv2d
from .reference import basis_to_atom

IMAGE_SIZE = 16
NUM_CLASSES = 10
BATCH_SIZE = 64
LEARNING_RATE = 3e-3
DEFAULT_EPOCHS = 12
QUICK_SPLIT = (160, 80)  # (train, test) images for --quick: a smoke test, not a result


def load_digits_split(seed: int, quick: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stratified split of the digits -> x_train [N, 1, 16, 16] (standardised with the training
    set's mean and std), y_train [N] int64, x_test [N', 1, 16, 16], y_test [N']. 80/20, or
    QUICK_SPLIT images with `quick`."""
    from sklearn.datasets import load_digits  # the demo's only use of scikit-learn
    from sklearn.model_selection import train_test_split

    pixels, labels = load_digits(return_X_y=True)  # [1797, 64] in 0..16, [1797]
    train_size, test_size = QUICK_SPLIT if quick else (None, 0.2)
    split = train_test_split(pixels, labels, train_size=train_size, test_size=test_size, stratify=labels, random_state=seed)
    x_train, x_test, y_train, y_test = (torch.as_tensor(a) for a in split)

    def images(rows: torch.Tensor) -> torch.Tensor:
        x = rows.float().view(-1, 1, 8, 8)
        return F.interpolate(x, size=IMAGE_SIZE, mode="bilinear", align_corners=False)

    x_train, x_test = images(x_train), images(x_test)
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, y_train.long(), (x_test - mean) / std, y_test.long()


def build_cnn() -> nn.Sequential:
    """The demo's CNN: x [N, 1, 16, 16] -> logits [N, 10]. A 5×5 stem (two scales of bases once
    converted), a strided 3×3, a 3×3, a 1×1 mixing conv (left alone by the conversion)."""
    def block(c_in, c_out, kernel, stride=1):
        return [nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2), nn.BatchNorm2d(c_out), nn.ReLU()]

    return nn.Sequential(
        *block(1, 16, 5), *block(16, 32, 3, stride=2), *block(32, 32, 3), *block(32, 64, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, NUM_CLASSES),
    )


def build_atom_cnn() -> tuple[nn.Sequential, str]:
    """build_cnn() with its 3×3 and 5×5 convs made AtomConv2d -> (model, conversion report text)."""
    report = ConversionReport()
    model = convert_conv2d(build_cnn(), report=report)
    return model, str(report)


def mixed_precision(device: torch.device):
    """bfloat16 autocast on CUDA; on the CPU plain float32 (CPU bfloat16 is rarely faster)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def print_progress(label: str, step: int, total: int, loss: float, width: int = 30) -> None:
    """One self-overwriting progress line on stderr; a newline after the last step."""
    filled = width * step // total
    end = "\n" if step == total else ""
    print(f"\r{label:<16} [{'#' * filled}{'.' * (width - filled)}] {step}/{total} steps, loss {loss:.3f}",
          end=end, file=sys.stderr, flush=True)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, label: str) -> float:
    """Adam with a cosine schedule and cross-entropy on (x [N, 1, H, W], y [N]), both already on
    the model's device; batch order from `seed`. Returns the wall time in seconds."""
    device = x.device
    order = torch.Generator().manual_seed(seed)
    steps = epochs * -(-len(x) // BATCH_SIZE)
    optimiser = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
    model.train()
    start, step = time.perf_counter(), 0
    for _ in range(epochs):
        for batch in torch.randperm(len(x), generator=order).to(device).split(BATCH_SIZE):
            with mixed_precision(device):
                loss = F.cross_entropy(model(x[batch]), y[batch])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            step += 1
            print_progress(label, step, steps, loss.item())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode logits [N, 10] of x [N, 1, H, W], in float32."""
    model.eval()
    with mixed_precision(x.device):
        return torch.cat([model(chunk).float() for chunk in x.split(256)])


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def checkpoint_round_trip(model: nn.Module, x: torch.Tensor, path: Path) -> float:
    """Save model's state dict to `path`, load it into a freshly built and converted network,
    and return max |difference| of their eval outputs on x (0.0 when identical)."""
    torch.save(model.state_dict(), path)
    reloaded, _ = build_atom_cnn()
    reloaded.load_state_dict(torch.load(path, map_location=x.device, weights_only=True))
    reloaded.to(x.device)
    return (predict(model, x) - predict(reloaded, x)).abs().max().item()


@torch.no_grad()
def scale_energy_and_atoms(layer: AtomConv2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What an AtomConv2d adapts, per output pixel, for input x [N, C_in, H, W], in the layer's
    current mode (eval for a trained network: its generator has batch norms):

    energy [N, S, H_out, W_out]: for each scale s of the bases (S = K // 2; scale s holds
      rows s*B .. (s+1)*B - 1 of `layer.bases`, B bases per scale), sum_m ||sum_{l in s}
      beta[m, l] Psi_l||^2, the atoms' energy in that scale's bases;
    atoms [N, H_out, W_out, M, K, K]: the synthesised atoms A_m = sum_l beta[m, l] Psi_l.
    """
    beta = layer.atom_coefficients(x).float()  # [N, M*L, H_out, W_out]
    n, _, h, w = beta.shape
    m, (k, _) = layer.num_atoms, layer.kernel_size
    num_scales = k // 2
    bases = layer.bases.float()
    per_scale = bases.shape[0] // num_scales
    beta_by_scale = beta.view(n, m, num_scales, per_scale, h, w)
    energy = torch.stack([
        basis_to_atom(beta_by_scale[:, :, s].reshape(n, -1, h, w), bases[s * per_scale : (s + 1) * per_scale], m)
        .square().sum((0, 4))  # [K*K, n, h, w, M] -> [n, h, w]
        for s in range(num_scales)
    ], dim=1)
    atoms = basis_to_atom(beta, bases, m).view(k, k, n, h, w, m).permute(2, 3, 4, 5, 0, 1)
    return energy, atoms


def save_figure(images: torch.Tensor, labels: list[int], energy: torch.Tensor, atoms: torch.Tensor, path: Path) -> None:
    """Draw, for D digits, images [D, H, W] and each scale's share of the atoms' energy
    energy [D, S, H, W]; and, for three pixels of the first digit, its atoms
    atoms [D, H, W, M, K, K]. Writes a PNG to `path`."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    num_digits, num_scales = energy.shape[:2]
    share = energy / energy.sum(1, keepdim=True).clamp_min(1e-12)  # [D, S, H, W], sums to 1 over S
    low, high = share.min().item(), share.max().item()  # one colour scale, fitted to the data
    outer = share[0, -1]
    h, w = outer.shape
    pixels = {  # name -> (row, column) of the first digit
        "a": divmod(outer.argmax().item(), w), "b": divmod(outer.argmin().item(), w), "c": (h // 2, w // 2),
    }
    fig = Figure(figsize=(15, 6.6), layout="constrained")
    left, right = fig.subfigures(1, 2, width_ratios=[1, 1.1], wspace=0.04)

    axes = left.subplots(num_digits, 1 + num_scales, squeeze=False)
    for d in range(num_digits):
        axes[d, 0].imshow(images[d].numpy(), cmap="gray_r")
        axes[d, 0].set_ylabel(f"digit {labels[d]}\nrow")
        for s in range(num_scales):
            shown = axes[d, 1 + s].imshow(share[d, s].numpy(), cmap="viridis", vmin=low, vmax=high)
    for name, (row, col) in pixels.items():
        axes[0, 0].annotate(name, (col, row), color="red", fontsize=11, fontweight="bold", ha="center", va="center")
    axes[0, 0].set_title("input")
    for s in range(num_scales):
        size = 2 * s + 3
        axes[0, 1 + s].set_title(f"{size}×{size} scale")
    for ax in axes[-1]:
        ax.set_xlabel("column")
    left.colorbar(shown, ax=axes[:, 1:], label="share of the atoms' energy in this scale", shrink=0.7)
    left.suptitle("Adaptive receptive field of the first layer:\nper pixel, how the atoms' energy splits across the scales")

    m, k = atoms.shape[3], atoms.shape[-1]
    chosen = torch.stack([atoms[0, row, col] for row, col in pixels.values()])  # [3, M, K, K]
    limit = chosen.abs().max().item()
    axes = right.subplots(len(pixels), m, squeeze=False)
    for i, (name, (row, col)) in enumerate(pixels.items()):
        for j in range(m):
            shown = axes[i, j].imshow(chosen[i, j].numpy(), cmap="RdBu_r", vmin=-limit, vmax=limit)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
        axes[i, 0].set_ylabel(f"pixel {name} ({row}, {col})\n{k}×{k} share {outer[row, col]:.2f}")
    for j in range(m):
        axes[0, j].set_title(f"atom {j + 1}")
    right.colorbar(shown, ax=axes, label="atom weight", shrink=0.7)
    right.suptitle(f"Synthesised {k}×{k} atoms $A_m = \\sum_l \\beta_{{m,l}} \\Psi_l$\nat pixels a, b, c of digit {labels[0]}")
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    """Run the demo; returns what it printed, as numbers (used by the tests)."""
    parser = argparse.ArgumentParser(prog="python -m atomconv.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=None, help=f"training epochs (default {DEFAULT_EPOCHS}, 1 with --quick)")
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for the figure and the checkpoint")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: {QUICK_SPLIT[0]} training and {QUICK_SPLIT[1]} test images, 1 epoch")
    parser.add_argument("--seed", type=int, default=0, help="seeds the split, the initialisation and the batch order")
    args = parser.parse_args(argv)
    epochs = args.epochs if args.epochs is not None else (1 if args.quick else DEFAULT_EPOCHS)
    if epochs < 1:
        parser.error(f"--epochs must be >= 1, got {epochs}")

    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x_train, y_train, x_test, y_test = (t.to(device) for t in load_digits_split(args.seed, args.quick))
    where = f"{device}" if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"digits: {len(x_train)} training and {len(x_test)} test images, {IMAGE_SIZE}×{IMAGE_SIZE}, on {where}")

    torch.manual_seed(args.seed)
    conv_model = build_cnn().to(device)
    torch.manual_seed(args.seed)
    atom_model, report = build_atom_cnn()
    atom_model.to(device)
    print(report)
    results = {}
    for name, model in (("nn.Conv2d", conv_model), ("AtomConv2d", atom_model)):
        seconds = train(model, x_train, y_train, epochs, args.seed, f"{name} CNN")
        accuracy = (predict(model, x_test).argmax(1) == y_test).float().mean().item()
        results[name] = {"accuracy": accuracy, "parameters": count_parameters(model), "train_seconds": seconds}

    print(f"\n{'network':<16}{'test accuracy':>15}{'parameters':>12}{'train time':>12}   ({epochs} epochs, {where})")
    for name, r in results.items():
        print(f"{name + ' CNN':<16}{100 * r['accuracy']:>14.1f}%{r['parameters']:>12,}{r['train_seconds']:>11.1f}s")
    generators = sum(count_parameters(m.generator) for m in atom_model.modules() if isinstance(m, AtomConv2d))
    print(f"({generators:,} of the AtomConv2d CNN's parameters are in the layers' atom generators)")

    checkpoint = args.out / "atom_cnn.pt"
    difference = checkpoint_round_trip(atom_model, x_test, checkpoint)
    print(f"\ncheckpoint {checkpoint}: reloaded into a fresh network, max |output difference| = {difference:g}"
          + (" (identical)" if difference == 0 else ""))

    stem = atom_model.eval()[0]  # the 5×5 AtomConv2d: its input is the image, its output grid the image grid
    shown = torch.stack([(y_test == digit).nonzero()[0, 0] for digit in (3, 5, 8)])
    energy, atoms = scale_energy_and_atoms(stem, x_test[shown])
    figure = args.out / "demo_atoms.png"
    save_figure(x_test[shown, 0].cpu(), y_test[shown].tolist(), energy.cpu(), atoms.cpu(), figure)
    print(f"figure {figure}")
    return {"results": results, "checkpoint": checkpoint, "max_difference": difference, "figure": figure}


if __name__ == "__main__":
    main()
