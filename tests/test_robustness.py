"""Robustness on real model code: functional rectifiers, reused modules, containers, residual networks, sequences,
awkward training set-ups (accumulation, manual optimization, bf16, ``torch.compile``, dtype changes, empty epochs)
and bad input.

Every count is checked against an independent brute force: the layers are replayed by hand (``torch.clamp`` for the
rectifier, ``F.linear``/``F.conv2d``/``F.batch_norm`` for the rest) on the same data, and the activity is measured with
plain boolean logic. In Lightning fits the replay runs inside ``training_step`` with the weights of that step, so the
weights may change between steps.
"""

from __future__ import annotations

import copy
import csv
import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_relu import (
    ActivationStats,
    DeadUnitMonitor,
    DeadUnitReviver,
    DeadUnitTracker,
    LayerReport,
    ReluInitializer,
    find_relu_sites,
    rai_,
    revive_dead_units_,
    sign_flip_,
    theory,
)
from tests import helpers

# ------------------------------------------------------------------------------------------------ brute force


def expected_counts(outputs: list[Tensor], unit_axis: int) -> dict[str, object]:
    """Activity of one site from its outputs (one per forward), with plain boolean logic.

    ``unit_axis`` is the dimension that indexes units: 1 for convolutions, -1 for dense layers and sequences.
    """
    active: list[int] | None = None
    entries = samples = killed = 0
    nonfinite = False
    for output in outputs:
        out = output.detach().float()
        nonfinite = nonfinite or not bool(torch.isfinite(out).all())
        n = out.shape[0]
        per_sample = out.movedim(unit_axis, -1).reshape(n, -1, out.shape[unit_axis])  # (samples, positions, units)
        counts = [int((per_sample[:, :, u] > 0).sum()) for u in range(per_sample.shape[-1])]
        active = counts if active is None else [a + c for a, c in zip(active, counts, strict=True)]
        entries += n * per_sample.shape[1]
        samples += n
        killed += sum(1 for i in range(n) if bool((per_sample[i] == 0).all()))  # the whole output is 0
    assert active is not None
    return {
        "num_units": len(active),
        "active": active,
        "dead": [a == 0 and not nonfinite for a in active],  # a site that saw NaN/Inf is not judged (issue 20)
        "nonfinite": nonfinite,
        "entries": entries,
        "samples": samples,
        "killed": killed,
    }


def assert_report(report: dict[str, LayerReport], expected: dict[str, dict], exact_keys: bool = True) -> None:
    if exact_keys:
        assert set(report) == set(expected)
    for name, exp in expected.items():
        layer = report[name]
        assert layer.num_units == exp["num_units"], name
        assert layer.active_count.tolist() == exp["active"], name
        assert layer.dead.tolist() == exp["dead"], name
        assert layer.entries_per_unit == exp["entries"], name
        assert layer.samples == exp["samples"], name
        assert layer.killed == exp["killed"], name
        assert layer.living_data_fraction == pytest.approx(1 - exp["killed"] / exp["samples"]), name
        assert layer.nonfinite == exp.get("nonfinite", False), name
        if exp.get("nonfinite"):
            assert math.isnan(layer.dead_fraction) and not layer.collapsed, name
        else:
            assert layer.dead_fraction == pytest.approx(sum(exp["dead"]) / exp["num_units"]), name


def clamp(x: Tensor) -> Tensor:
    return torch.clamp(x, min=0)


def bn(x: Tensor, norm: nn.BatchNorm1d | nn.BatchNorm2d) -> Tensor:
    """BatchNorm by hand, with the statistics a module in ``norm``'s mode would use (running stats not updated)."""
    if norm.training:
        return F.batch_norm(x, None, None, norm.weight, norm.bias, training=True, eps=norm.eps)
    return F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, training=False, eps=norm.eps)


def lin(x: Tensor, layer: nn.Linear) -> Tensor:
    return F.linear(x, layer.weight, layer.bias)


