"""The fused C counting kernel: its counts against brute force in every layout it takes, the outputs it hands
back to ATen, its build fallbacks and the environment switch."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_relu import DeadUnitTracker, _native
from tests.helpers import conv_bn_net, counting_path, mlp


def brute(output: torch.Tensor, axis: int) -> tuple[list[int], list[str]]:
    """Per-unit counts of entries > 0, and per sample "zero", "finite" or "nonfinite", with Python loops."""
    values = output.to(torch.float64).movedim(axis, -1).reshape(output.shape[0], -1, output.shape[axis])
    counts = [0] * output.shape[axis]
    kinds = []
    for sample in values.tolist():
        flat = [v for block in sample for v in block]
        for block in sample:
            for u, v in enumerate(block):
                counts[u] += v > 0
        if any(not math.isfinite(v) for v in flat):
            kinds.append("nonfinite")
        else:
            kinds.append("zero" if all(v == 0 for v in flat) else "finite")
    return counts, kinds


def kinds_of(sums: torch.Tensor) -> list[str]:
    return ["nonfinite" if not math.isfinite(v) else "zero" if v == 0 else "finite" for v in sums.tolist()]


def check_accumulate(kernel, out: torch.Tensor, axis: int) -> None:
    """``kernel.accumulate`` adds to states that already hold counts exactly what brute force finds: the active
    entries per unit, the samples whose whole output is 0, and 1 when the output holds NaN or Inf."""
    units = out.shape[axis]
    before = torch.arange(units, dtype=torch.float64) * 2**40  # counts already there, beyond float32's integers
    active, killed, nonfinite = before.clone(), torch.tensor(5), torch.tensor(2)
    assert kernel.accumulate(out, axis, active, killed, nonfinite)
    expected_counts, expected_kinds = brute(out, axis)
    assert (active - before).tolist() == expected_counts
    assert int(killed) == 5 + expected_kinds.count("zero")
    assert int(nonfinite) == 2 + ("nonfinite" in expected_kinds)


def relu_output(shape: tuple[int, ...], dtype: torch.dtype, seed: int, special: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = torch.relu(torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)
    if shape[0] > 1:
        out[1] = 0  # a killed sample
    if special and out.numel() > 2:
        out.view(-1)[out.numel() // 2] = float("nan")
        out.view(-1)[-1] = float("inf")
    return out


@pytest.fixture
def kernel():
    with counting_path("kernel"):
        yield _native.counting_kernel()


LAYOUTS = [
    ((5, 7), 1, None),  # Linear output: units last
    ((300, 3), 1, None),  # more samples than threads, parallel
    ((7, 6, 3), 2, None),  # (batch, tokens, features): units last with positions
    ((9, 3, 4, 5), 1, None),  # NCHW: units first
    ((4, 33), 1, None),  # a width that is no multiple of a SIMD vector
    ((2, 3, 1000), 1, None),  # (batch, channels, length): units first, long rows
    ((64, 16, 8, 8), 1, None),  # 65536 entries: the parallel path
    ((64, 16, 8, 8), 1, torch.channels_last),  # NHWC memory: units last
    ((3, 4, 2, 3, 5), 1, torch.channels_last_3d),
    ((1, 1), 1, None),
    ((6, 5, 1, 1), 1, None),  # one position: read as units last
    ((6, 1, 4, 4), 1, torch.channels_last),  # one channel: channels-last memory is also contiguous
    ((6, 5, 1, 1), 1, torch.channels_last),
    ((5, 4, 3), 1, "offset"),  # a view that starts inside its storage
    ((5, 4, 3), 1, "odd size-1 strides"),
]


@pytest.mark.parametrize(("shape", "axis", "memory_format"), LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("special", [False, True])
def test_kernel_counts_match_brute_force(kernel, shape, axis, memory_format, dtype, special):
    out = relu_output(shape, dtype, seed=len(shape), special=special)
    if memory_format == "offset":
        out = torch.cat([torch.full_like(out[:2], 7.0), out])[2:]  # entries before the view must not be read
        assert out.storage_offset() > 0
    elif memory_format == "odd size-1 strides":
        a, b, c = out.stride()
        out = out.as_strided((shape[0], shape[1], 1, shape[2]), (a, b, 1000, c))  # a size-1 dim's stride is free
        assert out.is_contiguous()
    elif memory_format is not None:
        out = out.contiguous(memory_format=memory_format)
    result = kernel.count(out, axis)
    assert result is not None
    counts, sums = result
    expected_counts, expected_kinds = brute(out, axis)
    assert counts.dtype == torch.float64 and counts.tolist() == expected_counts
    assert sums.dtype == dtype and kinds_of(sums) == expected_kinds
    finite = sums.isfinite()
    reference = out.to(torch.float64).sum(tuple(range(1, out.ndim)))
    torch.testing.assert_close(sums[finite].double(), reference[finite], rtol=1e-5, atol=1e-6)
    check_accumulate(kernel, out, axis)


@given(
    batch=st.integers(1, 40),
    middle=st.lists(st.integers(1, 9), max_size=2),
    units=st.integers(1, 40),
    units_first=st.booleans(),
    zero_share=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_kernel_counts_match_brute_force_on_random_shapes(kernel, batch, middle, units, units_first, zero_share, seed):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, units, *middle) if units_first else (batch, *middle, units)
    out = torch.rand(shape, generator=g)
    out[out < zero_share] = 0
    axis = 1 if units_first else out.ndim - 1
    counts, sums = kernel.count(out, axis)
    expected_counts, expected_kinds = brute(out, axis)
    assert counts.tolist() == expected_counts
    assert kinds_of(sums) == expected_kinds
    check_accumulate(kernel, out, axis)


def test_kernel_threads_agree(kernel):
    out = relu_output((128, 64, 4, 4), torch.float32, seed=3, special=True)
    wide = relu_output((64, 2048), torch.float32, seed=4)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        serial = [kernel.count(out, 1), kernel.count(wide, 1)]
        torch.set_num_threads(max(2, threads))
        parallel = [kernel.count(out, 1), kernel.count(wide, 1)]
    finally:
        torch.set_num_threads(threads)
    for (c1, s1), (c2, s2) in zip(serial, parallel, strict=True):
        assert torch.equal(c1, c2)
        assert kinds_of(s1) == kinds_of(s2)


@pytest.mark.parametrize(
    "states",
    [
        {"active": torch.zeros(4, dtype=torch.int64)},  # counts loaded as int64: ATen folds them
        {"active": torch.zeros(4, dtype=torch.float32)},
        {"active": torch.zeros(5, dtype=torch.float64)},  # another width
        {"active": torch.zeros(8, dtype=torch.float64)[::2]},  # not contiguous
        {"killed": torch.zeros((), dtype=torch.float64)},
        {"nonfinite": torch.zeros(2, dtype=torch.int64)},
        {"killed": torch.zeros((), dtype=torch.int64, device="meta")},
    ],
    ids=["int64", "float32", "width", "strided", "float killed", "two flags", "meta"],
)
def test_accumulate_declines_states_it_cannot_write(kernel, states):
    """States of another dtype, size or device are left untouched (False): the caller counts with ATen."""
    full = {
        "active": torch.zeros(4, dtype=torch.float64),
        "killed": torch.zeros((), dtype=torch.int64),
        "nonfinite": torch.zeros((), dtype=torch.int64),
        **states,
    }
    before = {name: state.clone() for name, state in full.items()}
    assert not kernel.accumulate(relu_output((6, 4), torch.float32, seed=0, special=True), 1, **full)
    for name, state in full.items():
        assert state.device.type == "meta" or torch.equal(state, before[name]), name


@pytest.mark.parametrize("every", [3, 6])
def test_int32_counts_are_folded_before_they_could_overflow(every):
    """Each thread keeps int32 counts and folds them into int64 every LR_FOLD_EVERY positions (2**30): built with
    a fold every 3 positions (rows one at a time) or 6 (four at a time, then single rows up to the fold) and every
    output split over threads, counts and sums stay right across many folds."""
    with counting_path("kernel"):
        library, _ = _native._build(_native._compiler(), defines={"LR_FOLD_EVERY": every, "LR_PARALLEL_MIN": 1})
    kernel = _native._Kernel(library, "test")
    threads = torch.get_num_threads()
    try:
        for count in sorted({1, 2, threads}):
            torch.set_num_threads(count)
            for shape, axis in (((10, 7, 5), 2), ((4, 5, 11), 1), ((9, 4), 1)):
                out = relu_output(shape, torch.float32, seed=1, special=True)
                counts, sums = kernel.count(out, axis)
                expected_counts, expected_kinds = brute(out, axis)
                assert counts.tolist() == expected_counts, (count, shape)
                assert kinds_of(sums) == expected_kinds, (count, shape)
                check_accumulate(kernel, out, axis)
    finally:
        torch.set_num_threads(threads)


def test_counting_goes_through_the_kernel(monkeypatch):
    """The tracker's hot path calls the kernel for the outputs it takes (else every "kernel" test above could pass on
    ATen alone): each site binds the kernel call once, on its first output, and later passes run that call again
    without binding; the reports hold what the calls counted."""
    with counting_path("kernel"):
        kernel = _native.counting_kernel()
        bound, runs = [], []

        class Spy:
            run = staticmethod(_native._Kernel.run)

            def bind(self, output, axis, active, killed, nonfinite):
                call = kernel.bind(output, axis, active, killed, nonfinite)
                bound.append(call is not None)
                if call is None:
                    return None
                function, arguments = call

                def counted(*args):
                    runs.append(args[0])
                    return function(*args)

                return counted, arguments

        monkeypatch.setitem(_native._state, "kernel", Spy())
        model = conv_bn_net()
        x = torch.randn(6, 3, 8, 8)
        with DeadUnitTracker(model) as tracker:
            for _ in range(3):
                model(x)
            assert not tracker._dirty  # counted straight into the states: nothing waits for a fold
            report = tracker.report()
        assert bound == [True, True, True]  # the first pass binds each site's call...
        assert len(runs) == 9  # ...which every pass runs
        with torch.no_grad():
            hidden = model[2](model[1](model[0](x)))
        assert report["2"].active_count.tolist() == [3 * c for c in brute(hidden, 1)[0]]
        assert report["2"].samples == 18


def test_accumulate_again_takes_only_outputs_like_the_last(kernel):
    """``accumulate_again`` reruns the last kernel call only for a plain CPU output of the same shape, strides and
    dtype into the same states; anything else is declined untouched and ``accumulate`` counts it. Whatever the mix,
    the counts are brute force's over every output."""
    from lightning_relu import ActivationStats

    class Marked(torch.Tensor):
        pass

    stats = ActivationStats()
    first = relu_output((6, 3, 4, 4), torch.float32, seed=0, special=True)
    assert not stats.accumulate_again(first)  # nothing bound yet
    stats.accumulate(first)
    seen = [first]
    alike = relu_output((6, 3, 4, 4), torch.float32, seed=1)
    others = [
        relu_output((7, 3, 4, 4), torch.float32, seed=2),  # another batch size
        relu_output((6, 3, 4, 4), torch.float64, seed=3),  # another dtype
        relu_output((6, 3, 4, 4), torch.float32, seed=4).contiguous(memory_format=torch.channels_last),  # strides
        relu_output((6, 3, 4, 4), torch.float32, seed=5).as_subclass(Marked),
        torch._neg_view(-relu_output((6, 3, 4, 4), torch.float32, seed=6)),  # same strides, negated view
        relu_output((6, 3, 4, 4), torch.float32, seed=7).to_sparse(),
    ]
    for other in others:
        stats.accumulate(first)  # bind the call for `first` again
        seen.append(first)
        before = {name: getattr(stats, name).clone() for name in ("active", "killed", "nonfinite")}
        assert not stats.accumulate_again(other), other.layout
        for name, state in before.items():
            assert torch.equal(getattr(stats, name), state), name
        if other.layout == torch.strided:
            stats.accumulate(other)
            seen.append(other)
    stats.accumulate(first)
    assert stats.accumulate_again(alike)
    seen += [first, alike]
    report = stats.compute()
    expected = [sum(column) for column in zip(*(brute(out.resolve_neg(), 1)[0] for out in seen), strict=True)]
    assert report.active_count.tolist() == expected
    assert report.samples == sum(out.shape[0] for out in seen)
    kinds = [kind for out in seen for kind in brute(out.resolve_neg(), 1)[1]]
    assert report.killed == kinds.count("zero")

    stats.reset()  # new states: the call bound to the old ones is not used
    assert not stats.accumulate_again(alike)
    with counting_path("aten"):  # the counting path was switched: neither
        stats.accumulate(alike)
        assert not stats.accumulate_again(alike)
    assert stats.compute().active_count.tolist() == brute(alike, 1)[0]


