"""``DeadUnitTracker`` counts on real model code, each count checked against the brute-force oracle
(``tests.conftest.expected_counts`` on outputs replayed by hand): functional rectifiers, data-dependent control flow,
in-place and reused modules, containers, a small ResNet, sequences, activation checkpointing, inference mode,
deep copies, dtype and device changes, ``torch.func`` transforms."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_relu import (
    DeadUnitTracker,
    find_relu_sites,
    sign_flip_,
)
from tests import helpers
from tests.helpers import (
    FUNCTIONAL_SITES,
    MLP,
    AllFunctional,
    TinyResNet,
    assert_report,
    bn,
    clamp,
    expected_counts,
    lin,
    positive_data,
)


def test_tracker_counts_every_functional_form_exactly():
    torch.manual_seed(0)
    model = AllFunctional()
    model.kill()
    batches = [torch.randn(9, 4), torch.randn(1, 4), torch.randn(6, 4)]
    with DeadUnitTracker(model) as tracker:
        for x in batches:
            model(x)
    with torch.no_grad():
        replays = [AllFunctional.replay(model, x) for x in batches]
    expected = {name: expected_counts([r[name] for r in replays], -1) for name in FUNCTIONAL_SITES}
    assert expected["relu"]["dead"][0] and expected["relu"]["dead"][3]
    assert expected["relu6"]["dead"][:5] == [True] * 5 and expected["relu6"]["killed"] > 0
    assert_report(tracker.report(), expected)


class _DataDependent(nn.Module):
    """A forward with data-dependent control flow (no symbolic trace could follow it)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.fc(x))
        if h.sum() > 0:
            return F.relu(h - 0.1)
        return h


def test_data_dependent_control_flow_counts_the_branch_each_forward_takes():
    """The functional call in a data-dependent branch is found on the first forward that takes it and counted in
    every forward that does; the module sites count every forward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), _DataDependent(), nn.Linear(5, 2))
    with torch.no_grad():
        model[0].bias[1] = -1e4
        model[2].fc.bias[[0, 4]] = -1e4
    tracker = DeadUnitTracker(model)
    assert [s.name for s in tracker.sites] == ["1", "2.act"]  # the functional call is found on the first forward
    batches = [torch.randn(7, 3), torch.randn(5, 3)]
    with tracker:
        for x in batches:
            model(x)
    assert [s.name for s in tracker.sites] == ["1", "2.act", "2.relu"]
    outs: dict[str, list[Tensor]] = {"1": [], "2.act": [], "2.relu": []}
    with torch.no_grad():
        for x in batches:
            a = clamp(lin(x, model[0]))
            h = clamp(lin(a, model[2].fc))
            outs["1"].append(a)
            outs["2.act"].append(h)
            if h.sum() > 0:
                outs["2.relu"].append(clamp(h - 0.1))
    assert len(outs["2.relu"]) == 2
    assert_report(tracker.report(), {k: expected_counts(v, -1) for k, v in outs.items()})


def test_a_model_with_data_dependent_control_flow_is_observed_as_it_runs():
    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 4)
            self.act = nn.ReLU()

        def forward(self, x):
            if x.mean() > 0:
                x = -x
            return F.relu(self.act(self.fc(x)))

    assert [s.name for s in find_relu_sites(Root())] == ["act"]  # nothing runs without an example
    sites = find_relu_sites(Root(), example_input=torch.randn(4, 3))
    assert [(s.name, s.kind) for s in sites] == [("act", "module"), ("relu", "function")]


def test_inplace_relu_counts_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 6),
        nn.ReLU(inplace=True),
        nn.Linear(6, 6),
        nn.BatchNorm1d(6),
        nn.ReLU(inplace=True),
        nn.Linear(6, 1),
    )
    with torch.no_grad():
        model[0].bias[2] = -1e4
        model[3].bias[[0, 5]] = -1e4
    batches = [torch.randn(8, 5), torch.randn(3, 5)]
    with DeadUnitTracker(model) as tracker:
        for x in batches:
            model(x)
    outs: dict[str, list[Tensor]] = {"1": [], "4": []}
    with torch.no_grad():
        for x in batches:
            a = clamp(lin(x, model[0]))
            outs["1"].append(a)
            outs["4"].append(clamp(bn(lin(a, model[2]), model[3])))
    expected = {k: expected_counts(v, -1) for k, v in outs.items()}
    assert expected["1"]["dead"] == [False, False, True, False, False, False]
    assert_report(tracker.report(), expected)


class _ReusedDifferentWidths(nn.Module):
    """One `nn.ReLU` object at three places of widths 5, 3 and 5."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(5, 3)
        self.fc3 = nn.Linear(3, 5)
        self.head = nn.Linear(5, 1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.head(self.act(self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))))