def conv(x: Tensor, layer: nn.Conv2d) -> Tensor:
    return F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def params_of(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_params(before: dict[str, Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    assert set(before) == set(after)
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


# ------------------------------------------------------------------------------------------------ models


class AllFunctional(nn.Module):
    """Every functional rectifier form, one per layer, each fed by its own Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.fc2 = nn.Linear(6, 5)
        self.fc3 = nn.Linear(5, 7)
        self.fc4 = nn.Linear(7, 4)
        self.fc5 = nn.Linear(4, 6)
        self.fc6 = nn.Linear(6, 5)
        self.fc7 = nn.Linear(5, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.fc1(x))
        h = torch.relu(self.fc2(h))
        h = torch.relu_(self.fc3(h))
        h = self.fc4(h).relu()
        h = F.relu6(self.fc5(h))
        h = self.fc6(h).relu_()
        h = F.relu(self.fc7(h), inplace=True)
        return self.head(h)

    @staticmethod
    def replay(m: AllFunctional, x: Tensor) -> dict[str, Tensor]:
        outs = {}
        h = outs["relu"] = clamp(lin(x, m.fc1))
        h = outs["relu_1"] = clamp(lin(h, m.fc2))
        h = outs["relu_2"] = clamp(lin(h, m.fc3))
        h = outs["relu_3"] = clamp(lin(h, m.fc4))
        h = outs["relu6"] = torch.clamp(lin(h, m.fc5), 0, 6)
        h = outs["relu_4"] = clamp(lin(h, m.fc6))
        outs["relu_5"] = clamp(lin(h, m.fc7))
        return outs

    def kill(self) -> None:
        with torch.no_grad():
            self.fc1.bias[[0, 3]] = -1e4
            self.fc3.bias[2] = -1e4
            self.fc5.bias[:5] = -1e4  # at most one unit left at the relu6 site
            self.fc7.bias[1] = -1e4


FUNCTIONAL_SITES = {
    # name: (producer, consumer, width)
    "relu": ("fc1", "fc2", 6),
    "relu_1": ("fc2", "fc3", 5),
    "relu_2": ("fc3", "fc4", 7),
    "relu_3": ("fc4", "fc5", 4),
    "relu6": ("fc5", "fc6", 6),
    "relu_4": ("fc6", "fc7", 5),
    "relu_5": ("fc7", "head", 3),
}


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: one `nn.ReLU(inplace=True)` object applied twice, optional 1x1-conv shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
        self.layer1 = BasicBlock(4, 4)
        self.layer2 = BasicBlock(4, 6, stride=2)
        self.layer3 = BasicBlock(6, 6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))

    @staticmethod
    def replay(m: TinyResNet, x: Tensor) -> dict[str, Tensor]:
        outs = {}
        h = outs["stem.2"] = clamp(bn(conv(x, m.stem[0]), m.stem[1]))
        for name in ("layer1", "layer2", "layer3"):
            block = getattr(m, name)
            a = outs[f"{name}.relu"] = clamp(bn(conv(h, block.conv1), block.bn1))
            b = bn(conv(a, block.conv2), block.bn2)
            identity = h if block.downsample is None else bn(conv(h, block.downsample[0]), block.downsample[1])
            h = outs[f"{name}.relu_1"] = clamp(b + identity)
        return outs


# ------------------------------------------------------------------------------------------------ Lightning


class Replayed(L.LightningModule):
    """Wraps ``net`` as ``self.net``; every training step first replays it by hand and records each site's output.

    ``recorded[epoch][site]`` lists the outputs of every training forward, measured with the weights of that step.
    """

    def __init__(
        self,
        net: nn.Module,
        replay: Callable[[nn.Module, Tensor], dict[str, Tensor]],
        train_x: Tensor,
        val_x: Tensor | None = None,
        lr: float = 0.05,
        batch_size: int = 4,
    ) -> None:
        super().__init__()
        self.net = net
        self.replay_fn = replay
        self.train_x = train_x
        self.val_x = val_x
        self.lr = lr
        self.batch_size = batch_size
        self.recorded: dict[int, dict[str, list[Tensor]]] = {}

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def record(self, x: Tensor) -> None:
        with torch.no_grad():
            outs = self.replay_fn(self.net, x)
        epoch = self.recorded.setdefault(self.current_epoch, {})
        for name, out in outs.items():
            epoch.setdefault(f"net.{name}", []).append(out.detach().clone())

    def inputs(self, batch) -> Tensor:
        return batch[0].to(next(self.parameters()).dtype)

    def training_step(self, batch, batch_idx):
        x = self.inputs(batch)
        self.record(x)
        return self(x).float().pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self(self.inputs(batch)).float().pow(2).mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.train_x), batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self):
        x = self.val_x if self.val_x is not None else self.train_x
        return DataLoader(TensorDataset(x), batch_size=self.batch_size)

    def expected(self, epoch: int, unit_axis: int = -1) -> dict[str, dict]:
        return {name: expected_counts(outs, unit_axis) for name, outs in self.recorded[epoch].items()}


class MLP(nn.Sequential):
    """4 -> 8 -> 8 -> 1 with an in-place ReLU; unit 0 reads -sum(x) (dead on positive data), units 1-6 of the
    second layer are dead (so some samples are killed there)."""

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        super().__init__(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(inplace=True), nn.Linear(8, 1))
        with torch.no_grad():
            self[0].weight[0] = -1.0
            self[0].bias[0] = 0.0
            self[2].bias[1:7] = -1e4

    @staticmethod
    def replay(m: MLP, x: Tensor) -> dict[str, Tensor]:
        a = clamp(lin(x, m[0]))
        return {"1": a, "3": clamp(lin(a, m[2]))}


def positive_data(n: int, features: int = 4, seed: int = 0) -> Tensor:
    return torch.rand(n, features, generator=torch.Generator().manual_seed(seed)) + 0.01


def make_trainer(tmp_path: Path, callbacks: list[Callback], **kwargs) -> L.Trainer:
    return helpers.make_trainer(tmp_path, callbacks, **{"enable_checkpointing": False, "logger": False, **kwargs})


def assert_monitor_matches(monitor: DeadUnitMonitor, module: Replayed, unit_axis: int = -1) -> None:
    assert [h.epoch for h in monitor.history] == sorted(module.recorded)
    for epoch_report in monitor.history:
        assert_report(epoch_report.layers, module.expected(epoch_report.epoch, unit_axis))


# ================================================================================================ sites


def test_functional_forms_are_found_with_producers_and_consumers():
    model = AllFunctional()
    sites = find_relu_sites(model, example_input=torch.randn(3, 4))
    assert [s.name for s in sites] == list(FUNCTIONAL_SITES)
    for site in sites:
        producer, consumer, width = FUNCTIONAL_SITES[site.name]
        assert site.kind == "function" and site.module is None
        assert site.parent is model and site.parent_name == ""
        assert site.producer is getattr(model, producer) and site.producer_name == producer
        assert [c.module for c in site.consumers] == [getattr(model, consumer)]
        assert site.num_units == width and site.unit_dim == -1


def test_functional_forms_in_a_submodule_are_named_after_it():
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = AllFunctional()

        def forward(self, x: Tensor) -> Tensor:
            return self.enc(x)

    names = [s.name for s in find_relu_sites(Holder(), example_input=torch.randn(3, 4))]
    assert names == [f"enc.{n}" for n in FUNCTIONAL_SITES]


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


@pytest.mark.filterwarnings("ignore::lightning_relu.CollapseWarning")
def test_monitor_counts_every_functional_form_exactly(tmp_path):
    torch.manual_seed(0)
    net = AllFunctional()
    net.kill()
    module = Replayed(net, AllFunctional.replay, torch.randn(16, 4, generator=torch.Generator().manual_seed(1)))
    monitor = DeadUnitMonitor()
    make_trainer(tmp_path, [monitor], limit_train_batches=3).fit(module)
    assert len(monitor.history) == 2
    assert set(monitor.last_report) == {f"net.{n}" for n in FUNCTIONAL_SITES}
    assert_monitor_matches(monitor, module)


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


def test_monitor_sites_restricts_and_unknown_names_list_the_available_ones(tmp_path):
    module = Replayed(MLP(), MLP.replay, positive_data(12))
    monitor = DeadUnitMonitor(sites=["net.3"])
    make_trainer(tmp_path, [monitor], max_epochs=1, limit_train_batches=3).fit(module)
    assert set(monitor.last_report) == {"net.3"}
    assert_report(monitor.last_report, {"net.3": module.expected(0)["net.3"]})

    bad = DeadUnitMonitor(sites=["net.3", "net.7"])
    with pytest.raises(ValueError, match=r"unknown site names \['net\.7'\].*\['net\.1', 'net\.3'\]"):
        make_trainer(tmp_path, [bad], max_epochs=1).fit(Replayed(MLP(), MLP.replay, positive_data(8)))


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


class _RootFunctional(Replayed):
    """The LightningModule's own forward makes the functional calls: sites named at the root."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(
            nn.ModuleList([nn.Linear(4, 6), nn.Linear(6, 3), nn.Linear(3, 1)]), self._replay, positive_data(8)
        )
        with torch.no_grad():
            self.net[0].bias[2] = -1e4

    @staticmethod
    def _replay(net: nn.ModuleList, x: Tensor) -> dict[str, Tensor]:
        a = clamp(lin(x, net[0]))
        return {"relu": a, "relu_1": clamp(lin(a, net[1]))}

    def forward(self, x):
        return self.net[2](torch.relu(self.net[1](F.relu(self.net[0](x)))))

    def record(self, x: Tensor) -> None:
        with torch.no_grad():
            outs = self._replay(self.net, x)
        epoch = self.recorded.setdefault(self.current_epoch, {})
        for name, out in outs.items():
            epoch.setdefault(name, []).append(out.clone())


def test_functional_calls_in_the_lightning_modules_own_forward(tmp_path):
    module = _RootFunctional()
    monitor = DeadUnitMonitor()
    make_trainer(tmp_path, [monitor], limit_train_batches=2).fit(module)
    assert set(monitor.last_report) == {"relu", "relu_1"}
    assert_monitor_matches(monitor, module)


# ================================================================================================ training set-ups


def test_gradient_accumulation_counts_every_micro_batch_once_and_never_validation(tmp_path):
    module = Replayed(MLP(), MLP.replay, positive_data(24), val_x=-positive_data(8, seed=5), lr=0.1)
    monitor = DeadUnitMonitor()
    trainer = make_trainer(tmp_path, [monitor], accumulate_grad_batches=2, limit_train_batches=6, max_epochs=2)
    trainer.fit(module)
    assert trainer.global_step == 6  # 3 optimizer steps per epoch: the weights did change between micro-batches
    for epoch in (0, 1):
        assert len(module.recorded[epoch]["net.1"]) == 6
    assert_monitor_matches(monitor, module)
    assert monitor.last_report["net.1"].samples == 24
    assert monitor.last_report["net.1"].dead[0]  # dead on training data, alive on the (never counted) validation data


def test_limit_train_batches_counts_only_the_batches_run(tmp_path):
    module = Replayed(MLP(), MLP.replay, positive_data(40), batch_size=4)
    monitor = DeadUnitMonitor()
    make_trainer(tmp_path, [monitor], limit_train_batches=3, limit_val_batches=0).fit(module)
    assert_monitor_matches(monitor, module)
    assert [h.layers["net.3"].samples for h in monitor.history] == [12, 12]


def _logged_keys(tmp_path: Path) -> set[str]:
    keys: set[str] = set()
    for path in tmp_path.rglob("metrics.csv"):
        with open(path) as handle:
            for row in csv.DictReader(handle):
                keys |= {k for k, v in row.items() if v not in ("", None)}
    return keys


def test_limit_train_batches_zero_does_not_crash_or_log(tmp_path):
    module = Replayed(MLP(), MLP.replay, positive_data(8))
    monitor = DeadUnitMonitor(revive=True)
    logger = CSVLogger(tmp_path)
    make_trainer(tmp_path, [monitor], limit_train_batches=0, logger=logger).fit(module)
    assert all(not layer.seen for report in monitor.history for layer in report.layers.values())
    assert not any(k.startswith(("dead_units", "living_data", "dying_units")) for k in module.trainer.callback_metrics)
    assert not any("dead_units" in k or "living_data" in k for k in _logged_keys(tmp_path))


class _EpochLengths(IterableDataset):
    """Yields ``lengths[epoch]`` batches of 4 positive samples in each epoch (an epoch may have none)."""

    def __init__(self, lengths: list[int]) -> None:
        self.lengths = lengths
        self.epoch = 0

    def __iter__(self):
        n = self.lengths[min(self.epoch, len(self.lengths) - 1)]
        self.epoch += 1
        for i in range(n):
            yield (positive_data(4, seed=100 + i),)


class _IterableReplayed(Replayed):
    def __init__(self, dataset: IterableDataset) -> None:
        super().__init__(MLP(), MLP.replay, positive_data(4))
        self.dataset = dataset

    def train_dataloader(self):
        return DataLoader(self.dataset, batch_size=None)


def test_epoch_with_zero_training_batches_logs_nothing_bogus(tmp_path):
    module = _IterableReplayed(_EpochLengths([3, 0, 2]))
    monitor = DeadUnitMonitor(revive=True)
    logger = CSVLogger(tmp_path)
    make_trainer(tmp_path, [monitor], max_epochs=3, limit_val_batches=0, logger=logger).fit(module)
    counted = {h.epoch: h for h in monitor.history if any(layer.seen for layer in h.layers.values())}
    assert sorted(counted) == sorted(module.recorded) == [0, 2]
    for epoch, report in counted.items():
        assert_report(report.layers, module.expected(epoch))
    for report in monitor.history:
        if report.epoch not in counted:
            assert all(not layer.seen and layer.num_dead == 0 for layer in report.layers.values())
            assert report.dead_fraction == 0.0
    # every logged dead-unit value is a finite fraction
    for path in tmp_path.rglob("metrics.csv"):
        with open(path) as handle:
            for row in csv.DictReader(handle):
                for key, value in row.items():
                    if key.startswith(("dead_units", "living_data")) and value:
                        assert 0.0 <= float(value) <= 1.0 and math.isfinite(float(value))


def test_empty_dataloader_does_not_crash(tmp_path):
    module = Replayed(MLP(), MLP.replay, torch.empty(0, 4))
    monitor = DeadUnitMonitor()
    make_trainer(tmp_path, [monitor], limit_val_batches=0).fit(module)
    assert all(not layer.seen for report in monitor.history for layer in report.layers.values())
    assert "dead_units/total" not in module.trainer.callback_metrics


class _TwoOptimizers(Replayed):
    """Manual optimization, two optimizers, two forwards per training step."""

    def __init__(self) -> None:
        super().__init__(MLP(), MLP.replay, positive_data(16), lr=0.2)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt_a, opt_b = self.optimizers()
        x = batch[0]
        for opt, target in ((opt_a, 0.0), (opt_b, 1.0)):
            self.record(x)
            loss = (self(x) - target).pow(2).mean()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    def configure_optimizers(self):
        return (
            torch.optim.SGD(self.net[0].parameters(), lr=self.lr),
            torch.optim.Adam([*self.net[2].parameters(), *self.net[4].parameters()], lr=self.lr),
        )


def test_manual_optimization_with_two_optimizers_counts_every_forward(tmp_path):
    module = _TwoOptimizers()
    before = params_of(module)
    monitor = DeadUnitMonitor()
    make_trainer(tmp_path, [monitor], limit_train_batches=4, limit_val_batches=0).fit(module)
    assert not torch.equal(before["net.0.weight"], module.net[0].weight)
    assert_monitor_matches(monitor, module)
    assert monitor.last_report["net.1"].samples == 2 * 16


@pytest.mark.filterwarnings("ignore::lightning_relu.CollapseWarning")
def test_bf16_mixed_precision_counts_exactly_under_the_same_autocast(tmp_path):
    torch.manual_seed(0)
    net = AllFunctional()
    net.kill()
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(2))
    module = Replayed(net, AllFunctional.replay, x)
    monitor = DeadUnitMonitor()
    make_trainer(tmp_path, [monitor], precision="bf16-mixed", limit_train_batches=3, limit_val_batches=1).fit(module)
    assert module.recorded[0]["net.relu"][0].dtype == torch.bfloat16  # the replay ran under the fit's autocast
    assert_monitor_matches(monitor, module)


def test_bf16_mixed_precision_resnet_counts_exactly(tmp_path):
    torch.manual_seed(0)
    net = TinyResNet()
    with torch.no_grad():
        net.layer1.bn1.bias[1] = -1e4
    module = Replayed(net, TinyResNet.replay, torch.randn(6, 3, 8, 8), batch_size=3)
    monitor = DeadUnitMonitor()
    make_trainer(tmp_path, [monitor], precision="bf16-mixed", max_epochs=1, limit_val_batches=0).fit(module)
    assert_monitor_matches(monitor, module, unit_axis=1)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(6, 5)
        self.fc3 = nn.Linear(5, 1)

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(self.act(self.fc1(x)))))

    @staticmethod
    def replay(m: _Net, x: Tensor) -> dict[str, Tensor]:
        a = clamp(lin(x, m.fc1))
        return {"act": a, "relu": clamp(lin(a, m.fc2))}


