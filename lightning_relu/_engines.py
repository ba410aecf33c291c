"""Writing the initializers and revival through FSDP2 shards and DeepSpeed's master weights, on every rank alike.

FSDP2 (``torch.distributed.fsdp.fully_shard``) holds each parameter as a ``DTensor`` shard, and its optimizer state
as shards alike. :func:`rai_`, :func:`sign_flip_` and :func:`revive_dead_units_` read whole weights, write rows,
columns and single entries, and run forwards whose output they check. Under FSDP2 they run as on one process:

1. every FSDP module of the model is unsharded (FSDP2's own ``unshard``, an all-gather) and kept unsharded through
   the forwards the function makes (``reshard_after_forward`` off for the call): the module holds plain full
   tensors, which the function reads, writes and runs forwards with;
2. the optimizer state of the sharded parameters is gathered (``DTensor.full_tensor()``) into stand-in optimizers
   that hold the full parameters, so revival resets the state of the touched rows and columns as on one process;
3. afterwards every full parameter and state tensor goes back into its shard, scattered from rank 0
   (``distribute_tensor(..., src_data_rank=0)``), the buffers are broadcast from rank 0, the modules are resharded,
   and FSDP2's reshard setting and post-forward records are put back as they were.

DeepSpeed's ZeRO stages 1 and 2 (and its bf16 optimizer) keep the module's parameters whole, each linked to an fp32
master fragment; the function acts on the module, and the changed entries go into the masters and the gathered
optimizer state back into the optimizer's partitions through DeepSpeed's public accessors (see :class:`_DeepSpeed`).
ZeRO-3 partitions the parameters themselves: they are gathered for the call, DeepSpeed's module hooks set aside, and
the masters and state go back partition by partition (see :class:`_Zero3`).

Rank 0's arguments decide: ranks called with different data all end with what rank 0 computed, and get rank 0's
return value. Every rank must make the call (the gathers are collectives). A call that fails on any rank changes
nothing on any rank: every rank keeps its weights and raises. What cannot be written through is refused before
anything changes: parameters that stay ``DTensor`` s once unsharded (tensor parallelism, strided shards), FSDP2 mixed
precision that all-gathers in another dtype than the shards' (writing back would round them), a torch whose FSDP2
lacks what this relies on, ZeRO-3 while DeepSpeed's ``memory_efficient_linear`` has replaced
``torch.nn.functional.linear`` (the rest of DeepSpeed's refusals are in :mod:`lightning_relu._sharded`). Neither
``torch.distributed.tensor``, FSDP nor ``deepspeed`` is imported here before a model holding their objects is seen
(``sys.modules``).

Memory: every rank holds the full parameters and the full optimizer state of the model for the call's duration.

What this relies on of FSDP2, DeepSpeed and ``nn.Module`` beyond their public APIs (FSDP2's reshard setting and
post-forward records, its mixed precision policy, how DeepSpeed marks, partitions and groups the parameters, the
module's hook dictionaries) is in :mod:`lightning_relu._compat`.
"""

from __future__ import annotations

import sys
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_relu._compat import (
    Fsdp2ForwardState,
    SetAsideHooks,
    deepspeed_master_linked,
    deepspeed_module_groups,
    deepspeed_zero3_flat_masters,
    deepspeed_zero3_partition,
    deepspeed_zero3_partitioned,
    fsdp2_forward_state,
    fsdp2_param_dtype,
    fsdp2_supported,
    restore_fsdp2_forward_state,
    restore_hooks,
    set_aside_hooks,
)

__all__ = ["WriteThrough", "agree_with_rank_zero", "deepspeed_write_through", "fsdp2_write_through"]

R = TypeVar("R")

_LOCAL = threading.local()  # how deep this thread is inside write-through calls


def inside_write_through() -> bool:
    """Whether this thread runs a function on an engine's unsharded model (the function then acts on it as it is)."""
    return getattr(_LOCAL, "depth", 0) > 0


@contextmanager
def _inside() -> Iterator[None]:
    _LOCAL.depth = getattr(_LOCAL, "depth", 0) + 1
    try:
        yield
    finally:
        _LOCAL.depth -= 1


