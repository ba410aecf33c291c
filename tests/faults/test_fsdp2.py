"""FSDP2 (`fully_shard`, 2 CPU processes, gloo): the initializers and revival refuse sharded parameters with a clear
error before changing anything, instead of raw DTensor errors half way through (issue 20, item 5)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_relu import DeadUnitTracker, rai_, revive_dead_units_, sign_flip_
from tests.helpers import kill_units, mlp

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _run(rank: int, port: int) -> None:
    from torch.distributed.fsdp import fully_shard

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
        plain = mlp([4, 8, 8, 1], seed=0)
        kill_units(plain, 0, [1, 2])
        with DeadUnitTracker(plain) as tracker:
            plain(x)
        report = tracker.report()
        model = mlp([4, 8, 8, 1], seed=0)
        kill_units(model, 0, [1, 2])
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        optimizer = torch.optim.Adam(model.parameters())
        for warm in (False, True):  # before the first forward (lazy init pending) and after it
            if warm:
                model(x)
            before = [p.to_local().clone() for p in model.parameters()]
            calls = {
                "rai_": lambda: rai_(model, generator=torch.Generator().manual_seed(0)),
                "sign_flip_": lambda: sign_flip_(model, x),
                "revive_dead_units_": lambda: revive_dead_units_(model, report, optimizer, example_input=x),
            }
            for name, call in calls.items():
                with pytest.raises(
                    ValueError, match=rf"`{name}` cannot write into `(model|module)`: .*'0\.weight'.*FSDP2"
                ):
                    call()
            after = [p.to_local() for p in model.parameters()]
            assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
        # training goes on: the refusals left the sharded model usable
        model(x).sum().backward()
        optimizer.step()
    finally:
        dist.destroy_process_group()


def test_fsdp2_sharded_models_are_refused_before_anything_changes() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_run, args=(port,), nprocs=2)
