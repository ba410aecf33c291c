from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_relu import DeadUnitTracker, NoReluSitesWarning, find_relu_sites, revive_dead_units_
from tests.conftest import expected_counts
from tests.helpers import brute_force, conv_bn_net, counting_path, kill_units, mlp


def _assert_matches(report, expected):
    assert set(report) == set(expected)
    for name, exp in expected.items():
        layer = report[name]
        assert layer.num_units == len(exp["active"])
        assert layer.active_count.tolist() == exp["active"]
        assert layer.dead.tolist() == exp["dead"]
        assert layer.num_dead == sum(exp["dead"])
        assert layer.dead_fraction == pytest.approx(sum(exp["dead"]) / len(exp["dead"]))
        torch.testing.assert_close(layer.activation_rate, torch.tensor(exp["rate"], dtype=torch.float64))
        assert layer.samples == exp["samples"]
        assert layer.killed == exp["killed"]
        assert layer.living_data_fraction == pytest.approx(exp["living"])


def test_mlp_matches_brute_force():
    model = mlp([6, 9, 9, 9, 2])
    kill_units(model, 0, [1, 4])
    kill_units(model, 4, [0, 1, 2, 3, 4, 5, 6, 7])  # all but one unit: some samples are killed there
    batches = [torch.randn(13, 6), torch.randn(7, 6), torch.randn(1, 6)]
    with DeadUnitTracker(model) as tracker:
        for x in batches:
            model(x)
    expected = brute_force(model, batches)
    assert expected["1"]["dead"][1] and expected["1"]["dead"][4]
    assert 0 < expected["5"]["killed"] < 21
    _assert_matches(tracker.report(), expected)


def test_conv_bn_net_matches_brute_force():
    model = conv_bn_net()
    kill_units(model, 1, [2])  # BatchNorm beta: channel 2 of the first block is dead
    kill_units(model, 5, [0, 3])
    batches = [torch.randn(4, 3, 8, 8), torch.randn(3, 3, 8, 8)]
    with DeadUnitTracker(model) as tracker:
        for x in batches:
            model(x)
    expected = brute_force(model, batches)
    assert expected["2"]["dead"] == [False, False, True, False, False, False]
    _assert_matches(tracker.report(), expected)


def test_sequence_input_units_are_last_dim():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU())
    kill_units(model, 0, [3])
    x = torch.randn(2, 6, 4)  # (batch, time, features)
    with DeadUnitTracker(model) as tracker:
        out = model(x)
    report = tracker.report()["1"]
    assert report.num_units == 5
    assert report.entries_per_unit == 12
    expected = [int((out[..., u] > 0).sum()) for u in range(5)]
    assert report.active_count.tolist() == expected
    assert report.dead.tolist() == [False, False, False, True, False]


def test_nan_counts_as_not_active():
    stats_model = nn.Sequential(nn.ReLU())
    x = torch.tensor([[1.0, float("nan"), 0.0], [2.0, float("nan"), 3.0]])
    with DeadUnitTracker(stats_model) as tracker:
        stats_model(x)
    report = tracker.report()["0"]
    assert report.active_count.tolist() == [2, 0, 1]
    # a site that saw NaN is non-finite, never dead (issue 20): its counts are kept, its units not judged
    assert report.nonfinite and report.dead.tolist() == [False, False, False] and not report.collapsed


def test_hooks_removed_on_exit_and_reset_and_pause():
    model = mlp([3, 4, 1])
    tracker = DeadUnitTracker(model)
    relu = model[1]
    with tracker:
        assert len(relu._forward_hooks) == 1
        model(torch.randn(5, 3))
        tracker.pause()
        model(torch.randn(50, 3))
        tracker.resume()
    assert len(relu._forward_hooks) == 0
    assert tracker.report()["1"].samples == 5
    model(torch.randn(8, 3))  # not counted: detached
    assert tracker.report()["1"].samples == 5
    tracker.reset()
    # nothing counted since the reset, hooks removed: an error, not "0 dead over 0 samples" (issue 20)
    with pytest.raises(RuntimeError, match=r"nothing to report: its hooks are not attached"):
        tracker.report()
    tracker.detach()  # idempotent


def test_hooks_removed_when_body_raises():
    model = mlp([3, 4, 1])
    with pytest.raises(RuntimeError, match="boom"), DeadUnitTracker(model):
        raise RuntimeError("boom")
    assert len(model[1]._forward_hooks) == 0


def test_no_relu_warns_once_and_counts_nothing():
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh())
    with pytest.warns(NoReluSitesWarning, match="no `nn.ReLU`"), DeadUnitTracker(model) as tracker:
        y = model(torch.randn(4, 3))
    assert y.shape == (4, 2)
    assert tracker.report() == {}


def test_restrict_sites_and_unknown_names():
    model = mlp([3, 4, 4, 1])
    tracker = DeadUnitTracker(model, sites=["3"])
    assert [s.name for s in tracker.sites] == ["3"]
    with pytest.raises(ValueError, match=r"unknown site names \['nope'\].*\['1', '3'\]"):
        DeadUnitTracker(model, sites=["nope"])
    with pytest.raises(ValueError, match="`sites` must be a sequence"):
        DeadUnitTracker(model, sites="1")
    with pytest.raises(TypeError, match="`model` must be"):
        DeadUnitTracker("model")  # type: ignore[arg-type]


def test_width_mismatch_warns_and_skips():
    relu = nn.ReLU()
    model = nn.Sequential(nn.Linear(3, 4), relu)
    tracker = DeadUnitTracker(model)
    with tracker, pytest.warns(RuntimeWarning, match="expects 4 units"):
        relu(torch.randn(2, 9))
    with pytest.raises(RuntimeError, match="nothing to report"):  # nothing counted: not "0 dead" (issue 20)
        tracker.report()