def test_stats_with_a_bound_call_pickle_and_copy(kernel):
    """The bound call (a C function) is left out of pickles and copies; the copy binds its own."""
    import copy
    import pickle

    from lightning_relu import ActivationStats

    stats = ActivationStats()
    out = relu_output((5, 8), torch.float32, seed=0)
    stats.accumulate(out)
    assert stats.accumulate_again(out)
    for twin in (pickle.loads(pickle.dumps(stats)), copy.deepcopy(stats)):
        assert not twin.accumulate_again(out)
        twin.accumulate(out)
        assert twin.accumulate_again(out)
        assert twin.compute().active_count.tolist() == [4 * c for c in brute(out, 1)[0]]
    assert stats.compute().active_count.tolist() == [2 * c for c in brute(out, 1)[0]]


# --------------------------------------------------------------------------------------------------------------------
# dead_rows: sign_flip_'s question of a pre-activation
# --------------------------------------------------------------------------------------------------------------------


def brute_dead(z: torch.Tensor, flipped: bool) -> list[bool]:
    """Per sample: whether no entry is > 0 (flipped: < 0), NaN being neither, with Python loops."""
    rows = z.to(torch.float64).reshape(z.shape[0], -1).tolist()
    if flipped:
        return [all(v >= 0 for v in row) for row in rows]
    return [all(v <= 0 for v in row) for row in rows]


