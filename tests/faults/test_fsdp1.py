"""FSDP1 (``FullyShardedDataParallel``, Lightning's ``FSDPStrategy``) is refused before anything changes (issue 20,
item 5): its flat parameters and flattened optimizer state are not written through (FSDP2 is, see
``test_distributed.py``). FSDP1 needs an accelerator, which these tests do not have: the strategy is a real
``FSDPStrategy`` on a stub trainer (built without a GPU, as Lightning allows), and the wrapped model a
``FullyShardedDataParallel`` shell around the model (a real instance of the class, not initialized by FSDP)."""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from lightning_relu import DeadUnitReviver, DeadUnitTracker, ReluInitializer, rai_, revive_dead_units_, sign_flip_
from tests.helpers import kill_units, mlp


def _model() -> nn.Sequential:
    model = mlp([4, 8, 8, 1], seed=0)
    kill_units(model, 0, [1, 2])
    return model


def _refused(params: list[torch.Tensor], call: Callable[[], Any], message: str) -> None:
    """``call`` raises ``ValueError`` matching ``message``, and ``params`` are unchanged."""
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=message):
        call()
    assert all(torch.equal(a, b) for a, b in zip(before, params, strict=True))


def test_lightnings_fsdp_strategy_is_refused_by_the_reviver_and_the_initializer() -> None:
    model = _model()
    trainer = types.SimpleNamespace(strategy=FSDPStrategy(), global_step=0)
    for name, call in (
        ("DeadUnitReviver", lambda: DeadUnitReviver().on_fit_start(trainer, model)),  # type: ignore[arg-type]
        ("ReluInitializer", lambda: ReluInitializer().setup(trainer, model, "fit")),  # type: ignore[arg-type]
    ):
        message = (
            rf"^`{name}` cannot write into `pl_module`: the trainer's strategy is `FSDPStrategy`, which wraps the "
            r"model in FSDP1\. Nothing was changed\."
        )
        _refused(list(model.parameters()), call, message)


def test_a_model_wrapped_by_fsdp1_is_refused_by_the_initializers_and_revival() -> None:
    inner = _model()
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
    with DeadUnitTracker(inner) as tracker:
        inner(x)
    report = tracker.report()
    shell = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    nn.Module.__init__(shell)
    shell._modules["_fsdp_wrapped_module"] = inner  # what FSDP1 registers (its `__getattr__` reads it)
    model = nn.Sequential()
    model.add_module("body", shell)
    for name, argument, call in (
        ("rai_", "module", lambda: rai_(model, generator=torch.Generator().manual_seed(0))),
        ("sign_flip_", "model", lambda: sign_flip_(model, x)),
        ("revive_dead_units_", "model", lambda: revive_dead_units_(model, report, example_input=x)),
    ):
        message = (
            rf"^`{name}` cannot write into `{argument}`: 'body' \(1 in all\) are wrapped by FSDP1 "
            r"\(`FullyShardedDataParallel`\)\. Nothing was changed\."
        )
        _refused(list(inner.parameters()), call, message)
