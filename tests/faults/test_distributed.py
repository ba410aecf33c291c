"""Faults on 2 CPU processes (gloo), started once for the whole module (a start costs more than the work):

- exact resume under DDP, from the middle of an epoch and from its last batch: every rank gets the uninterrupted
  fit's reports, revivals and weights (issue 20, item 2). The processes run the three fits one after the other with
  Lightning's ``ddp`` strategy, launched externally as ``torchrun`` would;
- FSDP2 (``fully_shard``): ``rai_``, ``sign_flip_`` and ``revive_dead_units_`` refuse a sharded model with a clear
  error before changing anything, instead of raw ``DTensor`` errors half way through (issue 20, item 5).
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from lightning_relu import DeadUnitMonitor, DeadUnitReviver, DeadUnitTracker, rai_, revive_dead_units_, sign_flip_
from tests.faults.models import Dump, Net, alike_batches, trainer
from tests.helpers import kill_units, mlp

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


class _DivergeOnRankOne(Callback):
    """The fault: rank 1's weights turn NaN at global step 2; DDP's gradient all-reduce spreads it to rank 0."""

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_rank == 1 and trainer.global_step == 2:
            with torch.no_grad():
                pl_module.net[0].weight.fill_(float("nan"))


def _fit(root: Path, name: str, ckpt_path: str | None = None, *extra: Callback, max_epochs: int = 2) -> None:
    monitor = DeadUnitMonitor(revive=DeadUnitReviver(seed=0))
    callbacks: list = [*extra, monitor, Dump(str(root / name), monitor)]
    if ckpt_path is None:
        callbacks.append(
            ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
        )
    fit = trainer(
        root,
        callbacks,
        strategy="ddp",
        devices=2,
        limit_train_batches=4,
        max_epochs=max_epochs,
        enable_checkpointing=ckpt_path is None,
        use_distributed_sampler=False,  # each rank reads the alike batches in order (a sampler would shuffle them)
    )
    # lr = 0 and alike batches: the weights change only by revival, and which batches a resumed fit replays on which
    # rank does not matter
    fit.fit(Net(alike_batches(8), lr=0.0), ckpt_path=ckpt_path)


def _fsdp2(rank: int) -> dict[str, Any]:
    """Call the initializers and revival on a model sharded by FSDP2, before and after its first forward."""
    from torch.distributed.fsdp import fully_shard

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
    results: dict[str, Any] = {}
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
            try:
                call()
                results[f"{name}, warm={warm}"] = "no error"
            except Exception as error:  # what the user sees, checked by the test
                results[f"{name}, warm={warm}"] = f"{type(error).__name__}: {error}"
        after = [p.to_local() for p in model.parameters()]
        results[f"unchanged, warm={warm}"] = all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    try:  # the reviver refuses at the start of a fit (Lightning shards in `configure_model`, before `on_fit_start`)
        DeadUnitReviver().on_fit_start(None, model)  # type: ignore[arg-type]
        results["reviver"] = "no error"
    except Exception as error:
        results["reviver"] = f"{type(error).__name__}: {error}"
    try:  # training goes on: the refusals left the sharded model usable
        model(x).sum().backward()
        optimizer.step()
        results["trained"] = "trained"
    except Exception as error:  # every rank fails alike (the same calls): no rank waits for the other
        results["trained"] = f"{type(error).__name__}: {error}"
    return results


class _Wrapped(torch.nn.Module):
    """An MLP with a rectifier function at the root: the tracker must observe a forward to find it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = mlp([4, 8, 8, 2], seed=0)
        kill_units(self.body, 0, [1, 2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.relu(self.body(x) - 0.1)


def _fsdp2_tracker(rank: int) -> dict[str, Any]:
    """A tracker built on an FSDP2 model before its first forward (no trace may run FSDP2's hooks early)."""
    from torch.distributed.fsdp import fully_shard

    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(1 + rank))
    model, plain = _Wrapped(), _Wrapped()
    for layer in model.body:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    results: dict[str, Any] = {}
    try:
        with DeadUnitTracker(model) as tracker:
            model(x).sum().backward()
        results["counts"] = {name: r.active_count.tolist() for name, r in tracker.report().items()}
    except Exception as error:  # what the user sees, checked by the test
        results["counts"] = f"{type(error).__name__}: {error}"
    with torch.no_grad():  # brute force on this rank's samples; the test adds the ranks up
        a = torch.relu(plain.body[0](x))
        b = torch.relu(plain.body[2](a))
        c = torch.relu(plain.body[4](b) - 0.1)
    results["local"] = {name: (out > 0).sum(0).tolist() for name, out in (("body.1", a), ("body.3", b), ("relu", c))}
    return results


def _rank(rank: int, port: int, root: str) -> None:
    # what torchrun sets: Lightning's `ddp` joins the processes instead of launching them
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0", LOCAL_RANK=str(rank)
    )
    path = Path(root)
    _fit(path, "whole")  # checkpoints at steps 2 (the middle of epoch 0), 4 (its last batch), 6, 8
    _fit(path, "mid", str(path / "ckpt" / "step=2.ckpt"))
    _fit(path, "last", str(path / "ckpt" / "step=4.ckpt"))
    if rank == 0:  # the fault: the checkpoint lacks the interrupted epoch's counts (an older version wrote none)
        checkpoint = torch.load(path / "ckpt" / "step=2.ckpt", weights_only=False)
        for key, state in checkpoint["callbacks"].items():
            if key.startswith("DeadUnitMonitor"):
                state["window"] = None
        torch.save(checkpoint, path / "no-counts.ckpt")
    dist.barrier()
    _fit(path, "partial", str(path / "no-counts.ckpt"), max_epochs=1)
    _fit(path, "diverged", None, _DivergeOnRankOne(), max_epochs=1)
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.save(_fsdp2(rank), path / f"fsdp2_rank{rank}.pt")
    torch.save(_fsdp2_tracker(rank), path / f"fsdp2_tracker_rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("distributed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_rank, args=(port, str(root)), nprocs=2)
    return root


