from __future__ import annotations

import math

import pytest
import torch

from lightning_relu import ActivationStats, LayerReport


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