def pre_activation(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Samples of every kind: random, all negative, all zero (with -0.0), negative but for a NaN, a +Inf or one
    positive entry at the end (past the last full block of 16), all positive, all -Inf."""
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


DEAD_ROW_LAYOUTS = [
    ((5, 7), None),  # fewer entries than a block
    ((9, 16), None),  # exactly one block
    ((9, 33), None),  # two blocks and a tail
    ((15, 3, 4, 5), None),  # NCHW: a sample is one block of 60 entries
    ((15, 3, 4, 5), torch.channels_last),  # the same entries in another order, still one block
    ((7, 4, 6), "transposed"),  # dims 1 and 2 swapped: still one block
    ((9, 5, 4), "offset"),  # a view that starts inside its storage
    ((64, 32, 8, 4), None),  # 65536 entries: the parallel path
    ((1, 20), None),
    ((14, 1), None),
]


@pytest.mark.parametrize(("shape", "layout"), DEAD_ROW_LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("flipped", [False, True])
@pytest.mark.parametrize("with_alive", [False, True])
def test_dead_rows_match_brute_force(kernel, shape, layout, dtype, flipped, with_alive):
    z = pre_activation(shape, dtype, seed=len(shape))
    if layout == "offset":
        z = torch.cat([torch.full_like(z[:2], 7.0), z])[2:]  # entries before the view must not be read
        assert z.storage_offset() > 0
    elif layout == "transposed":
        z = z.transpose(1, 2)
        assert not z.is_contiguous()
    elif layout is not None:
        z = z.contiguous(memory_format=layout)
    n = shape[0]
    alive = (torch.arange(n) % 3 != 0) if with_alive else None
    dead = torch.ones(n, dtype=torch.bool)
    dead[::2] = False  # whatever it held is overwritten
    found = kernel.dead_rows(z, flipped, alive, dead)
    expected = brute_dead(z, flipped)
    assert dead.tolist() == expected
    marked = alive.tolist() if alive is not None else [True] * n
    assert found == (sum(expected), sum(d and a for d, a in zip(expected, marked, strict=True)))
    assert 0 < sum(expected) < n or n < 3  # the samples hold both kinds


@given(
    batch=st.integers(1, 40),
    rest=st.lists(st.integers(1, 40), min_size=1, max_size=2),
    negative_share=st.floats(0, 1),
    zero_share=st.floats(0, 0.5),
    flipped=st.booleans(),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_dead_rows_match_brute_force_on_random_shapes(kernel, batch, rest, negative_share, zero_share, flipped, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.rand(batch, *rest, generator=g)
    z[torch.rand(z.shape, generator=g) < negative_share] *= -1
    z[torch.rand(z.shape, generator=g) < zero_share] = 0
    alive = torch.rand(batch, generator=g) < 0.5
    dead = torch.empty(batch, dtype=torch.bool)
    found = kernel.dead_rows(z, flipped, alive, dead)
    expected = brute_dead(z, flipped)
    assert dead.tolist() == expected
    assert found == (sum(expected), sum(d and a for d, a in zip(expected, alive.tolist(), strict=True)))


@pytest.mark.parametrize(
    "make",
    [
        lambda z: z.half(),
        lambda z: z.bfloat16(),
        lambda z: z[:, ::2],  # a sample's entries are not one block
        lambda z: z.t().contiguous().t(),  # a sample's entries spread over the whole storage
        lambda z: torch._neg_view(z),  # memory holds -z
        lambda z: z[:0],
        lambda z: torch.empty(4, 0),
        lambda z: z.to("meta"),
    ],
    ids=["half", "bfloat16", "strided", "samples interleaved", "neg view", "no samples", "no entries", "meta"],
)
def test_dead_rows_declines_what_it_cannot_read(kernel, make):
    """None, with nothing written: the caller answers with ATen reductions."""
    z = make(pre_activation((4, 6), torch.float32, seed=0))
    dead = torch.tensor([True, False, True, False])
    assert kernel.dead_rows(z, False, None, dead) is None
    assert dead.tolist() == [True, False, True, False]


def test_dead_rows_and_moments_threads_agree():
    """Built to split every call over the threads: the same answers with 1, 2 and all of them."""
    with counting_path("kernel"):
        library, _ = _native._build(_native._compiler(), defines={"LR_PARALLEL_MIN": 1})
    kernel = _native._Kernel(library, "test")
    z = pre_activation((37, 3, 11), torch.float32, seed=5)
    alive = torch.arange(37) % 4 != 1
    expected = brute_dead(z, False)
    threads = torch.get_num_threads()
    try:
        for count in sorted({1, 2, threads}):
            torch.set_num_threads(count)
            dead = torch.empty(37, dtype=torch.bool)
            found = kernel.dead_rows(z, False, alive, dead)
            assert dead.tolist() == expected, count
            assert found == (sum(expected), sum(d and a for d, a in zip(expected, alive.tolist(), strict=True)))
            for axis in (1, 2):  # units first, then last (rows of 11 units: four at a time, then the rest)
                check_moments(kernel, torch.randn(37, 3, 11, generator=torch.Generator().manual_seed(6)), axis)
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------------------------
# moments: the margin's per-unit sums
# --------------------------------------------------------------------------------------------------------------------


def brute_moments(pre: torch.Tensor, axis: int) -> tuple[list[float], list[float], int]:
    """Per unit: the entries summed and their squares summed, with Python floats (double); entries per unit."""
    rows = pre.to(torch.float64).movedim(axis, -1).reshape(-1, pre.shape[axis]).tolist()
    sums = [math.fsum(column) for column in zip(*rows, strict=True)]
    squares = [math.fsum(v * v for v in column) for column in zip(*rows, strict=True)]
    return sums, squares, len(rows)


def check_moments(kernel, pre: torch.Tensor, axis: int) -> None:
    """``kernel.moments`` adds to states that already hold sums exactly what brute force finds (to double
    rounding)."""
    units = pre.shape[axis]
    total, squares, entries = (
        torch.full((units,), 2.5, dtype=torch.float64),
        torch.ones(units, dtype=torch.float64),
        torch.tensor(7),
    )
    assert kernel.moments(pre, axis, total, squares, entries)
    sums, sums_of_squares, count = brute_moments(pre, axis)
    torch.testing.assert_close(total, torch.tensor(sums, dtype=torch.float64) + 2.5, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(squares, torch.tensor(sums_of_squares, dtype=torch.float64) + 1, rtol=1e-12, atol=1e-9)
    assert int(entries) == 7 + count


@pytest.mark.parametrize(("shape", "axis", "memory_format"), LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_moments_match_brute_force(kernel, shape, axis, memory_format, dtype):
    pre = torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape)), dtype=torch.float64).to(dtype)
    if memory_format == "offset":
        pre = torch.cat([torch.full_like(pre[:2], 7.0), pre])[2:]  # entries before the view must not be read
    elif memory_format == "odd size-1 strides":
        a, b, c = pre.stride()
        pre = pre.as_strided((shape[0], shape[1], 1, shape[2]), (a, b, 1000, c))
    elif memory_format is not None:
        pre = pre.contiguous(memory_format=memory_format)
    check_moments(kernel, pre, axis)


def test_update_margin_again_takes_only_pre_activations_like_the_last(kernel):
    """``update_margin_again`` reruns the last kernel call only for a plain CPU pre-activation of the same shape,
    strides and dtype into the same states; anything else is declined untouched and ``update_margin`` sums it.
    Whatever the mix, the sums are brute force's over every pre-activation; pickles and copies bind their own."""
    import copy
    import pickle

    from lightning_relu import ActivationStats

    class Marked(torch.Tensor):
        pass

    def pre(seed, shape=(6, 3, 4, 4), dtype=torch.float32):
        return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)

    stats = ActivationStats(track_margin=True)
    first = pre(0)
    assert not stats.update_margin_again(first)  # nothing bound yet
    stats.update_margin(first)
    seen = [first]
    others = [
        pre(2, shape=(7, 3, 4, 4)),  # another batch size
        pre(3, dtype=torch.float64),
        pre(4).contiguous(memory_format=torch.channels_last),  # same shape, other strides
        pre(5).as_subclass(Marked),
        torch._neg_view(pre(6)),  # same strides, negated view
    ]
    for other in others:
        stats.update_margin(first)  # bind the call for `first` again
        seen.append(first)
        states = (stats.pre_sum, stats.pre_sumsq, stats.pre_entries)
        before = [state.clone() for state in states]
        assert not stats.update_margin_again(other)
        assert all(torch.equal(a, b) for a, b in zip(states, before, strict=True))
        stats.update_margin(other)
        seen.append(other.resolve_neg().as_subclass(torch.Tensor))
    stats.update_margin(first)
    alike = pre(1)
    assert stats.update_margin_again(alike)
    seen += [first, alike]
    # brute force over all of them at once: every pre-activation's entries per unit, side by side
    sums, squares, count = brute_moments(torch.cat([one.double().movedim(1, -1).reshape(-1, 3) for one in seen]), 1)
    torch.testing.assert_close(stats.pre_sum, torch.tensor(sums, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.pre_sumsq, torch.tensor(squares, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    assert int(stats.pre_entries) == count

    for twin in (pickle.loads(pickle.dumps(stats)), copy.deepcopy(stats)):
        assert not twin.update_margin_again(alike)
        twin.update_margin(alike)
        assert twin.update_margin_again(alike)
    stats.reset()  # new states: the call bound to the old ones is not used
    assert not stats.update_margin_again(alike)
    with counting_path("aten"):  # the counting path was switched: neither
        stats.update_margin(alike)
        assert not stats.update_margin_again(alike)
    expected = torch.tensor(brute_moments(alike, 1)[0], dtype=torch.float64)
    torch.testing.assert_close(stats.pre_sum, expected, rtol=1e-5, atol=1e-5)  # ATen sums in float32


def test_moments_propagate_nan_and_decline_what_they_cannot_take(kernel):
    pre = torch.randn(6, 4)
    pre[2, 1] = float("nan")
    total, squares, entries = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), torch.tensor(0)
    assert kernel.moments(pre, 1, total, squares, entries)
    assert [math.isnan(v) for v in total.tolist()] == [False, True, False, False]
    assert [math.isnan(v) for v in squares.tolist()] == [False, True, False, False]
    good = (torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64), torch.tensor(0))
    for other, states in [
        (pre.half(), good),
        (pre[:, ::2], (good[0][:2], good[1][:2], good[2])),  # a strided view
        (torch._neg_view(pre), good),
        (pre, (torch.zeros(4), good[1], good[2])),  # float32 sums
        (pre, (good[0], torch.zeros(5, dtype=torch.float64), good[2])),  # another width
        (pre, (good[0], good[1], torch.tensor(0.0))),  # a float entry count
        (pre, (torch.zeros(8, dtype=torch.float64)[::2], good[1], good[2])),  # not contiguous
    ]:
        before = [state.clone() for state in states]
        assert not kernel.moments(other, 1, *states)
        assert all(torch.equal(a, b) for a, b in zip(states, before, strict=True))


def test_environment_compiler_may_carry_arguments(monkeypatch):
    """``CC="env cc"``: the first word is the program, the rest its arguments."""
    if shutil.which("env") is None or shutil.which("cc") is None:
        pytest.skip("needs env and cc")
    monkeypatch.setenv("CC", "env cc")
    library, description = _native._build(_native._compiler())
    assert description.startswith("env cc -O3")
    out = relu_output((5, 6), torch.float32, seed=2)
    assert _native._Kernel(library, description).count(out, 1)[0].tolist() == brute(out, 1)[0]


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (lambda: relu_output((6, 5), torch.float32, 0).t(), "not contiguous"),
        (lambda: relu_output((6, 5), torch.bfloat16, 0), "bfloat16"),
        (lambda: relu_output((6, 5), torch.float16, 0), "float16"),
        (lambda: relu_output((6, 5, 4), torch.float32, 0)[:, :, ::2], "strided"),
        (lambda: torch._neg_view(relu_output((6, 5), torch.float32, 0)), "negative view"),
    ],
)
def test_outputs_the_kernel_does_not_take_go_to_aten(kernel, make, why):
    assert kernel.count(make(), 1) is None, why


