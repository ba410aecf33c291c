"""lightning_relu: keep ReLU networks alive in PyTorch Lightning.

Prevent dead units at initialization (:class:`ReluInitializer`, :func:`rai_`, :func:`sign_flip_`), measure them
while the model trains (:class:`DeadUnitMonitor`, :class:`DeadUnitTracker`) and revive them
(:class:`DeadUnitReviver`, :func:`revive_dead_units_`), on top of the site discovery in :func:`find_relu_sites`.

The public names are imported on first use (PEP 562), so that ``import lightning_relu`` and the
``lightning-relu`` command line start without importing torch and Lightning until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

# public name -> the submodule that defines it
_LAZY = {
    "CompactOnFitEnd": "compaction",
    "Compaction": "compaction",
    "SiteCompaction": "compaction",
    "compact": "compaction",
    "SignFlipReport": "init",
    "rai_": "init",
    "sign_flip_": "init",
    "ReluInitializer": "initializer",
    "CollapseError": "monitor",
    "CollapseWarning": "monitor",
    "DeadUnitMonitor": "monitor",
    "DyingWarning": "monitor",
    "EpochReport": "monitor",
    "DeadUnitReviver": "revive",
    "RevivalWarning": "revive",
    "revive_dead_units_": "revive",
    "Consumer": "site",
    "Site": "site",
    "SiteKey": "site",
    "SiteTracingWarning": "site",
    "find_relu_sites": "sites",
    "ActivationStats": "stats",
    "LayerReport": "stats",
    "TargetScaleCheck": "target_check",
    "TargetScaleWarning": "target_check",
    "DeadUnitTracker": "tracker",
    "NoReluSitesWarning": "tracker",
}
_SUBMODULES = ("theory",)

if TYPE_CHECKING:
    from lightning_relu import theory
    from lightning_relu.compaction import Compaction, CompactOnFitEnd, SiteCompaction, compact
    from lightning_relu.init import SignFlipReport, rai_, sign_flip_
    from lightning_relu.initializer import ReluInitializer
    from lightning_relu.monitor import CollapseError, CollapseWarning, DeadUnitMonitor, DyingWarning, EpochReport
    from lightning_relu.revive import DeadUnitReviver, RevivalWarning, revive_dead_units_
    from lightning_relu.site import Consumer, Site, SiteKey, SiteTracingWarning
    from lightning_relu.sites import find_relu_sites
    from lightning_relu.stats import ActivationStats, LayerReport
    from lightning_relu.target_check import TargetScaleCheck, TargetScaleWarning
    from lightning_relu.tracker import DeadUnitTracker, NoReluSitesWarning

__all__ = [
    "ActivationStats",
    "CollapseError",
    "CollapseWarning",
    "CompactOnFitEnd",
    "Compaction",
    "Consumer",
    "DeadUnitMonitor",
    "DeadUnitReviver",
    "DeadUnitTracker",
    "DyingWarning",
    "EpochReport",
    "LayerReport",
    "NoReluSitesWarning",
    "ReluInitializer",
    "RevivalWarning",
    "SignFlipReport",
    "Site",
    "SiteCompaction",
    "SiteKey",
    "SiteTracingWarning",
    "TargetScaleCheck",
    "TargetScaleWarning",
    "__version__",
    "compact",
    "find_relu_sites",
    "rai_",
    "revive_dead_units_",
    "sign_flip_",
    "theory",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
