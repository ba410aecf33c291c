"""Refusing models whose parameters are sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 holds each parameter as a ``DTensor`` shard. The initializers and revival write rows, columns and single
entries of parameters and read whole weights; on shards they would fail half way with raw ``DTensor`` errors, or
write into the unsharded copies that FSDP2 frees after the forward. Until they write through the shards, they refuse
such a model before changing anything.
"""

from __future__ import annotations

import sys

from torch import nn


def sharded_parameters(model: nn.Module) -> list[str]:
    """Names of ``model``'s parameters that are ``DTensor``s (none while ``torch.distributed.tensor`` is unused)."""
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    if dtensor is None or not isinstance(model, nn.Module):  # not a module: the caller's own check says so
        return []
    return [name for name, param in model.named_parameters() if isinstance(param, dtensor)]


def refuse_sharded(model: nn.Module, function: str, argument: str = "model") -> None:
    """Raise ``ValueError`` naming ``function`` and the sharded parameters when ``model`` holds any."""
    sharded = sharded_parameters(model)
    if not sharded:
        return
    shown = ", ".join(repr(name) for name in sharded[:3]) + (", ..." if len(sharded) > 3 else "")
    raise ValueError(
        f"`{function}` cannot write into `{argument}`: its parameters {shown} ({len(sharded)} in all) are DTensor "
        "shards of FSDP2 (`fully_shard`), which it does not support yet. Nothing was changed. Initialize the model "
        "before sharding it (in `configure_model`, before `fully_shard`), and train without revival under FSDP2."
    )