@pytest.mark.parametrize("path", ["cpu", "plain"])
@pytest.mark.parametrize("track_margin", [False, True])
def test_hook_path_does_not_sync_or_keep_tensors(monkeypatch, path, track_margin):
    """The per-step path never calls host-syncing methods and keeps no activation alive: on the CPU path (reused
    buffers) and on the plain ATen path (the one GPU tensors take), with the margin's statistics too, over 20 steps
    (the CPU path's buffers are built on the first and reused after)."""
    import weakref

    model = conv_bn_net()
    calls = []
    methods = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero", "equal")
    for method in methods:
        original = getattr(torch.Tensor, method)

        def spy(self, *args, _name=method, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, spy)
    refs = []

    def keep_ref(module, inputs, output):
        refs.append(weakref.ref(output))

    with counting_path(path), DeadUnitTracker(model, track_margin=track_margin) as tracker:
        handle = model[2].register_forward_hook(keep_ref)
        for _ in range(20):
            model(torch.randn(4, 3, 8, 8)).sum().backward()
        handle.remove()
        assert calls == []
        assert tracker.report()["2"].samples == 4 * 20  # every step was counted
        assert calls  # a reader returns host numbers: the spies see that
        monkeypatch.undo()
    import gc

    gc.collect()
    assert refs and all(ref() is None for ref in refs)


class _BasicBlock(nn.Module):
    """A residual block that applies one `nn.ReLU` object twice, like torchvision's BasicBlock."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


def test_reused_module_is_one_site_per_call_position():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _BasicBlock(4), _BasicBlock(4))
    with torch.no_grad():
        model[1].bn1.bias[1] = -1e4  # dead at the first call of block 1's relu only
    batches = [torch.randn(3, 3, 5, 5), torch.randn(2, 3, 5, 5)]
    # brute force: replay the blocks by hand
    seen = {"1.relu": [], "1.relu_1": [], "2.relu": [], "2.relu_1": []}
    with torch.no_grad():
        for x in batches:
            h = model[0](x)
            for b in ("1", "2"):
                block = model[int(b)]
                a = torch.relu(block.bn1(block.conv1(h)))
                seen[f"{b}.relu"].append(a)
                h = torch.relu(block.bn2(block.conv2(a)) + h)
                seen[f"{b}.relu_1"].append(h)
    with DeadUnitTracker(model) as tracker:
        for x in batches:
            model(x)
    report = tracker.report()
    assert set(report) == set(seen)
    for name, outs in seen.items():
        out = torch.cat(outs)
        expected = [int((out[:, c] > 0).sum()) for c in range(4)]
        assert report[name].active_count.tolist() == expected, name
        assert report[name].samples == 5
    assert report["1.relu"].dead.tolist() == [False, True, False, False]
    assert not report["1.relu_1"].dead.any()


class _Unrolled(nn.Module):
    """One block run twice (weights tied): a Sequential with an `nn.ReLU`, then a module with an `F.relu`."""

    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
        self.blk = _TiedFunctional()

    def forward(self, x):
        return self.blk(self.blk(self.seq(self.seq(x))))


class _TiedFunctional(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return F.relu(self.fc(x))


@pytest.mark.parametrize("trace", [True, False])
def test_a_block_run_twice_counts_both_runs_at_its_sites(trace):
    """A site is a call position within one run of the forward that applies it: the runs of a block add up at its
    sites, as its parameters are shared; discovery names the same sites the hooks count."""
    torch.manual_seed(0)
    model = _Unrolled()
    with torch.no_grad():
        # unit 1 reads input 1, which is 0 in the first run and seq[2]'s constant 1 in the second: dead in one only
        model.seq[0].weight[1] = torch.tensor([0.0, 100.0, 0.0, 0.0])
        model.seq[0].bias[1] = -50.0
        model.seq[2].weight[1] = 0.0
        model.seq[2].bias[1] = 1.0
    x = torch.randn(16, 4)
    x[:, 1] = 0.0
    with torch.no_grad():  # brute force: the four rectifier outputs, by hand
        a = torch.relu(model.seq[0](x))
        b = torch.relu(model.seq[0](model.seq[2](a)))
        c = torch.relu(model.blk.fc(model.seq[2](b)))
        d = torch.relu(model.blk.fc(c))
    expected = {"seq.1": torch.cat([a, b]), "blk.relu": torch.cat([c, d])}
    assert (a[:, 1] == 0).all() and (b[:, 1] > 0).any()  # the unit is alive in one run only
    tracker = DeadUnitTracker(model, trace=trace)
    with tracker, torch.no_grad():
        model(x)
    names = [site.name for site in tracker.all_sites]  # the functional call is found on the first forward
    assert names == (["seq.1", "blk.relu"] if trace else ["seq.1"])
    report = tracker.report()
    assert set(report) == set(names)
    for name in names:
        out = expected[name]
        assert report[name].samples == 32
        assert report[name].active_count.tolist() == (out > 0).sum(0).tolist(), name
    assert not report["seq.1"].dead[1]  # alive in the second run
    # the Sequential's layers run as often as its site: linked (the traced F.relu's layer runs twice in its graph)
    sites = {site.name: site for site in tracker.all_sites}
    assert sites["seq.1"].producer is model.seq[0] and [c.module for c in sites["seq.1"].consumers] == [model.seq[2]]
    if trace:
        assert sites["blk.relu"].producer is None and sites["blk.relu"].consumers == []
    # so revival touches only units dead in both runs, and the output stays the same
    with torch.no_grad():
        model.seq[0].bias[3] = -50.0
        model.seq[0].weight[3] = 0.0
        y = model(x)
        a = torch.relu(model.seq[0](x))
        b = torch.relu(model.seq[0](model.seq[2](a)))
    with tracker, torch.no_grad():
        tracker.reset()
        model(x)
    dead_in_both = [u for u in range(4) if not ((a[:, u] > 0).any() or (b[:, u] > 0).any())]
    assert 3 in dead_in_both
    counts = revive_dead_units_(model, {"seq.1": tracker.report()["seq.1"]}, sites=tracker.all_sites)
    assert counts == {"seq.1": len(dead_in_both)} and 1 not in dead_in_both
    with torch.no_grad():
        assert torch.equal(model(x), y)


def test_a_layer_registered_twice_but_applied_once_keeps_its_links():
    class Handles(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
            self.first, self.last = self.net[0], self.net[2]  # handles on the same layers

        def forward(self, x):
            return self.net(x)

    model = Handles()
    for trace in (True, False):  # the trace counts one call; without it, the chain holds the layer once
        (site,) = DeadUnitTracker(model, trace=trace).all_sites
        assert site.producer is model.net[0] and [c.module for c in site.consumers] == [model.net[2]]


def test_reused_module_positions_restart_even_without_the_models_forward():
    act = nn.ReLU()
    model = nn.Module()
    model.act = act
    tracker = DeadUnitTracker(model)
    with tracker:
        for _ in range(3):  # the model's forward never runs: the caller marks each pass
            tracker.new_pass()
            act(torch.ones(2, 3))
            act(-torch.ones(2, 5))
    report = tracker.report()
    assert set(report) == {"act", "act_1"}
    assert report["act"].num_units == 3 and report["act"].num_dead == 0 and report["act"].samples == 6
    assert report["act_1"].num_units == 5 and report["act_1"].num_dead == 5
    assert DeadUnitTracker(model, sites=["act_1"]).sites == []  # later positions are valid names


class _FunctionalNet(nn.Module):
    """Functional rectifiers in two nested forwards, beside a ReLU module (whose own F.relu must not count twice)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(3, 6)
        self.block = _FunctionalBlock()
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(6, 5)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        h = self.act(self.block(h))
        return torch.relu(self.fc2(h)).sum(-1) + F.relu6(h).mean(-1)


