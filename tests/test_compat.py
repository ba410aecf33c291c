"""``lightning_relu._compat`` against the installed torch and Lightning: each stand-in for a missing public API does
what the package needs of it (run in every supported environment). These tests reach into the privates on purpose:
they are what ``_compat`` depends on."""

from __future__ import annotations

import importlib.util
import inspect
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from lightning_relu._compat import (
    BATCH_NORM_TYPES,
    CONV_TYPES,
    deepspeed_master_linked,
    deepspeed_module_groups,
    deepspeed_zero3_flat_masters,
    deepspeed_zero3_partition,
    deepspeed_zero3_partitioned,
    fsdp2_forward_state,
    fsdp2_param_dtype,
    fsdp2_supported,
    is_compiled,
    is_forward_redirected,
    lightning_batches_run_in_epoch,
    lightning_batches_that_stepped,
    on_backward_end,
    restore_fsdp2_forward_state,
    restore_hooks,
    set_aside_hooks,
    stops_recomputation,
)
from lightning_relu.init import rai_, sign_flip_
from lightning_relu.stats import ActivationStats
from tests.helpers import mlp


class _Step(L.LightningModule):
    """Records, inside ``training_step`` and inside its own forward, whether it is seen as redirected."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 2)
        self.seen: list[tuple[str, bool]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(("forward", is_forward_redirected(self)))
        return self.layer(x)

    def training_step(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(("training_step", is_forward_redirected(self)))
        return self(x).sum()


class _Wrapper(nn.Module):
    """A strategy's wrapper (DDP's role): its forward calls the wrapped module's ``forward``, as it finds it."""

    def __init__(self, inner: _Step) -> None:
        super().__init__()
        self.inner = inner
        self.before_call: list[bool] = []

    def forward(self, x: torch.Tensor) -> Any:
        self.before_call.append(is_forward_redirected(self.inner))
        return self.inner(x)


def test_lightnings_forward_redirection_is_seen_while_it_is_in_place() -> None:
    """Lightning's ``_ForwardRedirection`` (how a strategy runs ``training_step`` through its wrapper): the model is
    redirected when the wrapper calls it, and no longer once the redirection runs ``training_step``."""
    from lightning.pytorch.strategies.strategy import _ForwardRedirection

    model = _Step()
    wrapper = _Wrapper(model)
    assert not is_forward_redirected(model)
    _ForwardRedirection()(wrapper, model, "training_step", torch.ones(1, 2))
    assert wrapper.before_call == [True]
    assert model.seen == [("training_step", False), ("forward", False)]
    assert not is_forward_redirected(model)


def test_fabrics_forward_redirection_is_seen_while_it_is_in_place() -> None:
    from lightning.fabric import Fabric

    model = _Step()
    fabric = Fabric(accelerator="cpu", devices=1)
    module = fabric.setup_module(model)
    wrapper = _Wrapper(model)
    module._forward_module = wrapper  # a strategy's wrapper, as DDP's would be
    assert "wrapped_forward" in inspect.getsource(type(module)._redirection_through_forward)
    module._redirection_through_forward("training_step")(torch.ones(1, 2))
    assert wrapper.before_call == [True]
    assert model.seen == [("training_step", False), ("forward", False)]


def test_a_plain_forward_or_a_user_method_named_otherwise_is_not_redirected() -> None:
    model = nn.Linear(2, 2)
    assert not is_forward_redirected(model)
    model.forward = lambda x: x  # type: ignore[method-assign]  # an instance forward, not Lightning's
    assert not is_forward_redirected(model)


def test_every_way_of_compiling_a_module_is_seen_and_nothing_is_compiled() -> None:
    """``torch.compile(module)``, ``module.compile()``, Lightning's ``from_compiled`` and a forward replaced by a
    compiled function. ``torch.compile`` compiles on the first call: none is made here."""
    from lightning.pytorch.utilities.compile import from_compiled

    plain = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    assert not any(is_compiled(m) for m in plain.modules())
    wrapped = torch.compile(plain)
    assert is_compiled(wrapped) and not is_compiled(plain)  # the wrapper, not the model it holds
    in_place = nn.Linear(2, 2)
    in_place.compile()
    assert is_compiled(in_place)
    lightning_module = from_compiled(torch.compile(_Step()))  # type: ignore[arg-type]
    assert is_compiled(lightning_module)
    replaced = nn.Linear(2, 2)
    replaced.forward = torch.compile(replaced.forward)  # type: ignore[method-assign]
    assert is_compiled(replaced)


