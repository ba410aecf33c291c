"""Shared fixtures and the one brute-force oracle of the test suite.

The oracle, :func:`expected_counts`, measures the activity of one site from its outputs with plain boolean logic on a
float64 copy (exact for every floating dtype), independent of the code under test. The tests of the counting itself
compare with it: directly (``tests/test_tracker_models.py``, ``tests/test_monitor_*.py``, ``tests/test_functional.py``,
``tests/test_counting.py``) or through ``tests.helpers.brute_force``, which replays an ``nn.Sequential`` layer by layer
and measures each ReLU output with it (``tests/test_monitor.py``, ``tests/test_tracker.py`` and others).

``lightning_relu.functional.activation_stats``, the functional twin of ``ActivationStats``, is the package's own
counting: tests of something else that need the counts of one tensor use it (``tests/test_surgery.py``: the activity
of revived units), never a test of the counting (it would check the code with itself).

``tests/zoo/oracle.py`` stays the zoo's own oracle: it records every rectifier operation at the ATen dispatcher level,
where the zoo's real models have no hand-written replay.

Fixtures: ``path``, each counting path in turn (``"cpu"``, ``"plain"``), for the tests of the counting.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

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


@pytest.fixture(params=["cpu", "plain"])
def path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each counting path in turn (``tests.helpers.counting_path``): ``"cpu"`` (chunks of samples into reused buffers)
    and ``"plain"`` (the ATen operations that GPU tensors, tensor subclasses and ``torch.compile`` take)."""
    from tests.helpers import counting_path

    with counting_path(request.param):
        yield request.param
