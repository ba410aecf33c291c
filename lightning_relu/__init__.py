"""lightning_relu: keep ReLU networks alive in PyTorch Lightning.

Measure dead units while the model trains (:class:`DeadUnitMonitor`, :class:`DeadUnitTracker`) and revive them
(:class:`DeadUnitReviver`, :func:`revive_dead_units_`), on top of the site discovery in :func:`find_relu_sites`.
"""

from lightning_relu.monitor import CollapseError, CollapseWarning, DeadUnitMonitor, EpochReport
from lightning_relu.revive import DeadUnitReviver, RevivalWarning, revive_dead_units_
from lightning_relu.sites import Consumer, Site, SiteTracingWarning, find_relu_sites
from lightning_relu.stats import ActivationStats, LayerReport
from lightning_relu.tracker import DeadUnitTracker, NoReluSitesWarning

__version__ = "0.1.0.dev0"

__all__ = [
    "ActivationStats",
    "CollapseError",
    "CollapseWarning",
    "Consumer",
    "DeadUnitMonitor",
    "DeadUnitReviver",
    "DeadUnitTracker",
    "EpochReport",
    "LayerReport",
    "NoReluSitesWarning",
    "RevivalWarning",
    "Site",
    "SiteTracingWarning",
    "__version__",
    "find_relu_sites",
    "revive_dead_units_",
]