def _dtensor_class() -> Any:
    return getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)


def _fsdp_module_class() -> type | None:
    return getattr(sys.modules.get("torch.distributed.fsdp"), "FSDPModule", None)


_MIXED = (
    "FSDP2 all-gathers its parameters in {gathered} (a mixed precision policy, `param_dtype`) while the shards are "
    "{stored}: writing the full tensors back would round the shards"
)


def _shown(names: list[str]) -> str:
    return ", ".join(repr(name) for name in names[:3]) + (", ..." if len(names) > 3 else "")


class WriteThrough:
    """Runs a function of (model, optimizers) on a model whose weights an engine holds, and writes its changes
    through (see the module's docstring). Subclasses say how to enter (what model and optimizers the function gets),
    commit (write back) and exit."""

    function: str
    argument: str
    holder: str  # what holds the weights, for the messages

    def run(
        self,
        call: Callable[[nn.Module, list[Any]], R],
        optimizer: Any = None,
        *,
        share_result: bool = False,
    ) -> R:
        """``call(model, optimizers)`` on what :meth:`_enter` gives, then written back on every rank when it succeeded
        on every rank; with ``share_result``, every rank returns rank 0's result."""
        import torch.distributed as dist

        outcome: list[Any] = [None]
        ok = committed = False
        # buffers are the module's own (no engine shards them): what the call changes in them goes back on failure
        buffers = [(buffer, buffer.detach().clone()) for buffer in self._root().buffers()]
        try:
            model, optimizers = self._enter(_listed(optimizer))
            with _inside():
                outcome[0] = call(model, optimizers)
            ok = True
        finally:
            # every rank writes back only when every rank succeeded (a collective each; none waits for the other)
            distributed = dist.is_available() and dist.is_initialized()
            failed = torch.tensor([0 if ok else 1], device=_flag_device(distributed))
            if distributed:
                dist.all_reduce(failed, op=dist.ReduceOp.MAX)
            try:
                if ok and int(failed) == 0:
                    committed = True
                    with torch.no_grad():
                        self._commit()
                    if share_result and distributed:
                        dist.broadcast_object_list(outcome, src=0)
            finally:
                if not committed:
                    with torch.no_grad():
                        for buffer, saved in buffers:
                            buffer.copy_(saved)
                self._exit(committed)
        if int(failed):
            raise RuntimeError(
                f"`{self.function}` failed on another rank, so no rank changed `{self.argument}` ({self.holder})."
            )
        return outcome[0]  # type: ignore[no-any-return]

    def _root(self) -> nn.Module:
        """The module the function gets (its buffers are saved for a failure)."""
        raise NotImplementedError

    def _enter(self, optimizers: list[Any]) -> tuple[nn.Module, list[Any]]:
        raise NotImplementedError

    def _commit(self) -> None:
        raise NotImplementedError

    def _exit(self, committed: bool) -> None:
        """Always called, after :meth:`_commit` or instead of it (then nothing the call did may remain)."""
        raise NotImplementedError


def _flag_device(distributed: bool) -> torch.device:
    """Where a tensor for the default process group must be (NCCL reduces CUDA tensors only)."""
    import torch.distributed as dist

    if distributed and "nccl" in str(dist.get_backend()) and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@dataclass(eq=False)
class _Sharded:
    """One sharded parameter: where FSDP2 registers it, the ``DTensor`` shard, and (unsharded) its full tensor."""

    module: nn.Module
    name: str
    shard: Any  # a DTensor
    full: Tensor | None = None


@dataclass(eq=False)
class _Stand:
    """A stand-in optimizer holding the full parameters and their gathered state, and what goes back where."""

    optimizer: Optimizer
    writes: list[tuple[Any, Tensor]] = field(default_factory=list)  # (DTensor state value, its full tensor)