def _public_subclasses(base: type) -> set[type]:
    """The classes of the public ``torch.nn`` namespace that subclass ``base``."""
    return {cls for cls in vars(nn).values() if isinstance(cls, type) and issubclass(cls, base)}


@pytest.mark.parametrize("gradient", ["backward", "autograd.grad"])
def test_a_callback_queued_in_a_backward_runs_once_when_that_backward_is_over(gradient: str) -> None:
    events: list[str] = []
    x = torch.randn(3, requires_grad=True)
    hidden = x * 2
    out = (hidden * 3).sum()

    def began(grad: torch.Tensor) -> None:
        events.append("hook")
        on_backward_end(lambda: events.append("end"))

    def later(grad: torch.Tensor) -> None:
        events.append("later")  # a gradient computed after the hook's, in the same backward

    out.register_hook(began)
    hidden.register_hook(later)
    if gradient == "backward":
        out.backward()
    else:
        torch.autograd.grad(out, x)
    assert events == ["hook", "later", "end"]
    (x * 4).sum().backward()  # a later backward runs nothing queued by the first
    assert events == ["hook", "later", "end"]


def test_a_recomputation_that_checkpointing_stops_early_raises_what_stops_recomputation_names() -> None:
    """Non-reentrant checkpointing ends a recomputation once the tensors the backward needs are back, by raising
    inside the recomputed forward: the error the module's forward sees there is the one named."""
    seen: list[BaseException] = []

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1, self.l2 = nn.Linear(3, 3), nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            try:
                return torch.relu(self.l2(torch.relu(self.l1(x)))) * 2
            except BaseException as error:
                seen.append(error)
                raise

    block = Block()
    out = torch.utils.checkpoint.checkpoint(block, torch.randn(2, 3, requires_grad=True), use_reentrant=False)
    out.sum().backward()
    assert seen and all(stops_recomputation(error) for error in seen)
    assert not stops_recomputation(ValueError("the model's own")) and not stops_recomputation(None)


class _Stepping(L.LightningModule):
    """One Linear; with ``manual``, manual optimization that steps on every other batch only."""

    def __init__(self, manual: bool) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.automatic_optimization = not manual
        self.counts: list[int | None] = []

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        loss = self.layer(batch[0]).pow(2).mean()
        if self.automatic_optimization:
            return loss
        self.manual_backward(loss)
        if batch_idx % 2:
            self.optimizers().step()  # type: ignore[union-attr]
        return None

    def on_train_epoch_end(self) -> None:
        self.counts.append(lightning_batches_that_stepped(self.trainer))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self) -> Any:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(10, 2)), batch_size=2)


@pytest.mark.parametrize(("manual", "accumulate", "per_epoch"), [(True, 1, 5), (False, 2, 3), (False, 1, 5)])
def test_lightnings_count_of_batches_that_stepped(
    tmp_path: Path, manual: bool, accumulate: int, per_epoch: int
) -> None:
    # 5 batches an epoch: under manual optimization every batch counts (whether it stepped or not); accumulating 2,
    # batches 2, 4 and the epoch's last step
    module = _Stepping(manual)
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=2,
        accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    assert module.counts == [per_epoch, 2 * per_epoch]
    assert lightning_batches_that_stepped(object()) is None


def test_the_public_conv_types_are_every_convolution_of_torch_nn() -> None:
    from torch.nn.modules.conv import _ConvNd

    public = _public_subclasses(_ConvNd)
    assert nn.Conv2d in public and nn.LazyConvTranspose3d in public  # the namespace is read right
    assert all(issubclass(cls, CONV_TYPES) for cls in public), public
    assert all(issubclass(cls, _ConvNd) for cls in CONV_TYPES)


