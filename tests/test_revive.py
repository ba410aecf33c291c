"""Tests of revival: the surgery (`revive_dead_units_`) and the `DeadUnitReviver` callback.

Expectations are computed directly (hand-built masks of the entries that must change, outputs before and
after), never read from what the code under test reports.
"""

from __future__ import annotations

import csv
import importlib.util
import math
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, LearningRateFinder
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_relu.monitor import DeadUnitMonitor
from lightning_relu.revive import DeadUnitReviver, RevivalWarning, revive_dead_units_
from lightning_relu.sites import find_relu_sites
from lightning_relu.stats import LayerReport
from lightning_relu.tracker import DeadUnitTracker
from tests.helpers import (
    MLP,
    AutoEncoder,
    Replayed,
    SpawnDDP,
    assert_monitor_matches,
    positive_data,
    quiet_trainer,
    retry_spawn_abort,
)

# ------------------------------------------------------------------------------------------------ helpers


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 3))


def _convnet(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 6, 3, padding=1, groups=2),  # consumer of site "2": 4 input channels per group
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 10),  # consumer of site "6" through Flatten: 16 columns per channel
        nn.ReLU(),
        nn.Linear(10, 2),
    )


def _kill(layer: nn.Module, units: list[int]) -> None:
    with torch.no_grad():
        layer.bias[units] = -100.0  # type: ignore[index]


def _report(model: nn.Module, x: Tensor) -> dict[str, LayerReport]:
    with DeadUnitTracker(model) as tracker, torch.no_grad():
        model(x)
    return tracker.report()


def _site_outputs(model: nn.Sequential, x: Tensor) -> dict[str, Tensor]:
    """Every ReLU's output, computed layer by layer."""
    outs = {}
    with torch.no_grad():
        for i, layer in enumerate(model):
            x = layer(x)
            if isinstance(layer, nn.ReLU):
                outs[str(i)] = x.clone()
    return outs


def _dead_units(output: Tensor) -> list[int]:
    per_unit = output.transpose(0, 1).reshape(output.shape[1], -1)
    return [u for u in range(per_unit.shape[0]) if not bool((per_unit[u] > 0).any())]


def _masks(model: nn.Module) -> dict[str, Tensor]:
    return {name: torch.zeros_like(p, dtype=torch.bool) for name, p in model.named_parameters()}


def _mlp_touched(model: nn.Sequential, dead1: list[int], dead3: list[int]) -> dict[str, Tensor]:
    """Entries that revival of `dead1` at site "1" and `dead3` at site "3" may change, written out by hand."""
    masks = _masks(model)
    for u in dead1:
        masks["0.weight"][u, :] = True
        masks["0.bias"][u] = True
        masks["2.weight"][:, u] = True
    for u in dead3:
        masks["2.weight"][u, :] = True
        masks["2.bias"][u] = True
        masks["4.weight"][:, u] = True
    return masks


def _steps(model: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor, n: int) -> None:
    for _ in range(n):
        optimizer.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def _clone_state(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
    return {
        id(p): {k: v.clone() if isinstance(v, Tensor) else v for k, v in s.items()} for p, s in optimizer.state.items()
    }


# ---------------------------------------------------------------------------------------- same function


def test_mlp_computes_the_same_function_and_revived_units_fire() -> None:
    model = _mlp()
    x = torch.randn(128, 6)
    _kill(model[0], [1, 5, 9])
    _kill(model[2], [0, 7])
    outs = _site_outputs(model, x)
    assert _dead_units(outs["1"]) == [1, 5, 9] and _dead_units(outs["3"]) == [0, 7]
    before = model(x).detach()

    counts = revive_dead_units_(model, _report(model, x), generator=torch.Generator().manual_seed(0))

    assert counts == {"1": 3, "3": 2}
    assert torch.equal(model(x).detach(), before)
    outs = _site_outputs(model, x)
    assert _dead_units(outs["1"]) == [] and _dead_units(outs["3"]) == []


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_conv_bn_flatten_net_computes_the_same_function(train: bool) -> None:
    model = _convnet()
    x = torch.randn(32, 3, 8, 8)
    model.train()
    model(x)  # some running statistics
    model.train(train)
    _kill(model[1], [2, 3, 6])  # BatchNorm bias: channels 2, 3 (group 0 of the next conv) and 6 (group 1)
    _kill(model[5], [1, 4])
    _kill(model[8], [3])
    dead = {name: _dead_units(out) for name, out in _site_outputs(model, x).items()}
    assert {2, 3, 6} <= set(dead["2"]) and {1, 4} <= set(dead["6"]) and {3} <= set(dead["9"])
    before = model(x).detach()

    counts = revive_dead_units_(model, _report(model, x), generator=torch.Generator().manual_seed(1))

    assert counts == {name: len(units) for name, units in dead.items()}
    bn = model[1]
    assert bn.weight[[2, 3, 6]].tolist() == [1.0] * 3 and bn.bias[[2, 3, 6]].tolist() == [0.0] * 3
    assert bn.running_mean[[2, 3, 6]].tolist() == [0.0] * 3 and bn.running_var[[2, 3, 6]].tolist() == [1.0] * 3
    torch.testing.assert_close(model(x).detach(), before, rtol=0, atol=0)
    outs = _site_outputs(model, x)
    assert _dead_units(outs["2"]) == [] and _dead_units(outs["6"]) == [] and _dead_units(outs["9"]) == []


def test_dense_sequence_through_flatten_is_strided() -> None:
    # (N, 3, 5) -> Flatten -> 15 columns, feature c at columns c, c + 5, c + 10
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Flatten(), nn.Linear(15, 2))
    _kill(model[0], [2])
    x = torch.randn(16, 3, 4)
    before = model(x).detach()
    old = model[3].weight.detach().clone()
    assert revive_dead_units_(model, _report(model, x), generator=torch.Generator().manual_seed(0)) == {"1": 1}
    assert torch.equal(model(x).detach(), before)
    expected = old.clone()
    expected[:, [2, 7, 12]] = 0.0
    assert torch.equal(model[3].weight.detach(), expected)