class _Fsdp2(WriteThrough):
    holder = "FSDP2 shards"

    def __init__(self, model: nn.Module, function: str, argument: str) -> None:
        self.model = model
        self.function = function
        self.argument = argument
        self._settings: list[Fsdp2ForwardState] = []
        self._stands: list[_Stand] = []
        dtensor, fsdp_module = _dtensor_class(), _fsdp_module_class()
        self.modules = [m for m in model.modules() if fsdp_module is not None and isinstance(m, fsdp_module)]
        for module in self.modules:
            # a root left unsharded by a forward without backward (FSDP2 does not reshard a root after its forward)
            # registers its full tensors: the shards are what the call writes into (the values are the same)
            module.reshard()  # type: ignore[operator]
        self.params = [
            _Sharded(module, name, param)
            for module in model.modules()
            for name, param in module.named_parameters(recurse=False, remove_duplicate=False)
            if dtensor is not None and isinstance(param, dtensor)
        ]
        self._check()

    # --------------------------------------------------------------------------------------------- refusals
    def _refuse(self, why: str) -> ValueError:
        return ValueError(
            f"`{self.function}` cannot write into `{self.argument}`: {why}. Nothing was changed. Initialize the model "
            "before sharding it (in `configure_model`, before `fully_shard`), and train without revival there."
        )

    def _check(self) -> None:
        names = {id(param): name for name, param in self.model.named_parameters()}
        managed = {id(param) for module in self.modules for param in module.parameters()}
        outside = [names.get(id(p.shard), p.name) for p in self.params if id(p.shard) not in managed]
        if outside:
            raise self._refuse(
                f"its parameters {_shown(outside)} ({len(outside)} in all) are DTensors that no FSDP2 module "
                f"(`fully_shard`) within `{self.argument}` manages (tensor parallelism, or a module around it "
                "sharded: pass that one), which it does not support"
            )
        from torch.distributed.tensor import Replicate, Shard

        odd = [p for p in self.params if any(type(place) not in (Shard, Replicate) for place in p.shard.placements)]
        if odd:
            shown = _shown([names.get(id(p.shard), p.name) for p in odd])
            raise self._refuse(
                f"its parameters {shown} ({len(odd)} in all) are DTensors placed as {list(odd[0].shard.placements)} "
                "(FSDP2 with tensor parallelism?), which it does not support"
            )
        for module in self.modules:
            if not fsdp2_supported(module):
                raise self._refuse(
                    f"this version of torch ({torch.__version__}) has an FSDP2 whose reshard-after-forward setting "
                    "it cannot keep off for the call"
                )
            gathered = fsdp2_param_dtype(module)
            stored = {param.dtype for param in module.parameters()}
            if gathered is not None and stored - {gathered}:
                raise self._refuse(
                    _MIXED.format(gathered=gathered, stored=", ".join(map(str, sorted(stored, key=str))))
                )

    # ------------------------------------------------------------------------------------------------- run
    def _enter(self, optimizers: list[Any]) -> tuple[nn.Module, list[Any]]:
        self._settings = [fsdp2_forward_state(module) for module in self.modules]
        for module in self.modules:
            module.set_reshard_after_forward(False, recurse=False)  # type: ignore[operator]
            module.unshard()  # type: ignore[operator]
        for param in self.params:
            full = dict(param.module.named_parameters(recurse=False, remove_duplicate=False)).get(param.name)
            if full is None or isinstance(full, _dtensor_class() or ()) or full.shape != param.shard.shape:
                raise self._refuse(f"FSDP2 did not unshard {param.name!r} into a full tensor")
            if full.dtype != param.shard.dtype:
                raise self._refuse(_MIXED.format(gathered=full.dtype, stored=param.shard.dtype))
            param.full = full
        self._stands = self._stand_ins(optimizers)
        return self.model, [stand.optimizer for stand in self._stands] + optimizers[len(self._stands) :]

    def _root(self) -> nn.Module:
        return self.model

    def _exit(self, committed: bool) -> None:
        # the full tensors are freed: without a commit the shards keep their values
        for module, setting in zip(self.modules, self._settings, strict=False):  # fewer: failed before any change
            module.reshard()  # type: ignore[operator]
            restore_fsdp2_forward_state(module, setting)

    def _stand_ins(self, optimizers: list[Any]) -> list[_Stand]:
        """Stand-ins for the leading torch optimizers: the full parameters, their state gathered (every rank the
        same order: parameters as the groups list them, keys sorted)."""
        import torch.distributed as dist

        dtensor = _dtensor_class()
        full_of = {id(p.shard): p.full for p in self.params}
        stands: list[_Stand] = []
        for optimizer in optimizers:
            if not isinstance(optimizer, Optimizer):
                break  # the function's own check says what is wrong with it
            proxy = object.__new__(type(optimizer))
            proxy.__dict__.update(optimizer.__dict__)
            proxy.param_groups = [
                {**group, "params": [full_of.get(id(p), p) for p in group["params"]]}
                for group in optimizer.param_groups
            ]
            listed = [param for group in optimizer.param_groups for param in group["params"]]
            held_by = [
                (index, param, optimizer.state[param])
                for index, param in enumerate(listed)
                if id(param) in full_of and optimizer.state.get(param)
            ]
            if dist.is_initialized():  # state on some ranks only would leave the others waiting in the gathers
                signature = [(index, sorted(map(str, held))) for index, _, held in held_by]
                everyone: list[Any] = [None] * dist.get_world_size()
                dist.all_gather_object(everyone, signature)
                if any(other != signature for other in everyone):
                    raise self._refuse("the optimizer's state differs between the ranks (steps taken on some only)")
            stand = _Stand(proxy)
            state: defaultdict[Tensor, dict[str, Any]] = defaultdict(dict)
            for _, param, held in held_by:
                gathered: dict[str, Any] = {}
                for key in sorted(held, key=str):
                    value = held[key]
                    if dtensor is not None and isinstance(value, dtensor):
                        gathered[key] = value.full_tensor()  # a collective: every rank, the same order
                        stand.writes.append((value, gathered[key]))
                    else:
                        gathered[key] = value
                state[full_of[id(param)]] = gathered  # type: ignore[index]
            for param, held in optimizer.state.items():
                if id(param) not in full_of:
                    state[param] = held
            proxy.state = state
            stands.append(stand)
        return stands

    def _commit(self) -> None:
        import torch.distributed as dist
        from torch.distributed.tensor import distribute_tensor

        pairs = [(p.shard, p.full) for p in self.params] + [pair for s in self._stands for pair in s.writes]
        for shard, full in pairs:
            assert full is not None
            scattered = distribute_tensor(full.detach(), shard.device_mesh, shard.placements, src_data_rank=0)
            shard.to_local().copy_(scattered.to_local())
        if dist.is_initialized():
            for buffer in self.model.buffers():
                dist.broadcast(buffer, src=0)