class _FunctionalBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return self.fc(x).relu_() - 0.5


def _functional_brute_force(model, batches):
    outs = {"relu": [], "block.relu": [], "act": [], "relu_1": [], "relu6": []}
    with torch.no_grad():
        for x in batches:
            a = torch.clamp(model.fc1(x), min=0)
            outs["relu"].append(a)
            b = torch.clamp(model.block.fc(a), min=0)
            outs["block.relu"].append(b)
            c = torch.clamp(b - 0.5, min=0)
            outs["act"].append(c)
            outs["relu_1"].append(torch.clamp(model.fc2(c), min=0))
            outs["relu6"].append(torch.clamp(c, 0, 6))
    return {name: torch.cat(v) for name, v in outs.items()}


class _ListedBlocks(nn.Module):
    """Blocks and ReLU modules held in containers without a forward (`nn.ModuleList`, `nn.ModuleDict`), or reached
    past a module with a forward of its own, beside the parent's own `F.relu`: calls made inside the blocks are
    theirs, not the parent's."""

    def training_step(self, x):
        return F.relu(self(x) - 1.0).sum()  # a hinge-like loss: not a call of the forward

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_FunctionalBlock(), _FunctionalBlock()])
        self.acts = nn.ModuleDict({"a": nn.ReLU(), "b": nn.ReLU()})
        self.enc = _Holder()  # has a forward of its own, but the parent calls its block directly
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        h = self.acts["a"](self.blocks[0](x))
        h = self.acts["b"](self.blocks[1](h))
        h = self.enc.block(h)
        return F.relu(self.head(h))


class _Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _FunctionalBlock()

    def forward(self, x):
        return self.block(x)


def test_functional_calls_inside_listed_blocks_and_redirected_forwards_are_counted_once():
    torch.manual_seed(0)
    model = _ListedBlocks()
    batches = [torch.randn(8, 6), torch.randn(5, 6)]
    outs = {"blocks.0.relu": [], "acts.a": [], "blocks.1.relu": [], "acts.b": [], "enc.block.relu": [], "relu": []}
    with torch.no_grad():  # brute force
        for x in batches:
            for i, act in ((0, "a"), (1, "b")):
                x = torch.clamp(model.blocks[i].fc(x), min=0)
                outs[f"blocks.{i}.relu"].append(x)
                x = torch.clamp(x - 0.5, min=0)
                outs[f"acts.{act}"].append(x)
            x = torch.clamp(model.enc.block.fc(x), min=0)
            outs["enc.block.relu"].append(x)
            outs["relu"].append(torch.clamp(model.head(x - 0.5), min=0))

    def redirected(x):
        # as Lightning's DDP strategy reaches `training_step` through the module's call: the forward swapped for a
        # `wrapped_forward` that puts it back and runs `training_step`, which calls `self(x)`
        original = model.forward

        def wrapped_forward(*args):
            model.forward = original
            return model.training_step(*args)

        model.forward = wrapped_forward
        return model(x)

    for reenter in (False, True):
        with DeadUnitTracker(model) as tracker:
            for x in batches:
                redirected(x) if reenter else model(x)
        assert "forward" not in model.__dict__ or model.forward.__func__ is _ListedBlocks.forward
        report = tracker.report()
        assert set(report) == set(outs), reenter
        for name, parts in outs.items():
            out = torch.cat(parts)
            assert report[name].samples == 13, (reenter, name)
            assert report[name].active_count.tolist() == (out > 0).sum(0).tolist(), (reenter, name)


def test_functional_calls_match_brute_force():
    torch.manual_seed(0)
    model = _FunctionalNet()
    with torch.no_grad():
        model.fc1.bias[2] = -1e4
        model.block.fc.bias[:3] = -1e4
    batches = [torch.randn(8, 3), torch.randn(5, 3)]
    with DeadUnitTracker(model) as tracker:
        for x in batches:
            model(x)
    report = tracker.report()
    expected = _functional_brute_force(model, batches)
    assert set(report) == set(expected)
    for name, out in expected.items():
        active = [int((out[:, u] > 0).sum()) for u in range(out.shape[1])]
        assert report[name].active_count.tolist() == active, name
        assert report[name].samples == 13
        assert report[name].killed == sum(1 for row in out if not bool((row > 0).any()))
    assert report["relu"].dead.tolist()[2] and bool(report["block.relu"].dead[:3].all())