# ----------------------------------------------------------------------------- weights and optimizer state


def _optimizer(kind: str, params: Any) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(params, lr=1e-2, amsgrad=True)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=1e-2)
    return torch.optim.RMSprop(params, lr=1e-3, momentum=0.5, centered=True)


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw", "rmsprop"])
def test_only_touched_entries_and_their_optimizer_state_change(kind: str) -> None:
    model = _mlp()
    x, y = torch.randn(64, 6), torch.randn(64, 3)
    optimizer = _optimizer(kind, model.parameters())
    _steps(model, optimizer, x, y, 3)  # every unit alive: every state entry non-zero
    _kill(model[0], [4, 11])
    _kill(model[2], [2])
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    state = _clone_state(optimizer)
    dead = {name: _dead_units(out) for name, out in _site_outputs(model, x).items()}
    assert {4, 11} <= set(dead["1"]) and {2} <= set(dead["3"])
    masks = _mlp_touched(model, dead["1"], dead["3"])

    revive_dead_units_(model, _report(model, x), optimizer, generator=torch.Generator().manual_seed(0))

    shaped_keys = 0
    for name, p in model.named_parameters():
        assert torch.equal(p.detach()[~masks[name]], params[name][~masks[name]]), name
        for key, value in optimizer.state[p].items():
            old = state[id(p)][key]
            if isinstance(value, Tensor) and value.shape == p.shape:
                shaped_keys += 1
                if masks[name].any():  # the reset is not vacuous
                    assert (old[masks[name]] != 0).float().mean() > 0.5, (name, key)
                assert bool((value[masks[name]] == 0).all()), (name, key)
                assert torch.equal(value[~masks[name]], old[~masks[name]]), (name, key)
            else:
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(old)), (name, key)  # `step` untouched
    assert shaped_keys >= len(params)
    # revived rows are new, the outgoing columns are zero
    assert not torch.equal(model[0].weight.detach()[[4, 11]], params["0.weight"][[4, 11]])
    assert model[0].bias.detach()[[4, 11]].abs().max() <= 1 / math.sqrt(6)
    assert bool((model[2].weight.detach()[:, [4, 11]] == 0).all())
    assert bool((model[4].weight.detach()[:, 2] == 0).all())