def test_reused_relu_at_places_of_different_widths_is_one_site_per_place():
    torch.manual_seed(0)
    model = _ReusedDifferentWidths()
    with torch.no_grad():
        model.fc1.bias[4] = -1e4
        model.fc2.bias[0] = -1e4
        model.fc3.bias[[1, 2]] = -1e4
    sites = {s.name: s for s in find_relu_sites(model, example_input=torch.randn(2, 4))}
    assert list(sites) == ["act", "act_1", "act_2"]
    assert [sites[n].num_units for n in sites] == [5, 3, 5]
    assert [sites[n].producer_name for n in sites] == ["fc1", "fc2", "fc3"]
    assert [[c.name for c in sites[n].consumers] for n in sites] == [["fc2"], ["fc3"], ["head"]]
    batches = [torch.randn(6, 4), torch.randn(4, 4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no width-mismatch warning: the places are never mixed
        with DeadUnitTracker(model) as tracker:
            for x in batches:
                model(x)
    outs: dict[str, list[Tensor]] = {"act": [], "act_1": [], "act_2": []}
    with torch.no_grad():
        for x in batches:
            a = clamp(lin(x, model.fc1))
            b = clamp(lin(a, model.fc2))
            outs["act"].append(a)
            outs["act_1"].append(b)
            outs["act_2"].append(clamp(lin(b, model.fc3)))
    expected = {k: expected_counts(v, -1) for k, v in outs.items()}
    assert expected["act"]["dead"] == [False] * 4 + [True]
    assert_report(tracker.report(), expected)


def _reused_in_sequential() -> nn.Sequential:
    torch.manual_seed(0)
    act = nn.ReLU()
    return nn.Sequential(nn.Linear(3, 5), act, nn.Linear(5, 2), act, nn.Linear(2, 1))


def test_reused_relu_inside_a_sequential_counts_each_place_apart():
    model = _reused_in_sequential()
    with torch.no_grad():
        model[2].bias[1] = -1e4
    x = torch.randn(10, 3)
    with DeadUnitTracker(model) as tracker:
        model(x)
        model(x[:4])
    with torch.no_grad():
        a = clamp(lin(x, model[0]))
        b = clamp(lin(a, model[2]))
    expected = {"1": expected_counts([a, a[:4]], -1), "1_1": expected_counts([b, b[:4]], -1)}
    assert expected["1_1"]["dead"] == [False, True]
    assert_report(tracker.report(), expected)


def test_reused_relu_inside_a_sequential_is_discovered_once_per_place():
    model = _reused_in_sequential()
    sites = {s.name: s for s in find_relu_sites(model, example_input=torch.randn(2, 3))}
    assert list(sites) == ["1", "1_1"]
    assert sites["1"].num_units == 5 and sites["1_1"].num_units == 2
    assert sites["1"].producer is model[0] and sites["1_1"].producer is model[2]
    assert [c.module for c in sites["1_1"].consumers] == [model[4]]


def test_sign_flip_keeps_half_of_the_living_data_at_a_reused_relus_second_place():
    model = _reused_in_sequential()
    with torch.no_grad():
        model[2].weight.fill_(-1.0)  # the second place kills every sample alive at the first one
        model[2].bias.fill_(-1.0)
    x = torch.randn(64, 3)
    sign_flip_(model, x)
    with torch.no_grad():
        a = clamp(lin(x, model[0]))
        b = clamp(lin(a, model[2]))
    alive_a = (a > 0).any(dim=1)
    alive_b = alive_a & (b > 0).any(dim=1)
    assert 2 * int(alive_b.sum()) >= int(alive_a.sum())


class _SharedBlock(nn.Module):
    def __init__(self, act: nn.Module, cin: int, cout: int) -> None:
        super().__init__()
        self.fc = nn.Linear(cin, cout)
        self.act = act

    def forward(self, x):
        return self.act(self.fc(x))


class _SharedAcrossBlocks(nn.Module):
    """One `nn.ReLU` object shared by two sibling blocks; ``second_first`` calls the block registered second first."""

    def __init__(self, second_first: bool) -> None:
        super().__init__()
        act = nn.ReLU()
        self.second_first = second_first
        if second_first:
            self.b1 = _SharedBlock(act, 3, 5)  # called second
            self.b2 = _SharedBlock(act, 4, 3)  # called first
        else:
            self.b1 = _SharedBlock(act, 4, 3)
            self.b2 = _SharedBlock(act, 3, 5)
        self.head = nn.Linear(5, 1)

    def forward(self, x):
        h = self.b1(self.b2(x)) if self.second_first else self.b2(self.b1(x))
        return self.head(h)


def _check_shared_across_blocks(second_first: bool) -> None:
    torch.manual_seed(0)
    model = _SharedAcrossBlocks(second_first)
    first, second = (model.b2, model.b1) if second_first else (model.b1, model.b2)
    with torch.no_grad():
        first.fc.bias[0] = -1e4
        second.fc.bias[[1, 3]] = -1e4
    x = torch.randn(12, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with DeadUnitTracker(model) as tracker:
            model(x)
            model(x)
    assert not [w for w in caught if "units but produced" in str(w.message)]
    with torch.no_grad():
        a = clamp(lin(x, first.fc))
        b = clamp(lin(a, second.fc))
    # the first place in forward order is the module's first site, the second one its `_1` site
    expected = {"b1.act": expected_counts([a, a], -1), "b1.act_1": expected_counts([b, b], -1)}
    assert_report(tracker.report(), expected)


def test_relu_shared_by_sibling_blocks_called_in_registration_order():
    _check_shared_across_blocks(second_first=False)


def test_relu_shared_by_sibling_blocks_called_in_reverse_order():
    _check_shared_across_blocks(second_first=True)


class _Containers(nn.Module):
    """ReLUs inside a ModuleList and a ModuleDict, applied by loops in the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 6), nn.Linear(6, 5)])
        self.acts = nn.ModuleList([nn.ReLU(), nn.ReLU(inplace=True)])
        self.heads = nn.ModuleDict(
            {"a": nn.Sequential(nn.Linear(5, 3), nn.ReLU()), "b": nn.Sequential(nn.Linear(5, 2), nn.ReLU6())}
        )
        self.out = nn.Linear(5, 1)

    def forward(self, x):
        for layer, act in zip(self.layers, self.acts, strict=True):
            x = act(layer(x))
        return self.out(torch.cat([self.heads["a"](x), self.heads["b"](x)], dim=-1))


def test_relus_in_modulelist_and_moduledict_count_exactly():
    torch.manual_seed(0)
    model = _Containers()
    with torch.no_grad():
        model.layers[0].bias[[1, 2]] = -1e4
        model.heads["a"][0].bias[0] = -1e4
        model.heads["b"][0].bias[:] = -1e4  # a collapsed site
    sites = {s.name: s for s in find_relu_sites(model, example_input=torch.randn(2, 4))}
    assert set(sites) == {"acts.0", "acts.1", "heads.a.1", "heads.b.1"}
    assert sites["acts.0"].producer is model.layers[0] and sites["acts.0"].num_units == 6
    assert sites["acts.1"].producer is model.layers[1] and sites["heads.b.1"].num_units == 2
    batches = [torch.randn(5, 4), torch.randn(8, 4)]
    with DeadUnitTracker(model) as tracker:
        for x in batches:
            model(x)
    outs: dict[str, list[Tensor]] = {name: [] for name in sites}
    with torch.no_grad():
        for x in batches:
            a = clamp(lin(x, model.layers[0]))
            b = clamp(lin(a, model.layers[1]))
            outs["acts.0"].append(a)
            outs["acts.1"].append(b)
            outs["heads.a.1"].append(clamp(lin(b, model.heads["a"][0])))
            outs["heads.b.1"].append(torch.clamp(lin(b, model.heads["b"][0]), 0, 6))
    expected = {k: expected_counts(v, -1) for k, v in outs.items()}
    assert expected["heads.b.1"]["dead"] == [True, True]
    report = tracker.report()
    assert_report(report, expected)
    assert report["heads.b.1"].collapsed


def test_small_resnet_every_site_counted_exactly():
    torch.manual_seed(0)
    model = TinyResNet()
    with torch.no_grad():
        model.stem[1].bias[1] = -1e4
        model.layer1.bn1.bias[[0, 3]] = -1e4
        model.layer2.bn1.bias[2] = -1e4
        model.layer3.bn1.bias[:] = -1e4  # layer3's first site collapses; its second still sees the shortcut
    model.train()
    batches = [torch.randn(4, 3, 8, 8), torch.randn(2, 3, 8, 8)]
    with DeadUnitTracker(model) as tracker:
        for x in batches:
            model(x)
    with torch.no_grad():
        replays = [TinyResNet.replay(model, x) for x in batches]
    expected = {name: expected_counts([r[name] for r in replays], 1) for name in replays[0]}
    assert set(expected) == {"stem.2", *(f"layer{i}.relu{s}" for i in (1, 2, 3) for s in ("", "_1"))}
    assert expected["layer1.relu"]["dead"] == [True, False, False, True]
    assert expected["layer2.relu"]["num_units"] == 6 and expected["layer2.relu"]["entries"] == 6 * 4 * 4
    report = tracker.report()
    assert_report(report, expected)
    assert report["layer3.relu"].collapsed and not report["layer3.relu_1"].collapsed

    sites = {s.name: s for s in find_relu_sites(model, example_input=batches[0])}
    assert list(sites) == ["stem.2", *(f"layer{i}.relu{s}" for i in (1, 2, 3) for s in ("", "_1"))]
    for i in (1, 2, 3):
        block = getattr(model, f"layer{i}")
        first, second = sites[f"layer{i}.relu"], sites[f"layer{i}.relu_1"]
        assert first.producer is block.conv1 and first.norm is block.bn1 and first.unit_dim == 1
        assert [c.module for c in first.consumers] == [block.conv2]
        assert second.module is block.relu and second.call_index == 1
        assert second.producer is None and second.norm is None  # reads the residual sum
    # the output of a block feeds the next block's convolutions, and also its residual sum when it has no shortcut
    assert [c.module for c in sites["layer1.relu_1"].consumers] == [model.layer2.conv1, model.layer2.downsample[0]]
    assert sites["layer2.relu_1"].consumers == []
    assert [c.module for c in sites["layer3.relu_1"].consumers] == [model.fc]
    assert sites["stem.2"].producer is model.stem[0] and sites["stem.2"].norm is model.stem[1]


def test_small_resnet_in_eval_mode_counts_exactly():
    torch.manual_seed(1)
    model = TinyResNet()
    with torch.no_grad():
        model.layer2.bn1.bias[[0, 5]] = -1e4
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(5, 3, 8, 8)
    with DeadUnitTracker(model) as tracker:
        model(x)
    with torch.no_grad():
        replay = TinyResNet.replay(model, x)
    assert_report(tracker.report(), {name: expected_counts([out], 1) for name, out in replay.items()})


class _SequenceBlock(nn.Module):
    """A transformer-style feed-forward block on (B, T, C): units are the last dimension."""

    def __init__(self, c: int = 4, hidden: int = 6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, c)
        self.proj = nn.Linear(c, 5)

    def forward(self, x):
        x = x + self.fc2(self.act(self.fc1(self.norm(x))))
        return F.relu(self.proj(x))


def test_sequence_inputs_units_are_the_last_dimension():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.ReLU(), _SequenceBlock())
    with torch.no_grad():
        model[1].bias[2] = -1e4
        model[3].fc1.bias[[0, 5]] = -1e4
        model[3].proj.bias[:4] = -1e4  # one unit left: some samples are killed
    sites = {s.name: s for s in find_relu_sites(model, example_input=torch.randn(2, 7, 3))}
    assert set(sites) == {"2", "3.act", "3.relu"}
    assert all(s.unit_dim == -1 for s in sites.values())
    assert [sites[n].num_units for n in ("2", "3.act", "3.relu")] == [4, 6, 5]
    batches = [torch.randn(3, 7, 3), torch.randn(5, 2, 3) * 0.1]
    with DeadUnitTracker(model) as tracker:
        for x in batches:
            model(x)
    outs: dict[str, list[Tensor]] = {"2": [], "3.act": [], "3.relu": []}
    block = model[3]
    with torch.no_grad():
        for x in batches:
            a = clamp(F.layer_norm(lin(x, model[0]), (4,), model[1].weight, model[1].bias, model[1].eps))
            h = clamp(lin(F.layer_norm(a, (4,), block.norm.weight, block.norm.bias, block.norm.eps), block.fc1))
            outs["2"].append(a)
            outs["3.act"].append(h)
            outs["3.relu"].append(clamp(lin(a + lin(h, block.fc2), block.proj)))
    expected = {k: expected_counts(v, -1) for k, v in outs.items()}
    assert expected["2"]["entries"] == 3 * 7 + 5 * 2 and expected["2"]["num_units"] == 4
    assert expected["3.relu"]["killed"] > 0
    assert_report(tracker.report(), expected)


class _Checkpointed(nn.Module):
    def __init__(self, use_reentrant: bool) -> None:
        super().__init__()
        self.use_reentrant = use_reentrant
        self.body = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU())
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        return self.head(checkpoint(self.body, x, use_reentrant=self.use_reentrant))


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_activation_checkpointing_counts_each_forward_once(use_reentrant):
    torch.manual_seed(0)
    model = _Checkpointed(use_reentrant)
    with torch.no_grad():
        model.body[0].bias[1] = -1e4
    batches = [torch.randn(6, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)]
    with DeadUnitTracker(model) as tracker:
        for x in batches:
            model(x).sum().backward()
    outs: dict[str, list[Tensor]] = {"body.1": [], "body.3": []}
    with torch.no_grad():
        for x in batches:
            a = clamp(lin(x, model.body[0]))
            outs["body.1"].append(a)
            outs["body.3"].append(clamp(lin(a, model.body[2])))
    assert_report(tracker.report(), {k: expected_counts(v, -1) for k, v in outs.items()})


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("gradient", ["backward", "autograd.grad"])
@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
def test_a_forward_after_the_backward_of_the_output_is_counted(use_reentrant, gradient):
    """A second forward in the same step, after a backward reached the model's output (a GAN's discriminator after the
    generator's backward, a physics-informed loss after ``torch.autograd.grad``), is counted; the recomputation of
    activation checkpointing inside that backward is not."""
    if use_reentrant and gradient == "autograd.grad":
        pytest.skip("torch refuses torch.autograd.grad through reentrant checkpointing")
    torch.manual_seed(0)
    model = _Checkpointed(use_reentrant)
    with torch.no_grad():
        model.body[0].bias[1] = -1e4
    x, later = torch.randn(6, 3, requires_grad=True), torch.randn(4, 3) + 50.0
    with torch.no_grad():  # the later batch makes unit 1 fire
        model.body[0].weight[1] = torch.tensor([1e3, 1e3, 1e3])
    with DeadUnitTracker(model) as tracker:
        out = model(x)
        if gradient == "backward":
            out.sum().backward()
        else:
            torch.autograd.grad(out.sum(), x)
        model.body(later).sum().backward()  # a submodule's forward with autograd on, after that backward
    outs: dict[str, list[Tensor]] = {"body.1": [], "body.3": []}
    with torch.no_grad():
        for batch in (x, later):
            a = clamp(lin(batch, model.body[0]))
            outs["body.1"].append(a)
            outs["body.3"].append(clamp(lin(a, model.body[2])))
    expected = {k: expected_counts(v, -1) for k, v in outs.items()}
    assert expected["body.1"]["samples"] == 10
    assert_report(tracker.report(), expected)


def test_one_dimensional_activation_with_varying_batch_size_does_not_crash():
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 1)

        def forward(self, x):
            return F.relu(self.fc(x).squeeze(-1))  # (B,)

    model = Head()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with DeadUnitTracker(model) as tracker:
            model(torch.randn(8, 3))
            model(torch.randn(5, 3))  # a smaller last batch
    report = tracker.report()["relu"]
    assert report.samples == 13 or any("relu" in str(w.message) for w in caught)


def test_first_forward_under_inference_mode_then_training_keeps_counting():
    torch.manual_seed(0)
    model = TinyResNet()
    x_eval, x_train = torch.randn(2, 3, 8, 8), torch.randn(3, 3, 8, 8)
    with torch.no_grad():  # replayed before the forwards below move the running statistics
        eval_out = TinyResNet.replay(model.eval(), x_eval)
        train_out = TinyResNet.replay(model.train(), x_train)
    with DeadUnitTracker(model) as tracker:
        model.eval()
        with torch.inference_mode():
            model(x_eval)
        model.train()
        model(x_train).sum().backward()
    expected = {name: expected_counts([eval_out[name], train_out[name]], 1) for name in eval_out}
    assert_report(tracker.report(), expected)


def test_deepcopy_of_a_watched_model_works_and_the_copy_is_not_counted_by_the_original():
    """EMA/SWA callbacks deep-copy the model while the hooks are attached."""
    torch.manual_seed(0)
    model = AllFunctional()
    x = torch.randn(5, 4)
    with DeadUnitTracker(model) as tracker:
        model(x)
        twin = copy.deepcopy(model)
        twin(torch.randn(7, 4))
        model(x)
    report = tracker.report()
    assert {layer.samples for layer in report.values()} == {10}
    with torch.no_grad():
        replay = AllFunctional.replay(model, x)
    assert_report(report, {name: expected_counts([out, out], -1) for name, out in replay.items()})


def test_tracker_keeps_counting_across_to_and_dtype_changes():
    model = MLP()
    xs = [positive_data(5, seed=s) for s in range(3)]
    with DeadUnitTracker(model) as tracker:
        model(xs[0])
        model.to("cpu")
        model(xs[1])
        model.double()
        model(xs[2].double())
    outs = [MLP.replay(model, x.double()) for x in xs]
    expected = {name: expected_counts([o[name] for o in outs], -1) for name in ("1", "3")}
    assert_report(tracker.report(), expected)


@pytest.mark.parametrize("counting", ["cpu", "plain"])
@pytest.mark.parametrize("margin", [False, True])
def test_outputs_inside_torch_func_transforms_are_skipped_with_one_warning(counting, margin):
    """Inside ``torch.func.vmap``/``grad`` a site sees wrappers without storage, whose results could not be folded
    outside the transform: they are not counted (one RuntimeWarning), the plain passes around them still are, and
    reports still work. Outputs of the same shape as a site's last one do not slip into its reused CPU buffers."""
    with helpers.counting_path(counting):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1))
        x = torch.randn(3, 5, 4)
        with DeadUnitTracker(model, track_margin=margin) as tracker:
            model(x[0])  # a plain pass: (5, 6) outputs
            with pytest.warns(RuntimeWarning, match="torch.func transforms") as caught:
                torch.func.vmap(model)(x)  # per call (5, 6) outputs again, batched wrappers
                torch.func.grad(lambda inputs: model(inputs).sum())(x[1])
            model(x[2])
            report = tracker.report()["1"]
        assert sum("torch.func" in str(w.message) for w in caught) == 1
        with torch.no_grad():
            hidden = torch.clamp(F.linear(x[[0, 2]], model[0].weight, model[0].bias), min=0)
        assert report.samples == 10
        assert report.active_count.tolist() == (hidden > 0).sum((0, 1)).tolist()
