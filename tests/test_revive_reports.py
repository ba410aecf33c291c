"""``revive_dead_units_`` with reports that do not fit the model (another model, another architecture) raises and
changes nothing; a matching report, or one measured on a deep copy, changes only the dead units."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from lightning_relu import (
    DeadUnitTracker,
    LayerReport,
    revive_dead_units_,
)
from tests.helpers import (
    TinyResNet,
    bn,
    clamp,
    lin,
    params_of,
)


def _revival_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(8, 4)).sum().backward()
    optimizer.step()
    return model, optimizer


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    state = params_of(model)
    for i, param in enumerate(model.parameters()):
        for key, value in optimizer.state[param].items():
            if isinstance(value, Tensor):
                state[f"opt.{i}.{key}"] = value.clone()
    return state


def _assert_snapshot(before: dict[str, Tensor], model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    after = _snapshot(model, optimizer)
    assert set(before) == set(after)
    for key in before:
        assert torch.equal(before[key], after[key]), key


def _dead(name: str, n: int, dead: list[int]) -> LayerReport:
    active = torch.ones(n, dtype=torch.int64)
    active[dead] = 0
    return LayerReport.from_counts(name, active, 10, 10, 0)


@pytest.mark.parametrize(
    ("report", "match"),
    [
        ({"9": _dead("9", 6, [0])}, r"site '9' that the model does not have; the model's sites are \['2', '4'\]"),
        ({"2": _dead("2", 7, [0])}, r"site '2' has 7 units but the model's site '2' has 6"),
        # a valid site first, then a wrong one: nothing at all is touched
        ({"2": _dead("2", 6, [1, 3]), "4": _dead("4", 3, [0])}, r"site '4' has 3 units but the model's site '4' has 5"),
        ({"2": "dead"}, r"site '2' must be a `LayerReport` with a 1-D bool `dead` mask"),
        (
            {"2": LayerReport.from_counts("2", torch.ones(2, 3, dtype=torch.int64), 1, 1, 0)},
            r"1-D bool `dead` mask",
        ),
    ],
    ids=["unknown-site", "wrong-width", "valid-then-wrong", "not-a-report", "2d-mask"],
)
def test_revive_with_a_report_of_another_model_raises_and_changes_nothing(report, match):
    model, optimizer = _revival_setup()
    before = _snapshot(model, optimizer)
    with pytest.raises(ValueError, match=match):
        revive_dead_units_(model, report, optimizer, generator=torch.Generator().manual_seed(0))
    _assert_snapshot(before, model, optimizer)


def test_revive_with_a_report_of_another_architecture_raises_and_changes_nothing():
    model, optimizer = _revival_setup()
    other = TinyResNet()
    with DeadUnitTracker(other) as tracker:
        other(torch.randn(2, 3, 8, 8))
    before = _snapshot(model, optimizer)
    with pytest.raises(ValueError, match="Was the report measured on another model"):
        revive_dead_units_(model, tracker.report(), optimizer)
    _assert_snapshot(before, model, optimizer)


def test_revive_a_matching_report_changes_only_the_dead_units():
    """Control for the tests above: the same set-up with a matching report does revive."""
    model, optimizer = _revival_setup()
    x = torch.randn(16, 4)
    with torch.no_grad():
        model[1].bias[[1, 3]] = -1e4
    model.eval()
    with DeadUnitTracker(model) as tracker:
        before_out = model(x)
    with torch.no_grad():
        b = clamp(lin(clamp(bn(lin(x, model[0]), model[1])), model[3]))
    dead_4 = sum(1 for u in range(5) if not bool((b[:, u] > 0).any()))
    before = _snapshot(model, optimizer)
    counts = revive_dead_units_(model, tracker.report(), optimizer, generator=torch.Generator().manual_seed(0))
    assert counts == {"2": 2, "4": dead_4}
    after = _snapshot(model, optimizer)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert {"0.weight", "0.bias", "1.bias", "3.weight"} <= changed
    assert torch.equal(after["0.weight"][[0, 2, 4, 5]], before["0.weight"][[0, 2, 4, 5]])
    assert torch.equal(model(x), before_out)


def test_revive_with_a_report_measured_on_a_deep_copy():
    """A report measured on a deep copy of the model applies to the original (same architecture, same names)."""
    model, optimizer = _revival_setup()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        twin[0].bias[0] = -1e4
    twin.eval()
    with DeadUnitTracker(twin) as tracker:
        twin(torch.randn(8, 4))
    counts = revive_dead_units_(model, tracker.report(), optimizer, generator=torch.Generator().manual_seed(1))
    assert counts["2"] == int(tracker.report()["2"].num_dead) >= 1