def test_the_public_batch_norm_types_are_every_batch_norm_of_torch_nn() -> None:
    from torch.nn.modules.batchnorm import _BatchNorm

    public = _public_subclasses(_BatchNorm)
    assert nn.SyncBatchNorm in public and nn.LazyBatchNorm1d in public
    assert all(issubclass(cls, BATCH_NORM_TYPES) for cls in public), public
    assert all(issubclass(cls, _BatchNorm) for cls in BATCH_NORM_TYPES)
    assert not any(issubclass(cls, BATCH_NORM_TYPES) for cls in (nn.InstanceNorm1d, nn.LayerNorm, nn.GroupNorm))


def test_the_fan_in_rai_uses_is_torchs() -> None:
    """``rai_`` counts the fan-in as ``nn.init`` does (inputs times receptive field), without its private helper."""
    for shape in [(3, 5), (4, 3, 2), (6, 2, 3, 3), (2, 4, 1, 2, 3)]:
        weight = torch.empty(shape)
        fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
        assert weight.shape[1] * torch.Size(weight.shape[2:]).numel() == fan_in


def test_the_metrics_public_state_is_every_state_it_adds() -> None:
    """The monitor saves and merges ``ActivationStats`` through torchmetrics' public ``metric_state``: every state
    the metric adds, as tensors, counts folded in."""
    stats = ActivationStats(track_margin=True)
    stats.update(torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0]]))
    stats.update_margin(torch.tensor([[1.0, -1.0], [2.0, -1.0], [-3.0, -1.0]]))
    state = stats.metric_state
    keys = ["active", "entries", "samples", "killed", "nonfinite", "pre_sum_bits", "pre_sumsq_bits", "pre_entries"]
    assert sorted(state) == sorted(keys)
    assert all(isinstance(value, torch.Tensor) for value in state.values())
    assert state["active"].tolist() == [2, 0] and int(state["samples"]) == 3 and int(state["killed"]) == 1
    assert state["pre_sum_bits"].view(torch.float64).tolist() == [0.0, -3.0]
    assert sorted(ActivationStats().metric_state) == sorted(keys[:5])


# ------------------------------------------------------------------------------------------------------------ FSDP2


@pytest.fixture
def one_process_group() -> Iterator[None]:
    """A process group of this process alone (gloo), for ``fully_shard``; destroyed afterwards."""
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _sharded(seed: int = 0) -> nn.Sequential:
    """An MLP whose first Linear is an FSDP2 module of its own, and whose root holds the other Linears' parameters."""
    from torch.distributed.fsdp import fully_shard

    model = mlp([4, 8, 8, 2], seed=seed)
    fully_shard(model[0])
    return fully_shard(model)  # type: ignore[no-any-return]


def _records(module: nn.Module) -> list[tuple[int, int]]:
    """FSDP2's post-forward records of ``module``'s parameter groups (read here without the code under test)."""
    groups = module._get_fsdp_state()._fsdp_param_groups  # type: ignore[operator]
    return [(len(g._post_forward_indices), len(getattr(g.comm_ctx, "post_forward_order", []))) for g in groups]


def _resharded(model: nn.Module) -> list[bool]:
    """Which of ``model``'s registered parameters are shards (``DTensor`` s) rather than full tensors."""
    from torch.distributed.tensor import DTensor

    return [isinstance(p, DTensor) for m in model.modules() for _, p in m.named_parameters(recurse=False)]


