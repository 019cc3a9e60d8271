"""One rank of the distributed tests (tests/test_distributed.py starts two of these): a few
training steps of a small AtomConv2d network under DDP, then under FSDP2 (`fully_shard`), on
the CPU with the gloo backend, each rank on its half of the batch.

    python tests/distributed_worker.py RANK WORLD_SIZE INIT_FILE OUT_DIR

Writes OUT_DIR/ddp_rank{RANK}.pt and OUT_DIR/fsdp_rank{RANK}.pt: {parameter name: full tensor}
after training. `build_network`, `batch` and `train` are also what the test runs in one process
on the whole batch.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from atomconv import AtomConv2d

STEPS = 3
BATCH = 8  # split evenly over the ranks
LEARNING_RATE = 0.1


def build_network() -> nn.Sequential:
    """x [N, 3, 8, 8] -> [N, 4, 4, 4]. Group-norm generators: no batch statistics, so the ranks'
    halves of the batch give exactly the whole batch's gradient once averaged."""
    torch.manual_seed(0)
    options = dict(num_atoms=2, generator_norm="group", generator_width=8)
    return nn.Sequential(
        AtomConv2d(3, 8, 3, padding=1, **options), nn.ReLU(),
        AtomConv2d(8, 4, 3, stride=2, padding=1, groups=2, **options),
    )


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch: inputs [BATCH, 3, 8, 8] and targets [BATCH, 4, 4, 4]."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 3, 8, 8, generator=g), torch.randn(BATCH, 4, 4, 4, generator=g)


def train(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> None:
    """STEPS of SGD on the mean squared error (a mean over the batch: averaging the ranks'
    gradients, as DDP and FSDP do, gives the whole batch's)."""
    optimiser = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    for _ in range(STEPS):
        loss = F.mse_loss(model(x), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


def main(rank: int, world_size: int, init_file: str, out_dir: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    x, target = batch()
    share = BATCH // world_size
    mine = slice(rank * share, (rank + 1) * share)

    ddp = DistributedDataParallel(build_network())
    train(ddp, x[mine], target[mine])
    torch.save({name: p.detach() for name, p in ddp.module.named_parameters()}, out_dir / f"ddp_rank{rank}.pt")

    model = build_network()
    for layer in model:
        if isinstance(layer, AtomConv2d):
            fully_shard(layer)
    fully_shard(model)
    train(model, x[mine], target[mine])
    full = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach() for name, p in model.named_parameters()}
    torch.save(full, out_dir / f"fsdp_rank{rank}.pt")
    del ddp, model, full
    dist.barrier()  # neither rank closes its connections while the other still talks
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
    # Skip the interpreter's finalisation. Once in CI a rank aborted with no traceback
    # ("terminate called without an active exception", exit -6): the known way for that is a
    # gloo thread that takes the GIL while the interpreter shuts down. Everything this rank
    # owes the test is on disk by now, and the test checks it.
    sys.stdout.flush()
    os._exit(0)