def test_conv_optimizer_state_groups_and_flatten_columns() -> None:
    model = _convnet()
    x, y = torch.randn(16, 3, 8, 8), torch.randn(16, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    _steps(model, optimizer, x, y, 2)
    _kill(model[1], [1, 5])
    _kill(model[5], [4])
    state = _clone_state(optimizer)
    params = {name: p.detach().clone() for name, p in model.named_parameters()}
    masks = _masks(model)
    outgoing = torch.zeros_like(masks["4.weight"])
    for c in (1, 5):
        masks["0.weight"][c] = masks["0.bias"][c] = masks["1.weight"][c] = masks["1.bias"][c] = True
        group = c // 4  # 8 input channels in 2 groups; 3 output channels per group
        for row in range(3 * group, 3 * group + 3):
            outgoing[row, c % 4] = True
    masks["4.weight"][4] = masks["4.bias"][4] = masks["5.weight"][4] = masks["5.bias"][4] = True
    masks["4.weight"] |= outgoing
    masks["8.weight"][:, 4 * 16 : 5 * 16] = True

    counts = revive_dead_units_(model, _report(model, x), [optimizer], exclude=["9"], generator=torch.Generator())
    assert counts == {"2": 2, "6": 1}

    for name, p in model.named_parameters():
        assert torch.equal(p.detach()[~masks[name]], params[name][~masks[name]]), name
        for key in ("exp_avg", "exp_avg_sq"):
            value, old = optimizer.state[p][key], state[id(p)][key]
            assert bool((value[masks[name]] == 0).all()), (name, key)
            assert torch.equal(value[~masks[name]], old[~masks[name]]), (name, key)
    assert bool((model[4].weight.detach()[outgoing] == 0).all())
    assert bool((model[4].weight.detach()[4][~outgoing[4]] != 0).all())  # the rest of revived row 4 is new
    assert bool((model[8].weight.detach()[masks["8.weight"]] == 0).all())


def test_revived_units_learn_again() -> None:
    model = _mlp()
    x, y = torch.randn(64, 6), torch.randn(64, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _kill(model[0], [3, 8])
    nn.functional.mse_loss(model(x), y).backward()
    assert model[0].weight.grad[[3, 8]].abs().max() == 0  # dead: no gradient at all
    optimizer.zero_grad()

    revive_dead_units_(model, _report(model, x), optimizer, generator=torch.Generator().manual_seed(0))
    _steps(model, optimizer, x, y, 1)  # the outgoing weights learn first ...
    assert bool((model[2].weight.detach()[:, [3, 8]] != 0).any(dim=0).all())
    optimizer.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()  # ... then the incoming weights get gradient
    assert bool((model[0].weight.grad[[3, 8]].abs().sum(dim=1) > 0).all())


# ------------------------------------------------------------------------------------------------ options


@pytest.mark.parametrize("init", ["default", "kaiming", "rai"])
def test_init_distributions(init: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(400, 256), nn.ReLU(), nn.Linear(256, 2))
    _kill(model[0], list(range(256)))
    report = {"1": LayerReport.from_counts("1", torch.zeros(256, dtype=torch.int64), 1, 1, 1)}
    revive_dead_units_(model, report, init=init, generator=torch.Generator().manual_seed(0))
    w, b = model[0].weight.detach(), model[0].bias.detach()
    if init == "default":
        bound = 1 / math.sqrt(400)
        assert w.abs().max() <= bound and b.abs().max() <= bound
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.05 * bound
    elif init == "kaiming":
        assert abs(w.std().item() - math.sqrt(2 / 400)) < 0.03 * math.sqrt(2 / 400)
        assert bool((b == 0).all())
    else:
        rows = torch.cat([w, b[:, None]], dim=1)  # V_j = [w_j; b_j]
        sigma = 0.6007 / math.sqrt(400)
        large = rows.abs() > 0.2  # > 6.6 sigma: only the Beta(2, 1) entry (itself < 0.2 with probability 0.04)
        assert int(large.sum(dim=1).max()) == 1
        assert bool((rows[large] > 0).all())
        assert large.any(dim=1).float().mean() > 0.9
        assert abs(rows[~large].std().item() - sigma) < 0.03 * sigma


def test_max_fraction_caps_and_draws_among_dead_units() -> None:
    model = _mlp()
    x = torch.randn(64, 6)
    dead = [0, 2, 3, 5, 7, 8, 10, 12, 13, 15]
    _kill(model[0], dead)
    report = _report(model, x)
    first = _mlp()
    first.load_state_dict(model.state_dict())
    report = {"1": report["1"]}  # a partial report is fine
    counts = revive_dead_units_(model, report, max_fraction=0.25, generator=torch.Generator().manual_seed(3))
    assert counts == {"1": 4}
    revived = [u for u in range(16) if model[0].bias[u] != -100.0]
    assert len(revived) == 4 + 16 - len(dead)
    revived = [u for u in dead if model[0].bias[u] != -100.0]
    assert len(revived) == 4
    # the same generator seed picks the same units
    revive_dead_units_(first, report, max_fraction=0.25, generator=torch.Generator().manual_seed(3))
    assert [u for u in dead if first[0].bias[u] != -100.0] == revived


def test_exclude_and_warnings() -> None:
    model = _mlp()
    x = torch.randn(64, 6)
    _kill(model[0], [1])
    _kill(model[2], [1])
    old = model[0].bias.detach().clone()
    assert revive_dead_units_(model, _report(model, x), exclude=["1"]) == {"3": 1}
    assert torch.equal(model[0].bias.detach(), old)

    class Free(nn.Module):  # the pre-activation is not a layer output: no producer known
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.act = nn.Linear(3, 4), nn.ReLU()

        def forward(self, x: Tensor) -> Tensor:
            return self.act(self.fc(x) * 1.0)

    free = Free()
    _kill(free.fc, [0])
    with pytest.warns(RevivalWarning, match=r"\['act'\] have dead units but no known producer"):
        assert revive_dead_units_(free, _report(free, torch.randn(8, 3))) == {"act": 0}
    assert free.fc.bias[0] == -100.0

    # a LayerNorm after the site hides the consumer; the LayerNorm before it mixes units
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.ReLU(), nn.LayerNorm(4), nn.Linear(4, 1))
    with torch.no_grad():
        net[1].bias[2] = -100.0
    with pytest.warns(RevivalWarning) as record:
        assert revive_dead_units_(net, _report(net, torch.randn(8, 3))) == {"2": 1}
    messages = " ".join(str(w.message) for w in record)
    assert "no known consumer" in messages and "normalizes several units together" in messages
    assert net[1].weight[2] == 1.0 and net[1].bias[2] == 0.0


@pytest.mark.parametrize("kind", ["rprop", "adagrad"])
def test_optimizer_state_is_reset_to_what_a_fresh_optimizer_starts_with(kind: str) -> None:
    """Rprop starts its step sizes at the learning rate and Adagrad its sums at `initial_accumulator_value`: a
    zero there would freeze the revived entries (Rprop) or give them outsized first steps (Adagrad)."""

    def make(params: Any) -> torch.optim.Optimizer:
        if kind == "rprop":
            return torch.optim.Rprop(params, lr=0.02)
        return torch.optim.Adagrad(params, lr=0.1, initial_accumulator_value=0.3)

    model = _mlp()
    x, y = torch.randn(64, 6), torch.randn(64, 3)
    optimizer = make(model.parameters())
    _steps(model, optimizer, x, y, 3)
    _kill(model[0], [4, 11])
    dead = _dead_units(_site_outputs(model, x)["1"])
    masks = _mlp_touched(model, dead, [])
    state = _clone_state(optimizer)
    # the reference: a fresh optimizer's state after one step with a zero gradient (which moves nothing)
    fresh_params = [nn.Parameter(p.detach().clone()) for p in model.parameters()]
    fresh = make(fresh_params)
    for p in fresh_params:
        p.grad = torch.zeros_like(p)
    fresh.step()

    revive_dead_units_(model, _report(model, x), optimizer, generator=torch.Generator().manual_seed(0))

    checked = 0
    for (name, p), q in zip(model.named_parameters(), fresh_params, strict=True):
        for key, value in optimizer.state[p].items():
            if not (isinstance(value, Tensor) and value.shape == p.shape):
                continue
            start = fresh.state[q][key]
            assert torch.equal(value[masks[name]], start[masks[name]]), (name, key)
            assert torch.equal(value[~masks[name]], state[id(p)][key][~masks[name]]), (name, key)
            checked += int(masks[name].any())
    assert checked >= 3  # rows, bias and columns, each with state that was not at its start


def test_parametrized_layers_are_never_written_through_their_computed_weight() -> None:
    """`weight_norm`/`spectral_norm` recompute `weight` from other parameters: a producer behind one is skipped, a
    consumer behind one cannot be zeroed (so the revival warns that the output changes)."""
    from torch.nn.utils import parametrizations

    x = torch.randn(64, 6)
    for wrap in (parametrizations.weight_norm, parametrizations.spectral_norm, nn.utils.weight_norm):
        model = _mlp()
        _kill(model[0], [3])
        model[0] = wrap(model[0])
        model.eval()  # spectral_norm's power iteration would move its buffers at every training forward
        before = {k: v.clone() for k, v in model.state_dict().items()}
        y = model(x)
        with pytest.warns(RevivalWarning, match=r"\['1'\] have a producer or norm layer whose weights are computed"):
            assert revive_dead_units_(model, _report(model, x), generator=torch.Generator()) == {"1": 0, "3": 0}
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), (wrap.__name__, key)
        assert torch.equal(model(x), y)

    model = _mlp()
    _kill(model[0], [3])
    model[2] = parametrizations.weight_norm(model[2])
    original = [p.detach().clone() for p in model[2].parameters()]
    with pytest.warns(RevivalWarning, match=r"\['1'\] have no known consumer .* or one that cannot be zeroed"):
        assert revive_dead_units_(model, _report(model, x), generator=torch.Generator()) == {"1": 1, "3": 0}
    assert all(torch.equal(p, q) for p, q in zip(model[2].parameters(), original, strict=True))
    assert model[0].bias[3] != -100.0  # revived all the same


