"""Which models the initializers and revival write into through an engine, and which they refuse: FSDP2, DeepSpeed.

FSDP2 (``torch.distributed.fsdp.fully_shard``) holds each parameter as a ``DTensor`` shard. The initializers and
revival write rows, columns and single entries of parameters and read whole weights; on the shards themselves they
would fail half way with raw ``DTensor`` errors, or write into the unsharded copies that FSDP2 frees after the
forward. They act on the unsharded model instead and write the result back into the shards
(:mod:`lightning_relu._engines`); what that cannot serve is refused there, before anything changes.

DeepSpeed keeps weights of its own beside the model's: ZeRO stages 1 and 2 (and its bf16/fp16 optimizers) hold fp32
master partitions in the optimizer and copy them over the model's parameters at every ``engine.step()``; ZeRO-3
partitions the parameters themselves (``ds_id``, ``ds_tensor``: the module's ``weight`` is an empty placeholder
outside a forward). A unit revived in the model alone would be reverted by the next step, and a report of revived
units would be wrong. Where the parameters are linked to fp32 masters (ZeRO stages 1 and 2, the bf16 optimizer) or
partitioned by ZeRO-3, the change is written through them (:mod:`lightning_relu._engines`); the rest (ZeRO-3 while
DeepSpeed's `memory_efficient_linear` has replaced ``torch.nn.functional.linear``, the fp16 optimizer of stage 0, a
DeepSpeed optimizer given with a model it does not train, Lightning's ``DeepSpeedStrategy``, which only runs on GPUs
and is not tested here) is refused before anything changes.

Neither ``torch.distributed.tensor`` nor ``deepspeed`` is imported here: a model cannot hold their objects unless its
program imported them (``sys.modules``).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, cast

import torch
from torch import nn

from lightning_relu._compat import deepspeed_master_linked, deepspeed_zero3_partitioned
from lightning_relu._engines import (
    WriteThrough,
    _shown,
    deepspeed_write_through,
    fsdp2_write_through,
    inside_write_through,
)

_DEEPSPEED_ADVICE = (
    "DeepSpeed keeps fp32 master weights and optimizer state of its own, and the next `engine.step()` would copy "
    "them back over the change. Nothing was changed. Initialize the model before `deepspeed.initialize` (under "
    "Lightning: before `DeepSpeedStrategy` wraps it, e.g. in the module's `__init__`); revival and the initializers "
    "write through the standalone engine of ZeRO stages 1 to 3 (pass the engine or its module, and its optimizer)."
)


def _deepspeed_class(module: str, name: str) -> type | None:
    """A DeepSpeed class, only where the program imported it (``None`` otherwise: nothing can be an instance)."""
    return getattr(sys.modules.get(module), name, None)


def _linear_note() -> str:
    """Why ZeRO-3 is not written through here: DeepSpeed's `memory_efficient_linear` (on by default) replaced
    ``torch.nn.functional.linear`` for the whole process, which hides the Linear producers from an observed forward."""
    if not getattr(torch.nn.functional.linear, "__module__", "").startswith("deepspeed"):
        return ""
    return (
        ", and DeepSpeed replaced `torch.nn.functional.linear` for the whole process (ZeRO-3's "
        "`memory_efficient_linear`, on by default), which hides the Linear layers from the forward that revival and "
        'the initializers observe; with `"memory_efficient_linear": false` in the ZeRO config, ZeRO-3 is written '
        "through"
    )


def _engine_reason(model: nn.Module) -> str | None:
    """Why a ``DeepSpeedEngine`` passed as the model keeps master weights; ``None`` for an engine that keeps none
    (ZeRO stage 0 in fp32 with a torch optimizer: the optimizer steps the model's own parameters)."""
    engine = _deepspeed_class("deepspeed.runtime.engine", "DeepSpeedEngine")
    if engine is None or not isinstance(model, engine):
        return None
    stage = _call(model, "zero_optimization_stage", 0)
    mixed = [name for name in ("fp16", "bfloat16") if _call(model, f"{name}_enabled", False)]
    optimizer = getattr(model, "optimizer", None)
    if not (stage or mixed or _is_deepspeed_optimizer(optimizer)):
        return None
    how = f"ZeRO stage {stage}" + (f", {mixed[0]}" if mixed else "")
    return f"it is a DeepSpeed engine (`{type(model).__name__}`, {how})" + (_linear_note() if stage == 3 else "")


def _call(obj: Any, method: str, default: Any) -> Any:
    function = getattr(obj, method, None)
    try:
        return function() if callable(function) else default
    except Exception:  # an engine half set up: its config says nothing
        return default


def _is_deepspeed_optimizer(optimizer: Any) -> bool:
    base = _deepspeed_class("deepspeed.runtime.base_optimizer", "DeepSpeedOptimizer")
    return base is not None and isinstance(optimizer, base)


def _parameters_reason(model: nn.Module) -> str | None:
    """Why ``model``'s parameters belong to a DeepSpeed engine (partitioned by ZeRO-3, or linked to fp32 masters)."""
    partitioned = [name for name, param in model.named_parameters() if deepspeed_zero3_partitioned(param)]
    if partitioned:
        return (
            f"its parameters {_shown(partitioned)} ({len(partitioned)} in all) are partitioned by DeepSpeed ZeRO "
            "stage 3 (outside a forward each holds an empty placeholder; the weights are `ds_tensor` partitions)"
            + _linear_note()
        )
    linked = [name for name, param in model.named_parameters() if deepspeed_master_linked(param)]
    if linked:
        return (
            f"its parameters {_shown(linked)} ({len(linked)} in all) are copies of fp32 master weights that a "
            "DeepSpeed optimizer holds (ZeRO stage 1 or 2, or bf16)"
        )
    return None


def _optimizers_of(optimizer: Any) -> list[Any]:
    """The optimizers given, without consuming an iterator (the caller's own check reads it)."""
    if isinstance(optimizer, (list, tuple, set, frozenset)):
        return list(optimizer)
    return [] if optimizer is None or isinstance(optimizer, Iterable) else [optimizer]


def _strategy_reason(trainer: Any) -> str | None:
    strategy = getattr(trainer, "strategy", None)
    for module in ("lightning.pytorch.strategies.deepspeed", "pytorch_lightning.strategies.deepspeed"):
        deepspeed_strategy = getattr(sys.modules.get(module), "DeepSpeedStrategy", None)
        if deepspeed_strategy is not None and isinstance(strategy, deepspeed_strategy):
            return f"the trainer's strategy is `{type(strategy).__name__}`, which wraps the model in a DeepSpeed engine"
    return None


_FSDP1_ADVICE = (
    "Nothing was changed. Initialize the model before wrapping it; FSDP2 (`fully_shard`, Lightning's "
    "`ModelParallelStrategy`) is written through."
)


def _fsdp1_reason(model: Any, trainer: Any) -> str | None:
    """Why ``model`` is held by FSDP1 (``FullyShardedDataParallel``: flat parameters, views of them outside a forward),
    which neither the shards nor the flattened optimizer state are written through for (FSDP1 needs an accelerator:
    not tested here)."""
    strategy = getattr(trainer, "strategy", None)
    for module in ("lightning.pytorch.strategies.fsdp", "pytorch_lightning.strategies.fsdp"):
        fsdp_strategy = getattr(sys.modules.get(module), "FSDPStrategy", None)
        if fsdp_strategy is not None and isinstance(strategy, fsdp_strategy):
            return f"the trainer's strategy is `{type(strategy).__name__}`, which wraps the model in FSDP1"
    fsdp1 = getattr(sys.modules.get("torch.distributed.fsdp"), "FullyShardedDataParallel", None)
    if fsdp1 is not None and isinstance(model, nn.Module):
        wrapped = [name or "the model" for name, module in model.named_modules() if isinstance(module, fsdp1)]
        if wrapped:
            return f"{_shown(wrapped)} ({len(wrapped)} in all) are wrapped by FSDP1 (`FullyShardedDataParallel`)"
    return None


def refuse_sharded(
    model: nn.Module, function: str, argument: str = "model", *, optimizer: Any = None, trainer: Any = None
) -> None:
    """Raise ``ValueError`` naming ``function``, the argument and why, when ``model`` is managed by DeepSpeed (an
    engine, ZeRO-3 partitions, parameters linked to master weights), when ``optimizer`` (one or a list) is a DeepSpeed
    optimizer, or when ``trainer`` runs Lightning's ``DeepSpeedStrategy``; the same for FSDP1 (Lightning's
    ``FSDPStrategy``, ``FullyShardedDataParallel`` modules)."""
    fsdp1 = _fsdp1_reason(model, trainer)
    if fsdp1 is not None:
        raise ValueError(f"`{function}` cannot write into `{argument}`: {fsdp1}. {_FSDP1_ADVICE}")
    reason = _strategy_reason(trainer)
    if "deepspeed" not in sys.modules and reason is None:  # no DeepSpeed class or mark exists before its import
        return
    if reason is None and isinstance(model, nn.Module):
        reason = _engine_reason(model) or _parameters_reason(model)
    if reason is not None:
        raise ValueError(f"`{function}` cannot write into `{argument}`: {reason}. {_DEEPSPEED_ADVICE}")
    for given in _optimizers_of(optimizer):
        if _is_deepspeed_optimizer(given):
            kind = type(given)
            raise ValueError(
                f"`{function}` cannot use `optimizer`: it is a DeepSpeed optimizer (`{kind.__name__}` of "
                f"`{kind.__module__}`), which steps fp32 master weights of its own rather than `{argument}`'s "
                f"parameters. {_DEEPSPEED_ADVICE}"
            )


def write_through(
    model: nn.Module, function: str, argument: str = "model", *, optimizer: Any = None, trainer: Any = None
) -> WriteThrough | None:
    """How ``function`` writes into ``model``: ``None`` for a model it acts on directly (also inside a write-through
    call), a :class:`~lightning_relu._engines.WriteThrough` whose ``run`` calls it on the unsharded model and writes
    the result back (FSDP2), or ``ValueError`` naming the function, the argument and why, before anything changes,
    for what it cannot write into (see :func:`refuse_sharded`)."""
    if inside_write_through():
        return None
    engine = fsdp2_write_through(model, function, argument)
    if engine is None and isinstance(model, nn.Module) and _strategy_reason(trainer) is None:
        deepspeed_engine = _deepspeed_class("deepspeed.runtime.engine", "DeepSpeedEngine")
        is_engine = deepspeed_engine is not None and isinstance(model, deepspeed_engine)
        module = cast(nn.Module, model.module) if is_engine else model
        engine = deepspeed_write_through(module, function, argument)
    if engine is not None:
        return engine
    refuse_sharded(model, function, argument, optimizer=optimizer, trainer=trainer)
    return None