def test_functional_counting_leaves_no_mode_behind_on_error():
    from torch.overrides import _get_current_function_mode_stack

    model = _FunctionalNet()
    with DeadUnitTracker(model):
        with pytest.raises(RuntimeError):
            model(torch.randn(2, 4))  # wrong width: fails inside the forward
        assert _get_current_function_mode_stack() == []
        model(torch.randn(2, 3))
    assert _get_current_function_mode_stack() == []


class _FailsOnce(nn.Module):
    """Calls `F.relu`, then raises on its first call (the model's own error); with `before`, raises before it."""

    def __init__(self, before: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(3, 4)
        self.failed = False
        self.before = before

    def forward(self, x: Tensor) -> Tensor:
        if self.before and not self.failed:
            self.failed = True
            raise ValueError("the model's own error")
        h = F.relu(self.fc(x))
        if not self.failed:
            self.failed = True
            raise ValueError("the model's own error")
        return h


def test_a_first_forward_that_raises_after_a_functional_call_keeps_the_users_error():
    """The tracker added its counting hooks while torch ran the failed forward's hooks: the user's error became
    "OrderedDict mutated during iteration". The next forward is then watched as a first one, and counted."""
    model = _FailsOnce()
    with torch.no_grad():
        model.fc.bias[1] = -1e4
    batches = [torch.randn(6, 3), torch.randn(5, 3)]
    with DeadUnitTracker(model) as tracker:
        with pytest.raises(ValueError, match="the model's own error"):
            model(torch.randn(2, 3))
        tracker.reset()  # the failed call's entries are not compared
        for x in batches:
            model(x)
        model(batches[0])  # a third call: counted by the hooks handed over, not by the watch
    report = tracker.report()
    with torch.no_grad():
        expected = expected_counts([F.relu(model.fc(x)) for x in [*batches, batches[0]]], unit_axis=-1)
    assert list(report) == ["relu"]
    assert report["relu"].active_count.tolist() == expected["active"]
    assert report["relu"].samples == expected["samples"] == 17
    assert report["relu"].dead.tolist() == expected["dead"] and expected["dead"][1]


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc(x))


class _TwoCalls(nn.Module):
    """A step that calls two children (`head(enc(x))`), the head failing once, as a skipped out-of-memory batch."""

    def __init__(self, before: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.enc = _Encoder()
        self.head = _FailsOnce(before)
        self.head.fc = nn.Linear(4, 5)


@pytest.mark.parametrize("before", [False, True], ids=["after-its-relu", "before-its-relu"])
def test_a_failed_second_call_of_the_first_step_leaves_both_childrens_functional_sites_counted(before):
    """The step's first call (`enc`) repeated on the next step ended the watch before the failed call's parent was
    handed over (`head.relu` was never counted again), or, when the head failed before its `F.relu`, before that
    call was found (reviews of two earlier versions of the fix): a failed step is watched again whole."""
    model = _TwoCalls(before)
    batches = [torch.randn(6, 3) for _ in range(3)]
    with torch.no_grad(), DeadUnitTracker(model) as tracker:
        with pytest.raises(ValueError, match="the model's own error"):
            model.head(model.enc(torch.randn(2, 3)))
        tracker.reset()
        for x in batches:
            model.head(model.enc(x))
        report = tracker.report()
        hidden = [model.enc(x) for x in batches]
        expected = {"enc.relu": hidden, "head.relu": [F.relu(model.head.fc(h)) for h in hidden]}
    assert sorted(report) == sorted(expected)
    for name, outputs in expected.items():
        counts = expected_counts(outputs, unit_axis=-1)
        assert report[name].active_count.tolist() == counts["active"], name
        assert report[name].samples == counts["samples"] == 18, name


class _ReturnsNothing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> None:
        F.relu(self.fc(x))


def test_a_forward_returning_none_inside_the_users_except_block_ends_the_watch():
    """A model returning None, called while the caller handles an exception, looked like a failed forward to a
    first version of the fix: the watch never ended and the site names were never checked."""
    model = _ReturnsNothing()
    # the names are checked at the end of the first forward
    with pytest.raises(ValueError, match="unknown site names"), DeadUnitTracker(model, unit_dims={"nosuch": -1}):
        for _ in range(2):
            try:
                raise KeyError("the caller's own")
            except KeyError:
                model(torch.randn(2, 3))


class _RecursiveFailing(nn.Module):
    """Calls itself once; the outer run raises when `fail` is set (its inner run has returned)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 4)
        self.fail = False

    def forward(self, x: Tensor, depth: int = 1) -> Tensor:
        y = F.relu(self.lin(x))
        if depth > 0:
            y = self(y, depth - 1)
            if self.fail:
                raise ValueError("the model's own error")
        return y


def test_a_recursive_model_failing_after_its_inner_call_returned_keeps_the_users_error():
    """An inner run of the same module had returned, so the outer failed run was taken for one that returned (a
    first version of the fix kept one slot for every module)."""
    model = _RecursiveFailing()
    x = torch.randn(5, 4)
    with DeadUnitTracker(model) as tracker:
        model.fail = True
        with pytest.raises(ValueError, match="the model's own error"):
            model(torch.randn(3, 4))
        model.fail = False
        tracker.reset()
        model(x)
        model(x)
    report = tracker.report()
    with torch.no_grad():
        first = F.relu(model.lin(x))
        second = F.relu(model.lin(first))
    # each run of the module numbers its calls from 0: both runs' calls are its site `relu`
    assert list(report) == ["relu"]
    expected = expected_counts([first, second, first, second], unit_axis=-1)
    assert report["relu"].active_count.tolist() == expected["active"]
    assert report["relu"].samples == expected["samples"] == 20


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(6, 8)
        self.l2 = nn.Linear(8, 8)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.l2(F.relu(self.l1(x))))


class _Encode(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = _Block()

    def forward(self, x: Tensor) -> Tensor:
        return torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)


class _Checkpointed(nn.Module):
    """Called through `encode` and `decode`, never as a whole; the encoder checkpoints its block."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = _Encode()
        self.decoder = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)


