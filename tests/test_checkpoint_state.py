"""The monitor's and the reviver's checkpoint state is O(units): the history lives in the loggers (issue 22, item 7)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_relu import DeadUnitMonitor, DeadUnitReviver
from tests.faults.models import Net, random_batches, trainer

WIDTHS = {"net.1": 6, "net.3": 6}  # the sites of `Net`: 4 -> 6 -> ReLU -> 6 -> ReLU -> 1


def _numbers(value: Any) -> int:
    """How many numbers a state holds: a tensor's entries, one per int/float/bool, none for a string or None."""
    if isinstance(value, torch.Tensor):
        return value.numel()
    if isinstance(value, dict):
        return sum(_numbers(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_numbers(item) for item in value)
    if isinstance(value, (bool, int, float)):
        return 1
    assert value is None or isinstance(value, str), type(value)
    return 0


def _fit(tmp_path: Path, epochs: int, **reviver: Any) -> DeadUnitMonitor:
    monitor = DeadUnitMonitor(revive=DeadUnitReviver(seed=0, **reviver))
    torch.manual_seed(0)
    trainer(tmp_path / str(epochs), [monitor], max_epochs=epochs).fit(Net(random_batches(5), lr=0.05))
    assert [report.epoch for report in monitor.history] == list(range(epochs))
    return monitor


def test_the_state_does_not_grow_with_the_epochs(tmp_path: Path) -> None:
    """After 1 and after 5 epochs the state holds the same count of numbers, the closed form below: the last report
    (epoch, step, the partial flag; per site its ``active_count`` and 5 scalars), the progress of the epoch (its
    number, batches, done), no window (the epoch ended); the reviver's last revival (epoch, step, a count per site),
    its totals per site and its seed."""
    sites, units = len(WIDTHS), sum(WIDTHS.values())
    last_report = 3 + units + 5 * sites
    progress = 3
    reviver = (2 + sites) + sites + 1
    expected = last_report + progress + reviver
    for epochs in (1, 5):
        monitor = _fit(tmp_path, epochs)
        state = monitor.state_dict()
        assert "history" not in state and "history" not in state["reviver"]
        assert state["window"] is None and state["reviver"]["example"] is None
        assert sorted(state["reviver"]["totals"]) == sorted(WIDTHS)
        assert _numbers(state) == expected, epochs
        # what the fit revived in all, per site, survives in the totals
        totals = {name: 0 for name in WIDTHS}
        for entry in monitor.reviver.history:
            for name, count in entry["revived"].items():
                totals[name] += count
        assert state["reviver"]["totals"] == totals
        assert state["reviver"]["last"] == monitor.reviver.history[-1]


def test_a_round_trip_keeps_the_last_report_and_the_revival_totals(tmp_path: Path) -> None:
    monitor = _fit(tmp_path, 3)
    copy = DeadUnitMonitor(revive=DeadUnitReviver(seed=0))
    copy.load_state_dict(monitor.state_dict())
    assert len(copy.history) == 1 and copy.history[0].epoch == 2
    for name, layer in monitor.history[-1].layers.items():
        assert torch.equal(copy.last_report[name].active_count, layer.active_count)
        assert copy.last_report[name].samples == layer.samples == 20
    assert copy.reviver.history == monitor.reviver.history[-1:]
    expected = sum(sum(entry["revived"].values()) for entry in monitor.reviver.history)
    assert copy.reviver.total_revived == expected
    assert copy.revived_totals() == monitor.revived_totals()


def _old_report(epoch: int, active: list[int]) -> dict[str, Any]:
    """An epoch report as older versions saved it in the ``history`` list: one site, 4 samples of 6 entries."""
    layer = {
        "name": "net.1",
        "active_count": torch.tensor(active),
        "entries_per_unit": 4,
        "samples": 4,
        "killed": 0,
        "eps": 0.01,
        "nonfinite_batches": 0,
        "pre_mean": None,
        "pre_std": None,
    }
    return {"epoch": epoch, "global_step": 5 * (epoch + 1), "layers": [layer], "partial": False}


def test_an_old_state_with_the_whole_history_loads() -> None:
    """A state written by an older version, built by hand: every epoch's report and every revival. The monitor keeps
    the latest report; the reviver the latest revival, and its totals are the sums over the old history."""
    old = {
        "history": [_old_report(0, [0, 4, 4, 0, 1, 2]), _old_report(1, [3, 4, 4, 0, 0, 2])],
        "collapse_warned": ["net.3"],
        "reviver": {
            "history": [
                {"epoch": 0, "global_step": 5, "revived": {"net.1": 2, "net.3": 1}},
                {"epoch": 1, "global_step": 10, "revived": {"net.1": 2, "net.3": 0}},
            ],
            "seed": 11,
        },
    }
    monitor = DeadUnitMonitor(revive=DeadUnitReviver())
    monitor.load_state_dict(old)
    assert [report.epoch for report in monitor.history] == [1]
    layer = monitor.last_report["net.1"]
    assert layer.active_count.tolist() == [3, 4, 4, 0, 0, 2]
    assert layer.dead.tolist() == [False, False, False, True, True, False]  # 0 of 4 entries active
    assert monitor._collapse_warned == {"net.3"}
    reviver = monitor.reviver
    assert reviver.history == [{"epoch": 1, "global_step": 10, "revived": {"net.1": 2, "net.3": 0}}]
    assert reviver.revived_per_site == {"net.1": 4, "net.3": 1}
    assert reviver.total_revived == 5
    assert reviver._resolved_seed == 11
    # saved again, it is in the new form
    new = monitor.state_dict()
    assert "history" not in new and new["last_report"]["epoch"] == 1
    assert new["reviver"]["totals"] == {"net.1": 4, "net.3": 1} and "history" not in new["reviver"]


def test_a_fit_resumes_from_an_old_checkpoint_with_the_history(tmp_path: Path) -> None:
    """A real checkpoint rewritten into the old form (two epochs of history in place of the last report): the fit
    resumes from it, its history starting with the old history's last report, and goes on to the next epoch."""
    monitor = DeadUnitMonitor()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    torch.manual_seed(0)
    trainer(tmp_path, [monitor, ckpt], enable_checkpointing=True).fit(Net(random_batches(5)))
    path = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("DeadUnitMonitor")]
    state = checkpoint["callbacks"][key]
    state["history"] = [report.state_dict() for report in monitor.history]
    del state["last_report"]
    torch.save(checkpoint, path)

    resumed = DeadUnitMonitor()
    torch.manual_seed(0)
    trainer(tmp_path, [resumed], max_epochs=3).fit(Net(random_batches(5)), ckpt_path=str(path))
    assert [report.epoch for report in resumed.history] == [1, 2]
    for name, layer in monitor.history[-1].layers.items():
        assert resumed.history[0].layers[name].active_count.tolist() == layer.active_count.tolist()
    # lr = 0: every epoch sees the same weights and data, so epoch 2 counts what epoch 1 did
    for name, layer in monitor.history[-1].layers.items():
        assert resumed.history[1].layers[name].active_count.tolist() == layer.active_count.tolist()


