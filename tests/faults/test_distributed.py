"""Faults on 2 CPU processes (gloo), started once per part for the whole module (a start costs more than the work;
each part's process groups go down with its processes):

- exact resume under DDP, from the middle of an epoch and from its last batch: every rank gets the uninterrupted
  fit's reports, revivals and weights (issue 20, item 2). The processes run the three fits one after the other with
  Lightning's ``ddp`` strategy, launched externally as ``torchrun`` would;
- FSDP2 (``fully_shard``, issue 20, item 5): ``rai_``, ``sign_flip_`` and ``revive_dead_units_`` on a sharded model,
  each rank with data of its own, give every rank the weights, revival counts and optimizer state (Adam moments of
  the revived rows and columns reset) of one process on rank 0's data, before the first forward and after training;
  a call failing on one rank changes nothing and hangs no rank; what cannot be written through (mixed precision,
  DTensors that FSDP2 does not manage) is refused before anything changes. A fit under Lightning's
  ``ModelParallelStrategy`` (``configure_model`` calls ``fully_shard``) with ``ReluInitializer("rai+sign_flip")`` and
  ``DeadUnitMonitor(revive=...)`` ends with the weights and revivals of the same fit on one process.
"""

from __future__ import annotations

import gc
import os
import re
import socket
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_relu import (
    DeadUnitMonitor,
    DeadUnitReviver,
    DeadUnitTracker,
    ReluInitializer,
    rai_,
    revive_dead_units_,
    sign_flip_,
)
from tests.faults.engines import averaged_step, error_of
from tests.faults.models import Dump, Net, alike_batches, summary, trainer
from tests.helpers import conv_bn_net, kill_units, mlp

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


WIDTHS = [4, 8, 8, 1]
LR = 0.01


def _inputs(rank: int) -> torch.Tensor:
    """Each rank's samples (they differ: rank 0's decide what the initializers and revival do)."""
    return torch.randn(16, 4, generator=torch.Generator().manual_seed(rank))