def test_the_watch_ends_when_a_checkpointed_recomputation_stops_early():
    """Non-reentrant checkpointing stops a recomputation by raising inside the recomputed forward: the watch took
    that for a failed step every time and never ended (a first version of the fix)."""
    model = _Checkpointed()
    with DeadUnitTracker(model) as tracker:
        for _ in range(3):
            x = torch.randn(4, 6, requires_grad=True)
            model.decoder(model.encode(x)).sum().backward()
        assert not tracker.discovering


def test_names_given_for_a_later_calls_functional_site_are_checked_when_the_watch_ends():
    """`sites=`/`unit_dims=` naming the head's functional site of a `head(enc(x))` step were refused at the end of
    the encoder's call, before the head's call found it."""
    model = _TwoCalls(before=False)
    model.head.failed = True  # it does not fail here
    x = torch.randn(6, 3)
    with torch.no_grad(), DeadUnitTracker(model, sites=["head.relu"], unit_dims={"head.relu": -1}) as tracker:
        for _ in range(2):
            model.head(model.enc(x))
    report = tracker.report()
    assert list(report) == ["head.relu"]
    with torch.no_grad():
        expected = expected_counts([F.relu(model.head.fc(model.enc(x)))] * 2, unit_axis=-1)
    assert report["head.relu"].active_count.tolist() == expected["active"]


def test_paused_tracker_skips_functional_calls():
    model = _FunctionalNet()
    tracker = DeadUnitTracker(model)
    with tracker:
        tracker.pause()
        model(torch.randn(4, 3))
        tracker.resume()
        model(torch.randn(2, 3))
    assert {r.samples for r in tracker.report().values()} == {2}


@pytest.mark.parametrize("path", ["cpu", "plain"])
def test_margin_matches_brute_force_and_predicts_the_rate(path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 6), nn.ReLU(inplace=True), nn.Linear(6, 1))
    with torch.no_grad():
        model[0].bias.copy_(torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 3.0]))
        model[0].weight.mul_(3.0)
    batches = [torch.randn(500, 20) for _ in range(4)]
    with counting_path(path), DeadUnitTracker(model, track_margin=True, eps=0.05) as tracker:
        for x in batches:
            model(x)
    report = tracker.report()["1"]
    with torch.no_grad():
        z = torch.cat([model[0](x) for x in batches]).double()
    torch.testing.assert_close(report.pre_mean, z.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(report.pre_std, z.std(0, unbiased=False), rtol=1e-4, atol=1e-5)
    # Gaussian inputs give Gaussian pre-activations: Phi(mean/std) predicts the measured activity rate
    torch.testing.assert_close(report.predicted_rate, report.activation_rate, atol=0.03, rtol=0)
    threshold = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.05)).item()
    assert report.at_risk.tolist() == [m < threshold for m in (z.mean(0) / z.std(0, unbiased=False)).tolist()]
    assert report.at_risk.tolist()[0] and not report.at_risk.tolist()[-1]


@pytest.mark.parametrize("path", ["cpu", "plain"])
def test_margin_for_functional_and_reused_sites(path):
    torch.manual_seed(1)
    model = _FunctionalNet()
    batches = [torch.randn(64, 3) for _ in range(2)]
    with counting_path(path), DeadUnitTracker(model, track_margin=True) as tracker:
        for x in batches:
            model(x)
    report = tracker.report()
    with torch.no_grad():
        pre = torch.cat([model.fc1(x) for x in batches]).double()
    torch.testing.assert_close(report["relu"].pre_mean, pre.mean(0), rtol=1e-5, atol=1e-6)
    with DeadUnitTracker(model) as plain:
        model(batches[0])
    assert plain.report()["relu"].margin is None
    with pytest.raises(ValueError, match="`track_margin` must be a bool, got 1"):
        DeadUnitTracker(model, track_margin=1)