def test_tracker_reports_are_identical_on_both_paths():
    torch.manual_seed(0)
    batches = [torch.randn(32, 3, 8, 8) for _ in range(3)]
    reports = {}
    for path in ("aten", "kernel"):
        with counting_path(path):
            for name, model, data in (
                ("cnn", conv_bn_net(), batches),
                ("mlp", mlp([12, 40, 30, 3]), [b.flatten(1)[:, :12] for b in batches]),
            ):
                with DeadUnitTracker(model) as tracker:
                    for x in data:
                        model(x)
                    reports[path, name] = tracker.report()
    for name in ("cnn", "mlp"):
        a, k = reports["aten", name], reports["kernel", name]
        assert a.keys() == k.keys()
        for site in a:
            assert torch.equal(a[site].active_count, k[site].active_count), site
            assert (a[site].killed, a[site].samples, a[site].nonfinite_batches) == (
                k[site].killed,
                k[site].samples,
                k[site].nonfinite_batches,
            )


def test_environment_switch(monkeypatch):
    saved = dict(_native._state)
    try:
        monkeypatch.setenv(_native.ENV, "sometimes")
        _native._reset()
        expected = r"LIGHTNING_RELU_KERNEL must be one of auto, off, require; got 'sometimes'"
        with pytest.raises(ValueError, match=expected):
            _native.counting_kernel()
        monkeypatch.setenv(_native.ENV, "OFF")
        _native._reset()
        assert _native.counting_kernel() is None
        assert _native.describe() == "ATen operations (LIGHTNING_RELU_KERNEL=off)"
    finally:
        _native._state.clear()
        _native._state.update(saved)