def test_layers_applied_at_several_places_are_not_touched() -> None:
    """A layer shared by two paths: re-drawing its rows for one path's ReLU would change the other path."""

    class TwoPaths(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            shared = nn.Linear(4, 8)
            self.a = nn.Sequential(shared, nn.ReLU(), nn.Linear(8, 1))
            self.b = nn.Sequential(shared, nn.Tanh(), nn.Linear(8, 1))

        def forward(self, x: Tensor) -> Tensor:
            return self.a(x) + self.b(x)

    for trace in (True, False):
        model = TwoPaths()
        _kill(model.a[0], [1, 5])
        x = torch.randn(64, 4)
        y = model(x)
        report = _report(model, x)
        assert report["a.1"].dead[[1, 5]].all()
        with pytest.warns(RevivalWarning, match=r"\['a.1'\] have dead units but no known producer"):
            counts = revive_dead_units_(model, report, sites=find_relu_sites(model, trace=trace))
        assert counts == {"a.1": 0}
        assert torch.equal(model(x), y)


def test_layers_with_tied_parameters_are_not_touched() -> None:
    """Two layers sharing one weight matrix: re-drawing a row of one, or zeroing a column of the other, would
    change both."""
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    model[2].weight = model[0].weight
    _kill(model[0], [1, 5])
    x = torch.randn(64, 8)
    y = model(x)
    with pytest.warns(RevivalWarning, match=r"\['1'\] have dead units but no known producer"):
        counts = revive_dead_units_(model, _report(model, x), generator=torch.Generator())
    assert counts["1"] == 0
    assert torch.equal(model(x), y)


# -------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("report", "match"),
    [
        ({"1": 16, "7": 4}, r"site '7' that the model does not have; the model's sites are \['1', '3'\]"),
        ({"1": 16, "3": 20}, r"site '3' has 20 units but the model's site '3' has 12"),
    ],
    ids=["unknown-site", "wrong-width"],
)
def test_report_of_another_model_changes_nothing(report: dict[str, int], match: str) -> None:
    model = _mlp()
    x, y = torch.randn(32, 6), torch.randn(32, 3)
    optimizer = torch.optim.Adam(model.parameters())
    _steps(model, optimizer, x, y, 1)
    layers = {
        name: LayerReport.from_counts(name, torch.zeros(width, dtype=torch.int64), 10, 10, 10)  # all dead
        for name, width in report.items()
    }
    params = {k: v.clone() for k, v in model.state_dict().items()}
    state = _clone_state(optimizer)
    with pytest.raises(ValueError, match=match):
        revive_dead_units_(model, layers, optimizer, generator=torch.Generator())
    for key, value in model.state_dict().items():
        assert torch.equal(value, params[key]), key
    for p, s in optimizer.state.items():
        for key, value in s.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(state[id(p)][key])), key


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_n_epochs": 0}, r"`every_n_epochs` must be a positive integer, got 0"),
        ({"max_fraction": 1.5}, r"`max_fraction` must be a number in \(0, 1\], got 1.5"),
        ({"exclude": "net.1"}, r"`exclude` must be a sequence of site names, got 'net.1'"),
        ({"init": "xavier"}, r"`init` can be 'default', 'kaiming', 'rai', got 'xavier'"),
        ({"seed": -1}, r"`seed` must be a non-negative integer or None, got -1"),
    ],
)
def test_reviver_validates_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DeadUnitReviver(**kwargs)