def test_the_fsdp2_forward_state_reads_the_public_setting_and_what_it_puts_back_behaves_as_untouched(
    one_process_group: None,
) -> None:
    """The state read before a call that turns resharding off and makes forwards of its own is put back: the setting
    and the records as they were, and the model then reshards, records and trains as a twin that never saw the call
    (a root found by the call's forward follows FSDP2's rule: no resharding after its forward)."""
    from torch.distributed.fsdp import FSDPModule

    model, twin = _sharded(), _sharded()
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    assert len(modules) == 2 and all(fsdp2_supported(m) for m in modules)
    assert not fsdp2_supported(nn.Linear(2, 2))
    saved = [fsdp2_forward_state(m) for m in modules]
    assert [(s.auto, s.was_root) for s in saved] == [(True, None), (True, None)]  # before the first forward
    assert all(info is not None for s in saved for info in s.infos)
    records = [_records(m) for m in modules]

    # the call: resharding off (public), forwards of its own
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    for module in modules:
        module.set_reshard_after_forward(False, recurse=False)  # type: ignore[operator]
        module.unshard()  # type: ignore[operator]
    off = [fsdp2_forward_state(m) for m in modules]
    assert [s.auto for s in off] == [False, False] and all(info is None for s in off for info in s.infos)
    model(x).sum()
    model(x).sum()
    assert not any(_resharded(model))  # the setting held through the forwards
    assert [_records(m) for m in modules] != records  # the forwards were recorded
    for module, state in zip(modules, saved, strict=True):
        module.reshard()  # type: ignore[operator]
        restore_fsdp2_forward_state(module, state)

    assert [_records(m) for m in modules] == records
    after = [fsdp2_forward_state(m) for m in modules]
    assert [(s.auto, s.was_root) for s in after] == [(True, True), (True, False)]
    assert after[0].infos == [None] and after[1].infos == saved[1].infos
    twin(x)
    model(x)
    assert _resharded(model) == _resharded(twin) == [True, True, False, False, False, False]
    twin(x).sum().backward()
    model(x).sum().backward()
    grads = [p.grad.full_tensor() for p in model.parameters()]  # type: ignore[union-attr]
    want = [p.grad.full_tensor() for p in twin.parameters()]  # type: ignore[union-attr]
    assert all(torch.equal(a, b) for a, b in zip(grads, want, strict=True))


def test_the_fsdp2_param_dtype_is_the_dtype_fsdp2_gathers_in(one_process_group: None) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    for policy, want in [(None, None), (MixedPrecisionPolicy(param_dtype=torch.bfloat16), torch.bfloat16)]:
        layer = nn.Linear(4, 4)
        fully_shard(layer, **({} if policy is None else {"mp_policy": policy}))
        assert fsdp2_param_dtype(layer) == want
        layer.unshard()  # type: ignore[operator]
        layer(torch.ones(1, 4))  # the unsharded parameters are registered by the forward's pre-hook
        assert layer.weight.dtype == (want or torch.float32)


# ------------------------------------------------------------------------------------------------------------ hooks


def _hooked(calls: list[str]) -> tuple[nn.Sequential, list[Any]]:
    """A model with hooks of every kind on its layers, each recording its name in ``calls``; half of them chosen."""
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.ReLU(), nn.Linear(2, 1)))
    chosen: list[Any] = []

    def hook(name: str, pick: bool) -> Callable[..., None]:
        def record(*args: Any, **kwargs: Any) -> None:
            calls.append(name)

        if pick:
            chosen.append(record)
        return record

    for i, layer in enumerate([model[0], model[1], model[1][1]]):
        layer.register_forward_pre_hook(hook(f"pre{i}a", i != 1))
        layer.register_forward_pre_hook(hook(f"pre{i}b", False), with_kwargs=True)
        layer.register_forward_hook(hook(f"fwd{i}a", False), always_call=True)
        layer.register_forward_hook(hook(f"fwd{i}b", True), with_kwargs=True)
        layer.register_full_backward_pre_hook(hook(f"bpre{i}", i == 0))
        layer.register_full_backward_hook(hook(f"bwd{i}", i == 2))
    return model, chosen


def test_hooks_set_aside_do_not_run_and_come_back_in_their_order() -> None:
    calls: list[str] = []
    model, chosen = _hooked(calls)
    x = torch.ones(3, 2, requires_grad=True)
    model(x).sum().backward()
    everything = list(calls)
    assert len(everything) == 18  # every hook ran once

    saved = set_aside_hooks(model, lambda hook: any(hook is c for c in chosen))
    calls.clear()
    model(x).sum().backward()
    picked = {"pre0a", "pre2a", "fwd0b", "fwd1b", "fwd2b", "bpre0", "bwd2"}
    assert calls == [name for name in everything if name not in picked]

    restore_hooks(saved)
    calls.clear()
    model(x).sum().backward()
    assert calls == everything


def test_setting_aside_nothing_changes_nothing() -> None:
    calls: list[str] = []
    model, _ = _hooked(calls)
    assert set_aside_hooks(model, lambda hook: False) == []


# -------------------------------------------------------------------------------------------------------- DeepSpeed