def test_torch_compile_with_tracker_counts_exactly_or_warns():
    torch.manual_seed(0)
    model = _Net()
    with torch.no_grad():
        model.fc1.bias[:2] = -1e4
        model.fc2.bias[0] = -1e4
    compiled = torch.compile(model)
    batches = [torch.randn(8, 4), torch.randn(8, 4), torch.randn(8, 4)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with DeadUnitTracker(compiled) as tracker:
            for x in batches:
                compiled(x)
            tracker.pause()
            compiled(torch.randn(8, 4))  # paused: not counted, even from the compiled graph
            tracker.resume()
            compiled(batches[0])
    with torch.no_grad():
        replays = [_Net.replay(model, x) for x in [*batches, batches[0]]]
    prefix = "_orig_mod."  # the compiled wrapper holds the model as `_orig_mod`
    expected = {prefix + name: expected_counts([r[name] for r in replays], -1) for name in ("act", "relu")}
    _assert_exact_or_warned_once(lambda: assert_report(tracker.report(), expected), caught)


def _assert_exact_or_warned_once(check: Callable[[], None], caught: list[warnings.WarningMessage]) -> None:
    """Counts under ``torch.compile`` are exact, or the library said once that they may not be."""
    said = [w for w in caught if "compile" in str(w.message) and "count" in str(w.message)]
    try:
        check()
    except AssertionError:
        if len(said) != 1:
            raise
    else:
        assert len(said) <= 1


def test_compiled_lightning_module_counts_exactly_or_warns(tmp_path):
    torch.manual_seed(0)
    net = _Net()
    with torch.no_grad():
        net.fc1.bias[3] = -1e4
    module = Replayed(net, _Net.replay, positive_data(12), val_x=-positive_data(4))
    monitor = DeadUnitMonitor()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [monitor], limit_train_batches=3, limit_val_batches=1).fit(torch.compile(module))
    assert module.recorded and sorted(module.recorded) == [0, 1]
    _assert_exact_or_warned_once(lambda: assert_monitor_matches(monitor, module), caught)


