"""Every reliance of the package on something torch, Lightning or DeepSpeed do not document, in one place.

Each function here stands in for a public API that does not exist yet; its docstring says why the package needs it
and what public API would replace it. ``tests/test_compat.py`` checks each against the installed versions (run it in
every supported environment): when one of them breaks, the test says which, and this module is the one to change.
The rest of the package uses public APIs only.

Also here, because they replace the private base classes ``torch.nn.modules.conv._ConvNd`` and
``torch.nn.modules.batchnorm._BatchNorm``: the public classes that stand for them (a test checks that every
convolution and batch norm of ``torch.nn`` is one of them).

The write-through of the initializers and revival (:mod:`lightning_relu._engines`) needs more: what FSDP2 keeps of a
module's forward (:func:`fsdp2_forward_state` and its companions, :func:`fsdp2_param_dtype`), how DeepSpeed holds a
model's parameters (linked to fp32 masters, or partitioned by ZeRO-3) and its optimizer's groups (the ``deepspeed_*``
functions), and setting a module's hooks aside for a while (:func:`set_aside_hooks`). None of them imports FSDP or
DeepSpeed: they read the objects they are given. DeepSpeed's documented accessors (``deepspeed.utils.safe_*``,
``deepspeed.zero.GatheredParameters``) are used where they are needed, not here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

import torch
import torch.utils.checkpoint
from torch import nn

__all__ = [
    "BATCH_NORM_TYPES",
    "CONV_TYPES",
    "Fsdp2ForwardState",
    "SetAsideHooks",
    "deepspeed_master_linked",
    "deepspeed_module_groups",
    "deepspeed_zero3_flat_masters",
    "deepspeed_zero3_partition",
    "deepspeed_zero3_partitioned",
    "fsdp2_forward_state",
    "fsdp2_param_dtype",
    "fsdp2_supported",
    "is_compiled",
    "is_forward_redirected",
    "lightning_batches_run_in_epoch",
    "lightning_batches_that_stepped",
    "on_backward_end",
    "restore_fsdp2_forward_state",
    "restore_hooks",
    "set_aside_hooks",
]

#: The convolutions of ``torch.nn`` (their lazy forms are subclasses), in place of the private ``_ConvNd``.
CONV_TYPES = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)

#: The batch norms of ``torch.nn`` with running statistics, in place of the private ``_BatchNorm`` (the lazy forms
#: are not subclasses of the others until their first forward).
BATCH_NORM_TYPES = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
)


def is_forward_redirected(module: nn.Module) -> bool:
    """Whether ``module``'s ``forward`` is swapped, for this call, for another of its methods by Lightning's or
    Fabric's forward redirection.

    Why: under strategies that wrap the model (DDP, FSDP, DeepSpeed), Lightning runs ``training_step`` through the
    wrapper by setting an instance attribute ``forward`` on the LightningModule, a function named
    ``wrapped_forward`` (``lightning.pytorch.strategies.strategy._ForwardRedirection``, and
    ``lightning.fabric.wrappers._FabricModule`` for Fabric), which calls the method and then puts the original
    ``forward`` back. The hooks of such a call see a "forward" of the model that is really ``training_step``: it is
    not a forward of the model (the real one runs inside it), and the tracker must not count it as one.

    Replaced by: a public marker of a redirected call in Lightning (none in Lightning 2.x). ``tests/test_compat.py``
    runs Lightning's own redirection and checks this function sees it.
    """
    forward = module.__dict__.get("forward")
    return forward is not None and getattr(forward, "__name__", "") == "wrapped_forward"


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` is, or holds, a forward compiled by ``torch.compile``: the wrapper ``torch.compile(model)``
    returns (an ``OptimizedModule`` holding the model as ``_orig_mod``), a module after ``module.compile()`` (its
    ``_compiled_call_impl``), a LightningModule compiled through Lightning (its ``_compiler_ctx``), or a module
    whose ``forward`` was replaced by a compiled function (``_torchdynamo_orig_callable``).

    Why: a compiled forward runs no Python of the model's modules, so a forward of it cannot be watched for the
    rectifier calls it makes; the tracker says so instead of reporting nothing.

    Replaced by: a public "is this module compiled" query in ``torch.compiler`` (none in torch 2.x: the
    ``OptimizedModule`` class lives in the private ``torch._dynamo.eval_frame``). ``tests/test_compat.py``
    compiles a module each of these ways (without running it: no compiler runs) and checks this function sees it.
    """
    if type(module).__name__ == "OptimizedModule" and isinstance(getattr(module, "_orig_mod", None), nn.Module):
        return True
    if isinstance(module.__dict__.get("_compiler_ctx"), dict):  # Lightning's record of a compiled LightningModule
        return True
    if module.__dict__.get("_compiled_call_impl") is not None:  # `module.compile()`
        return True
    return hasattr(module.__dict__.get("forward"), "_torchdynamo_orig_callable")