def _load(root: Path, name: str) -> list[dict]:
    return [torch.load(root / f"{name}_rank{rank}.pt", weights_only=False) for rank in (0, 1)]


def test_ddp_resume_mid_epoch_and_from_the_last_batch_is_exact_on_every_rank(runs: Path) -> None:
    whole, mid, last = _load(runs, "whole"), _load(runs, "mid"), _load(runs, "last")
    reference = whole[0]
    assert [epoch for epoch, _, _ in reference["history"]] == [0, 1]
    # brute force of epoch 0: every sample of both ranks' 4 batches meets the initial weights
    x = alike_batches(8)
    with torch.no_grad():
        out = Net(x).net[:4](x[:4]).repeat(8, 1)  # 2 ranks x 4 batches of the same 4 samples
    _, _, sites = reference["history"][0]
    assert sites["net.3"][0] == [int((out[:, u] > 0).sum()) for u in range(6)] and sites["net.3"][1] == 32
    assert sum(reference["revived"][0].values()) > 0
    for run in (*whole, *mid, *last):
        assert run["history"] == reference["history"]
        assert run["revived"] == reference["revived"]
        assert run["partial"] == [False, False]
        for key, value in reference["params"].items():
            assert torch.equal(run["params"][key], value), key


def test_ddp_missing_counts_make_the_epoch_partial_on_every_rank(runs: Path) -> None:
    for run in _load(runs, "partial"):
        assert run["partial"] == [True]
        (_, _, sites) = run["history"][0]
        assert sites["net.3"][1] == 16  # the 2 batches of each rank run after the resume
        assert run["revived"] == []  # no remedy on partial data


def test_ddp_non_finite_on_one_rank_is_reported_on_every_rank_and_not_revived(runs: Path) -> None:
    for run in _load(runs, "diverged"):
        # brute force: rank 1 is NaN at steps 2 and 3, rank 0 at step 3 (after the NaN gradients' all-reduce)
        assert run["nonfinite"] == [(["net.1", "net.3"], 2)]
        assert run["nonfinite_batches"] == [{"net.1": 3, "net.3": 3}]
        (_, _, sites) = run["history"][0]
        assert not any(sites["net.1"][2]) and not any(sites["net.3"][2])  # never dead
        assert run["revived"] == []


def test_fsdp2_sharded_models_are_refused_before_anything_changes(runs: Path) -> None:
    for results in _load(runs, "fsdp2"):
        for warm in (False, True):
            for name, argument in (("rai_", "module"), ("sign_flip_", "model"), ("revive_dead_units_", "model")):
                message = results[f"{name}, warm={warm}"]
                pattern = rf"ValueError: `{name}` cannot write into `{argument}`: its parameters '0\.weight'.*FSDP2"
                assert re.match(pattern, message), message
            assert results[f"unchanged, warm={warm}"]
        assert re.match(r"ValueError: `DeadUnitReviver` cannot write into `pl_module`", results["reviver"])
        assert results["trained"] == "trained"


def test_fsdp2_a_tracker_built_before_the_first_forward_counts_exactly(runs: Path) -> None:
    ranks = _load(runs, "fsdp2_tracker")
    expected = {
        name: [sum(values) for values in zip(*(run["local"][name] for run in ranks), strict=True)]
        for name in ranks[0]["local"]
    }
    for run in ranks:
        assert run["counts"] == expected  # summed over both ranks, the functional site included