class _ChangeDeviceAndDtype(Callback):
    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            pl_module.to("cpu")
            pl_module.double()


def test_model_moved_and_cast_to_float64_between_epochs_keeps_counting(tmp_path):
    module = Replayed(MLP(), MLP.replay, positive_data(16), lr=0.1)
    monitor = DeadUnitMonitor()
    make_trainer(tmp_path, [monitor, _ChangeDeviceAndDtype()], limit_train_batches=4, limit_val_batches=0).fit(module)
    assert module.recorded[0]["net.1"][0].dtype == torch.float32
    assert module.recorded[1]["net.1"][0].dtype == torch.float64
    assert_monitor_matches(monitor, module)


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


# ================================================================================================ bad input


class _NoRelu(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))

    def training_step(self, batch, batch_idx):
        return self.net(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(32, 4)), batch_size=4, shuffle=True)


def test_model_without_relu_warns_once_and_trains_untouched(tmp_path):
    def fit(callbacks):
        L.seed_everything(7, verbose=False)
        module = _NoRelu()
        make_trainer(tmp_path, callbacks, max_epochs=2).fit(module)
        return module

    reference = fit([])
    monitor = DeadUnitMonitor(revive=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watched = fit([monitor])
    relevant = [w for w in caught if "ReLU" in str(w.message) or "relu" in str(w.message)]
    assert len(relevant) == 1, [str(w.message) for w in relevant]
    assert "DeadUnitMonitor" in str(relevant[0].message)
    assert_same_params(params_of(reference), watched)
    assert monitor.history == [] or all(not h.layers for h in monitor.history)


class _NonFinite(Replayed):
    """Sample 0 of every batch gets a NaN input (both epochs), or with ``inf=True`` sample 1 gets +Inf (epoch 0)."""

    def __init__(self, inf: bool) -> None:
        super().__init__(MLP(), MLP.replay, positive_data(12))
        self.inf = inf

    def training_step(self, batch, batch_idx):
        x = batch[0].clone()
        if self.inf:
            if self.current_epoch == 0:
                x[1, 0] = float("inf")  # fc1's unit 0 reads -sum(x): -inf; the other units +inf or -inf
        else:
            x[0, 0] = float("nan")
        self.record(x)
        self(x)
        # no loss, no optimizer step: the weights stay finite (even lr=0 turns NaN gradients into NaN weights)


def _fit_non_finite(tmp_path: Path, inf: bool) -> tuple[_NonFinite, DeadUnitMonitor, list[str]]:
    module = _NonFinite(inf)
    monitor = DeadUnitMonitor()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [monitor], limit_train_batches=3, limit_val_batches=0).fit(module)
    assert len(monitor.history) == 2
    return module, monitor, [str(w.message) for w in caught if "NaN or Inf" in str(w.message)]