def lightning_batches_that_stepped(trainer: Any) -> int | None:
    """The training batches of the fit so far after which the optimizers stepped (every batch under manual
    optimization; with gradient accumulation, those that ended an accumulation), as Lightning counts them; None
    when the trainer does not say.

    Why: Lightning logs a training epoch's epoch-level metrics (``self.log(..., on_epoch=True)``) at this count minus
    one, not at ``global_step - 1``: the two differ under manual optimization (``global_step`` counts every
    optimizer's steps: two per batch with two optimizers, none in a batch that does not step). The monitor logs
    its report at the same step, so that a CSV row or a TensorBoard point lines up with the epoch's losses.
    Lightning's own ``LearningRateMonitor`` and ``DeviceStatsMonitor`` read the same attribute
    (``trainer.fit_loop.epoch_loop._batches_that_stepped``, private).

    Replaced by: a public step of epoch-level logging on the Trainer (none in Lightning 2.x).
    ``tests/test_compat.py`` fits under manual optimization with two optimizers and compares with the step of a
    metric logged with ``on_epoch=True``.
    """
    count = getattr(getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None), "_batches_that_stepped", None)
    return count if _is_int(count) else None


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def lightning_batches_run_in_epoch(trainer: Any) -> int | None:
    """The training batches of the current epoch whose step ran, as Lightning counts them (restored from a
    checkpoint when a fit resumes in the middle of an epoch; 0 at the start of an epoch); None when the trainer does
    not say.

    Why: a fit resumed from a checkpoint that holds no state of the monitor (saved without it, or by one watching
    other sites) must know that the epoch it resumes lacks the counts of the batches run before the checkpoint,
    so that it reports that epoch as partial rather than whole.

    Replaced by: a public count of the epoch's batches on the Trainer (none in Lightning 2.x; the loop's
    ``batch_progress`` is an attribute of a private class). ``tests/test_compat.py`` resumes a fit from checkpoints
    saved at several steps and compares with the batches that ran before each.
    """
    fit_loop = getattr(trainer, "fit_loop", None)
    progress = getattr(getattr(fit_loop, "epoch_loop", None), "batch_progress", None)
    count = getattr(getattr(progress, "current", None), "processed", None)
    started = getattr(getattr(getattr(fit_loop, "epoch_progress", None), "current", None), "started", None)
    epoch = getattr(trainer, "current_epoch", None)
    if not (_is_int(count) and _is_int(started) and _is_int(epoch)):
        return None
    # the batch count belongs to the epoch started last (`started - 1`): a checkpoint saved at an epoch's end, or on
    # its last batch by a step-based checkpoint, resumes with the next epoch before that count is reset; one saved by
    # the validation run on the last batch (`val_check_interval`) resumes in the same epoch, all of its batches run
    return count if started - 1 == epoch else 0


def on_backward_end(callback: Callable[[], None]) -> None:
    """Run ``callback`` once the backward pass that is running now (a call of autograd's engine) is over; called from
    a gradient hook, which runs inside that pass.

    Why: the tracker must not count again the forwards that activation checkpointing recomputes inside a backward
    pass, and must count every forward after it, such as a second forward of a submodule in the same training step
    (a GAN's discriminator after the generator's backward, the boundary term of a physics-informed loss after
    ``torch.autograd.grad``). A gradient hook on the model's output says when a backward reaches it; only the engine
    says when that backward is over. This queues the callback with the engine, as DDP and FSDP do for their
    end-of-backward work (``Variable._execution_engine.queue_callback``, a private attribute of ``torch.autograd``).

    Replaced by: a public end-of-backward hook in ``torch.autograd`` (none in torch 2.x). ``tests/test_compat.py``
    runs a backward and ``torch.autograd.grad`` and checks the callback runs once, at the end of each.
    """
    torch.autograd.Variable._execution_engine.queue_callback(callback)