def test_without_a_compiler_counting_falls_back_or_raises_when_required(monkeypatch):
    saved = dict(_native._state)
    try:
        monkeypatch.setenv("CC", "no-such-compiler-here")
        monkeypatch.setenv(_native.ENV, "auto")
        _native._reset()
        assert _native.counting_kernel() is None
        assert "no C compiler 'no-such-compiler-here' found" in _native.describe()
        model = mlp([6, 9, 2])
        x = torch.randn(20, 6)
        with DeadUnitTracker(model) as tracker:
            model(x)
            report = tracker.report()["1"]
        hidden = torch.relu(model[0](x)).detach()
        assert report.active_count.tolist() == brute(hidden, 1)[0]
        monkeypatch.setenv(_native.ENV, "require")
        _native._reset()
        with pytest.raises(RuntimeError, match="LIGHTNING_RELU_KERNEL=require, but no C compiler"):
            _native.counting_kernel()
    finally:
        _native._state.clear()
        _native._state.update(saved)


def test_a_failing_build_falls_back(monkeypatch, tmp_path):
    """A compiler that fails every attempt (a script exiting 1) leaves counting on ATen with the error kept."""
    fake = tmp_path / "broken-cc"
    fake.write_text("#!/bin/sh\necho 'fatal error: nothing works' >&2\nexit 1\n")
    fake.chmod(0o755)
    saved = dict(_native._state)
    try:
        monkeypatch.setenv("CC", str(fake))
        monkeypatch.setenv(_native.ENV, "auto")
        _native._reset()
        assert _native.counting_kernel() is None
        assert "could not be built" in _native.describe() and "nothing works" in _native.describe()
    finally:
        _native._state.clear()
        _native._state.update(saved)