def _not_active_if_non_finite(module: _NonFinite) -> None:
    for epoch in module.recorded.values():
        for outs in epoch.values():
            for out in outs:
                out[~torch.isfinite(out)] = 0.0


def test_nan_activations_are_not_active_and_warn_once_per_site(tmp_path):
    module, monitor, messages = _fit_non_finite(tmp_path, inf=False)
    # NaN at both sites in both epochs: one warning, naming the first site and step (issue 20)
    assert len(messages) == 1, messages
    assert "'net.1'" in messages[0] and "epoch 0" in messages[0] and "3 training batches" in messages[0]
    assert "first at global step 0" in messages[0]
    assert any(bool(torch.isnan(o).any()) for o in module.recorded[0]["net.3"])
    assert_monitor_matches(monitor, module)  # NaN is not `> 0`; a sample holding NaN is not all 0


def test_inf_activations_warn_once_per_site_and_do_not_crash(tmp_path):
    module, monitor, messages = _fit_non_finite(tmp_path, inf=True)
    assert any(bool(torch.isposinf(o).any()) for o in module.recorded[0]["net.1"])
    assert len(messages) == 1 and "'net.1'" in messages[0] and "epoch 0" in messages[0], messages
    assert [h.layers["net.1"].nonfinite_batches for h in monitor.history] == [3, 0]  # every batch of epoch 0
    # epoch 1 has no non-finite value: counted exactly
    assert_report(monitor.history[1].layers, module.expected(1))