class _DeepSpeed(WriteThrough):
    """ZeRO stages 1 and 2 (and DeepSpeed's bf16 optimizer): the module's parameters are whole, each linked to an fp32
    master fragment in the optimizer of the rank that owns it, and ``engine.step()`` copies the masters over them.
    The function acts on the module; afterwards every rank takes rank 0's parameters and buffers, each changed entry
    goes into the fp32 masters (``safe_set_full_fp32_param``; unchanged entries keep their fp32 values, so a bf16 or
    fp16 module rounds nothing), and the optimizer state of a DeepSpeed optimizer, gathered for the call
    (``safe_get_full_optimizer_state``) into a stand-in torch optimizer over the module's parameters, goes back with
    ``safe_set_full_optimizer_state``."""

    holder = "DeepSpeed's fp32 master weights"

    def __init__(self, module: nn.Module, function: str, argument: str) -> None:
        self.module = module
        self.function = function
        self.argument = argument
        self.params = [param for param in module.parameters() if self._held(param)]
        self._before: list[Tensor] = []
        self._states: list[tuple[Tensor, str, Tensor]] = []  # (module parameter, state key, its full state)

    @staticmethod
    def _held(param: Tensor) -> bool:
        """Whether DeepSpeed holds ``param`` the way this write-through writes into."""
        return deepspeed_master_linked(param)

    def _enter(self, optimizers: list[Any]) -> tuple[nn.Module, list[Any]]:
        self._before = [param.detach().clone() for param in self.params]
        self._states = []
        return self.module, [self._stand_in(optimizer) for optimizer in optimizers]

    def _stand_in(self, optimizer: Any) -> Any:
        """A torch optimizer of the DeepSpeed optimizer's inner kind over the module's parameters, holding their full
        fp32 state (every rank the same order: groups, parameters, keys sorted); other optimizers as they are."""

        inner = getattr(optimizer, "optimizer", None)
        lp_groups = deepspeed_module_groups(optimizer)
        if isinstance(optimizer, Optimizer) or not isinstance(inner, Optimizer) or lp_groups is None:
            return optimizer  # a torch optimizer, or one the function's own checks refuse
        if len(lp_groups) != len(inner.param_groups):
            raise self._refuse("its DeepSpeed optimizer's parameter groups do not match its inner optimizer's")
        groups = []
        for group, params in zip(inner.param_groups, lp_groups, strict=True):
            flat = group["params"][0]
            held = inner.state.get(flat, {})
            keys = sorted(k for k, v in held.items() if isinstance(v, Tensor) and v.shape == flat.shape)
            groups.append((group, params, keys))
        return self._gathered_stand_in(inner, groups)

    def _gathered_stand_in(self, inner: Optimizer, groups: list[tuple[dict[str, Any], list[Any], list[str]]]) -> Any:
        """A torch optimizer of ``inner``'s kind over the module's parameters (per group: ``inner``'s options, the
        parameters, the state keys), holding their full fp32 state, gathered in the same order on every rank."""
        from deepspeed.utils import safe_get_full_optimizer_state  # type: ignore[import-untyped, unused-ignore]

        stand = object.__new__(type(inner))
        stand.__dict__.update(inner.__dict__)
        stand.param_groups = [{**options, "params": params} for options, params, _ in groups]
        state: defaultdict[Tensor, dict[str, Any]] = defaultdict(dict)
        for _, params, keys in groups:
            for param in params:
                for key in keys:
                    full = safe_get_full_optimizer_state(param, key)  # a collective: every rank calls it
                    state[param][key] = full
                    self._states.append((param, key, full))
        stand.state = state
        return stand

    def _refuse(self, why: str) -> ValueError:
        return ValueError(f"`{self.function}` cannot write into `{self.argument}`: {why}. Nothing was changed.")

    def _commit(self) -> None:
        import torch.distributed as dist
        from deepspeed.utils import (  # type: ignore[import-untyped, unused-ignore]
            safe_get_full_fp32_param,
            safe_set_full_fp32_param,
            safe_set_full_optimizer_state,
        )

        distributed = dist.is_initialized()
        if distributed:  # rank 0's result everywhere (the masters are set from each rank's copy)
            for tensor in [*self.module.parameters(), *self.module.buffers()]:
                dist.broadcast(tensor.data, src=0)
        for param, before in zip(self.params, self._before, strict=True):
            master = safe_get_full_fp32_param(param)  # a collective: every rank calls it
            value = param.detach()
            safe_set_full_fp32_param(param, torch.where(value != before, value.to(master.dtype), master))
        for owner, key, full in self._states:
            if distributed:
                dist.broadcast(full, src=0)
            safe_set_full_optimizer_state(owner, full, key)

    def _root(self) -> nn.Module:
        return self.module

    def _exit(self, committed: bool) -> None:
        if not committed:  # the module's parameters as they were (the masters were not touched)
            with torch.no_grad():
                for param, before in zip(self.params, self._before, strict=False):
                    param.copy_(before)
        self._before, self._states = [], []