#: The hook dictionaries of an ``nn.Module`` (read here without the code under test)
HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def _deepspeed_process(rank: int, port: int, path: str) -> None:
    """One DeepSpeed process on the CPU: what the DeepSpeed stand-ins see of a ZeRO-1 and a ZeRO-3 engine, against
    what DeepSpeed's public accessors and the inner torch optimizer say."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", DS_ACCELERATOR="cpu"
    )
    import deepspeed
    import deepspeed.ops

    # no shared-memory all-reduce op to compile (see tests/faults/test_deepspeed.py)
    deepspeed.ops.__compatible_ops__ = {**deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm": False}
    deepspeed.init_distributed(dist_backend="gloo")
    from deepspeed.utils import safe_get_local_fp32_param

    from lightning_relu._engines import _is_deepspeeds

    results: dict[str, Any] = {}
    for stage in (1, 3):
        model = mlp([4, 8, 1], seed=0)
        zero = {"stage": stage, "memory_efficient_linear": False}
        config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": zero, "zero_allow_untested_optimizer": True}
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        engine, wrapper, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        engine.backward(engine(torch.ones(2, 4)).sum())
        engine.step()  # the inner optimizer now holds momentum for what it steps
        module, inner = engine.module, wrapper.optimizer
        params = list(module.parameters())
        results[f"linked {stage}"] = [deepspeed_master_linked(p) for p in params]
        results[f"partitioned {stage}"] = [deepspeed_zero3_partitioned(p) for p in params]
        groups = deepspeed_module_groups(wrapper)
        index = {id(p): i for i, p in enumerate(params)}
        results[f"groups {stage}"] = None if groups is None else [[index.get(id(p)) for p in g] for g in groups]
        results[f"inner groups {stage}"] = len(inner.param_groups)
        flats = deepspeed_zero3_flat_masters(wrapper)
        held = None if flats is None else [any(flat is key for key in inner.state) for flat in flats]
        results[f"flats held {stage}"] = held
        if stage == 3:
            partitions = [deepspeed_zero3_partition(p) for p in params]
            results["partitions"] = [
                (part.numel() == safe_get_local_fp32_param(p).numel(), dist.get_world_size(group))
                for p, (part, group) in zip(params, partitions, strict=True)
            ]
        hooks = [(m, name, dict(getattr(m, name))) for m in module.modules() for name in HOOK_DICTS]
        saved = set_aside_hooks(module, _is_deepspeeds)
        left = [hook for m, name, _ in hooks for hook in getattr(m, name).values()]
        results[f"taken {stage}"] = sum(len(before) for _, _, before in hooks) - len(left)
        results[f"deepspeed's left {stage}"] = sum(_is_deepspeeds(hook) for hook in left)
        restore_hooks(saved)
        results[f"restored {stage}"] = all(
            list(getattr(m, name).items()) == list(before.items()) for m, name, before in hooks
        )
    results["plain linked"] = deepspeed_master_linked(nn.Parameter(torch.ones(1)))
    torch.save(results, Path(path) / "deepspeed.pt")
    dist.destroy_process_group()


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_deepspeeds_marks_groups_partitions_and_hooks_are_seen(tmp_path: Path) -> None:
    """On a ZeRO-1 engine every parameter is linked to a master (a plain one is not) and the optimizer's group holds
    them all; on a ZeRO-3 engine every parameter is partitioned, its partition is the one DeepSpeed's public accessor
    gives, the inner optimizer steps the flat masters, and DeepSpeed's hooks on the module are all set aside and put
    back as they were (in a process of its own: DeepSpeed patches torch)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_deepspeed_process, args=(port, str(tmp_path)), nprocs=1)
    results = torch.load(tmp_path / "deepspeed.pt", weights_only=False)
    assert results["linked 1"] == [True] * 4 and results["linked 3"] == [False] * 4 and not results["plain linked"]
    assert results["partitioned 1"] == [False] * 4 and results["partitioned 3"] == [True] * 4
    assert results["groups 1"] == [[0, 1, 2, 3]] and results["inner groups 1"] == 1 and results["groups 3"] is None
    assert results["flats held 1"] is None and results["flats held 3"] == [True]
    assert results["partitions"] == [(True, 1)] * 4
    assert results["taken 3"] > 0 and results["deepspeed's left 3"] == 0 and results["restored 3"]
    assert results["deepspeed's left 1"] == 0 and results["restored 1"]


