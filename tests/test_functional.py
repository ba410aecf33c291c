"""``lightning_relu.functional``: the one counting function against brute force (Python loops) in every layout, on both
ATen paths (the CPU's chunks into reused buffers, and the plain operations GPU tensors and ``torch.compile`` take);
the margin's sums against ``math.fsum``; and ``sign_flip_``'s question of which samples a site kills."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lightning_relu.functional as functional
from lightning_relu import ActivationStats, DeadUnitTracker
from lightning_relu.functional import _activation_stats_update, _margin_update, activation_stats
from lightning_relu.init import _SignFlipPass
from tests.conftest import expected_counts
from tests.helpers import conv_bn_net, counting_path, mlp


def brute(output: torch.Tensor, axis: int) -> tuple[list[int], int, int]:
    """Per-unit counts of entries > 0, killed samples (whole output 0; NaN is not 0) and whether any entry is NaN or
    Inf, by the brute-force oracle (``tests.conftest.expected_counts``)."""
    counts = expected_counts([output], axis)
    return counts["active"], counts["killed"], int(counts["nonfinite"])


def relu_output(shape: tuple[int, ...], dtype: torch.dtype, seed: int, special: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = torch.relu(torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)
    if shape[0] > 1:
        out[1] = 0  # a killed sample
    if special and out.numel() > 2:
        out.view(-1)[out.numel() // 2] = float("nan")
        out.view(-1)[-1] = float("inf")
    return out


def check(out: torch.Tensor, axis: int, unit_dim: int | None) -> None:
    """Twice through the same workspace (the second count reuses it), against brute force."""
    expected_counts, expected_killed, expected_nonfinite = brute(out, axis)
    workspace = None
    for _ in range(2):
        active, killed, nonfinite, samples, entries, workspace = _activation_stats_update(out, unit_dim, workspace)
        assert active.dtype == torch.int64 and active.tolist() == expected_counts
        assert int(killed) == expected_killed and int(nonfinite) == expected_nonfinite
        assert samples == out.shape[0] and entries == out.numel() // out.shape[axis]


LAYOUTS = [
    ((5, 7), 1, None, None),  # Linear output: units last
    ((300, 3), 1, None, None),  # more samples than a chunk
    ((7, 6, 3), 2, -1, None),  # (batch, tokens, features): units last with positions
    ((9, 3, 4, 5), 1, 1, None),  # NCHW: units first
    ((4, 33), 1, None, None),  # a width that is no multiple of a SIMD vector
    ((2, 3, 1000), 1, 1, None),  # (batch, channels, length): units first, long rows
    ((64, 16, 8, 8), 1, 1, None),  # 65536 entries: several chunks
    ((64, 16, 8, 8), 1, 1, torch.channels_last),  # NHWC memory
    ((3, 4, 2, 3, 5), 1, 1, torch.channels_last_3d),
    ((1, 1), 1, None, None),
    ((6, 5, 1, 1), 1, 1, None),
    ((6, 1, 4, 4), 1, 1, torch.channels_last),
    ((5, 4, 3), 1, 1, "offset"),  # a view that starts inside its storage
    ((5, 4, 3), 1, 1, "transposed"),  # not contiguous
    ((6, 4, 3), 1, 1, "every other sample"),  # a strided batch
]


def laid_out(out: torch.Tensor, layout: object) -> torch.Tensor:
    if layout == "offset":
        out = torch.cat([torch.full_like(out[:2], 7.0), out])[2:]  # entries before the view must not be read
        assert out.storage_offset() > 0
    elif layout == "transposed":
        out = out.transpose(1, 2).contiguous().transpose(1, 2)
        assert not out.is_contiguous()
    elif layout == "every other sample":
        out = torch.stack([out, torch.full_like(out, 7.0)], 1).flatten(0, 1)[::2]
        assert not out.is_contiguous()
    elif layout is not None:
        out = out.contiguous(memory_format=layout)
    return out


@pytest.mark.parametrize(("shape", "axis", "unit_dim", "layout"), LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("special", [False, True])
@pytest.mark.parametrize("kept", ["per entry", "per unit"])
def test_counts_match_brute_force(monkeypatch, path, shape, axis, unit_dim, layout, dtype, special, kept):
    monkeypatch.setattr(functional, "_CHUNK_NUMEL_PER_THREAD", 64)  # several chunks even for small outputs
    # the CPU path keeps its partial counts per entry of a sample, or (larger samples) per unit
    monkeypatch.setattr(functional, "_MAX_POSITIONS_KEPT", 2**12 if kept == "per entry" else 0)
    out = laid_out(relu_output(shape, dtype, seed=len(shape), special=special), layout)
    check(out, axis, unit_dim)


@given(
    batch=st.integers(1, 40),
    middle=st.lists(st.integers(1, 9), max_size=2),
    units=st.integers(1, 40),
    units_first=st.booleans(),
    zero_share=st.floats(0, 1),
    chunk=st.sampled_from([1, 7, 64, 2**17]),
    plain=st.booleans(),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_counts_match_brute_force_on_random_shapes(
    monkeypatch, batch, middle, units, units_first, zero_share, chunk, plain, seed
):
    monkeypatch.setattr(functional, "_CHUNK_NUMEL_PER_THREAD", chunk)
    g = torch.Generator().manual_seed(seed)
    shape = (batch, units, *middle) if units_first else (batch, *middle, units)
    out = torch.rand(shape, generator=g)
    out[out < zero_share] = 0
    axis = 1 if units_first or out.ndim == 2 else out.ndim - 1
    with counting_path("plain" if plain else "cpu"):
        check(out, axis, 1 if units_first else -1)


def test_integer_and_bool_outputs(path):
    g = torch.Generator().manual_seed(0)
    ints = torch.randint(0, 3, (9, 4, 5), generator=g)
    ints[2] = 0
    check(ints, 1, 1)
    check(ints.bool(), 1, 1)


def test_threads_agree(monkeypatch):
    monkeypatch.setattr(functional, "_CHUNK_NUMEL_PER_THREAD", 2**13)  # chunks of 16 and of 32 samples of `out`
    out = relu_output((128, 64, 4, 4), torch.float32, seed=3, special=True)
    wide = relu_output((64, 2048), torch.float32, seed=4)
    threads = torch.get_num_threads()
    results, chunks = [], []
    try:
        for n in (1, 4):
            torch.set_num_threads(n)  # the chunk size follows the number of threads
            results.append([_activation_stats_update(x, 1)[:3] for x in (out, wide)])
            chunks.append(len(_activation_stats_update(out, 1)[-1].sizes))
    finally:
        torch.set_num_threads(threads)
    assert chunks == [8, 4]
    for serial, parallel in zip(*results, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(serial, parallel, strict=True))


def test_a_workspace_serves_only_outputs_like_its_own():
    """Another shape, stride, dtype or unit axis, a tensor subclass, another thread: a new workspace or none."""
    import threading

    out = relu_output((6, 4, 3), torch.float32, seed=0)
    _, _, _, _, _, ws = _activation_stats_update(out, 1)
    assert ws is not None and _activation_stats_update(out.clone(), 1, ws)[-1] is ws
    for other, unit_dim in (
        (out[:5], 1),
        (out.transpose(1, 2).contiguous().transpose(1, 2), 1),
        (out.double(), 1),
        (out, -1),
    ):
        active, *_, again = _activation_stats_update(other, unit_dim, ws)
        assert again is not ws and active.tolist() == brute(other, 1 if unit_dim == 1 else 2)[0]

    class Sub(torch.Tensor):
        pass

    assert _activation_stats_update(out.as_subclass(Sub), 1, ws)[-1] is None
    seen = []
    thread = threading.Thread(target=lambda: seen.append(_activation_stats_update(out, 1, ws)[-1]))
    thread.start()
    thread.join()
    assert seen[0] is not None and seen[0] is not ws  # the mask buffer is per thread


@pytest.mark.parametrize("kept", ["per entry", "per unit"])
def test_metric_states_read_exact_while_counts_are_held_back(monkeypatch, kept):
    """The CPU path holds partial counts back (float32 sums, per-sample sums of recent outputs) and folds them into the
    int64 states when they would stop being exact, when the kept sums are full, when the output's shape changes, and
    before any read or write of a state: every read in between equals brute force."""
    monkeypatch.setattr(functional, "_MAX_POSITIONS_KEPT", 2**12 if kept == "per entry" else 0)
    monkeypatch.setattr(functional, "_ROWS_KEPT", 3)  # the kept per-sample sums fill every third output
    monkeypatch.setattr(functional, "_FLOAT32_EXACT", 40)  # float32 counts fold before they pass 40
    monkeypatch.setattr(functional, "_CHUNK_NUMEL_PER_THREAD", 32)
    stats = ActivationStats(num_units=3, unit_dim=1)
    stats.persistent(True)
    expected = [0, 0, 0]
    killed = nonfinite = samples = 0
    shapes = [(6, 3, 2, 2)] * 4 + [(5, 3, 2, 2)] + [(6, 3, 2, 2)] * 3  # a smaller batch in between
    for step, shape in enumerate(shapes):
        out = relu_output(shape, torch.float32, seed=step, special=step == 5)
        stats.update(out)
        counts, k, n = brute(out, 1)
        expected = [e + c for e, c in zip(expected, counts, strict=True)]
        killed, nonfinite, samples = killed + k, nonfinite + n, samples + shape[0]
        if step % 2:  # reads in the middle of the stream fold what is held back
            assert stats.active.tolist() == expected
            assert (int(stats.killed), int(stats.nonfinite), int(stats.samples)) == (killed, nonfinite, samples)
            assert int(stats.entries) == samples * 4
    report = stats.compute()
    assert report.active_count.tolist() == expected and report.killed == killed and report.samples == samples
    assert report.nonfinite_batches == nonfinite == 1
    stats.update(relu_output((6, 3, 2, 2), torch.float32, seed=9))
    stats.reset()  # what was held back goes with the states it belongs to
    assert stats.active.tolist() == [0, 0, 0] and int(stats.samples) == 0 and int(stats.killed) == 0
    out = relu_output((6, 3, 2, 2), torch.float32, seed=10)
    stats.update(out)
    assert stats.state_dict()["active"].tolist() == brute(out, 1)[0]  # a checkpoint holds what was held back


def test_public_function_reports_one_tensor():
    out = relu_output((8, 3, 2, 2), torch.float32, seed=5, special=True)
    out[:, 2] = 0  # a dead unit
    counts, killed, nonfinite = brute(out, 1)
    report = activation_stats(out, name="conv", eps=0.3)
    assert report.name == "conv" and report.active_count.tolist() == counts
    # a non-finite output is not judged: no unit is dead or dying (issue 20)
    assert report.dead.tolist() == [c == 0 and not nonfinite for c in counts]
    assert report.killed == killed and report.samples == 8 and report.nonfinite_batches == nonfinite
    assert report.dying.tolist() == [c / 32 < 0.3 and not nonfinite for c in counts]
    empty = activation_stats(torch.zeros(0, 5))
    assert empty.num_units == 5 and not empty.seen
    with pytest.raises(ValueError, match="`unit_dim` must be 1, -1 or None, got 2"):
        activation_stats(out, unit_dim=2)


def test_the_metric_reports_what_the_function_reports(path):
    g = torch.Generator().manual_seed(2)
    outputs = [torch.relu(torch.randn(5, 3, 4, generator=g)) for _ in range(3)]
    stats = ActivationStats(unit_dim=-1)
    for out in outputs:
        stats.update(out)
    whole = activation_stats(torch.cat(outputs), unit_dim=-1)
    report = stats.compute()
    assert report.active_count.tolist() == whole.active_count.tolist()
    assert (report.killed, report.samples, report.entries_per_unit) == (whole.killed, whole.samples, 45)


def test_tracker_reports_are_identical_on_both_paths():
    torch.manual_seed(0)
    batches = [torch.randn(32, 3, 8, 8) for _ in range(3)]
    reports = {}
    for counting in ("plain", "cpu"):
        with counting_path(counting):
            for name, model, data in (
                ("cnn", conv_bn_net(), batches),
                ("mlp", mlp([12, 40, 30, 3]), [b.flatten(1)[:, :12] for b in batches]),
            ):
                with DeadUnitTracker(model) as tracker:
                    for x in data:
                        model(x)
                    reports[counting, name] = tracker.report()
    for name in ("cnn", "mlp"):
        a, k = reports["plain", name], reports["cpu", name]
        assert a.keys() == k.keys()
        for site in a:
            assert torch.equal(a[site].active_count, k[site].active_count), site
            assert (a[site].killed, a[site].samples, a[site].nonfinite_batches) == (
                k[site].killed,
                k[site].samples,
                k[site].nonfinite_batches,
            )


# --------------------------------------------------------------------------------------------------------------------
# the margin's per-unit sums
# --------------------------------------------------------------------------------------------------------------------


def brute_moments(pre: torch.Tensor, axis: int) -> tuple[list[float], list[float], int]:
    """Per unit: the entries summed and their squares summed, with Python floats (double); entries per unit."""
    rows = pre.to(torch.float64).movedim(axis, -1).reshape(-1, pre.shape[axis]).tolist()
    sums = [math.fsum(column) for column in zip(*rows, strict=True)]
    squares = [math.fsum(v * v for v in column) for column in zip(*rows, strict=True)]
    return sums, squares, len(rows)


@pytest.mark.parametrize(("shape", "axis", "unit_dim", "layout"), LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_margin_sums_match_brute_force(shape, axis, unit_dim, layout, dtype):
    pre = torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)), dtype=torch.float64).to(dtype)
    pre = laid_out(pre, layout)
    total, squares, entries = _margin_update(pre, unit_dim)
    sums, sums_of_squares, count = brute_moments(pre, axis)
    # float32 reductions for float32 (the ATen path's precision), float64 for float64
    torch.testing.assert_close(total, torch.tensor(sums, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(squares, torch.tensor(sums_of_squares, dtype=torch.float64), rtol=1e-5, atol=1e-5)
    assert total.dtype == squares.dtype == torch.float64 and entries == count


# --------------------------------------------------------------------------------------------------------------------
# sign_flip_'s question: which samples does a site kill?
# --------------------------------------------------------------------------------------------------------------------


def brute_dead(z: torch.Tensor, flipped: bool) -> list[bool]:
    """Per sample: whether no entry is > 0 (flipped: < 0), NaN being neither, with Python loops."""
    rows = z.to(torch.float64).reshape(z.shape[0], -1).tolist()
    if flipped:
        return [all(v >= 0 for v in row) for row in rows]
    return [all(v <= 0 for v in row) for row in rows]


def pre_activation(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Samples of every kind: random, all negative, all zero (with -0.0), negative but for a NaN, a +Inf or one
    positive entry at the end, all positive, all -Inf."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*shape, generator=g, dtype=torch.float64)
    flat = z.view(shape[0], -1)
    kinds = [
        lambda row: row.copy_(-row.abs()),
        lambda row: row.zero_().view(-1)[::2].fill_(-0.0),
        lambda row: row.copy_(-row.abs()).view(-1)[-1:].fill_(float("nan")),
        lambda row: row.copy_(-row.abs()).view(-1)[:1].fill_(float("inf")),
        lambda row: row.copy_(-row.abs()).view(-1)[-1:].fill_(0.5),
        lambda row: row.copy_(row.abs() + 0.1),
        lambda row: row.fill_(-float("inf")),
    ]
    for sample in range(1, shape[0], 2):
        kinds[(sample // 2) % len(kinds)](flat[sample])
    return z.to(dtype)


@pytest.mark.parametrize(
    ("shape", "layout"),
    [((9, 33), None), ((15, 3, 4, 5), None), ((15, 3, 4, 5), torch.channels_last), ((7, 4, 6), "transposed"),
     ((64, 32, 8, 4), None), ((1, 20), None), ((14, 1), None)],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("flipped", [False, True])
@pytest.mark.parametrize("with_alive", [False, True])
def test_killed_samples_match_brute_force(shape, layout, dtype, flipped, with_alive):
    z = pre_activation(shape, dtype, seed=len(shape))
    if layout == "transposed":
        z = z.transpose(1, 2)
    elif layout is not None:
        z = z.contiguous(memory_format=layout)
    n = shape[0]
    flip = _SignFlipPass([])
    flip.start(n)
    flip._alive = (torch.arange(n) % 3 != 0) if with_alive else None
    dead = torch.ones(n, dtype=torch.bool)
    dead[::2] = False  # whatever it held is overwritten
    found = flip._killed_on_host(z, flipped, dead)
    expected = brute_dead(z, flipped)
    assert dead.tolist() == expected
    marked = flip._alive.tolist() if with_alive else [True] * n
    assert found == (sum(expected), sum(d and a for d, a in zip(expected, marked, strict=True)))
    assert 0 < sum(expected) < n or n < 3  # the samples hold both kinds