def _loss(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (model(x) - 1.0).pow(2).mean()


def _shift_(model: torch.nn.Module) -> None:
    """Push the pre-activations down, so that `sign_flip_` has something to flip."""
    with torch.no_grad():
        model[0].bias.sub_(1.0)
        model[2].bias.sub_(1.0)


def _kill_(model: torch.nn.Module, index: int = 0) -> None:
    """Units 1 and 2 of the layer at `index` die (after training: their optimizer state is not zero)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        bias = model[index].bias
        full = bias.full_tensor() if isinstance(bias, DTensor) else bias.detach().clone()
        full[[1, 2]] = -1e4
        bias.copy_(distribute_tensor(full, bias.device_mesh, bias.placements) if isinstance(bias, DTensor) else full)


def _full(tensor: Any) -> torch.Tensor:
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


def _fsdp2_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {
        "params": [_full(p) for p in model.parameters()],
        "state": [{key: _full(v) for key, v in optimizer.state[p].items()} for p in model.parameters()],
    }


def _shard(model: torch.nn.Module, **options: Any) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, **options)
    return fully_shard(model, **options)


def _fsdp2(rank: int) -> dict[str, Any]:
    """The initializers and revival on a model sharded by FSDP2, each rank with data of its own; what the test compares
    with one process on rank 0's data."""
    x = _inputs(rank)
    model = _shard(mlp(WIDTHS, seed=0))
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    results: dict[str, Any] = {}
    rai_(model, generator=torch.Generator().manual_seed(0))  # before the first forward (FSDP2's lazy init pending)
    results["rai_"] = [_full(p) for p in model.parameters()]
    _shift_(model)
    flips = sign_flip_(model, x)
    results["sign_flip_"] = ({name: r.flipped for name, r in flips.items()}, [_full(p) for p in model.parameters()])
    for _ in range(2):
        _loss(model, x).backward()
        optimizer.step()
        optimizer.zero_grad()
    _kill_(model)
    results["trained"] = _fsdp2_state(model, optimizer)
    with DeadUnitTracker(model) as tracker, torch.no_grad():
        model(x)
    report = tracker.report()
    results["counts"] = {name: r.active_count.tolist() for name, r in report.items()}
    generator = torch.Generator().manual_seed(0)
    results["revived"] = revive_dead_units_(model, report, optimizer, generator, example_input=x)
    results["after revival"] = _fsdp2_state(model, optimizer)
    _loss(model, x).backward()
    optimizer.step()
    optimizer.zero_grad()
    results["stepped"] = _fsdp2_state(model, optimizer)

    # a call failing on one rank only, after rank 0 redrew every producer: no rank waits for the other, none keeps
    # anything
    before = [p.to_local().clone() for p in model.parameters()]
    generator: Any = torch.Generator().manual_seed(1) if rank == 0 else "a seed"
    results["one rank fails"] = error_of(lambda: rai_(model, generator=generator))
    results["unchanged after the failure"] = all(
        torch.equal(a, p.to_local()) for a, p in zip(before, model.parameters(), strict=True)
    )
    _loss(model, x).backward()  # training goes on
    optimizer.step()

    results["refused"] = _fsdp2_refusals(report, x)
    results["conv"] = _fsdp2_conv(_shard_whole(conv_bn_net(seed=0)))
    return results


def _shard_whole(model: torch.nn.Module) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    return fully_shard(model)


def _fsdp2_conv(model: torch.nn.Module) -> dict[str, Any]:
    """Revival of a conv/batch-norm net after one SGD step with momentum: norm entries, batch-norm running statistics
    (buffers, which FSDP2 does not shard) and consumer channels reset. Every rank reads the same images (the running
    statistics each rank updates from its own batch would differ otherwise)."""
    x = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    _loss(model, x).backward()
    optimizer.step()
    optimizer.zero_grad()
    _kill_(model, 1)  # the first batch norm's bias
    with DeadUnitTracker(model) as tracker, torch.no_grad():
        model(x)
    report = tracker.report()
    before = [_full(b) for b in model.buffers()]
    if dist.is_initialized():  # rank 0 revives (and sets running statistics), rank 1 fails: nothing may remain
        init: Any = "default" if dist.get_rank() == 0 else "unknown"
        failure = error_of(lambda: revive_dead_units_(model, report, optimizer, init=init, example_input=x))
        kept = all(torch.equal(a, _full(b)) for a, b in zip(before, model.buffers(), strict=True))
    revived = revive_dead_units_(model, report, optimizer, torch.Generator().manual_seed(0), example_input=x)
    results = {
        "revived": revived,
        **_fsdp2_state(model, optimizer),
        "buffers": [_full(b) for b in model.buffers()],
        "buffers before": before,
    }
    if dist.is_initialized():
        results.update(failure=failure, kept=kept)
    return results


def _fsdp2_refusals(report: Any, x: torch.Tensor) -> dict[str, Any]:
    """What the write-through does not support is refused before anything changes: mixed precision that gathers in
    another dtype than the shards', and DTensors that FSDP2 does not manage (tensor parallelism)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.distributed.tensor import Replicate, distribute_tensor

    mixed = _shard(mlp(WIDTHS, seed=0), mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    tensor_parallel = mlp(WIDTHS, seed=0)
    mesh = init_device_mesh("cpu", (2,))
    tensor_parallel[0].weight = torch.nn.Parameter(
        distribute_tensor(tensor_parallel[0].weight.detach(), mesh, [Replicate()])
    )
    return {"mixed": _fsdp2_refused(mixed, report, x), "tensor parallel": _fsdp2_refused(tensor_parallel, report, x)}


def _fsdp2_refused(model: torch.nn.Module, report: Any, x: torch.Tensor) -> dict[str, Any]:
    before = [_full(p) for p in model.parameters()]
    results = {
        "rai_": error_of(lambda: rai_(model, generator=torch.Generator().manual_seed(0))),
        "sign_flip_": error_of(lambda: sign_flip_(model, x)),
        "revive_dead_units_": error_of(lambda: revive_dead_units_(model, report, example_input=x)),
        "DeadUnitReviver": error_of(lambda: DeadUnitReviver().on_fit_start(None, model)),  # type: ignore[arg-type]
    }
    results["unchanged"] = all(torch.equal(a, _full(p)) for a, p in zip(before, model.parameters(), strict=True))
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


class _ShardedNet(Net):
    """`Net` (dead units, SGD with momentum) sharded by FSDP2 in `configure_model` when the strategy has a device mesh
    (`ModelParallelStrategy`); whole on one process (the reference)."""

    def configure_model(self) -> None:
        if self.device_mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


class _KillAfterInit(Callback):
    """Units 1 and 2 of the second layer die once the initializer ran (RAI redraws the dead units `Net` starts with)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _kill_(pl_module.net, 2)


class _FullDump(Callback):
    """Each rank's initializer decisions, revivals and full weights at the end of the fit."""

    def __init__(self, path: str, monitor: DeadUnitMonitor, initializer: ReluInitializer) -> None:
        self.path, self.monitor, self.initializer = path, monitor, initializer

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state = {
            "rai_layers": list(self.initializer.rai_layers),
            "flipped": {name: r.flipped for name, r in self.initializer.report.items()},
            "history": summary(self.monitor.history),
            "revived": [dict(entry["revived"]) for entry in self.monitor.reviver.history],
            "params": {key: _full(value) for key, value in pl_module.state_dict().items()},
        }
        torch.save(state, f"{self.path}_rank{trainer.global_rank}.pt")


def _sharded_fit(root: Path, name: str, **strategy: Any) -> None:
    """A fit with `ReluInitializer("rai+sign_flip")` and revival after each epoch; every rank reads the same batches."""
    initializer = ReluInitializer("rai+sign_flip", seed=0)
    monitor = DeadUnitMonitor(revive=DeadUnitReviver(seed=0))
    callbacks = [initializer, _KillAfterInit(), monitor, _FullDump(str(root / name), monitor, initializer)]
    fit = trainer(root, callbacks, limit_train_batches=4, max_epochs=2, use_distributed_sampler=False, **strategy)
    fit.fit(_ShardedNet(alike_batches(8, seed=1), lr=0.1))


class _PerRankNet(L.LightningModule):
    """Replicas whose own state differs between the ranks: each rank reads data of its own (feature 0 spread 10 on
    rank 0, 0.01 on rank 1), which BatchNorm's running statistics keep (momentum 1), and draws dropout from a
    generator seeded by its rank. Unit 0 of the norm's site (beta -3: a normalized batch of 8 stays below 2.47) and
    units 0-2 of the site after the dropout (bias -100) are dead; lr = 0, so only revival changes the weights."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(2, 4),
            torch.nn.BatchNorm1d(4, momentum=1.0),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.5),
            torch.nn.Linear(4, 4),
            torch.nn.ReLU(),
            torch.nn.Linear(4, 1),
        )
        with torch.no_grad():
            self.net[0].weight.zero_()
            self.net[0].weight[0, 0] = 1.0
            self.net[0].weight[1:, 1] = 1.0
            self.net[1].bias[0] = -3.0
            self.net[4].bias[:3] = -100.0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.net(batch[0]).pow(2).mean()

    def on_train_start(self) -> None:
        torch.manual_seed(1234 + self.trainer.global_rank)  # a common pattern: each rank's own random stream

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0, momentum=0.9)

    def train_dataloader(self) -> Any:
        rank = self.trainer.global_rank
        x = torch.randn(80, 2, generator=torch.Generator().manual_seed(rank))
        x[:, 0] *= 10.0 if rank == 0 else 0.01
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=8)


def _ddp(rank: int, path: Path) -> None:
    monitor = DeadUnitMonitor(revive=DeadUnitReviver(seed=3))
    fit = trainer(path, [monitor, Dump(str(path / "per_rank"), monitor)], strategy="ddp", devices=2, max_epochs=1)
    fit.fit(_PerRankNet())
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


def _fsdp2_calls(rank: int, path: Path) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.save(_fsdp2(rank), path / f"fsdp2_rank{rank}.pt")
    torch.save(_fsdp2_tracker(rank), path / f"fsdp2_tracker_rank{rank}.pt")
    torch.save(_agree(rank), path / f"agree_rank{rank}.pt")


def _agree(rank: int) -> dict[str, Any]:
    """`agree_with_rank_zero` on replicas that differ: a channels-last convolution, a BatchNorm (an integer buffer),
    SGD with momentum; then on optimizers whose state differs between the ranks."""
    from lightning_relu._engines import agree_with_rank_zero

    torch.manual_seed(rank)  # every tensor differs between the ranks
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 5, 5).to(memory_format=torch.channels_last)).sum().backward()
    optimizer.step()
    model[1].num_batches_tracked.fill_(rank + 1)
    assert not model[0].weight.is_contiguous()
    agreed = agree_with_rank_zero(model, [optimizer])
    state = {key: value.clone() for key, value in model.state_dict().items()}
    momentum = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    # rank 1's optimizer holds no state: the parameters still agree, the optimizer state is left, with a warning
    other = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if rank == 0:
        other.state = optimizer.state
    with torch.no_grad():
        model[0].weight.add_(rank)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        agree_with_rank_zero(model, [other])
    return {
        "agreed": agreed,
        "state": state,
        "momentum": momentum,
        "weight after the second": model[0].weight.detach().clone(),
        "warned": [str(w.message) for w in caught],
    }


def _model_parallel(rank: int, path: Path) -> None:
    _sharded_fit(
        path, "model_parallel", strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), devices=2
    )


def _rank(rank: int, port: int, root: str, part: str) -> None:
    # what torchrun sets: Lightning's strategies join the processes instead of launching them
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", NODE_RANK="0", LOCAL_RANK=str(rank)
    )
    {"ddp": _ddp, "fsdp2": _fsdp2_calls, "model_parallel": _model_parallel}[part](rank, Path(root))
    # what holds gloo work (DDP's reducer, the trainers) is freed and every group (the default one, the device meshes'
    # subgroups) goes down while the interpreter is whole: gloo work left to interpreter exit aborts the process now
    # and then ("terminate called without an active exception")
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three parts run in processes of their own: a part's process groups and device meshes do not outlive it."""
    root = tmp_path_factory.mktemp("distributed")
    for part in ("ddp", "fsdp2", "model_parallel"):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        mp.spawn(_rank, args=(port, str(root), part), nprocs=2)
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


def test_ddp_revival_leaves_the_replicas_identical_when_their_own_state_differs(runs: Path) -> None:
    """Every rank revives on rank 0's example, but read its own BatchNorm statistics (which decided on each rank
    whether a unit is alive in evaluation mode) and its own dropout draws (in the calibration passes): the
    replicas came out different (up to 1.7 apart) and DDP never made them equal again. Rank 0's result now goes to
    every rank: parameters, buffers and optimizer state."""
    zero, one = _load(runs, "per_rank")
    assert zero["revived"] == one["revived"] and sum(zero["revived"][0].values()) >= 3
    for key, value in zero["params"].items():
        assert torch.equal(one["params"][key], value), key


def test_replicas_agree_with_rank_zero_whatever_their_layout_and_optimizer_state(runs: Path) -> None:
    zero, one = _load(runs, "agree")
    assert zero["agreed"] and one["agreed"]
    for key, value in zero["state"].items():
        assert torch.equal(one["state"][key], value), key
    assert all(torch.equal(a, b) for a, b in zip(zero["momentum"], one["momentum"], strict=True))
    assert torch.equal(one["weight after the second"], zero["weight after the second"])
    assert zero["warned"] == one["warned"] and "optimizer state was left" in one["warned"][0]


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


def _fsdp2_reference() -> dict[str, Any]:
    """What `_fsdp2` does, on one process with rank 0's data; the training steps on both ranks' losses averaged (as
    FSDP2 averages the gradients)."""
    xs = [_inputs(0), _inputs(1)]
    model = mlp(WIDTHS, seed=0)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    step = averaged_step(model, optimizer, _loss, xs)

    results: dict[str, Any] = {}
    rai_(model, generator=torch.Generator().manual_seed(0))
    results["rai_"] = [_full(p) for p in model.parameters()]
    _shift_(model)
    flips = sign_flip_(model, xs[0])
    results["sign_flip_"] = ({name: r.flipped for name, r in flips.items()}, [_full(p) for p in model.parameters()])
    step()
    step()
    _kill_(model)
    results["trained"] = _fsdp2_state(model, optimizer)
    with DeadUnitTracker(model) as tracker, torch.no_grad():
        model(xs[0])
        model(xs[1])
    report = tracker.report()
    results["counts"] = {name: r.active_count.tolist() for name, r in report.items()}
    generator = torch.Generator().manual_seed(0)
    results["revived"] = revive_dead_units_(model, report, optimizer, generator, example_input=xs[0])
    results["after revival"] = _fsdp2_state(model, optimizer)
    step()
    results["stepped"] = _fsdp2_state(model, optimizer)
    return results


def _assert_close_states(got: dict[str, Any], want: dict[str, Any]) -> None:
    for a, b in zip(got["params"], want["params"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(got["state"], want["state"], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_fsdp2_initializers_and_revival_give_one_process_result_on_every_rank(runs: Path) -> None:
    reference = _fsdp2_reference()
    flips, _ = reference["sign_flip_"]
    assert any(flips.values())  # the setup has something to flip
    assert reference["revived"]["1"] == 2
    # revival resets state that training made: the touched rows and columns had moments before
    trained = reference["trained"]["state"]
    assert all(bool(trained[i]["exp_avg"][[1, 2]].ne(0).all()) for i in (0, 1))  # first layer's rows and biases
    assert bool(trained[2]["exp_avg"][:, [1, 2]].ne(0).all())  # the consumer's columns
    revived = reference["after revival"]["state"]
    assert all(bool(revived[i][key][[1, 2]].eq(0).all()) for i in (0, 1) for key in ("exp_avg", "exp_avg_sq"))
    assert all(bool(revived[2][key][:, [1, 2]].eq(0).all()) for key in ("exp_avg", "exp_avg_sq"))
    conv = _fsdp2_conv(conv_bn_net(seed=0))
    assert conv["revived"]["2"] >= 2  # the killed channels
    # revival sets the running statistics of the revived channels (to the held batch's), and only theirs
    changed = conv["buffers"][0].ne(conv["buffers before"][0])
    assert changed.tolist() == [unit in (1, 2) for unit in range(6)]
    for run in _load(runs, "fsdp2"):
        for got, want in zip(run["rai_"], reference["rai_"], strict=True):
            assert torch.equal(got, want)  # before the first forward
        assert run["sign_flip_"][0] == flips
        for got, want in zip(run["sign_flip_"][1], reference["sign_flip_"][1], strict=True):
            assert torch.equal(got, want)  # rank 1's data decided nothing
        _assert_close_states(run["trained"], reference["trained"])
        assert run["counts"] == reference["counts"]
        assert run["revived"] == reference["revived"]
        _assert_close_states(run["after revival"], reference["after revival"])
        _assert_close_states(run["stepped"], reference["stepped"])  # the revived units stay revived
        assert run["conv"]["revived"] == conv["revived"]
        assert run["conv"]["kept"]  # rank 0's running statistics of the failed revival did not stay
        _assert_close_states(run["conv"], conv)
        for got, want in zip(run["conv"]["buffers"], conv["buffers"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fsdp2_a_call_failing_on_one_rank_changes_nothing_and_hangs_no_rank(runs: Path) -> None:
    rank0, rank1 = _load(runs, "fsdp2")
    assert rank0["conv"]["failure"].startswith("RuntimeError: `revive_dead_units_` failed on another rank")
    assert rank1["conv"]["failure"].startswith("ValueError: `init` can be 'default', 'kaiming', 'rai', got 'unknown'")
    assert rank0["one rank fails"] == (
        "RuntimeError: `rai_` failed on another rank, so no rank changed `module` (FSDP2 shards)."
    )
    assert rank1["one rank fails"] == "ValueError: `generator` must be a `torch.Generator` or None, got 'a seed'"
    assert rank0["unchanged after the failure"] and rank1["unchanged after the failure"]


def test_fsdp2_what_cannot_be_written_through_is_refused_before_anything_changes(runs: Path) -> None:
    why = {
        "mixed": r"FSDP2 all-gathers its parameters in torch\.bfloat16 \(a mixed precision policy, `param_dtype`\) "
        r"while the shards are torch\.float32",
        "tensor parallel": r"its parameters '0\.weight' \(1 in all\) are DTensors that no FSDP2 module "
        r"\(`fully_shard`\) within `\w+` manages \(tensor parallelism",
    }
    for run in _load(runs, "fsdp2"):
        for model, results in run["refused"].items():
            for name, argument in (
                ("rai_", "module"),
                ("sign_flip_", "model"),
                ("revive_dead_units_", "model"),
                ("DeadUnitReviver", "pl_module"),
            ):
                pattern = rf"ValueError: `{name}` cannot write into `{argument}`: {why[model]}.*Nothing was changed"
                assert re.match(pattern, results[name]), results[name]
            assert results["unchanged"]


def test_model_parallel_fit_initializes_and_revives_as_one_process(runs: Path, tmp_path: Path) -> None:
    _sharded_fit(tmp_path, "one", devices=1)
    reference = torch.load(tmp_path / "one_rank0.pt", weights_only=False)
    assert reference["rai_layers"] == ["net.0", "net.2"]
    assert reference["revived"][0]["net.3"] >= 2  # the units killed after the initializer, at least
    # both ranks read the same batches: the counts over both are twice one process's
    doubled = [
        (
            epoch,
            step,
            {name: ([2 * c for c in counts], 2 * samples, dead) for name, (counts, samples, dead) in s.items()},
        )
        for epoch, step, s in reference["history"]
    ]
    for run in _load(runs, "model_parallel"):
        assert run["rai_layers"] == reference["rai_layers"]
        assert run["flipped"] == reference["flipped"]
        assert run["history"] == doubled
        assert run["revived"] == reference["revived"]
        assert run["params"].keys() == reference["params"].keys()
        for key, value in reference["params"].items():
            torch.testing.assert_close(run["params"][key], value, rtol=1e-5, atol=1e-6)


def test_fsdp2_a_tracker_built_before_the_first_forward_counts_exactly(runs: Path) -> None:
    ranks = _load(runs, "fsdp2_tracker")
    expected = {
        name: [sum(values) for values in zip(*(run["local"][name] for run in ranks), strict=True)]
        for name in ranks[0]["local"]
    }
    for run in ranks:
        assert run["counts"] == expected  # summed over both ranks, the functional site included
