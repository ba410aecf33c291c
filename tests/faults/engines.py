"""Helpers of the engine fault tests (FSDP2 in ``test_distributed.py``, DeepSpeed in ``test_deepspeed.py``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def error_of(call: Callable[[], Any]) -> str:
    """What the user sees of ``call``: ``"no error"``, or the exception's type and message (checked by the tests)."""
    try:
        call()
    except Exception as error:  # every rank records its own; none waits for the other
        return f"{type(error).__name__}: {error}"
    return "no error"


def averaged_step(model: Any, optimizer: Any, loss: Callable[[Any, Any], Any], inputs: list[Any]) -> Callable[[], None]:
    """One process's stand-in for a step on several ranks: the ranks' losses averaged (as FSDP2 and DeepSpeed average
    the gradients of the data-parallel ranks)."""

    def step() -> None:
        (sum(loss(model, x) for x in inputs) / len(inputs)).backward()
        optimizer.step()
        optimizer.zero_grad()

    return step