class _Zero3(_DeepSpeed):
    """ZeRO stage 3: the parameters themselves are partitioned (``ds_tensor``) beside fp32 master partitions. For the
    call the parameters are gathered (``deepspeed.zero.GatheredParameters(modifier_rank=0)``: on exit rank 0's values
    are partitioned again) and DeepSpeed's forward hooks on the module are set aside (they would release the
    gathered parameters after each forward the function makes); the fp32 masters and the optimizer state go back
    partition by partition (``safe_set_local_fp32_param``, ``safe_set_local_optimizer_state``: the full setters of
    DeepSpeed 0.19.8 fail on a padded partition)."""

    holder = "DeepSpeed ZeRO-3 partitions"

    @staticmethod
    def _held(param: Tensor) -> bool:
        return deepspeed_zero3_partitioned(param)

    def __init__(self, module: nn.Module, function: str, argument: str) -> None:
        super().__init__(module, function, argument)
        self._gathered: Any = None
        self._hooks: SetAsideHooks = []
        self._committed = False

    def _enter(self, optimizers: list[Any]) -> tuple[nn.Module, list[Any]]:
        import deepspeed  # type: ignore[import-untyped, unused-ignore]

        stands = [self._stand_in(optimizer) for optimizer in optimizers]  # gathers: before the parameters'
        self._committed = False
        self._gathered = deepspeed.zero.GatheredParameters(self.params, modifier_rank=0)
        self._gathered.__enter__()
        self._before = [param.detach().clone() for param in self.params]
        self._hooks = set_aside_hooks(self.module, _is_deepspeeds)
        return self.module, stands

    def _stand_in(self, optimizer: Any) -> Any:

        inner = getattr(optimizer, "optimizer", None)
        flats = deepspeed_zero3_flat_masters(optimizer)
        if isinstance(optimizer, Optimizer) or not isinstance(inner, Optimizer) or flats is None:
            return optimizer  # a torch optimizer, or one the function's own checks refuse
        keys = sorted(
            {
                k
                for flat in flats
                for k, v in inner.state.get(flat, {}).items()
                if isinstance(v, Tensor) and v.shape == flat.shape
            }
        )
        trainable = [param for param in self.params if param.requires_grad]
        return self._gathered_stand_in(inner, [(inner.param_groups[0], trainable, keys)])

    def _commit(self) -> None:
        import torch.distributed as dist
        from deepspeed.utils import (  # type: ignore[import-untyped, unused-ignore]
            safe_get_full_fp32_param,
            safe_set_local_fp32_param,
            safe_set_local_optimizer_state,
        )

        values = [param.detach().clone() for param in self.params]
        restore_hooks(self._hooks)
        self._hooks = []
        self._gathered.__exit__(None, None, None)  # rank 0's values into every rank's partition
        self._committed = True
        distributed = dist.is_initialized()
        for param, value, before in zip(self.params, values, self._before, strict=True):
            if distributed:
                dist.broadcast(value, src=0)
            if not param.requires_grad:
                continue
            master = safe_get_full_fp32_param(param)  # a collective: every rank calls it
            merged = torch.where(value != before, value.to(master.dtype), master)
            safe_set_local_fp32_param(param, _local_partition(param, merged))
        for owner, key, full in self._states:
            if distributed:
                dist.broadcast(full, src=0)
            safe_set_local_optimizer_state(owner, _local_partition(owner, full), key)

    def _exit(self, committed: bool) -> None:
        restore_hooks(self._hooks)
        self._hooks = []
        if self._gathered is not None and not self._committed:
            with torch.no_grad():  # nothing may change: rank 0's parameters as they were go back into the partitions
                for param, before in zip(self.params, self._before, strict=False):
                    param.data.copy_(before)
            self._gathered.__exit__(None, None, None)
        self._gathered, self._before, self._states = None, [], []