class _Peek(L.Callback):
    def __init__(self) -> None:
        self.seen: list[tuple[int, int | None]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seen.append((trainer.current_epoch, lightning_batches_run_in_epoch(trainer)))


def test_lightnings_count_of_the_epochs_batches_run_before_a_resume(tmp_path: Path) -> None:
    # 5 batches an epoch; checkpoints after steps 2 and 7 (inside epochs 0 and 1) and at each epoch's end
    settings: dict[str, Any] = dict(
        default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    every = L.pytorch.callbacks.ModelCheckpoint(tmp_path / "step", every_n_train_steps=1, save_top_k=-1)
    ends = L.pytorch.callbacks.ModelCheckpoint(tmp_path / "end", save_top_k=-1, filename="{epoch}")
    peek = _Peek()
    L.Trainer(max_epochs=2, callbacks=[every, ends, peek], **settings).fit(_Stepping(False))
    assert peek.seen == [(0, 0)]  # a fresh fit
    cases = {
        "step/epoch=0-step=2.ckpt": (0, 2),
        "step/epoch=1-step=7.ckpt": (1, 2),
        "step/epoch=0-step=5.ckpt": (1, 0),  # on the last batch, before the epoch's end: resumes with the next epoch
        "end/epoch=0.ckpt": (1, 0),
    }
    for path, expected in cases.items():
        peek = _Peek()
        L.Trainer(max_epochs=3, callbacks=[peek], enable_checkpointing=False, **settings).fit(
            _Stepping(False), ckpt_path=str(tmp_path / path)
        )
        assert peek.seen == [expected], path
    assert lightning_batches_run_in_epoch(object()) is None


class _Validated(_Stepping):
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("v", self.layer(batch[0]).mean())

    def val_dataloader(self) -> Any:
        return self.train_dataloader()


def test_lightnings_count_of_the_epochs_batches_at_a_validation_on_the_last_batch(tmp_path: Path) -> None:
    # `val_check_interval=0.5` validates after batches 2 and 4 of 4: a checkpoint saved by the last validation resumes
    # in the same epoch (Lightning then ends it at once), with all 4 of its batches run before the checkpoint
    settings: dict[str, Any] = dict(
        default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_train_batches=4, limit_val_batches=1, val_check_interval=0.5,
    )  # fmt: skip
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(tmp_path / "val", save_top_k=-1, filename="{epoch}-{step}")
    L.Trainer(max_epochs=1, callbacks=[checkpoint], **settings).fit(_Validated(False))
    for name, expected in {"epoch=0-step=2.ckpt": (0, 2), "epoch=0-step=4.ckpt": (0, 4)}.items():
        peek = _Peek()
        L.Trainer(max_epochs=2, callbacks=[peek], enable_checkpointing=False, **settings).fit(
            _Validated(False), ckpt_path=str(tmp_path / "val" / name)
        )
        assert peek.seen == [expected], name


def test_fsdp2_initializers_leave_frozen_layers_with_skip_frozen(one_process_group: None) -> None:
    """`sign_flip_(skip_frozen=True)` on an FSDP2 model negated its frozen first layer (the keyword was not passed
    through the write-through); `rai_` left it, as without FSDP2."""
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    model[0].requires_grad_(False)
    with torch.no_grad():
        model[0].bias.fill_(-1.0)  # most samples killed at the first site: a flip would be tried
    for index in (0, 2, 4):
        fully_shard(model[index])
    fully_shard(model)

    def full() -> dict[str, torch.Tensor]:
        return {k: getattr(v, "full_tensor", lambda v=v: v)().detach().clone() for k, v in model.state_dict().items()}

    before, x = full(), torch.rand(16, 4)
    with pytest.warns(RuntimeWarning, match="left 1 frozen layer"):
        rai_(model, generator=torch.Generator().manual_seed(0), example_input=x, skip_frozen=True)
    reports = sign_flip_(model, x, skip_frozen=True)
    after = full()
    assert all(torch.equal(before[k], after[k]) for k in ("0.weight", "0.bias"))
    assert not reports["1"].flipped and "frozen" in reports["1"].reason