@pytest.mark.parametrize(
    ("optimizer", "match"),
    [
        ("sgd", r"got 'sgd'$"),
        (3, r"got 3$"),
        (lambda net: net.parameters(), r"got a generator of \[Parameter, Parameter, Parameter, Parameter, \.\.\.\]$"),
        (lambda net: [torch.optim.SGD(net.parameters(), lr=0.1), None], r"got a list of \[SGD, NoneType\]$"),
    ],
    ids=["str", "int", "parameters", "list"],
)
def test_optimizer_argument_names_the_value(optimizer: Any, match: str) -> None:
    model = _mlp()
    given = optimizer(model) if callable(optimizer) else optimizer
    with pytest.raises(ValueError, match=r"`optimizer` must be a `torch.optim.Optimizer`, .*" + match):
        revive_dead_units_(model, _report(model, torch.randn(8, 6)), given)


# -------------------------------------------------------------------------------------------- Lightning


class _DeadModule(pl.LightningModule):
    """A small regressor whose `dead` units of `net.1` start dead (large negative bias)."""

    def __init__(self, dead: tuple[int, ...] = (1, 4, 6)) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        _kill(self.net[0], list(dead))
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(64, 8, generator=generator)
        self.data = TensorDataset(x, x.sum(dim=1, keepdim=True))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=8)


class _DumpState(Callback):
    def __init__(self, folder: str, reviver: DeadUnitReviver) -> None:
        self.folder = folder
        self.reviver = reviver

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = {"params": pl_module.state_dict(), "history": self.reviver.history}
        torch.save(state, Path(self.folder) / f"rank{trainer.global_rank}.pt")


def _trainer(tmp_path: Path, callbacks: list[Callback], **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = {
        "default_root_dir": tmp_path,
        "max_epochs": 2,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
    }
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


def test_fit_revives_logs_and_checkpoints(tmp_path: Path) -> None:
    reviver = DeadUnitReviver(seed=7)
    pickle.loads(pickle.dumps(reviver))
    model = _DeadModule()
    logger = CSVLogger(tmp_path, name="csv", version=0)
    trainer = _trainer(tmp_path, [DeadUnitMonitor(), reviver], logger=logger, limit_train_batches=4)
    trainer.fit(model)

    assert [e["revived"] for e in reviver.history] == [{"net.1": 3}, {"net.1": 0}]  # alive again in epoch 1
    assert bool((model.net[0].bias.detach()[[1, 4, 6]] > -1).all())
    assert trainer.callback_metrics["revived/total"] == 0.0
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        everything = list(csv.DictReader(f))
    rows = [row for row in everything if row.get("revived/net.1")]
    assert [(float(r["revived/net.1"]), float(r["revived/total"])) for r in rows] == [(3.0, 3.0), (0.0, 0.0)]
    # at the step and with the epoch of the report it follows (were one step later, without an epoch)
    reports = [(r["step"], r["epoch"]) for r in everything if r.get("dead_units/total")]
    assert [(r["step"], r["epoch"]) for r in rows] == reports == [("3", "0.0"), ("7", "1.0")]

    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=False)
    saved = checkpoint["callbacks"][reviver.state_key]
    assert saved["last"] == reviver.history[-1] and saved["totals"] == {"net.1": 3}  # not every revival
    fresh = DeadUnitReviver(seed=7)
    assert fresh.state_key == reviver.state_key
    fresh.load_state_dict(saved)
    assert fresh.history == reviver.history[-1:] and fresh.total_revived == 3
    fresh.load_state_dict({})  # old checkpoints without the keys load
    assert fresh.history == []
    restored = pickle.loads(pickle.dumps(reviver))
    assert restored.history == reviver.history


def test_attach_to_a_monitor_without_being_a_callback(tmp_path: Path) -> None:
    # how `DeadUnitMonitor(revive=...)` drives its reviver: `attach` in the monitor's setup, state through it
    monitor, reviver = DeadUnitMonitor(), DeadUnitReviver(seed=0)
    with pytest.raises(ValueError, match=r"`exclude` has unknown site names \['net.9'\]"):
        DeadUnitReviver(exclude=["net.9"]).attach(monitor, _DeadModule())
    reviver.attach(monitor, _DeadModule())
    trainer = _trainer(tmp_path, [monitor], logger=False, max_epochs=1, limit_train_batches=2)
    trainer.fit(_DeadModule())
    assert [e["revived"] for e in reviver.history] == [{"net.1": 3}]
    reviver.detach()
    reviver.detach()  # idempotent