def test_positive_inf_activations_count_as_active(tmp_path):
    """+Inf is > 0: a unit that outputs it is broken (and warned about), not dead. NaN is not > 0."""
    module, monitor, _ = _fit_non_finite(tmp_path, inf=True)
    assert_monitor_matches(monitor, module)  # the brute force's `> 0` is True for +Inf


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 1))


def _monitor() -> DeadUnitMonitor:
    return DeadUnitMonitor()


def _report(n: int = 5) -> dict[str, LayerReport]:
    return {"1": LayerReport.from_counts("1", torch.zeros(n, dtype=torch.int64), 10, 10, 10)}


# (callable, kwargs, exception, argument name, echoed value or None when the value is a type name)
INVALID = [
    (DeadUnitMonitor, {"sites": "net.1"}, ValueError, "sites", "'net.1'"),
    (DeadUnitMonitor, {"sites": [1, 2]}, ValueError, "sites", "[1, 2]"),
    (DeadUnitMonitor, {"on_collapse": "explode"}, ValueError, "on_collapse", "'explode'"),
    (DeadUnitMonitor, {"log_histograms": "yes"}, ValueError, "log_histograms", "'yes'"),
    (DeadUnitMonitor, {"revive": "always"}, ValueError, "revive", "'always'"),
    (DeadUnitMonitor, {"trace": 1}, ValueError, "trace", "1"),
    (DeadUnitMonitor, {"eps": 1.5}, ValueError, "eps", "1.5"),
    (DeadUnitMonitor, {"eps": float("nan")}, ValueError, "eps", "nan"),
    (lambda **kw: DeadUnitTracker(_mlp(), **kw), {"sites": "1"}, ValueError, "sites", "'1'"),
    (lambda **kw: DeadUnitTracker(_mlp(), **kw), {"sites": ["9"]}, ValueError, "sites", "['9']"),
    (lambda **kw: DeadUnitTracker(_mlp(), **kw), {"eps": -0.1}, ValueError, "eps", "-0.1"),
    (lambda **kw: DeadUnitTracker(_mlp(), **kw), {"trace": "no"}, ValueError, "trace", "'no'"),
    (DeadUnitTracker, {"model": "net"}, TypeError, "model", None),
    (DeadUnitReviver, {"every_n_epochs": 0}, ValueError, "every_n_epochs", "0"),
    (DeadUnitReviver, {"every_n_epochs": True}, ValueError, "every_n_epochs", "True"),
    (DeadUnitReviver, {"max_fraction": 0.0}, ValueError, "max_fraction", "0.0"),
    (DeadUnitReviver, {"max_fraction": 1.5}, ValueError, "max_fraction", "1.5"),
    (DeadUnitReviver, {"exclude": "1"}, ValueError, "exclude", "'1'"),
    (DeadUnitReviver, {"init": "xavier"}, ValueError, "init", "'xavier'"),
    (DeadUnitReviver, {"seed": -3}, ValueError, "seed", "-3"),
    (DeadUnitReviver, {"seed": 1.0}, ValueError, "seed", "1.0"),
    (lambda **kw: _monitor().add_report_listener(**kw), {"listener": 3}, ValueError, "listener", "3"),
    (lambda **kw: DeadUnitReviver().attach(**kw), {"monitor": object()}, ValueError, "monitor", None),
    (lambda **kw: revive_dead_units_(_mlp(), **kw), {"report": [1, 2]}, ValueError, "report", None),
    (lambda **kw: revive_dead_units_(_mlp(), _report(), **kw), {"init": "zeros"}, ValueError, "init", "'zeros'"),
    (lambda **kw: revive_dead_units_(_mlp(), _report(), **kw), {"max_fraction": 2}, ValueError, "max_fraction", "2"),
    (lambda **kw: revive_dead_units_(_mlp(), _report(), **kw), {"exclude": "1"}, ValueError, "exclude", "'1'"),
    (lambda **kw: revive_dead_units_(_mlp(), _report(), **kw), {"exclude": ["x"]}, ValueError, "exclude", "['x']"),
    (lambda **kw: revive_dead_units_(_mlp(), _report(), **kw), {"generator": 0}, ValueError, "generator", "0"),
    (lambda **kw: revive_dead_units_(_mlp(), _report(), **kw), {"optimizer": "sgd"}, ValueError, "optimizer", None),
    (lambda **kw: revive_dead_units_(report=_report(), **kw), {"model": "net"}, TypeError, "model", None),
    (ReluInitializer, {"method": "xavier"}, ValueError, "method", "'xavier'"),
    (ReluInitializer, {"seed": "0"}, ValueError, "seed", "'0'"),
    (ReluInitializer, {"max_samples": 0}, ValueError, "max_samples", "0"),
    (ReluInitializer, {"max_samples": True}, ValueError, "max_samples", "True"),
    (ReluInitializer, {"input_fn": 5}, ValueError, "input_fn", "5"),
    (ReluInitializer, {"log_prefix": 3}, ValueError, "log_prefix", "3"),
    (rai_, {"module": nn.Linear(2, 2), "generator": 1}, ValueError, "generator", "1"),
    (rai_, {"module": nn.ConvTranspose2d(2, 2, 3)}, ValueError, "module", None),
    (lambda **kw: sign_flip_(_mlp(), torch.randn(4, 4), **kw), {"max_samples": 0}, ValueError, "max_samples", "0"),
    (lambda **kw: sign_flip_(_mlp(), torch.randn(4, 4), **kw), {"input_fn": 1}, ValueError, "input_fn", "1"),
    (lambda **kw: sign_flip_(_mlp(), **kw), {"data": None}, ValueError, "data", "None"),
    (lambda **kw: sign_flip_(_mlp(), **kw), {"data": "abc"}, ValueError, "data", None),
    (ActivationStats, {"num_units": 0}, ValueError, "num_units", "0"),
    (ActivationStats, {"num_units": 2.5}, ValueError, "num_units", "2.5"),
    (ActivationStats, {"unit_dim": 2}, ValueError, "unit_dim", "2"),
    (ActivationStats, {"eps": "0.1"}, ValueError, "eps", "'0.1'"),
    (find_relu_sites, {"model": nn.ReLU(), "trace": None}, ValueError, "trace", "None"),
    (find_relu_sites, {"model": [nn.ReLU()]}, TypeError, "model", None),
    (theory.alive_probability_bounds, {"width": 0, "depth": 2}, ValueError, "width", "0"),
    (theory.alive_probability_bounds, {"width": 2, "depth": 1.5}, ValueError, "depth", "1.5"),
    (theory.alive_probability_bounds, {"width": True, "depth": 2}, ValueError, "width", "True"),
    (theory.alive_probability_lower_bound, {"widths": []}, ValueError, "widths", "[]"),
    (theory.alive_probability_lower_bound, {"widths": [3, 0]}, ValueError, "widths", "[3, 0]"),
    (theory.min_width_real, {"depth": 0, "p": 0.5}, ValueError, "depth", "0"),
    (theory.min_width_real, {"depth": 3, "p": 1.0}, ValueError, "p", "1.0"),
    (theory.min_width, {"depth": 3, "p": 0}, ValueError, "p", "0"),
    (theory.min_width, {"depth": -1, "p": 0.5}, ValueError, "depth", "-1"),
    (theory.model_alive_lower_bound, {"model": "net"}, TypeError, "model", None),
]

