"""Structure of a model's rectifier sites, observed on one real forward (see :func:`observe`).

The recording and the analysis live in :mod:`lightning_relu.observation`, below the measurement; :func:`observe`
puts them together with a :class:`~lightning_relu.DeadUnitTracker`, which names the rectifier calls.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from torch import nn

from lightning_relu.observation import (
    AxisWatch,
    Consumer,
    ModuleCall,
    Norm,
    ObservationError,
    ParamRef,
    Producer,
    RootCallWatch,
    SiteStructure,
    Structure,
    TrainingInputWatch,
    call_model,
    example_from_batch,
    preserved_state,
    record,
    split_by_call,
)
from lightning_relu.tracker import DeadUnitTracker

__all__ = [
    "AxisWatch",
    "Consumer",
    "ModuleCall",
    "Norm",
    "ObservationError",
    "ParamRef",
    "Producer",
    "RootCallWatch",
    "SiteStructure",
    "Structure",
    "TrainingInputWatch",
    "call_model",
    "example_from_batch",
    "observe",
    "preserved_state",
    "split_by_call",
]


def observe(
    model: nn.Module,
    example_input: Any,
    *,
    keep_values: bool = False,
    unit_dims: Mapping[str, int] | None = None,
    sites: Any = None,
) -> Structure:
    """Observe one real forward of ``model`` on ``example_input`` and derive every site's structure.

    Args:
        model: the network; it runs in its current mode (training or evaluation) under ``torch.no_grad()``.
        example_input: what the model's forward takes: a tensor, a tuple of positional arguments or a dict of
            keyword arguments (a Hugging Face batch).
        keep_values: also keep each site's pre-activation and its first norm's input on this batch
            (:attr:`Structure.pre_activations`, :attr:`Structure.norm_inputs`).
        unit_dims: unit axis per site name where no producer fixes it (see ``DeadUnitTracker``).
        sites: the model's sites as :func:`~lightning_relu.find_relu_sites` returns them, to skip discovering
            them again (default: discovered here).

    Raises:
        ObservationError: the forward failed on ``example_input``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
        >>> print(observe(net, torch.randn(2, 3, 4, 4)).table())
        site  units  producer  norm       consumers  remedies                       notes
        ----  -----  --------  ---------  ---------  -----------------------------  -----
        2     4      0         1 (batch)  4          count, rai, sign_flip, revive
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"`model` must be a `torch.nn.Module`, got {type(model).__name__}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what the counting warns about is the monitor's to say
        tracker = DeadUnitTracker(model, unit_dims=unit_dims, discovered=sites)
    return record(model, example_input, tracker, keep_values=keep_values)
