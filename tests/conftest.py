"""Shared fixtures and the one brute-force oracle of the test suite.

The oracle, :func:`expected_counts`, measures the activity of one site from its outputs with plain boolean logic on a
float64 copy (exact for every floating dtype), independent of the code under test: it is what the tests of the counting
itself (``tests/test_tracker*.py``, ``tests/test_monitor*.py``, ``tests/test_functional.py``, ``tests/test_stats.py``,
``tests.helpers.brute_force``) compare with. ``lightning_relu.functional.activation_stats``, the functional twin of
``ActivationStats``, is the package's own counting: tests of something else that need the counts of one tensor (the
reviver, compaction, the dashboards) may use it, never a test of the counting (it would check the code with itself).
``tests/zoo/oracle.py`` stays the zoo's own oracle (it dispatches on the zoo's model kinds and reuses this one's rules).

Fixtures: ``oracle`` (the function above), ``trainer_factory`` (``tests.helpers.make_trainer``: a small CPU Trainer).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch
from torch import Tensor

__all__ = ["expected_counts"]


def expected_counts(outputs: list[Tensor], unit_axis: int) -> dict[str, Any]:
    """Activity of one site from its outputs (one per forward), with plain boolean logic.

    ``unit_axis`` is the dimension that indexes units: 1 for convolutions, -1 for dense layers and sequences. An entry
    is active when ``> 0`` (NaN is not, +Inf is); a sample is killed when its whole output is 0 (NaN is not 0); a site
    that saw NaN or Inf is ``nonfinite`` and not judged dead (issue 20).
    """
    active: list[int] | None = None
    entries = samples = killed = 0
    nonfinite = False
    for output in outputs:
        out = output.detach().to(torch.float64)
        nonfinite = nonfinite or not bool(torch.isfinite(out).all())
        n = out.shape[0]
        per_sample = out.movedim(unit_axis, -1).reshape(n, -1, out.shape[unit_axis])  # (samples, positions, units)
        counts = [int((per_sample[:, :, u] > 0).sum()) for u in range(per_sample.shape[-1])]
        active = counts if active is None else [a + c for a, c in zip(active, counts, strict=True)]
        entries += n * per_sample.shape[1]
        samples += n
        killed += sum(1 for i in range(n) if bool((per_sample[i] == 0).all()))  # the whole output is 0
    assert active is not None
    return {
        "num_units": len(active),
        "active": active,
        "dead": [a == 0 and not nonfinite for a in active],
        "nonfinite": nonfinite,
        "entries": entries,
        "samples": samples,
        "killed": killed,
    }


@pytest.fixture
def oracle() -> Callable[[list[Tensor], int], dict[str, Any]]:
    """The brute-force oracle, :func:`expected_counts`."""
    return expected_counts


@pytest.fixture
def trainer_factory() -> Callable[..., L.Trainer]:
    """``tests.helpers.make_trainer``: ``trainer_factory(tmp_path, callbacks, **overrides)``."""
    from tests.helpers import make_trainer

    return make_trainer