def _local_partition(param: Any, full: Tensor) -> Tensor:
    """This rank's partition of ``full`` for a ZeRO-3 parameter: its slice of the flat tensor, padded with zeros to the
    partition's size (the last rank's may reach past the end)."""
    import torch.distributed as dist

    partition, group = deepspeed_zero3_partition(param)
    size = partition.numel()
    rank = dist.get_rank(group=group) if dist.is_initialized() else 0
    flat = full.detach().reshape(-1)
    local = flat[rank * size : (rank + 1) * size]
    return torch.cat([local, local.new_zeros(size - local.numel())]) if local.numel() < size else local


def _is_deepspeeds(hook: Any) -> bool:
    """Whether a module hook is DeepSpeed's (ZeRO-3 gathers and releases the parameters in its forward hooks)."""
    return getattr(hook, "__module__", "").startswith("deepspeed")


def deepspeed_write_through(module: nn.Module, function: str, argument: str) -> WriteThrough | None:
    """How ``function`` writes into ``module`` (a DeepSpeed engine's module) if DeepSpeed's ZeRO stage 1 or 2 or its
    bf16 optimizer links its parameters to fp32 masters (``None`` otherwise, and inside a write-through call: ZeRO-3
    partitions and other DeepSpeed set-ups are for the caller to refuse)."""
    if inside_write_through() or "deepspeed" not in sys.modules:
        return None
    params = list(module.parameters())
    if any(deepspeed_zero3_partitioned(param) for param in params):
        return _Zero3(module, function, argument) if _zero3_supported(module) else None
    if not any(deepspeed_master_linked(p) for p in params):
        return None
    return _DeepSpeed(module, function, argument)


