"""lightning_relu: keep ReLU networks alive in PyTorch Lightning.

Prevent dead units at initialization (:class:`ReluInitializer`, :func:`rai_`, :func:`sign_flip_`), measure them
while the model trains (:class:`DeadUnitMonitor`, :class:`DeadUnitTracker`) and revive them
(:class:`DeadUnitReviver`, :func:`revive_dead_units_`), on top of the site discovery in :func:`find_relu_sites`.
"""

from lightning_relu import theory
from lightning_relu.init import SignFlipReport, rai_, sign_flip_
from lightning_relu.initializer import ReluInitializer
from lightning_relu.monitor import CollapseError, CollapseWarning, DeadUnitMonitor, DyingWarning, EpochReport
from lightning_relu.revive import DeadUnitReviver, RevivalWarning, revive_dead_units_
from lightning_relu.sites import Consumer, Site, SiteTracingWarning, find_relu_sites
from lightning_relu.stats import ActivationStats, LayerReport
from lightning_relu.target_check import TargetScaleCheck, TargetScaleWarning
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
    "DyingWarning",
    "EpochReport",
    "LayerReport",
    "NoReluSitesWarning",
    "ReluInitializer",
    "RevivalWarning",
    "SignFlipReport",
    "Site",
    "SiteTracingWarning",
    "TargetScaleCheck",
    "TargetScaleWarning",
    "__version__",
    "find_relu_sites",
    "rai_",
    "revive_dead_units_",
    "sign_flip_",
    "theory",
]