def stops_recomputation(error: BaseException | None) -> bool:
    """Whether ``error`` is what ``torch.utils.checkpoint`` raises inside a recomputed forward to end it early (the
    non-reentrant variant, once every tensor the backward needs is recomputed): not the model's error.

    Why: the tracker's discovery of functional rectifiers takes a forward that raises for a failed step and watches
    the next step again; a recomputation stopped early is not one. The class is private
    (``torch.utils.checkpoint._StopRecomputationError``). Replaced by: none in torch 2.x. ``tests/test_compat.py``
    checks that a recomputation stopped early raises it.
    """
    stop = getattr(torch.utils.checkpoint, "_StopRecomputationError", None)
    return isinstance(stop, type) and isinstance(error, stop)


# ------------------------------------------------------------------------------------------------------------ FSDP2
# ``fully_shard`` keeps a module's settings and records in an ``FSDPState`` (``module._get_fsdp_state()``) that holds
# one ``FSDPParamGroup`` per group of parameters (``state._fsdp_param_groups``); both classes live in the private
# ``torch.distributed.fsdp._fully_shard``. ``FSDPModule`` offers ``unshard``, ``reshard`` and
# ``set_reshard_after_forward`` in public, but no getter of what the latter sets, and nothing that undoes what a
# forward records.


def _fsdp2_groups(module: nn.Module) -> list[Any] | None:
    """The ``FSDPParamGroup`` s of FSDP2 module ``module`` (``None`` where this torch's FSDP2 lacks what
    :func:`fsdp2_forward_state` and :func:`restore_fsdp2_forward_state` read and write)."""
    try:
        state = module._get_fsdp_state()  # type: ignore[operator]
        groups = list(state._fsdp_param_groups)
        for group in groups:
            group.post_forward_mesh_info  # noqa: B018 - the attributes must exist
            len(group._post_forward_indices)
            len(_post_forward_order(group))
        state._auto_reshard_after_forward  # noqa: B018
        state._is_root  # noqa: B018
    except (AttributeError, AssertionError, TypeError):
        return None
    return groups


def _post_forward_order(group: Any) -> list[Any]:
    """The post-forward order of ``group``'s root (empty, and not kept, before the root's first forward)."""
    return getattr(group.comm_ctx, "post_forward_order", [])


def fsdp2_supported(module: nn.Module) -> bool:
    """Whether this torch's FSDP2 holds, for FSDP2 module ``module`` (one ``fully_shard`` was applied to), what
    :func:`fsdp2_forward_state` saves and :func:`restore_fsdp2_forward_state` puts back.

    Why: the write-through refuses a model before changing anything where it could not put FSDP2's state back.

    Replaced by: the public API that replaces those two. ``tests/test_compat.py`` shards a model and checks it.
    """
    return _fsdp2_groups(module) is not None


@dataclass
class Fsdp2ForwardState:
    """What a call with ``set_reshard_after_forward(False)`` and forwards of its own changes in one FSDP2 module's
    state: the reshard-after-forward setting (``auto``: the state's, ``infos``: each group's post-forward mesh),
    whether the state was root yet (``None`` before the first forward's lazy init), and how long each group's
    post-forward records were (``indices``, ``orders``: the forwards append to them; backward prefetching reads them,
    and ranks that made different forwards would prefetch differently and wait on each other)."""

    auto: Any
    infos: list[Any]
    was_root: Any
    indices: list[int]
    orders: list[int]


def fsdp2_forward_state(module: nn.Module) -> Fsdp2ForwardState:
    """What :func:`restore_fsdp2_forward_state` puts back into FSDP2 module ``module`` (see
    :class:`Fsdp2ForwardState`; :func:`fsdp2_supported` says whether it can be read).

    Why: the initializers and revival keep the FSDP2 modules unsharded through the forwards they make
    (``set_reshard_after_forward(False)``, public) and afterwards leave FSDP2 as they found it.

    Replaced by: a public getter of the reshard-after-forward setting (``FSDPModule`` has only the setter) and a
    public way to make forwards FSDP2 does not record (none in torch 2.x). ``tests/test_compat.py`` runs forwards on
    a sharded model with the setting off and checks that the state read before is the one put back.
    """
    state = module._get_fsdp_state()  # type: ignore[operator]
    groups = _fsdp2_groups(module) or []
    return Fsdp2ForwardState(
        auto=state._auto_reshard_after_forward,
        infos=[group.post_forward_mesh_info for group in groups],
        was_root=state._is_root,
        indices=[len(group._post_forward_indices) for group in groups],
        orders=[len(_post_forward_order(group)) for group in groups],
    )


