"""Kept for compatibility: the recording and the analysis of a forward moved to :mod:`lightning_relu.observation`
(below the measurement, so that the package has no import cycle); :func:`~lightning_relu.structure.observe` is in
:mod:`lightning_relu.structure`. Import from those; this module re-exports their public names."""

from lightning_relu.observation import *  # noqa: F403
from lightning_relu.observation import __all__ as _moved
from lightning_relu.structure import observe

__all__ = [*_moved, "observe"]