# invalid arguments that once slipped through validation
INVALID_XFAIL = [
    pytest.param(
        lambda **kw: DeadUnitTracker(_mlp(), **kw),
        {"sites": [1]},
        ValueError,
        "sites",
        "1",
        id="DeadUnitTracker-sites-non-string",
    ),
    pytest.param(
        lambda **kw: DeadUnitTracker(_mlp(), **kw),
        {"sites": 5},
        ValueError,
        "sites",
        "5",
        id="DeadUnitTracker-sites-not-a-sequence",
    ),
    pytest.param(
        ActivationStats,
        {"num_units": True},
        ValueError,
        "num_units",
        "True",
        id="ActivationStats-num_units-bool",
    ),
]


def _invalid_id(case) -> str:
    func, kwargs = case[0], case[1]
    name = getattr(func, "__name__", "call")
    return f"{name}-{'-'.join(kwargs)}"


@pytest.mark.parametrize(
    ("func", "kwargs", "error", "argument", "value"),
    [pytest.param(*case, id=f"{i}-{_invalid_id(case)}") for i, case in enumerate(INVALID)] + INVALID_XFAIL,
)
def test_invalid_arguments_name_the_argument_and_echo_the_value(func, kwargs, error, argument, value):
    pattern = rf"`{re.escape(argument)}`"
    if value is not None:
        pattern += rf".*{re.escape(value)}"
    with pytest.raises(error, match=pattern):
        func(**kwargs)