class _Untraceable(nn.Module):
    """A sequence model whose forward torch.fx cannot trace: its ReLU module has no known layer."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.act = nn.ReLU()

    def forward(self, x):
        if x.shape[1] > 0 and bool(x.sum() > -1e9):  # data-dependent control flow
            x = self.fc(x)
        return self.act(x)


def test_unit_dims_sets_the_axis_of_sites_no_layer_fixes():
    torch.manual_seed(0)
    model = _Untraceable()
    with torch.no_grad():
        model.fc.bias[[1, 6]] = -100.0
    batches = [torch.randn(3, 9, 4), torch.randn(2, 5, 4)]  # (batch, time, features), the time varies
    with torch.no_grad():
        out = torch.cat([torch.relu(model.fc(x)).reshape(-1, 8) for x in batches])
    # the first forward shows the Linear feeding the site: its features are the units, no guess and no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with DeadUnitTracker(model) as tracker:
            for x in batches:
                model(x)
    assert tracker.report()["act"].num_units == 8
    assert tracker.report()["act"].dead.nonzero().flatten().tolist() == [1, 6]

    class NoProducer(nn.Module):  # the rectifier reads the input itself: nothing fixes the axis
        def __init__(self) -> None:
            super().__init__()
            self.act = nn.ReLU()

        def forward(self, x):
            if x.sum() > 1e9:  # untraceable
                x = x * 0
            return self.act(x)

    bare = NoProducer()
    with (
        pytest.warns(RuntimeWarning, match=r"expects 9 units .* are its units on another dimension\? Say which"),
        pytest.warns(
            RuntimeWarning,
            match=r"Site 'act' has no known Linear/ConvNd layer, so the units of its 3-D "
            r"output of shape \(3, 9, 4\) are taken along dimension 1",
        ),
        DeadUnitTracker(bare) as tracker,
    ):
        for x in batches:
            bare(x)
    assert tracker.report()["act"].num_units == 9  # the guess: time steps taken for units

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no guess, no warning
        with DeadUnitTracker(model, unit_dims={"act": -1}) as tracker:
            for x in batches:
                model(x)
    report = tracker.report()["act"]
    assert report.num_units == 8 and report.samples == 5
    assert report.active_count.tolist() == (out > 0).sum(0).tolist()
    assert report.entries_per_unit == 3 * 9 + 2 * 5
    assert report.dead.nonzero().flatten().tolist() == [1, 6]


def test_a_traced_pre_activation_without_a_producer_takes_the_axis_of_its_layers():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 6)

        def forward(self, x):
            return F.relu(x + self.fc(x) * 0.5)  # not one layer's output: no producer, but a Linear's axis

    model = Residual()
    x = torch.randn(4, 9, 6)
    with DeadUnitTracker(model) as tracker, torch.no_grad():
        out = model(x)
    report = tracker.report()["relu"]
    assert report.num_units == 6 and report.active_count.tolist() == (out > 0).reshape(-1, 6).sum(0).tolist()


@pytest.mark.parametrize(
    ("unit_dims", "match"),
    [
        ({"act": 0}, r"`unit_dims` values must be 1 \(channels\) or -1 \(last dimension\), got \{'act': 0\}"),
        ({"act": True}, r"`unit_dims` values must be 1 \(channels\) or -1 \(last dimension\), got \{'act': True\}"),
        ([("act", -1)], r"`unit_dims` must map site names to 1 or -1, or be None, got \[\('act', -1\)\]"),
        ({"nope": -1}, r"`unit_dims` has unknown site names \['nope'\]; the model's sites are \['act'\]"),
    ],
)
def test_unit_dims_is_checked(unit_dims, match):
    with pytest.raises(ValueError, match=match):
        DeadUnitTracker(_Untraceable(), unit_dims=unit_dims, trace=False)


def test_names_of_functional_sites_are_checked_on_the_first_forward():
    """A model whose forward may call `F.relu` has sites that only its first forward shows: a name given before
    it is checked then, with an error naming it."""
    model = _Untraceable()
    x = torch.randn(3, 4)
    tracker = DeadUnitTracker(model, sites=["act", "gone"])
    match = r"`sites` has unknown site names \['gone'\]; the model's sites are \['act'\] \(after its first forward"
    with pytest.raises(ValueError, match=match), tracker, torch.no_grad():
        model(x)
    tracker = DeadUnitTracker(model, unit_dims={"nope": -1})
    with pytest.raises(ValueError, match=r"`unit_dims` has unknown site names \['nope'\]"), tracker:
        model(x)
    from torch.overrides import _get_current_function_mode_stack

    assert _get_current_function_mode_stack() == []  # no recording left running after the error
    # the names are checked once: counting goes on in the next forwards
    tracker.reset()
    with tracker, torch.no_grad():
        out = model(x)
    assert tracker.report()["act"].active_count.tolist() == (out > 0).sum(0).tolist()


def test_unit_dims_cannot_contradict_a_known_layer():
    net = nn.Sequential(nn.Conv1d(2, 3, 1), nn.ReLU())
    match = r"`unit_dims` gives site '1' unit dimension -1, but its layer '0' puts its units on dimension 1"
    with pytest.raises(ValueError, match=match):
        DeadUnitTracker(net, unit_dims={"1": -1})
    assert DeadUnitTracker(net, unit_dims={"1": 1}).stats["1"].unit_dim == 1


def test_copies_and_pickles_of_a_watched_model_are_not_counted():
    """A teacher/EMA copy made during training, or a model saved mid-training, runs without the tracker."""
    import copy
    import io

    torch.manual_seed(0)
    model = _FunctionalNet()  # module sites and functional ones
    x, other = torch.randn(8, 3), torch.randn(5, 3)
    with DeadUnitTracker(model) as tracker:
        model(x)
        teacher = copy.deepcopy(model)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        with torch.no_grad():
            for clone in (teacher, loaded):
                clone(other)
        model(x)
    report = tracker.report()
    expected = _functional_brute_force(model, [x, x])
    assert set(report) == set(expected)
    for name, out in expected.items():
        assert report[name].samples == 16, name
        assert report[name].active_count.tolist() == (out > 0).sum(0).tolist(), name


def test_a_blocks_own_relu_applied_by_its_parent_is_a_later_position():
    """The parent applies the block's ReLU after the block ran: at run time that call follows the block's own (the
    positions count from the block's latest run), and discovery numbers it the same way, with its own links."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.blk = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
            self.out = nn.Linear(4, 1)

        def forward(self, x):
            return self.out(self.blk[1](self.blk(x) - 1.0))

    torch.manual_seed(0)
    model = Mixed()
    tracker = DeadUnitTracker(model)
    sites = {site.name: site for site in find_relu_sites(model, example_input=torch.randn(2, 4))}
    assert list(sites) == ["blk.1", "blk.1_1"]
    assert sites["blk.1"].producer is model.blk[0] and sites["blk.1"].consumers == []
    assert sites["blk.1_1"].producer is None and [c.module for c in sites["blk.1_1"].consumers] == [model.out]
    x = torch.randn(16, 4)
    with tracker, torch.no_grad():
        model(x)
    with torch.no_grad():
        first = torch.relu(model.blk[0](x))
        second = torch.relu(first - 1.0)
    report = tracker.report()
    assert set(report) == set(sites)
    assert report["blk.1"].active_count.tolist() == (first > 0).sum(0).tolist()
    assert report["blk.1_1"].active_count.tolist() == (second > 0).sum(0).tolist()


class _TwiceRectified(nn.Module):
    """One `nn.ReLU` applied twice after a Linear, then `F.relu` of the result minus a constant: three sites whose
    pre-activations past the first come from another rectifier."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.act(self.act(self.lin(x))) - 0.1)


@pytest.mark.parametrize("shape", [(8, 5, 4), (4, 3, 5, 4)], ids=["sequence", "channels-last"])
def test_a_rectifier_of_a_rectifiers_output_takes_the_linears_axis(shape):
    """The second and third sites took dimension 1 (5 'units' where the Linear makes 3, the dead feature missed): the
    walk to the layers a pre-activation comes from stopped at a rectifier."""
    model = _TwiceRectified()
    with torch.no_grad():
        model.lin.bias[1] = -1e4
    x = torch.randn(*shape)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with DeadUnitTracker(model) as tracker, torch.no_grad():
            model(x)
    assert not [w for w in caught if "taken along dimension 1" in str(w.message)]
    report = tracker.report()
    with torch.no_grad():
        first = torch.relu(model.lin(x))
        outputs = {"act": first, "act_1": first, "relu": F.relu(first - 0.1)}
    assert list(report) == ["act", "act_1", "relu"]
    for name, output in outputs.items():
        expected = expected_counts([output], unit_axis=-1)
        assert report[name].active_count.tolist() == expected["active"], name
        assert report[name].dead.tolist() == expected["dead"] and expected["dead"][1], name
    sites = {site.name: site for site in find_relu_sites(model, example_input=x)}
    assert [(sites[n].num_units, sites[n].unit_dim) for n in outputs] == [(3, -1)] * 3


def test_unit_axis_through_a_layernorm_over_channels_and_later_positions():
    class Nets(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(6, 6, 1)
            self.ln = nn.LayerNorm([6, 5, 7])  # over (C, H, W): the channels stay units

        def forward(self, x):
            return F.relu(self.ln(self.conv(x)) + x)

    x = torch.randn(2, 6, 5, 7)
    (site,) = find_relu_sites(Nets(), example_input=x)
    assert site.producer is None and site.unit_dim == 1
    # an inferred axis can be overridden, and the entry of a module's site covers its later positions
    with DeadUnitTracker(Nets(), unit_dims={"relu": -1}) as tracker, torch.no_grad():
        tracker.model(x)
    assert tracker.stats["relu"].unit_dim == -1 and tracker.report()["relu"].num_units == 7

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.act(x) - 1.0)

    with DeadUnitTracker(Twice(), unit_dims={"act": -1}) as tracker:
        tracker.model(torch.randn(2, 3, 4))
    assert [s.name for s in tracker.sites] == ["act", "act_1"]
    assert tracker.stats["act"].unit_dim == tracker.stats["act_1"].unit_dim == -1

    class Others(nn.Module):  # another call of the same parent, and another module named like a later position
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(6, 6, 1)
            self.relu_1 = nn.ReLU()

        def forward(self, x):
            return F.relu(x).sum() + F.relu(self.conv(x) + x).sum() + self.relu_1(x).sum()

    with DeadUnitTracker(Others(), unit_dims={"relu": -1}) as tracker:
        tracker.model(torch.randn(2, 6, 6))
    dims = {name: stats.unit_dim for name, stats in tracker.stats.items()}
    assert dims == {"relu": -1, "relu_1_fn": 1, "relu_1": None}  # the module `relu_1` is no position of `relu`

    class LinkedNorm(nn.Module):  # the LayerNorm over (C, H, W) is the site's own norm: the channels are units
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(6, 6, 1)
            self.ln = nn.LayerNorm([6, 5, 7])

        def forward(self, x):
            return F.relu(self.ln(self.conv(x) + x))

    (site,) = find_relu_sites(LinkedNorm(), example_input=x)
    assert site.producer is None and (site.unit_dim, site.num_units) == (1, 6)


class _Recursive(nn.Module):
    """Calls itself `depth` times; each run applies a ReLU module and, after the inner run, an `F.relu`."""

    def __init__(self, depth):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.act = nn.ReLU()
        self.depth = depth
        self.level = 0  # a plain attribute: torch.fx traces the recursion as the forward runs it

    def forward(self, x):
        if self.level < self.depth:
            self.level += 1
            x = self(x)
            self.level -= 1
        return F.relu(self.fc(self.act(x)) - 0.2)


def test_a_recursive_module_is_numbered_alike_at_discovery_and_at_run_time():
    torch.manual_seed(0)
    model = _Recursive(2)
    x = torch.randn(10, 4)
    with torch.no_grad():  # brute force, innermost run first
        acts, relus, h = [], [], x
        for _ in range(3):
            acts.append(torch.relu(h))
            h = torch.relu(model.fc(acts[-1]) - 0.2)
            relus.append(h)
    names = [site.name for site in find_relu_sites(model, example_input=x)]
    tracker = DeadUnitTracker(model)
    with tracker, torch.no_grad():
        model(x)
    report = tracker.report()
    assert set(report) == set(names)  # the observation names the sites as the counting does
    # the module's positions number on as the runs return (its hooks restart them at each run's start only);
    # the functional call's position counts within each run, so every run's call is the one site
    assert sorted(names) == ["act", "act_1", "act_2", "relu"]
    for k, out in enumerate(acts):
        name = "act" if k == 0 else f"act_{k}"
        assert report[name].active_count.tolist() == (out > 0).sum(0).tolist(), name
    assert report["relu"].active_count.tolist() == (torch.cat(relus) > 0).sum(0).tolist()
    assert report["relu"].samples == 30


def test_a_functional_position_created_at_run_time_keeps_clear_of_module_names():
    """A parent applying its `self.relu` twice (sites `relu`, `relu_1`) and an `F.relu` in a loop that runs more
    often than at discovery: the new functional position is named apart (as discovery names a colliding call)."""

    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.relu = nn.ReLU()
            self.fc = nn.Linear(3, 3)
            self.rounds = 1

        def forward(self, x):
            h = self.relu(self.relu(x) - 0.5)
            for _ in range(self.rounds):
                x = F.relu(self.fc(x))
            return h.sum() + x.sum()

    torch.manual_seed(0)
    model = Parent()
    x = torch.randn(8, 3).abs()
    tracker = DeadUnitTracker(model, discovered=find_relu_sites(model, example_input=x))
    assert [s.name for s in tracker.all_sites] == ["relu", "relu_1", "relu_fn"]
    model.rounds = 2
    with tracker, torch.no_grad():
        model(x)
    with torch.no_grad():
        a = torch.relu(x)
        b = torch.relu(a - 0.5)
        c = torch.relu(model.fc(x))
        d = torch.relu(model.fc(c))
    report = tracker.report()
    assert set(report) == {"relu", "relu_1", "relu_fn", "relu_1_fn"}
    for name, out in {"relu": a, "relu_1": b, "relu_fn": c, "relu_1_fn": d}.items():
        assert report[name].active_count.tolist() == (out > 0).sum(0).tolist(), name


def test_module_and_functional_positions_never_share_a_name():
    """A parent's F.relu runs before its ReLU module's second call: whichever position is created first, the
    other is named apart, and each counts only its own calls."""

    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.relu = nn.ReLU()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            a = F.relu(self.fc(x))
            b = F.relu(self.fc(a) - 0.2)
            return self.relu(self.relu(a + b) - 0.5)

    torch.manual_seed(0)
    model = Parent()
    x = torch.randn(8, 3)
    for trace in (True, False):
        with DeadUnitTracker(model, trace=trace) as tracker, torch.no_grad():
            model(x)
        with torch.no_grad():
            a = torch.relu(model.fc(x))
            b = torch.relu(model.fc(a) - 0.2)
            c = torch.relu(a + b)
            d = torch.relu(c - 0.5)
        report = tracker.report()
        names = {site.name for site in tracker.sites}
        assert len(names) == len(tracker.sites) and set(report) == names, trace
        counted = sorted(r.active_count.tolist() for r in report.values())
        expected = [(out > 0).sum(0).tolist() for out in ((a, b, c, d) if trace else (c, d))]
        assert counted == sorted(expected), trace


def test_a_restored_position_is_created_for_its_own_kind():
    """A checkpoint's counts of a functional position created at run time come back to a functional position, not to
    a position of the parent's ReLU module of the same base name; the functional names carry `_fn` (the module
    `relu` owns `relu`, and `relu_1` would be its second call position)."""

    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.relu = nn.ReLU()

        def forward(self, x):
            return F.relu(self.relu(x) - 0.5)

    model = Parent()
    tracker = DeadUnitTracker(model, discovered=find_relu_sites(model, example_input=torch.randn(2, 3)))
    assert [(s.name, s.kind) for s in tracker.all_sites] == [("relu", "module"), ("relu_fn", "function")]
    assert tracker._place_stats("function", "relu", 1, create=False) is None  # not created without `create`
    stats = tracker._place_stats("function", "relu", 1, create=True)
    assert stats is not None and tracker._place(tracker.sites[-1]) == ("function", "relu", 1)
    assert [(s.name, s.kind) for s in tracker.sites] == [
        ("relu", "module"), ("relu_fn", "function"), ("relu_1_fn", "function")
    ]  # fmt: skip


class _ScaledByARectifiedScalar(nn.Module):
    """A learnable scale kept non-negative by a rectifier: a 0-d rectifier output beside a real site."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.relu = nn.ReLU()
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return self.relu(self.lin(x)) * F.relu(self.scale)