def test_compact_reads_the_last_report_of_a_new_and_of_an_old_checkpoint(tmp_path: Path) -> None:
    """``lightning-relu compact`` takes the monitor's latest report: the new state's ``last_report``, or the last of an
    old state's ``history`` (here one epoch with no dead unit put before the real one: were it read, nothing would be
    removed)."""
    from lightning_relu.compaction import _compact_checkpoint
    from tests.test_compact import _demo_checkpoint

    path = _demo_checkpoint(tmp_path)
    new, _ = _compact_checkpoint(path, str(tmp_path / "new.ckpt"), None, None, 0)
    removed = {name: site.removed for name, site in new.sites.items()}
    assert removed["net.1"] == 3  # the three units the demo checkpoint killed

    checkpoint = torch.load(path, weights_only=True)
    (key,) = [k for k in checkpoint["callbacks"] if str(k).startswith("DeadUnitMonitor")]
    state = checkpoint["callbacks"][key]
    last = state.pop("last_report")
    alive = {
        **last,
        "epoch": -1,
        "layers": [
            {**layer, "active_count": layer["active_count"] * 0 + layer["entries_per_unit"]} for layer in last["layers"]
        ],
    }
    state["history"] = [alive, last]
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)
    compacted, _ = _compact_checkpoint(str(old), str(tmp_path / "old_small.ckpt"), None, None, 0)
    assert {name: site.removed for name, site in compacted.sites.items()} == removed


def test_the_held_examples_round_trip_and_an_older_single_example_loads() -> None:
    from lightning_relu.revive import _examples_from_state, _examples_state
    from lightning_relu.structure import ModuleCall

    x, h = torch.randn(2, 3), torch.randn(2, 4)
    held = [ModuleCall("encoder", (x,), {}), ModuleCall("decoder", (h,), {"scale": 2.0})]
    state = torch.load(_saved(_examples_state(held)), weights_only=True)
    loaded = _examples_from_state(state)
    assert [(e.module, e.kwargs) for e in loaded] == [("encoder", {}), ("decoder", {"scale": 2.0})]
    assert torch.equal(loaded[0].args[0], x) and torch.equal(loaded[1].args[0], h)
    batch = (x, h)  # the batch's input, when no call was seen: a tuple of positional arguments stays a tuple
    (again,) = _examples_from_state(torch.load(_saved(_examples_state([batch])), weights_only=True))
    assert isinstance(again, tuple) and torch.equal(again[1], h)
    # what a checkpoint of the previous version held: one example
    (old_call,) = _examples_from_state({"module": "net", "args": [x], "kwargs": {}})
    assert old_call.module == "net" and torch.equal(old_call.args[0], x)
    (old_input,) = _examples_from_state({"input": x, "tuple": False})
    assert torch.equal(old_input, x)
    assert _examples_state(None) is None and _examples_from_state(None) is None


def _saved(value: Any) -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    buffer.seek(0)
    return buffer
