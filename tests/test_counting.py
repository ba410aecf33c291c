"""The counting hot path (fused C kernel and ATen operations): scratch-buffer counts, pending results and
flushes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lightning_relu.stats as stats_module
import lightning_relu.tracker as tracker_module
from lightning_relu import ActivationStats, DeadUnitTracker
from lightning_relu.stats import flush_stats
from tests.helpers import counting_path


def brute(output: torch.Tensor, unit_dim: int) -> dict:
    """Per-unit counts, killed samples and the non-finite flag with Python loops over the entries."""
    if output.ndim == 1:
        output = output.unsqueeze(1)
    axis = output.ndim - 1 if output.ndim <= 2 else unit_dim % output.ndim
    values = output.to(torch.float64).movedim(axis, -1).reshape(output.shape[0], -1, output.shape[axis])
    units = output.shape[axis]
    active = [0] * units
    killed = 0
    for sample in values.tolist():
        flat = [v for block in sample for v in block]
        killed += all(v == 0 for v in flat)  # NaN is not 0: a sample holding NaN is not killed
        for block in sample:
            for u, v in enumerate(block):
                active[u] += v > 0  # NaN is not > 0, +Inf is
    nonfinite = any(not math.isfinite(v) for v in output.to(torch.float64).flatten().tolist())
    return {"active": active, "killed": killed, "nonfinite": int(nonfinite), "samples": output.shape[0]}


def sample_output(shape: tuple[int, ...], dtype: torch.dtype, seed: int, special: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = torch.relu(torch.randn(*shape, generator=g)).to(dtype)
    out[1] = 0  # a killed sample
    if out.ndim > 1:
        out.select(out.ndim - 1 if out.ndim == 2 else 1, 0).zero_()  # a dead unit
    if special:
        out.view(-1)[out.numel() // 2] = float("nan")
        out.view(-1)[-1] = float("inf")
    return out


SHAPES = [
    ((37, 5), -1),  # odd batch: no row blocks
    ((64, 16), -1),  # several chunks of the scratch buffer
    ((9, 3, 4, 5), 1),  # (batch, channels, h, w)
    ((7, 6, 3), -1),  # (batch, tokens, features)
    ((4, 10, 10), 1),  # one sample larger than the scratch buffer: the unbuffered path
    ((40,), -1),  # one unit per sample, smaller than the scratch buffer: a fresh temporary
]


@pytest.mark.parametrize(("shape", "unit_dim"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("special", [False, True])
@pytest.mark.parametrize("path", ["kernel", "aten"])
def test_counts_match_brute_force_in_every_path(monkeypatch, shape, unit_dim, dtype, special, path):
    monkeypatch.setattr(stats_module, "_SCRATCH_NUMEL", 64)  # small tensors cross chunk boundaries
    stats = ActivationStats(unit_dim=unit_dim if len(shape) > 2 else None)
    outputs = [sample_output(shape, dtype, seed, special and seed == 1) for seed in range(3)]
    with counting_path(path):
        for out in outputs:
            stats.accumulate(out)
    report = stats.compute()
    expected = [brute(out, unit_dim) for out in outputs]
    assert report.active_count.tolist() == [sum(col) for col in zip(*(e["active"] for e in expected), strict=True)]
    assert report.killed == sum(e["killed"] for e in expected)
    assert report.samples == sum(e["samples"] for e in expected)
    assert report.nonfinite_batches == sum(e["nonfinite"] for e in expected)
    assert report.entries_per_unit == sum(out.numel() // len(expected[0]["active"]) for out in outputs)


def test_scratch_buffer_is_reused_and_regrown(monkeypatch):
    monkeypatch.setattr(stats_module, "_SCRATCH_NUMEL", 16)
    first = stats_module._scratch(torch.float32)
    assert first.numel() >= 16 and stats_module._scratch(torch.float32) is first
    bigger = first.numel() + 1  # another test of this thread may have made the buffer already
    monkeypatch.setattr(stats_module, "_SCRATCH_NUMEL", bigger)
    assert stats_module._scratch(torch.float32).numel() == bigger


@pytest.fixture
def aten():
    """Count with ATen operations: their results wait to be folded (the kernel adds into the states at once)."""
    with counting_path("aten"):
        yield


@pytest.fixture(params=["kernel", "aten"])
def path(request):
    with counting_path(request.param):
        yield request.param


def test_kernel_counts_straight_into_the_states():
    out = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0], [3.0, 0.0, float("nan")]])
    with counting_path("kernel"):
        stats = ActivationStats(num_units=3)
        assert stats.accumulate(out) is False  # nothing waits
        assert stats.accumulate(out[:2]) is False
    assert stats.pending == 0
    assert stats.active.tolist() == [3.0, 0.0, 2.0]  # already in the state, added to what was there
    assert int(stats.killed) == 2 and int(stats.nonfinite) == 1
    assert int(stats.samples) == 0  # the sample count waits on the host until a reader folds it
    report = stats.compute()
    assert report.samples == 5 and report.entries_per_unit == 5 and report.killed == 2


def test_accumulate_leaves_results_pending_until_a_reader_flushes(aten):
    stats = ActivationStats(num_units=2)
    stats.accumulate(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert stats.pending == 1 and stats.active.tolist() == [0.0, 0.0]  # not folded yet
    report = stats.compute()  # compute folds
    assert stats.pending == 0 and report.active_count.tolist() == [1, 0] and report.killed == 1
    stats.update(torch.tensor([[2.0, 3.0]]))  # the public update folds at once
    assert stats.pending == 0 and stats.active.tolist() == [2.0, 1.0] and int(stats.samples) == 3


def test_reset_drops_pending_results(aten):
    stats = ActivationStats(num_units=1)
    stats.accumulate(torch.ones(3, 1))
    stats.reset()
    with pytest.warns(UserWarning, match="before the ``update`` method"):  # torchmetrics: nothing counted since
        report = stats.compute()
    assert stats.pending == 0 and not report.seen


def test_pending_results_are_bounded(aten):
    stats = ActivationStats(num_units=1)
    for _ in range(3 * stats_module._MAX_PENDING):
        stats.accumulate(torch.ones(2, 1))
        assert stats.pending < stats_module._MAX_PENDING
    assert stats.compute().active_count.tolist() == [6 * stats_module._MAX_PENDING]


def test_flush_of_several_sites_and_rounds_equals_separate_updates(aten):
    g = torch.Generator().manual_seed(0)
    outputs = {name: [torch.relu(torch.randn(b, 4, generator=g)) for b in (5, 5, 3)] for name in "abc"}
    batched = {name: ActivationStats(num_units=4) for name in outputs}
    separate = {name: ActivationStats(num_units=4) for name in outputs}
    for name, outs in outputs.items():
        for out in outs[: 2 if name == "b" else 3]:  # uneven rounds, mixed batch sizes
            batched[name].accumulate(out)
            separate[name].update(out)
    flush_stats([*batched.values(), batched["a"]])  # a site named twice is folded once
    for name in outputs:
        assert batched[name].pending == 0
        batched[name].flush()  # sample and entry counts wait on the host until a reader folds them
        for state in ("active", "samples", "entries", "killed", "nonfinite"):
            assert torch.equal(getattr(batched[name], state), getattr(separate[name], state)), (name, state)


def test_moving_the_metric_folds_pending_results_first(path):
    stats = ActivationStats(num_units=2)
    stats.accumulate(torch.tensor([[1.0, 1.0]]))
    stats.to(torch.float64)
    assert stats.pending == 0 and stats.compute().active_count.tolist() == [1, 1]


def test_tracker_folds_after_a_number_of_passes_and_on_report(aten):
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU())
    g = torch.Generator().manual_seed(0)
    fold_after = tracker_module._FOLD_AFTER
    inputs = [torch.randn(6, 3, generator=g) for _ in range(fold_after + 1)]
    with torch.no_grad():  # active entries per site, summed over the first `fold_after` passes
        expected = [sum(int((part(x) > 0).sum()) for x in inputs[:fold_after]) for part in (net[:2], net)]
    with DeadUnitTracker(net) as tracker:
        for n, x in enumerate(inputs[:fold_after], start=1):
            net(x)
            assert all(s.pending == n for s in tracker.stats.values())  # nothing folded yet
            assert all(int(s.active.sum()) == 0 for s in tracker.stats.values())
        net(inputs[fold_after])  # begins with `fold_after` passes waiting: they are folded, all sites at once
        assert all(s.pending == 1 for s in tracker.stats.values())
        assert [int(s.active.sum()) for s in tracker.stats.values()] == expected
        report = tracker.report()
    assert all(layer.samples == 6 * (fold_after + 1) for layer in report.values())
    assert all(s.pending == 0 for s in tracker.stats.values())


def test_tracker_on_the_kernel_path_holds_every_pass_in_its_states():
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU())
    g = torch.Generator().manual_seed(0)
    with counting_path("kernel"), DeadUnitTracker(net) as tracker, torch.no_grad():
        expected = [0, 0]
        for _ in range(3):
            x = torch.randn(6, 3, generator=g)
            tracker.pause()  # the reference passes are not counted
            expected = [e + int((part(x) > 0).sum()) for e, part in zip(expected, (net[:2], net), strict=True)]
            tracker.resume()
            net(x)
            assert not tracker._dirty and all(s.pending == 0 for s in tracker.stats.values())
            assert [int(s.active.sum()) for s in tracker.stats.values()] == expected


def test_flush_of_uneven_pending_results_equals_separate_updates():
    """Sites with different numbers of waiting results per batch size, widths, NaN/Inf batches, integer outputs."""
    g = torch.Generator().manual_seed(1)

    def out(batch: int, width: int) -> torch.Tensor:
        return torch.relu(torch.randn(batch, width, generator=g))

    nan, inf = out(4, 3), out(4, 3)
    nan[1, 2], inf[0, 0] = float("nan"), float("inf")
    plans = {
        "a": [out(4, 3), out(4, 3), out(2, 3), nan],
        "b": [out(4, 3), inf],  # fewer batches of 4 than "a"
        "c": [out(2, 5), out(2, 5), out(2, 5), out(4, 5)],  # another width
        "d": [torch.randint(0, 2, (4, 3), generator=g), torch.randint(0, 2, (4, 3), generator=g)],  # integers
        "e": [out(3, 2)],  # a single waiting result
    }
    batched = {name: ActivationStats(num_units=outs[0].shape[1]) for name, outs in plans.items()}
    separate = {name: ActivationStats(num_units=outs[0].shape[1]) for name, outs in plans.items()}
    for name, outs in plans.items():
        for output in outs:
            batched[name].accumulate(output)
            separate[name].update(output)
    flush_stats(batched.values())
    for name, outs in plans.items():
        assert batched[name].pending == 0
        batched[name].flush()
        for state in ("active", "samples", "entries", "killed", "nonfinite"):
            assert torch.equal(getattr(batched[name], state), getattr(separate[name], state)), (name, state)
        expected = [brute(output, 1) for output in outs]  # independent of the code under test
        assert batched[name].active.tolist() == [sum(e["active"][u] for e in expected) for u in range(outs[0].shape[1])]
        assert int(batched[name].killed) == sum(e["killed"] for e in expected)
        assert int(batched[name].nonfinite) == sum(e["nonfinite"] for e in expected)
    assert int(batched["a"].nonfinite) == 1 and int(batched["b"].nonfinite) == 1  # the data holds what is tested


def test_merge_state_folds_pending_results_of_both_metrics(path):
    a, b = ActivationStats(num_units=2), ActivationStats(num_units=2)
    a.accumulate(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    b.accumulate(torch.tensor([[1.0, 2.0]]))
    a.merge_state(b)
    report = a.compute()
    assert report.active_count.tolist() == [2, 1] and report.samples == 3 and report.killed == 1


def test_float64_counts_are_not_cast_by_a_dtype_move():
    holder = nn.Module()
    holder.stats = ActivationStats(num_units=1, track_margin=True)
    holder.to(dtype=torch.bfloat16)  # what bf16-true precision does to the LightningModule
    assert holder.stats.active.dtype == torch.float64 and holder.stats.pre_sum.dtype == torch.float64
    for _ in range(1000):  # bfloat16 integers stop being exact at 256
        holder.stats.update(torch.ones(1, 1))
    assert holder.stats.compute().active_count.tolist() == [1000]


def test_torchmetrics_forward_folds_pending_results_first(path):
    stats = ActivationStats(num_units=2)
    stats.accumulate(torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    stats(torch.tensor([[1.0, 1.0]]))
    report = stats.compute()
    assert report.active_count.tolist() == [3, 2] and report.samples == 3


def test_counts_saved_as_int64_load_and_keep_counting():
    old = ActivationStats(num_units=2)
    old.persistent(True)
    old.update(torch.tensor([[1.0, 0.0]]))
    state = {key: value.to(torch.int64) if key == "active" else value for key, value in old.state_dict().items()}
    new = ActivationStats(num_units=2)
    new.persistent(True)
    new.load_state_dict(state)
    new.update(torch.tensor([[1.0, 1.0]]))
    assert new.active.dtype == torch.float64 and new.compute().active_count.tolist() == [2, 1]


def test_sites_waiting_for_a_flush_are_listed_once(aten):
    outer = nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.ReLU()))
    with DeadUnitTracker(outer) as tracker:
        for _ in range(3 * stats_module._MAX_PENDING):
            outer[0](torch.randn(2, 3))  # the inner module only: the model's forward never folds
        assert len(tracker._dirty) == 1
        report = tracker.report()
    assert report["0.1"].samples == 2 * 3 * stats_module._MAX_PENDING


def test_fold_of_integer_beside_float32_counts_stays_exact():
    """Integer outputs give int64 counts; folded in one stack with float32 counts they must not pass through float32."""
    ints, floats = ActivationStats(num_units=1), ActivationStats(num_units=1)
    rows = torch.ones(1)
    ints._pending = [(torch.tensor([2**24 + 1]), rows), (torch.tensor([1]), rows)]  # 2**24 + 1 is not a float32
    floats._pending = [(torch.tensor([1.0]), rows), (torch.tensor([1.0]), rows)]
    flush_stats([ints, floats])
    assert ints.active.tolist() == [2**24 + 2] and floats.active.tolist() == [2.0]
