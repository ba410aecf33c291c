"""The zoo's ground truth on small models whose answer is known by construction (no torchvision needed)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.zoo.checks import compare_counts
from tests.zoo.oracle import apply_kills, plan_kills, recording


def _record(model: nn.Module, x: torch.Tensor):
    with recording(model, x) as recorder:
        model(x)
    return recorder


def test_linear_on_sequences_counts_features_along_the_last_axis() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x = torch.randn(4, 6, 5)
    recorder = _record(model, x)
    (call,) = recorder.calls
    out = torch.relu(model[0](x))
    assert call.axis == -1 and call.axis_from == "addmm"
    assert call.place == ("module", "1", 0)
    assert torch.equal(call.active, (out > 0).sum(dim=(0, 1)))
    assert call.entries == 24
    assert call.flow.clean and call.flow.producer == frozenset({"0.weight"}) and call.flow.shift == "0.bias"


def test_conv_norm_relu6_counts_channels_and_finds_the_norm_bias() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU6())
    x = torch.randn(2, 3, 6, 6)
    recorder = _record(model, x)
    (call,) = recorder.calls
    assert call.op == "relu6" and call.axis == 1 and call.units == 4 and call.entries == 2 * 4 * 4
    assert call.flow.producer == frozenset({"0.weight"}) and call.flow.shift == "1.bias" and call.flow.clean


class _Reused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 6)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.fc1(x))
        z = self.relu(self.fc2(y) + y)  # a residual sum: not clean
        return F.relu(z - 1) + F.relu6(z)


def test_places_follow_call_positions_and_residual_sums_are_not_clean() -> None:
    torch.manual_seed(0)
    recorder = _record(_Reused(), torch.randn(3, 4))
    places = [call.place for call in recorder.calls]
    assert places == [("module", "relu", 0), ("module", "relu", 1), ("function", "", 0), ("function", "", 1)]
    assert recorder.calls[0].flow.clean and not recorder.calls[1].flow.clean
    assert [call.op for call in recorder.calls] == ["relu", "relu", "relu", "relu6"]


class _Shared(nn.Module):
    """One block applied three times (as ALBERT's shared layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 4), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(3):
            x = self.block(x)
        return x


def test_a_block_run_several_times_is_one_place_with_its_counts_added() -> None:
    torch.manual_seed(0)
    model = _Shared()
    x = torch.randn(5, 4)
    recorder = _record(model, x)
    (place,) = recorder.places()
    expected = torch.zeros(4, dtype=torch.int64)
    h = x
    for _ in range(3):
        h = model.block(h)
        expected += (h > 0).sum(0)
    assert place.key == ("module", "block.1", 0) and len(place.calls) == 3
    assert torch.equal(place.active, expected) and place.entries == 15


def test_forcing_kills_the_planned_units() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(8, 8), nn.ReLU())])
    x = torch.randn(16, 8)
    kills = plan_kills(_record(model, x).calls, sites=3)
    assert len(kills) == 3 and all(kill.how == "shift" for kill in kills)
    apply_kills(model, kills)
    places = {place.key: place for place in _record(model, x).places()}
    for kill in kills:
        assert bool(places[kill.place].dead[list(kill.units)].all())


def test_bias_free_producers_are_forced_by_zeroing_their_rows() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(16, 8)
    (kill,) = plan_kills(_record(model, x).calls)
    assert kill.how == "zero" and kill.param == "0.weight"
    apply_kills(model, [kill])
    (place,) = _record(model, x).places()
    assert bool(place.dead[list(kill.units)].all())


class _Layer:
    def __init__(self, active: list[int], entries: int) -> None:
        self.active_count = torch.tensor(active)
        self.dead = self.active_count == 0
        self.num_units = len(active)
        self.num_dead = int(self.dead.sum())
        self.entries_per_unit = entries


def test_compare_counts_reports_a_wrong_count_and_a_site_too_many() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    x = torch.randn(6, 3)
    places = _record(model, x).places()
    truth = places[0].active.tolist()
    assert compare_counts(places, {"1": _Layer(truth, 6)}) == []
    wrong = [*truth[:-1], truth[-1] + 1]
    assert len(compare_counts(places, {"1": _Layer(wrong, 6)})) == 2
    extra = compare_counts(places, {"1": _Layer(truth, 6), "other": _Layer([1, 0], 3)})
    assert any("other" in line for line in extra) and any("2 sites seen" in line for line in extra)
