"""Clear errors for misuse, each naming the argument or state and the value; nothing changes when one is raised
(issue 20)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_relu import DeadUnitMonitor, DeadUnitTracker, find_relu_sites, revive_dead_units_
from tests.faults.models import Net, random_batches, trainer
from tests.helpers import kill_units, mlp


def _snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[torch.Tensor]:
    tensors = [value.clone() for value in model.state_dict().values()]
    if optimizer is not None:
        tensors += [v.clone() for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return tensors


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_a_tracker_read_before_any_forward_raises() -> None:
    model = mlp([4, 6, 1])
    tracker = DeadUnitTracker(model)
    with pytest.raises(RuntimeError, match=r"`DeadUnitTracker.report\(\)` has nothing to report: its hooks are not"):
        tracker.report()
    with tracker:
        with pytest.raises(RuntimeError, match="its hooks are attached but no forward pass of the model ran"):
            tracker.report()
        model(torch.randn(5, 4))  # the error changed nothing: counting goes on
    assert tracker.report()["1"].samples == 5


def test_a_tracker_read_after_its_block_closed_with_the_forward_outside_raises() -> None:
    model = mlp([4, 6, 1])
    with DeadUnitTracker(model) as tracker:
        pass
    model(torch.randn(5, 4))  # the fault: the forward runs after the `with` block closed
    with pytest.raises(RuntimeError, match=r"none of its 1 sites has counted a sample"):
        tracker.report()


def _dead_model() -> tuple[torch.nn.Sequential, dict, torch.Tensor]:
    model = mlp([4, 6, 6, 1], seed=0)
    kill_units(model, 0, [1, 2])
    x = torch.randn(16, 4)
    with DeadUnitTracker(model) as tracker:
        model(x)
    return model, tracker.report(), x


def _stepped(model: torch.nn.Module, x: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    optimizer = torch.optim.Adam(params, lr=1e-3)
    model(x).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return optimizer


@pytest.mark.parametrize("observed", [False, True])
def test_revival_with_another_models_optimizer_raises_and_changes_nothing(observed: bool) -> None:
    model, report, x = _dead_model()
    other = copy.deepcopy(model)
    optimizer = _stepped(other, x, list(other.parameters()))
    before = _snapshot(model) + _snapshot(other, optimizer)
    with pytest.raises(ValueError, match=r"`optimizer` \(Adam of 6 parameters\) holds none of `model`'s parameters"):
        revive_dead_units_(model, report, optimizer, example_input=x if observed else None)
    assert _same(_snapshot(model) + _snapshot(other, optimizer), before)


@pytest.mark.parametrize("observed", [False, True])
def test_revival_with_an_optimizer_missing_the_revived_parameters_raises_and_changes_nothing(observed: bool) -> None:
    model, report, x = _dead_model()
    optimizer = _stepped(model, x, list(model[2].parameters()) + list(model[4].parameters()))  # not net[0]'s
    before = _snapshot(model, optimizer)
    with pytest.raises(ValueError, match=r"`optimizer` does not hold parameter '0.weight'.*site '1'"):
        revive_dead_units_(model, report, optimizer, example_input=x if observed else None)
    assert _same(_snapshot(model, optimizer), before)
    # with the sites given (as the reviver does), the same check
    with pytest.raises(ValueError, match=r"does not hold parameter '0\.weight'"):
        revive_dead_units_(model, report, optimizer, sites=find_relu_sites(model))


def test_revival_with_a_report_of_other_sites_raises_and_changes_nothing() -> None:
    _, report, x = _dead_model()
    narrow = mlp([4, 5, 6, 1], seed=0)  # site '1' has 5 units, the report 6
    before = _snapshot(narrow)
    with pytest.raises(ValueError, match=r"The report of site '1' has 6 units but the model's site '1' has 5"):
        revive_dead_units_(narrow, report)
    shallow = mlp([4, 6, 1], seed=0)  # no site '3'
    with pytest.raises(ValueError, match=r"site.*'3'.*that the model does not have"):
        revive_dead_units_(shallow, report, example_input=x)
    assert _same(_snapshot(narrow), before)


def test_a_monitor_state_of_another_models_sites_raises_and_loads_nothing(tmp_path: Path) -> None:
    """A checkpoint whose monitor state was written for another model (the fault: a state loaded into the wrong
    run) is refused naming the sites; the monitor keeps its own history."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    saved = DeadUnitMonitor()
    trainer(tmp_path, [saved, ckpt], max_epochs=1, enable_checkpointing=True).fit(Net(random_batches(5)))
    checkpoint = torch.load(tmp_path / "ckpt" / "step=2.ckpt", weights_only=False)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("DeadUnitMonitor")]
    history = [saved.state_dict()["last_report"]]  # a state of an older version held every epoch's report
    for layer in (layer for epoch in history for layer in epoch["layers"]):
        assert layer["name"] in ("net.1", "net.3")

    monitor = DeadUnitMonitor()
    fit = trainer(tmp_path / "other", [monitor], max_epochs=1)
    other = Net(random_batches(5))
    other.net = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()), torch.nn.Linear(3, 1))
    monitor.setup(fit, other, "fit")  # the model the state would be loaded into (Lightning: setup, then restore)
    kept = list(monitor.history)
    with pytest.raises(
        ValueError, match=r"`state_dict` of `DeadUnitMonitor` holds reports of sites \['net.1', 'net.3'\]"
    ):
        monitor.load_state_dict({**state, "history": history})
    assert monitor.history == kept and monitor._window is None  # nothing loaded
    wide = Net(random_batches(5))
    wide.net = torch.nn.Sequential(torch.nn.Linear(4, 7), torch.nn.ReLU(), torch.nn.Linear(7, 7), torch.nn.ReLU())
    monitor.setup(fit, wide, "fit")
    with pytest.raises(ValueError, match=r"'net.1' has 6 units in the checkpoint, 7 in the model"):
        monitor.load_state_dict(saved.state_dict())
    monitor.teardown(fit, wide, "fit")
