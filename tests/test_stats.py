from __future__ import annotations

import math

import pytest
import torch

from lightning_relu import ActivationStats, LayerReport
from tests.conftest import expected_counts


def test_bf16_counts_are_exact():
    # 600 active entries per unit: more than bfloat16 can count exactly (its integers stop at 256)
    y = torch.zeros(3, 4, 20, 10, dtype=torch.bfloat16)
    y[:, 1] = 1.5
    y[0, 2, :5] = 0.25
    stats = ActivationStats(num_units=4)
    stats.update(y)
    report = stats.compute()
    assert report.active_count.tolist() == [0, 600, 50, 0]
    assert report.entries_per_unit == 600
    assert report.dead.tolist() == [True, False, False, True]
    assert report.killed == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_half_precision_counts_are_exact(dtype):
    # 4097 and 2049 are not representable in bfloat16 or float16: a sum in the activation dtype would round
    y = torch.zeros(4097, 3, dtype=dtype)
    y[:, 0] = 2.0
    y[:2049, 1] = 0.5
    stats = ActivationStats(num_units=3)
    stats.update(y)
    report = stats.compute()
    assert report.active_count.tolist() == [4097, 2049, 0]
    assert report.killed == 0 and report.samples == 4097


def test_blocks_beyond_float32_exactness_use_float64():
    n = 2**24 + 3  # float32 sums of ones stop being exact at 2**24
    y = torch.ones(1, 1, n)
    stats = ActivationStats(num_units=1)
    stats.update(y)
    assert stats.compute().active_count.tolist() == [n]


def test_lazy_size_and_reset():
    stats = ActivationStats()
    stats.update(torch.tensor([[0.0, 1.0, 2.0]]))
    assert stats.compute().num_units == 3
    stats.reset()
    report = stats.compute()
    assert report.num_units == 0 and not report.seen


def test_width_mismatch_raises():
    stats = ActivationStats(num_units=3, name="enc.1")
    with pytest.raises(ValueError, match=r"site 'enc\.1' has 3 units but got an output of shape"):
        stats.update(torch.ones(2, 4))


def test_empty_batch_counts_nothing():
    stats = ActivationStats(num_units=2)
    stats.update(torch.ones(0, 2))
    assert not stats.compute().seen


@pytest.mark.parametrize(("kwargs", "match"), [({"num_units": 0}, "`num_units`"), ({"unit_dim": 2}, "`unit_dim`")])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ActivationStats(**kwargs)


def test_unseen_report_and_state_round_trip():
    report = LayerReport.from_counts("s", torch.tensor([0, 3]), entries_per_unit=0, samples=0, killed=0)
    assert report.dead.tolist() == [False, False]
    assert math.isnan(report.living_data_fraction) and not report.collapsed
    report = LayerReport.from_counts("s", torch.tensor([0, 0]), entries_per_unit=5, samples=5, killed=5)
    assert report.collapsed and report.living_data_fraction == 0.0
    clone = LayerReport.from_state_dict(report.state_dict())
    assert clone.dead.tolist() == [True, True] and clone.killed == 5


def test_compute_sees_updates_made_after_an_earlier_compute():
    stats = ActivationStats(num_units=2, track_margin=True)
    stats.update(torch.tensor([[1.0, 0.0]]))
    assert stats.compute().active_count.tolist() == [1, 0]
    stats.update(torch.tensor([[1.0, 2.0]]))
    assert stats.compute().active_count.tolist() == [2, 1]
    stats.update_margin(torch.tensor([[4.0, -2.0]]))  # outside `update`: no cached result may hide it
    assert stats.compute().pre_mean.tolist() == [4.0, -2.0]


# ------------------------------------------------------------------------------------------------ edge outputs
def test_one_output_of_more_than_2_24_samples_is_counted_exactly() -> None:
    from lightning_relu.functional import activation_stats

    n = 2**24 + 3  # one unit per sample: float32 counts per position would stop at 2**24
    x = torch.ones(n, 1)
    x[:2] = 0.0
    metric = ActivationStats()
    metric.update(x)
    assert metric.active.tolist() == [n - 2] and int(metric.samples) == n and int(metric.killed) == 2
    assert activation_stats(x.view(-1)).active_count.tolist() == [n - 2]


@pytest.mark.parametrize(("shape", "unit_dim", "units"), [((4, 0, 3), -1, 3), ((4, 3, 0), 1, 3), ((4, 0), None, 0)])
def test_an_output_without_entries_adds_nothing(shape, unit_dim, units) -> None:
    from lightning_relu.functional import activation_stats

    report = activation_stats(torch.zeros(shape), unit_dim)
    assert report.num_units == units and report.samples == 0 and report.killed == 0
    metric = ActivationStats(unit_dim=unit_dim)
    metric.update(torch.zeros(shape))
    assert int(metric.samples) == 0 and int(metric.entries) == 0 and metric.active.tolist() == [0] * units
    if units:  # and the metric counts the next output as if the empty one had not come
        nonempty = torch.rand(tuple(2 if d == 0 else d for d in shape)) - 0.5
        metric.update(nonempty.clamp(min=0))
        axis = unit_dim % nonempty.ndim if unit_dim is not None else -1
        expected = expected_counts([nonempty.clamp(min=0)], axis)
        assert metric.active.tolist() == expected["active"] and int(metric.samples) == expected["samples"]


def test_a_0_d_output_is_refused_with_the_arguments_name() -> None:
    with pytest.raises(ValueError, match=r"`output` must have a batch dimension, got a 0-d tensor"):
        ActivationStats().update(torch.tensor(1.0))


def test_states_reset_under_inference_mode_count_again_outside_it() -> None:
    metric = ActivationStats(track_margin=True)
    first = torch.rand(4, 3)
    metric.update(first)
    metric.update_margin(first - 0.5)
    with torch.inference_mode():  # an evaluation loop that resets the metric
        metric.reset()
    later = torch.rand(5, 3) - 0.5
    metric.update(later.clamp(min=0))
    metric.update_margin(later)
    expected = expected_counts([later.clamp(min=0)], -1)
    assert metric.active.tolist() == expected["active"] and int(metric.samples) == 5
    assert int(metric.pre_entries) == 5
    assert torch.allclose(metric.pre_sum, later.sum(0).double(), atol=1e-6)


def test_torchmetrics_forward_and_merge_state_without_a_width_given() -> None:
    x, y = (torch.rand(8, 4) - 0.3).clamp(min=0), (torch.rand(6, 4) - 0.6).clamp(min=0)
    metric = ActivationStats()
    report = metric(x)  # the report of this output alone, and the states hold it
    assert report.active_count.tolist() == expected_counts([x], -1)["active"]
    metric.reset()
    assert metric(y).active_count.tolist() == expected_counts([y], -1)["active"]
    assert metric.active.tolist() == expected_counts([y], -1)["active"]
    fresh, other = ActivationStats(), ActivationStats()
    other.update(x)
    fresh.merge_state(other)  # a metric without a width takes the other's
    fresh.merge_state(ActivationStats())  # one that saw nothing adds nothing
    fresh.merge_state({"active": torch.zeros(0, dtype=torch.int64)})
    both = expected_counts([x], -1)
    assert fresh.active.tolist() == both["active"] and int(fresh.samples) == both["samples"]