def _zero3_supported(module: nn.Module) -> bool:
    """Whether ZeRO-3 can be written through here: every parameter partitioned, and `torch.nn.functional.linear` not
    replaced by DeepSpeed's (`memory_efficient_linear`, on by default), which hides the Linear producers from the
    observed forward."""
    linear = torch.nn.functional.linear
    return all(deepspeed_zero3_partitioned(p) for p in module.parameters()) and not getattr(
        linear, "__module__", ""
    ).startswith("deepspeed")


def _listed(optimizer: Any) -> list[Any]:
    if optimizer is None:
        return []
    if isinstance(optimizer, Optimizer):
        return [optimizer]
    if isinstance(optimizer, Iterable) and not isinstance(optimizer, (str, bytes)):
        return list(optimizer)
    return [optimizer]


def fsdp2_write_through(model: nn.Module, function: str, argument: str) -> WriteThrough | None:
    """How ``function`` writes into ``model`` if FSDP2 shards it (``None`` otherwise, and inside a write-through
    call); ``ValueError`` naming the function, the argument and the reason for a sharding it cannot write through."""
    if inside_write_through() or not isinstance(model, nn.Module):
        return None
    dtensor, fsdp_module = _dtensor_class(), _fsdp_module_class()
    sharded = fsdp_module is not None and any(isinstance(module, fsdp_module) for module in model.modules())
    if not sharded and (dtensor is None or not any(isinstance(param, dtensor) for param in model.parameters())):
        return None
    return _Fsdp2(model, function, argument)


def agree_with_rank_zero(module: nn.Module, optimizers: Iterable[Any]) -> bool:
    """Give every process rank 0's parameters, buffers and optimizer state of ``module``, a replica on every rank (as
    under DDP), after a change made on every rank; whether they were shared (``False`` outside a process group of
    several ranks, where there is nothing to agree on).

    Why: revival runs the same surgery on every rank from rank 0's example, and can still come out differently per
    rank: BatchNorm running statistics gathered from each rank's own data (DDP only broadcasts them at the next
    forward) decide which units are alive in evaluation mode, and dropout during the calibration passes draws from
    each rank's generator. DDP never makes parameters equal again, so replicas would drift apart for the rest of the
    fit. Optimizer state is shared where it has a parameter's shape (what revival resets); when the ranks do not hold
    the same such state (the same keys and shapes), parameters and buffers are still shared and a ``RuntimeWarning``
    says the optimizer state was left alone.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return False
    states: list[Tensor] = []
    signature: list[tuple[int, int, str, tuple[int, ...]]] = []
    for o, optimizer in enumerate(optimizers):
        if not isinstance(optimizer, Optimizer):
            continue
        params = [param for group in optimizer.param_groups for param in group["params"]]
        for index, param in enumerate(params):
            held = optimizer.state.get(param, {})
            for key in sorted(held, key=str):
                value = held[key]
                if isinstance(value, Tensor) and value.shape == param.shape:
                    states.append(value)
                    signature.append((o, index, str(key), tuple(value.shape)))
    theirs: list[Any] = [signature]
    dist.broadcast_object_list(theirs, src=0)
    differs = torch.tensor([int(theirs[0] != signature)], device=_flag_device(True))
    dist.all_reduce(differs, op=dist.ReduceOp.MAX)
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            dist.broadcast(tensor.data, src=0)
        if int(differs) == 0:
            for state in states:
                dist.broadcast(state, src=0)
    if int(differs):
        import warnings

        warnings.warn(
            "The ranks hold different optimizer state for the revived model: its parameters and buffers were made "
            "rank 0's, its optimizer state was left as each rank holds it.",
            RuntimeWarning,
            stacklevel=2,
        )
    return True