@pytest.mark.parametrize("func", [rai_, sign_flip_, find_relu_sites, DeadUnitTracker], ids=lambda f: f.__name__)
def test_non_module_model_is_rejected_naming_the_type(func):
    args = ("not a model",) if func is not sign_flip_ else ("not a model", torch.randn(2, 2))
    with pytest.raises((TypeError, ValueError), match=r"`(model|module)` must be a `torch\.nn\.Module`, got str"):
        func(*args)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (torch.empty(0, 4), r"`data` holds no samples: expected a tensor of shape \(num_samples, \.\.\.\)"),
        ([], r"`data` holds no samples"),
        (DataLoader(TensorDataset(torch.empty(0, 4)), batch_size=2), r"`data` holds no samples"),
        (torch.tensor(1.0), r"`data` must hold samples along a first dimension"),
        (torch.randn(6, 5), r"`data` of shape \(6, 5\) \(expected samples of shape \(\.\.\., 4\)\)"),
        ([torch.randn(3, 4), torch.randn(3, 5)], r"expected \(\*, 4\), got \(3, 5\)"),
        ([("x",)], r"`data` batches must be tensors"),
        ([()], r"`data` holds an empty batch"),
    ],
    ids=[
        "empty-tensor",
        "empty-list",
        "empty-loader",
        "scalar",
        "wrong-width",
        "mixed-shapes",
        "non-tensor",
        "empty-batch",
    ],
)
def test_sign_flip_with_empty_or_misshapen_data_names_what_was_expected(data, match):
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3), nn.ReLU(), nn.Linear(3, 1))
    before = params_of(model)
    with pytest.raises(ValueError, match=match):
        sign_flip_(model, data)
    assert_same_params(before, model)
    assert model.training  # mode restored


def test_sign_flip_failing_after_a_flip_leaves_the_model_unchanged():
    """The first site is flipped, then the forward fails: the flip is undone."""

    class FailsLate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 2), nn.ReLU())
            with torch.no_grad():
                self.body[0].weight.fill_(-1.0)
                self.body[0].bias.fill_(-1.0)  # kills every positive sample: the site must flip

        def forward(self, x):
            return self.body(x).view(7, -1)  # fails after the sites ran

    model = FailsLate()
    before = params_of(model)
    with pytest.raises(ValueError, match="could not run the model"):
        sign_flip_(model, torch.rand(4, 3) + 0.1)
    assert_same_params(before, model)


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