def test_a_0_d_rectifier_output_is_left_out_with_one_warning_and_the_forward_runs() -> None:
    torch.manual_seed(0)
    model = _ScaledByARectifiedScalar()
    batches = [torch.randn(6, 4), torch.randn(3, 4)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with DeadUnitTracker(model) as tracker:
            for x in batches:
                model(x).sum().backward()
    scalar = [w for w in caught if "0-d output" in str(w.message)]
    assert len(scalar) == 1 and "relu_fn" in str(scalar[0].message)
    with torch.no_grad():
        outs = [torch.relu(model.lin(x)) for x in batches]
    expected = expected_counts(outs, -1)
    report = tracker.report()["relu"]
    assert report.active_count.tolist() == expected["active"] and report.samples == expected["samples"]


def test_an_empty_sequence_in_the_batch_loop_is_counted_as_nothing() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.ReLU())
    full, empty = torch.randn(2, 6, 3), torch.randn(2, 0, 3)
    with DeadUnitTracker(net) as tracker:
        net(full)
        net(empty)  # a batch of sequences of length 0
    with torch.no_grad():
        expected = expected_counts([torch.relu(net[0](full))], -1)
    report = tracker.report()["1"]
    assert report.active_count.tolist() == expected["active"] and report.samples == expected["samples"] == 2


