"""Distributed training on the CPU: two gloo processes, started here, train an AtomConv2d network
under DDP and under FSDP2; every rank ends with the same parameters as one process that trained
on the whole batch."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import distributed_worker as worker

WORLD_SIZE = 2
TIMEOUT_SECONDS = 50  # the whole test ends within a minute, hung or not

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _run_ranks(out_dir: Path) -> None:
    """Start WORLD_SIZE worker processes and wait for them, killing all of them at the deadline."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # the reference backend only: kernels are not imported
    init_file = out_dir / "rendezvous"
    ranks = [subprocess.Popen([sys.executable, worker.__file__, str(rank), str(WORLD_SIZE), str(init_file), str(out_dir)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(WORLD_SIZE)]
    deadline = time.monotonic() + TIMEOUT_SECONDS
    try:
        outputs = [p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for p in ranks]
    except subprocess.TimeoutExpired:
        for p in ranks:
            p.kill()
        pytest.fail(f"the {WORLD_SIZE} ranks did not finish within {TIMEOUT_SECONDS} s")
    for rank, (p, output) in enumerate(zip(ranks, outputs)):
        assert p.returncode == 0, f"rank {rank} failed:\n{output}"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{"ddp"/"fsdp": [parameters of each rank]} and the one-process parameters."""
    out_dir = tmp_path_factory.mktemp("distributed")
    _run_ranks(out_dir)
    torch.set_num_threads(1)
    single = worker.build_network()
    worker.train(single, *worker.batch())
    expected = {name: p.detach() for name, p in single.named_parameters()}
    ranks = {kind: [torch.load(out_dir / f"{kind}_rank{r}.pt") for r in range(WORLD_SIZE)] for kind in ("ddp", "fsdp")}
    return ranks, expected


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_ranks_agree_and_equal_one_process_on_the_whole_batch(results, kind):
    ranks, expected = results
    first = ranks[kind][0]
    assert first.keys() == expected.keys()
    for other in ranks[kind][1:]:
        for name in first:
            assert torch.equal(other[name], first[name]), f"{kind}: ranks differ in {name}"
    trained = {name: not torch.equal(p, worker.build_network().state_dict()[name]) for name, p in expected.items()}
    assert all(trained.values()), "some parameters did not move: the comparison would prove nothing"
    for name, p in expected.items():
        torch.testing.assert_close(first[name], p, rtol=1e-5, atol=1e-6, msg=f"{kind}: {name}")
