"""The counting hot path on both ATen paths (the CPU's chunks into reused buffers, and the plain operations that GPU
tensors and ``torch.compile`` take): counts against brute force, the metric's states, moves, merges and loads."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lightning_relu.functional as functional
from lightning_relu import ActivationStats, DeadUnitTracker
from tests.conftest import expected_counts


def brute(output: torch.Tensor, unit_dim: int) -> dict:
    """Per-unit counts, killed samples and the non-finite flag, by the brute-force oracle
    (``tests.conftest.expected_counts``) along the dimension the metric reads units from."""
    if output.ndim == 1:
        output = output.unsqueeze(1)
    axis = output.ndim - 1 if output.ndim <= 2 else unit_dim % output.ndim
    counts = expected_counts([output], axis)
    return {
        "active": counts["active"],
        "killed": counts["killed"],
        "nonfinite": int(counts["nonfinite"]),
        "samples": counts["samples"],
    }


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
    ((37, 5), -1),  # odd batch: a short last chunk
    ((64, 16), -1),  # several chunks
    ((9, 3, 4, 5), 1),  # (batch, channels, h, w)
    ((7, 6, 3), -1),  # (batch, tokens, features)
    ((4, 10, 10), 1),  # one sample per chunk
    ((40,), -1),  # one unit per sample
]


@pytest.mark.parametrize(("shape", "unit_dim"), SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("special", [False, True])
def test_counts_match_brute_force_in_every_path(monkeypatch, path, shape, unit_dim, dtype, special):
    monkeypatch.setattr(functional, "_CHUNK_NUMEL_PER_THREAD", 16)  # small tensors cross chunk boundaries
    stats = ActivationStats(unit_dim=unit_dim if len(shape) > 2 else None)
    outputs = [sample_output(shape, dtype, seed, special and seed == 1) for seed in range(3)]
    for out in outputs:
        stats.update(out)
    report = stats.compute()
    expected = [brute(out, unit_dim) for out in outputs]
    assert report.active_count.tolist() == [sum(col) for col in zip(*(e["active"] for e in expected), strict=True)]
    assert report.killed == sum(e["killed"] for e in expected)
    assert report.samples == sum(e["samples"] for e in expected)
    assert report.nonfinite_batches == sum(e["nonfinite"] for e in expected)
    assert report.entries_per_unit == sum(out.numel() // len(expected[0]["active"]) for out in outputs)


def test_cpu_buffers_are_built_once_per_shape_and_reused():
    stats = ActivationStats(num_units=3)
    a, b = torch.relu(torch.randn(4, 3)), torch.relu(torch.randn(5, 3))
    stats.update(a)
    first = stats._workspace
    assert first is not None
    stats.update(a * 2)
    assert stats._workspace is first  # same shape: nothing built, nothing allocated by the counting
    stats.update(b)
    assert stats._workspace is not first  # another shape: its own buffers
    expected = [brute(x, -1)["active"] for x in (a, a * 2, b)]
    assert stats.compute().active_count.tolist() == [sum(col) for col in zip(*expected, strict=True)]


def test_update_adds_to_the_states_at_once(path):
    out = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, 0.0], [3.0, 0.0, float("nan")]])
    stats = ActivationStats(num_units=3)
    stats.update(out)
    stats.update(out[:2])
    assert stats.active.tolist() == [3, 0, 2]  # in the states, added to what was there
    assert int(stats.killed) == 2 and int(stats.nonfinite) == 1
    assert int(stats.samples) == 5 and int(stats.entries) == 5
    report = stats.compute()
    assert report.samples == 5 and report.entries_per_unit == 5 and report.killed == 2


def test_moving_the_metric_keeps_its_counts(path):
    stats = ActivationStats(num_units=2)
    stats.update(torch.tensor([[1.0, 1.0]]))
    stats.to(torch.float64)
    stats.update(torch.tensor([[1.0, 0.0]], dtype=torch.float64))
    assert stats.compute().active_count.tolist() == [2, 1]


def test_tracker_holds_every_pass_in_its_states(path):
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2), nn.ReLU())
    g = torch.Generator().manual_seed(0)
    with DeadUnitTracker(net) as tracker, torch.no_grad():
        expected = [0, 0]
        for step in range(1, 4):
            x = torch.randn(6, 3, generator=g)
            tracker.pause()  # the reference passes are not counted
            expected = [e + int((part(x) > 0).sum()) for e, part in zip(expected, (net[:2], net), strict=True)]
            tracker.resume()
            net(x)
            assert [int(s.active.sum()) for s in tracker.stats.values()] == expected
            assert [int(s.samples) for s in tracker.stats.values()] == [6 * step, 6 * step]


def test_several_sites_and_uneven_batches_match_brute_force(path):
    """Sites with different numbers of batches per size, widths, NaN/Inf batches, integer outputs."""
    g = torch.Generator().manual_seed(1)

    def out(batch: int, width: int) -> torch.Tensor:
        return torch.relu(torch.randn(batch, width, generator=g))

    nan, inf = out(4, 3), out(4, 3)
    nan[1, 2], inf[0, 0] = float("nan"), float("inf")
    plans = {
        "a": [out(4, 3), out(4, 3), out(2, 3), nan],
        "b": [out(4, 3), inf],
        "c": [out(2, 5), out(2, 5), out(2, 5), out(4, 5)],
        "d": [torch.randint(0, 2, (4, 3), generator=g), torch.randint(0, 2, (4, 3), generator=g)],  # integers
        "e": [out(3, 2)],
    }
    stats = {name: ActivationStats(num_units=outs[0].shape[1]) for name, outs in plans.items()}
    for name, outs in plans.items():
        for output in outs:
            stats[name].update(output)
    for name, outs in plans.items():
        expected = [brute(output, 1) for output in outs]  # independent of the code under test
        assert stats[name].active.tolist() == [sum(e["active"][u] for e in expected) for u in range(outs[0].shape[1])]
        assert int(stats[name].killed) == sum(e["killed"] for e in expected)
        assert int(stats[name].nonfinite) == sum(e["nonfinite"] for e in expected)
        assert int(stats[name].samples) == sum(e["samples"] for e in expected)
    assert int(stats["a"].nonfinite) == 1 and int(stats["b"].nonfinite) == 1  # the data holds what is tested


def test_merge_state_sums_both_metrics(path):
    a, b = ActivationStats(num_units=2), ActivationStats(num_units=2)
    a.update(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    b.update(torch.tensor([[1.0, 2.0]]))
    a.merge_state(b)
    report = a.compute()
    assert report.active_count.tolist() == [2, 1] and report.samples == 3 and report.killed == 1


def test_margin_sums_merge_and_survive_a_dtype_move():
    a, b = ActivationStats(num_units=2, track_margin=True), ActivationStats(num_units=2, track_margin=True)
    x, y = torch.tensor([[1.5, -2.0], [0.5, 4.0]]), torch.tensor([[3.0, 1.0]])
    for stats, pre in ((a, x), (b, y)):
        stats.update_margin(pre)
        stats.update(torch.relu(pre))
    holder = nn.Module()
    holder.stats = a
    holder.to(dtype=torch.bfloat16)  # what bf16-true precision does to the LightningModule
    a.merge_state(b)
    report = a.compute()
    every = torch.cat([x, y]).double()
    # float32 reductions per batch, float64 sums across batches and processes
    torch.testing.assert_close(report.pre_mean, every.mean(0), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(report.pre_std, every.std(0, unbiased=False), rtol=1e-6, atol=1e-7)


def test_float64_counts_are_not_cast_by_a_dtype_move():
    holder = nn.Module()
    holder.stats = ActivationStats(num_units=1, track_margin=True)
    holder.to(dtype=torch.bfloat16)  # what bf16-true precision does to the LightningModule
    assert holder.stats.active.dtype == torch.int64 and holder.stats.pre_sum.dtype == torch.float64
    for _ in range(1000):  # bfloat16 integers stop being exact at 256
        holder.stats.update(torch.ones(1, 1))
        holder.stats.update_margin(torch.full((1, 1), 1000.25))
    report = holder.stats.compute()
    assert report.active_count.tolist() == [1000]
    assert report.pre_mean.tolist() == [1000.25]  # bfloat16 would have rounded the sum


def test_torchmetrics_forward_counts_the_batch_and_keeps_the_window(path):
    stats = ActivationStats(num_units=2)
    stats.update(torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    batch = stats(torch.tensor([[1.0, 1.0]]))
    assert batch.active_count.tolist() == [1, 1] and batch.samples == 1
    report = stats.compute()
    assert report.active_count.tolist() == [3, 2] and report.samples == 3


@pytest.mark.parametrize("saved_dtype", [torch.int64, torch.float64])  # this version's states, the last version's
def test_saved_counts_load_and_keep_counting(saved_dtype):
    old = ActivationStats(num_units=2)
    old.persistent(True)
    old.update(torch.tensor([[1.0, 0.0]]))
    state = {key: value.to(saved_dtype) if key == "active" else value for key, value in old.state_dict().items()}
    new = ActivationStats(num_units=2)
    new.persistent(True)
    new.load_state_dict(state)
    new.update(torch.tensor([[1.0, 1.0]]))
    assert new.active.dtype == torch.int64 and new.compute().active_count.tolist() == [2, 1]


def test_integer_counts_beyond_float32_stay_exact(path):
    """Per-unit counts above 2**24 (float32's last exact integer) are summed in float64 and kept in int64."""
    n = 2**24 + 3
    stats = ActivationStats(num_units=2)
    out = torch.zeros(1, 2, n)  # one sample, two channels of n positions
    out[0, 0] = 1.0
    out[0, 1, :7] = 2.0
    stats.update(out)
    stats.update(out)
    assert stats.compute().active_count.tolist() == [2 * n, 14]


def test_workspaces_are_left_out_of_copies_and_pickles():
    import copy
    import pickle

    stats = ActivationStats(num_units=2)
    stats.update(torch.tensor([[1.0, 0.0]]))
    assert stats._workspace is not None
    for clone in (copy.deepcopy(stats), pickle.loads(pickle.dumps(stats))):
        assert clone._workspace is None
        clone.update(torch.tensor([[0.0, 2.0]]))
        assert clone.compute().active_count.tolist() == [1, 1]
    assert stats.compute().active_count.tolist() == [1, 0]


@pytest.mark.parametrize("kept", ["per entry", "per unit"])
def test_copies_and_pickles_carry_held_back_counts_into_buffers_of_their_own(monkeypatch, kept):
    """A copy or a pickle of a metric that holds counts back (per entry of a sample, or per unit and chunk) counts on
    with its own buffers: its later outputs do not reach the original, nor the original's the copy."""
    import copy
    import pickle

    monkeypatch.setattr(functional, "_MAX_POSITIONS_KEPT", 2**12 if kept == "per entry" else 0)
    monkeypatch.setattr(functional, "_CHUNK_NUMEL_PER_THREAD", 16)  # several chunks per output
    outputs = [sample_output((9, 3, 4, 5), torch.float32, seed, special=seed == 2) for seed in range(4)]
    stats = ActivationStats(unit_dim=1)
    for out in outputs[:2]:
        stats.update(out)
    clones = [copy.deepcopy(stats), pickle.loads(pickle.dumps(stats))]
    assert all(clone._pending is not None and not clone._pending.empty for clone in clones)  # something held back
    stats.update(outputs[2])
    for clone in clones:
        clone.update(outputs[3])

    def summed(outs: list[torch.Tensor]) -> tuple[list[int], int, int]:
        expected = [brute(out, 1) for out in outs]
        active = [sum(col) for col in zip(*(e["active"] for e in expected), strict=True)]
        return active, sum(e["killed"] for e in expected), sum(e["nonfinite"] for e in expected)

    for metric, outs in ((stats, outputs[:3]), *((clone, [*outputs[:2], outputs[3]]) for clone in clones)):
        report = metric.compute()
        assert (report.active_count.tolist(), report.killed, report.nonfinite_batches) == summed(outs)


@pytest.mark.parametrize("kept", ["per entry", "per unit"])
def test_reading_the_per_sample_part_every_step_keeps_the_counts_exact(monkeypatch, kept):
    """The monitor reads ``nonfinite`` after every batch, which folds the kept per-sample sums and not the per-unit
    counts: those keep filling (and fold when full) without overwriting what they hold."""
    monkeypatch.setattr(functional, "_MAX_POSITIONS_KEPT", 2**12 if kept == "per entry" else 0)
    monkeypatch.setattr(functional, "_ROWS_KEPT", 3)
    monkeypatch.setattr(functional, "_CHUNK_NUMEL_PER_THREAD", 32)
    stats = ActivationStats(unit_dim=1)
    outputs = [sample_output((6, 3, 2, 2), torch.float32, seed, special=seed == 4) for seed in range(8)]
    nonfinite = 0
    for out in outputs:
        stats.update(out)
        nonfinite += brute(out, 1)["nonfinite"]
        assert int(stats.nonfinite) == nonfinite
    expected = [brute(out, 1) for out in outputs]
    assert stats.active.tolist() == [sum(col) for col in zip(*(e["active"] for e in expected), strict=True)]
    assert int(stats.killed) == sum(e["killed"] for e in expected) and nonfinite == 1


def test_outputs_of_many_chunks_keep_fewer_outputs_back_and_stay_exact(monkeypatch):
    """Each kept output holds a view per chunk into the pending buffers: an output of many chunks keeps fewer outputs
    back (so the views stay few) and folds more often, with the same counts."""
    monkeypatch.setattr(functional, "_CHUNK_NUMEL_PER_THREAD", 1)  # one sample per chunk: 40 chunks per output
    stats = ActivationStats(unit_dim=1)
    outputs = [sample_output((40, 3, 2, 2), torch.float32, seed, special=seed == 3) for seed in range(9)]
    for out in outputs:
        stats.update(out)
    pending = stats._pending
    assert pending is not None and len(pending.sizes) == 40
    assert pending.kept == functional._MAX_CHUNK_TARGETS // 40 < functional._ROWS_KEPT
    assert 0 < pending.filled < 9  # it has folded on the way
    targets = pending.targets
    views = sum(len(row) for row in targets.rows) + sum(len(part) for part in targets.counts)
    assert views <= 2 * functional._MAX_CHUNK_TARGETS
    expected = [brute(out, 1) for out in outputs]
    report = stats.compute()
    assert report.active_count.tolist() == [sum(col) for col in zip(*(e["active"] for e in expected), strict=True)]
    assert report.killed == sum(e["killed"] for e in expected)
    assert report.nonfinite_batches == sum(e["nonfinite"] for e in expected) == 1
