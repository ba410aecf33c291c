"""Kept for compatibility: the recording and the analysis of a forward moved to :mod:`lightning_relu.observation`
(below the measurement, so that the package has no import cycle); :func:`~lightning_relu.structure.observe` is in
:mod:`lightning_relu.structure`."""

from lightning_relu.observation import *  # noqa: F403

# private helpers that modules of the package import from here, until they import them from the new place
from lightning_relu.observation import _CAST_OPS as _CAST_OPS
from lightning_relu.observation import _MOVE_OPS as _MOVE_OPS
from lightning_relu.observation import _POOL_OPS as _POOL_OPS
from lightning_relu.observation import __all__ as _moved
from lightning_relu.observation import _op_name as _op_name
from lightning_relu.observation import _tensors as _tensors
from lightning_relu.structure import observe

__all__ = [*_moved, "observe"]