def restore_fsdp2_forward_state(module: nn.Module, saved: Fsdp2ForwardState) -> None:
    """Put ``saved`` (:func:`fsdp2_forward_state`) back into FSDP2 module ``module``: its reshard-after-forward
    setting, and its post-forward records as long as they were (what forwards since appended is dropped). A root
    found by a forward since (FSDP2's lazy init) keeps FSDP2's rule: the root does not reshard after forward.

    Why and replaced by: see :func:`fsdp2_forward_state`.
    """
    state = module._get_fsdp_state()  # type: ignore[operator]
    state._auto_reshard_after_forward = saved.auto
    groups = _fsdp2_groups(module) or []
    for group, info, indices, order in zip(groups, saved.infos, saved.indices, saved.orders, strict=True):
        became_root = saved.auto and saved.was_root is None and state._is_root
        group.post_forward_mesh_info = None if became_root else info
        del group._post_forward_indices[indices:]
        del _post_forward_order(group)[order:]


def fsdp2_param_dtype(module: nn.Module) -> torch.dtype | None:
    """The dtype FSDP2 module ``module`` all-gathers its parameters in: the ``param_dtype`` of the
    ``MixedPrecisionPolicy`` given to ``fully_shard`` (``None``: the shards' own).

    Why: the write-through writes the unsharded parameters back into the shards; gathered in another dtype, that
    would round the shards, and it is refused.

    Replaced by: a public getter of the policy on ``FSDPModule`` (none in torch 2.x). ``tests/test_compat.py`` shards
    with and without a policy and checks what it reads.
    """
    policy = getattr(module._get_fsdp_state(), "_mp_policy", None)  # type: ignore[operator]
    dtype = getattr(policy, "param_dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else None


# -------------------------------------------------------------------------------------------------------- DeepSpeed


def deepspeed_master_linked(param: Any) -> bool:
    """Whether DeepSpeed links ``param`` to an fp32 master fragment in its optimizer (ZeRO stages 1 and 2, the bf16
    optimizer), which ``engine.step()`` copies over the parameter: DeepSpeed's mark ``param._hp_mapping`` (set, to
    ``None`` where another rank holds the fragment, on every parameter of such an optimizer).

    Why: a change to such a parameter must also go into its master (``deepspeed.utils.safe_set_full_fp32_param``,
    public); the package writes through, or refuses, the parameters this says are linked.

    Replaced by: a public query in ``deepspeed.utils`` (none in DeepSpeed 0.19; its public ``safe_*`` accessors make
    this same test of the mark). ``tests/test_compat.py`` checks it on a ZeRO-1 engine (skipped without DeepSpeed).
    """
    return hasattr(param, "_hp_mapping")


def deepspeed_module_groups(optimizer: Any) -> list[list[torch.Tensor]] | None:
    """The model parameters of each parameter group of a DeepSpeed optimizer that links them to fp32 masters, in the
    order of its inner torch optimizer's groups (``optimizer.optimizer``): ZeRO stages 1 and 2 keep them as
    ``bit16_groups``, the bf16 optimizer as ``bf16_groups``. ``None`` for any other optimizer.

    Why: the write-through gathers the optimizer state of these parameters (``safe_get_full_optimizer_state``,
    public) into a torch optimizer over them, group by group, with the inner optimizer's options.

    Replaced by: a public list of the parameters a DeepSpeed optimizer holds, by group (none in DeepSpeed 0.19).
    ``tests/test_compat.py`` checks it on a ZeRO-1 engine (the bf16 optimizer is not built on the CPU).
    """
    groups = getattr(optimizer, "bit16_groups", None) or getattr(optimizer, "bf16_groups", None)
    return None if groups is None else [list(group) for group in groups]


def deepspeed_zero3_partitioned(param: Any) -> bool:
    """Whether ZeRO-3 partitions ``param`` (outside a forward it is an empty placeholder): DeepSpeed's mark
    ``param.ds_id``.

    Why: such a parameter is gathered for the call and written back partition by partition.

    Replaced by: a public query in ``deepspeed.zero`` (none in DeepSpeed 0.19; its public ``safe_*`` accessors make
    this same test of the mark). ``tests/test_compat.py`` checks it on a ZeRO-3 engine.
    """
    return hasattr(param, "ds_id")


def deepspeed_zero3_partition(param: Any) -> tuple[torch.Tensor, Any]:
    """This rank's partition of ZeRO-3 parameter ``param`` (``param.ds_tensor``: its slice of the flattened
    parameter, the last rank's padded) and the process group it is partitioned over (``param.ds_process_group``;
    ``None``: the default group).

    Why: the fp32 masters and the optimizer state go back partition by partition (``safe_set_local_fp32_param``,
    public, takes this rank's slice; DeepSpeed 0.19's full setters fail on a padded partition), cut from the full
    tensors where this says.

    Replaced by: a public getter of a parameter's partition bounds (none in DeepSpeed 0.19). ``tests/test_compat.py``
    checks the partition against the public ``safe_get_local_fp32_param``.
    """
    return param.ds_tensor, getattr(param, "ds_process_group", None)


def deepspeed_zero3_flat_masters(optimizer: Any) -> list[torch.Tensor] | None:
    """The flat fp32 master partitions of a ZeRO-3 optimizer, one per group (``fp32_partitioned_groups_flat``), which
    its inner torch optimizer (``optimizer.optimizer``) holds the state of; ``None`` for any other optimizer.

    Why: the state keys of the write-through's stand-in optimizer are the inner optimizer's keys for them.

    Replaced by: a public list of a ZeRO-3 optimizer's master partitions (none in DeepSpeed 0.19).
    ``tests/test_compat.py`` checks it on a ZeRO-3 engine.
    """
    flats = getattr(optimizer, "fp32_partitioned_groups_flat", None)
    return None if flats is None else list(flats)


# ------------------------------------------------------------------------------------------------------------ hooks

#: The dictionaries of an ``nn.Module`` that hold its own forward and backward hooks, keyed by handle id in the order
#: they run. Their ``*_with_kwargs`` and ``*_always_called`` companions, keyed by the same ids, are left as they are:
#: torch reads them only for an id still in one of these.
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")

#: What :func:`set_aside_hooks` took away: each hook dictionary touched, with everything it held before.
SetAsideHooks = list[tuple[dict[Any, Any], dict[Any, Any]]]


def set_aside_hooks(module: nn.Module, chosen: Callable[[Any], bool]) -> SetAsideHooks:
    """Take the forward and backward hooks for which ``chosen(hook)`` is true off ``module`` and its submodules;
    :func:`restore_hooks` puts them back where and in the order they were.

    Why: ZeRO-3 gathers a module's parameters in hooks of DeepSpeed's and frees them in others after each forward.
    The write-through gathers them once for the whole call (``deepspeed.zero.GatheredParameters``, public) and runs
    forwards of its own in between, which DeepSpeed's hooks must not see. Their handles are DeepSpeed's, and
    registering them again would change their order among the other hooks.

    Replaced by: a public way to list a module's hooks with their handles, or to disable some for a while (none in
    torch 2.x). ``tests/test_compat.py`` checks it on hooks of every kind, and on ZeRO-3's (skipped without
    DeepSpeed).
    """
    saved: SetAsideHooks = []
    for child in module.modules():
        for attribute in _HOOK_DICTS:
            hooks = getattr(child, attribute, None)
            if not isinstance(hooks, dict):
                continue
            taken = [key for key, hook in hooks.items() if chosen(hook)]
            if taken:
                saved.append((hooks, dict(hooks)))
                for key in taken:
                    del hooks[key]
    return saved


def restore_hooks(saved: SetAsideHooks) -> None:
    """Put back what :func:`set_aside_hooks` took away, in the order it was (hooks registered since are dropped)."""
    for hooks, everything in saved:
        hooks.clear()
        hooks.update(everything)