@pytest.mark.parametrize("reviver_first", [True, False], ids=["reviver-first", "monitor-first"])
def test_the_revivers_own_forwards_are_not_counted_whatever_the_callback_order(
    tmp_path: Path, reviver_first: bool
) -> None:
    # the reviver observes the model on the first batch's example: with the reviver first in the list, that forward
    # ran while the monitor was still counting the batch
    monitor, reviver = DeadUnitMonitor(print_summary=False), DeadUnitReviver(seed=0)
    module = Replayed(MLP(), MLP.replay, positive_data(20))
    callbacks: list[Callback] = [reviver, monitor] if reviver_first else [monitor, reviver]
    quiet_trainer(tmp_path, callbacks, max_epochs=2, limit_val_batches=0).fit(module)
    assert [h.layers["net.1"].samples for h in monitor.history] == [20, 20]
    assert_monitor_matches(monitor, module)


def test_a_step_that_calls_two_children_has_both_revived(tmp_path: Path) -> None:
    # `self.decoder(self.encoder(x))`: each child's sites are observed on that child's call in the step
    module = AutoEncoder()
    x = module.train_dataloader().dataset.tensors[0]
    monitor = DeadUnitMonitor(print_summary=False, revive=DeadUnitReviver(seed=0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_trainer(tmp_path, [monitor], max_epochs=1, limit_val_batches=0).fit(module)
    assert not [w for w in caught if issubclass(w.category, RevivalWarning)], [str(w.message) for w in caught]
    assert monitor.reviver is not None and monitor.last_report is not None
    dead = {name: layer.num_dead for name, layer in monitor.last_report.items()}
    assert dead["encoder.1"] >= 2 and dead["decoder.1"] >= 2  # the units killed by hand, at least
    assert monitor.reviver.last_revived == dead
    with torch.no_grad():  # the revived units fire on the training data, by hand
        hidden = torch.relu(module.encoder[0](x))
        assert bool((hidden[:, [1, 4]] > 0).any(0).all())
        assert bool((torch.relu(module.decoder[0](module.encoder(x)))[:, [1, 4]] > 0).any(0).all())


class _TunedDeadModule(_DeadModule):
    """`_DeadModule` with an `lr` that Lightning's learning-rate finder tunes."""

    def __init__(self) -> None:
        super().__init__()
        self.lr = 1e-3

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class _FinderAtEpoch(LearningRateFinder):
    """Lightning's documented fine-tuning pattern: the finder runs at the start of a later epoch."""

    def __init__(self, epoch: int) -> None:
        super().__init__(num_training_steps=3, early_stop_threshold=None)
        self.epoch = epoch

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == self.epoch:
            self.lr_find(trainer, pl_module)


def test_a_finder_restoring_its_checkpoint_within_the_fit_keeps_the_histories(tmp_path: Path) -> None:
    """The finder saves a checkpoint, runs trial steps and restores it: the monitor's and the reviver's histories
    were cut to the checkpoint's latest entry (the heatmap lost the earlier epochs), though the fit went on."""
    monitor = DeadUnitMonitor(print_summary=False, revive=DeadUnitReviver(seed=0))
    trainer = _trainer(tmp_path, [_FinderAtEpoch(2), monitor], max_epochs=4, logger=False, enable_checkpointing=False)
    trainer.fit(_TunedDeadModule())
    reviver = monitor.reviver
    assert reviver is not None
    assert [report.epoch for report in monitor.history] == [0, 1, 2, 3]
    assert [entry["epoch"] for entry in reviver.history] == [0, 1, 2, 3]
    assert reviver.history[0]["revived"] == {"net.1": 3}
    whole: dict[str, int] = {}  # the fit started afresh: its totals are the sum of its history
    for entry in reviver.history:
        for name, count in entry["revived"].items():
            whole[name] = whole.get(name, 0) + count
    assert reviver.revived_per_site == whole


def test_the_same_trainer_resuming_another_runs_checkpoint_takes_that_runs_history(tmp_path: Path) -> None:
    """A Trainer that trained one run and then resumes another run's checkpoint (its latest report at the same epoch
    and step as one of the first run's) kept the first run's earlier reports, and the reviver's totals went negative
    for the revivals before the checkpoint (a first version of the finder fix)."""
    other = DeadUnitMonitor(print_summary=False, revive=DeadUnitReviver(seed=0))
    elsewhere = _trainer(tmp_path, [other], logger=False, enable_checkpointing=False, limit_train_batches=4)
    elsewhere.fit(_DeadModule(dead=(1,)))
    elsewhere.save_checkpoint(tmp_path / "other.ckpt")
    assert other.reviver is not None and other.reviver.revived_per_site == {"net.1": 1}

    monitor = DeadUnitMonitor(print_summary=False, revive=DeadUnitReviver(seed=0))
    trainer = _trainer(tmp_path, [monitor], logger=False, enable_checkpointing=False, limit_train_batches=4)
    trainer.fit(_DeadModule())
    assert [(r.epoch, r.global_step) for r in monitor.history] == [(0, 4), (1, 8)]  # what the checkpoint holds too
    trainer.fit_loop.max_epochs = 3
    trainer.fit(_DeadModule(dead=(1,)), ckpt_path=str(tmp_path / "other.ckpt"))
    assert [(r.epoch, r.global_step) for r in monitor.history] == [(1, 8), (2, 12)]
    assert monitor.history[0].layers["net.1"].num_dead == other.history[-1].layers["net.1"].num_dead
    reviver = monitor.reviver
    assert reviver is not None
    assert [(e["epoch"], e["revived"]) for e in reviver.history] == [(1, {"net.1": 0}), (2, {"net.1": 0})]
    assert reviver.revived_per_site == {"net.1": 1}  # the other run's revival in its epoch 0, nothing since


def test_a_test_or_validation_from_a_checkpoint_after_the_fit_keeps_the_histories(tmp_path: Path) -> None:
    """Lightning loads the callbacks' state for `validate`/`test` with `ckpt_path=`: the monitor's and the reviver's
    histories were cut to the checkpoint's latest entry after the fit."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    monitor = DeadUnitMonitor(print_summary=False, revive=DeadUnitReviver(seed=0))
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=-1)
    trainer = _trainer(tmp_path, [monitor, checkpoints], max_epochs=3, logger=False, limit_train_batches=2)
    module = _DeadModule()
    module.validation_step = lambda batch, batch_idx: None  # type: ignore[method-assign]
    module.val_dataloader = module.train_dataloader  # type: ignore[method-assign]
    trainer.fit(module)
    reviver = monitor.reviver
    assert reviver is not None
    places = [(0, 2), (1, 4), (2, 6)]
    assert [(r.epoch, r.global_step) for r in monitor.history] == places
    totals = dict(reviver.revived_per_site)
    for ckpt_path in ("last", str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt")):
        trainer.validate(module, ckpt_path=ckpt_path, verbose=False)
        assert [(r.epoch, r.global_step) for r in monitor.history] == places, ckpt_path
        assert [(e["epoch"], e["global_step"]) for e in reviver.history] == places, ckpt_path
        assert reviver.revived_per_site == totals


def test_reviver_needs_a_monitor(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, [DeadUnitReviver()], logger=False, max_epochs=1, limit_train_batches=1)
    with pytest.raises(MisconfigurationException, match="but the Trainer has none"):
        trainer.fit(_DeadModule())


@retry_spawn_abort
def test_ddp_ranks_perform_identical_surgery(tmp_path: Path) -> None:
    reviver = DeadUnitReviver(seed=None)  # the seed comes from rank zero: spawned ranks have their own
    trainer = _trainer(
        tmp_path,
        [DeadUnitMonitor(), reviver, _DumpState(str(tmp_path), reviver)],
        strategy=SpawnDDP(),
        accelerator="cpu",
        devices=2,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
    )
    trainer.fit(_DeadModule())
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert states[0]["history"] == states[1]["history"]
    assert [e["revived"] for e in states[0]["history"]] == [{"net.1": 3}]
    for key, value in states[0]["params"].items():
        assert torch.equal(value, states[1]["params"][key]), key
    assert bool((states[0]["params"]["net.0.bias"][[1, 4, 6]] > -1).all())
    assert bool((states[0]["params"]["net.2.weight"][:, [1, 4, 6]] == 0).all())


# ---------------------------------------------------------------------------------------------- example


def test_example_quick_mode(capsys: pytest.CaptureFixture[str]) -> None:
    path = Path(__file__).resolve().parents[1] / "examples" / "revival.py"
    spec = importlib.util.spec_from_file_location("revival_example", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        results = module.main(["--quick"])
    finally:
        del sys.modules[spec.name]
    assert sorted((r.seed, r.arm) for r in results) == [(s, a) for s in (0, 1) for a in ("no revival", "revival")]
    for r in results:
        assert len(r.dead_fraction) == 5 and all(0.0 <= d <= 1.0 for d in r.dead_fraction)
        assert math.isfinite(r.final_loss)
        assert (sum(r.revived) > 0) == (r.arm == "revival")
    out = capsys.readouterr().out
    assert "| epoch | lr | dead, no revival | dead, revival |" in out and "| mean ± std |" in out


def test_sites_from_a_tracker_revive_exactly_as_a_fresh_discovery(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_relu.revive as revive_module

    first, second = _DeadModule(), _DeadModule()
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(2))
    with DeadUnitTracker(first) as tracker:
        first(x)
    report = tracker.report()
    counts = revive_dead_units_(second, report, generator=torch.Generator().manual_seed(3))
    calls: list[nn.Module] = []
    monkeypatch.setattr(revive_module, "find_relu_sites", lambda model, **kw: calls.append(model) or [])
    reused = revive_dead_units_(first, report, generator=torch.Generator().manual_seed(3), sites=tracker.all_sites)
    assert calls == []  # no second discovery
    assert reused == counts == {"net.1": 3}
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)  # the same surgery, drawn from the same generator state


@pytest.mark.parametrize(
    ("sites", "match"),
    [("net.1", "`sites` must be the model's `Site`s"), ([1, 2], "`sites` must be the model's `Site`s")],
)
def test_sites_argument_is_checked(sites: Any, match: str) -> None:
    model = _DeadModule()
    with pytest.raises(ValueError, match=match):
        revive_dead_units_(model, {}, sites=sites)


def test_sites_of_another_model_are_refused() -> None:
    a, b = _DeadModule(), _DeadModule()
    with DeadUnitTracker(a) as tracker:
        a(torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"`sites` has sites of another model: the producers of \['net.1'\]"):
        revive_dead_units_(b, tracker.report(), sites=tracker.all_sites)


def test_monitor_with_revival_discovers_sites_once_per_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_relu.revive as revive_module
    import lightning_relu.tracker as tracker_module

    calls: list[str] = []
    # the reviver finds the sites with `find_relu_sites`, the tracker with `module_sites` (the module tree's sites)
    for module, function in ((revive_module, "find_relu_sites"), (tracker_module, "module_sites")):
        original = getattr(module, function)
        monkeypatch.setattr(module, function, lambda model, _f=original, **kw: calls.append("found") or _f(model, **kw))
    monitor = DeadUnitMonitor(revive=DeadUnitReviver(seed=0))
    _trainer(tmp_path, [monitor], logger=False, max_epochs=2, limit_train_batches=2).fit(_DeadModule())
    assert monitor.reviver is not None and len(monitor.reviver.history) == 2  # it revived at every epoch end
    assert calls == ["found"]


def _shares_of_revived(net: nn.Module, x: Tensor, units: int, dims: tuple[int, ...]) -> dict[str, list[float]]:
    """Per rectifier module, the share of entries > 0 on ``x`` of its first ``units`` units, by hand."""
    outputs: dict[str, Tensor] = {}
    handles = [
        module.register_forward_hook(lambda m, a, o, name=name: outputs.__setitem__(name, o.detach()))
        for name, module in net.named_modules()
        if isinstance(module, nn.ReLU)
    ]
    with torch.no_grad():
        net(x)
    for handle in handles:
        handle.remove()
    return {name: (out[:, :units] > 0).float().mean(dims).tolist() for name, out in outputs.items()}


@pytest.mark.parametrize("kind", ["mlp", "conv-bn-eval"])
def test_revived_units_of_a_chain_of_sites_fire_on_the_example(kind: str) -> None:
    # every layer's first four units dead: each revived site reads revived units of the one before
    torch.manual_seed(0)
    if kind == "mlp":
        layers: list[nn.Module] = []
        for i in range(6):
            layers += [nn.Linear(4 if i == 0 else 16, 16), nn.ReLU()]
        net = nn.Sequential(*layers, nn.Linear(16, 1))
        killed, x, dims = [net[2 * i].bias for i in range(6)], torch.randn(64, 4), (0,)
    else:
        blocks: list[nn.Module] = []
        for i in range(4):
            blocks += [nn.Conv2d(3 if i == 0 else 16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU()]
        net = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()
        killed, x, dims = [net[3 * i + 1].bias for i in range(4)], torch.randn(8, 3, 16, 16), (0, 2, 3)
    with torch.no_grad():
        for bias in killed:
            bias[:4] = -1000.0
    with DeadUnitTracker(net) as tracker, torch.no_grad():
        before = net(x)
    revived = revive_dead_units_(net, tracker.report(), None, torch.Generator().manual_seed(0), example_input=x)
    assert all(count >= 4 for count in revived.values()) and len(revived) == len(killed)
    with torch.no_grad():
        assert torch.allclose(net(x), before, rtol=1e-5, atol=1e-6)  # the function is the same
    for name, shares in _shares_of_revived(net, x, 4, dims).items():
        assert all(0.3 <= share <= 0.7 for share in shares), (name, shares)  # about half of the entries


def test_an_unknown_exclude_name_is_refused_with_an_example_input_too() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    with torch.no_grad():
        net[0].bias[:3] = -100.0
    x = torch.randn(64, 4)
    with DeadUnitTracker(net) as tracker, torch.no_grad():
        net(x)
    before = {name: tensor.detach().clone() for name, tensor in net.state_dict().items()}
    with pytest.raises(ValueError, match=r"`exclude` has unknown site names \['site_1'\]"):
        revive_dead_units_(net, tracker.report(), exclude=["site_1"], example_input=x)
    assert all(torch.equal(before[name], tensor) for name, tensor in net.state_dict().items())


class _Counter(nn.Module):
    """A child without rectifiers that the step also calls (a metric, a loss module): counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return x.sum()


class _WithMetric(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        with torch.no_grad():
            self.net[0].bias[:3] = -1e4
        self.counter = _Counter()

    def training_step(self, batch, batch_idx):
        out = self.net(batch[0])
        self.counter(out.detach())
        return out.pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(24, 4)), batch_size=8)


def test_the_reviver_runs_only_the_calls_that_hold_sites(tmp_path: Path) -> None:
    module = _WithMetric()
    monitor = DeadUnitMonitor(print_summary=False, revive=DeadUnitReviver(seed=0))
    quiet_trainer(tmp_path, [monitor], max_epochs=1, limit_val_batches=0).fit(module)
    assert module.counter.calls == 3  # one per training step: the reviver never called the metric-like child
    assert monitor.reviver is not None and monitor.reviver.last_revived == {"net.1": 3}


def test_a_second_monitor_does_not_count_the_revivers_own_forwards(tmp_path: Path) -> None:
    """The reviver observes the model on the first batch (its monitor paused): a second monitor on the same model
    counted that forward as training data (72 samples for 64 in epoch 0). Every monitor counts the dataset."""
    reviving = DeadUnitMonitor(revive=DeadUnitReviver(seed=0))
    other = DeadUnitMonitor(sites=["net.1"])  # another state key: a monitor of its own
    _trainer(tmp_path, [reviving, other], logger=False, enable_checkpointing=False).fit(_DeadModule())
    for monitor in (reviving, other):
        assert [report.layers["net.1"].samples for report in monitor.history] == [64, 64]
    assert reviving.reviver is not None and sum(reviving.reviver.history[0]["revived"].values()) == 3