def test_a_shared_modules_call_position_first_seen_later_takes_the_first_positions_observed_axis() -> None:
    """One `nn.ReLU` after two Linears on (batch, 20, features); its second call happens from the second forward on,
    after the axes were observed: it takes the first position's observed axis (the features), as before."""
    torch.manual_seed(0)

    class Late(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2, self.relu = nn.Linear(6, 10), nn.Linear(10, 10), nn.ReLU()
            with torch.no_grad():
                self.fc2.bias[:3] = -100.0

        def forward(self, x: torch.Tensor, deep: bool) -> torch.Tensor:
            h = self.relu(self.fc1(x))
            return self.relu(self.fc2(h)) if deep else h

    model = Late()
    xs = torch.randn(4, 8, 20, 6, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with DeadUnitTracker(model, example_input=(xs[0], False)) as tracker, torch.no_grad():
            for i, x in enumerate(xs):
                model(x, deep=i >= 1)
    with torch.no_grad():  # brute force over the same forwards: the second call's features never > 0
        fired = sum((model(x, deep=True).reshape(-1, 10) > 0).sum(0) for x in xs[1:])
    layer = tracker.report()["relu_1"]
    assert (layer.num_units, layer.num_dead) == (10, int((fired == 0).sum()))
    assert not [w for w in caught if "no known Linear/ConvNd" in str(w.message)]
