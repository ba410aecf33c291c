"""Non-finite is not dead: a site that saw NaN/Inf is reported as non-finite, never as dead or collapsed, and no
remedy acts on it (issue 20)."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_relu import CollapseWarning, DeadUnitMonitor, DeadUnitReviver, DeadUnitTracker, revive_dead_units_
from lightning_relu.report import LayerReport
from tests.faults.models import Net, random_batches, trainer
from tests.helpers import mlp

_POISON_STEP = 3


class _Diverge(Callback):
    """The fault: the run diverges at global step 3 (the first layer's weights turn NaN, as after an overflow)."""

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == _POISON_STEP:
            with torch.no_grad():
                pl_module.net[0].weight.fill_(float("nan"))


def test_a_diverged_run_is_reported_non_finite_not_dead_and_is_not_revived(tmp_path: Path) -> None:
    monitor = DeadUnitMonitor(revive=DeadUnitReviver(seed=0))
    fit = trainer(tmp_path, [_Diverge(), monitor])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit.fit(Net(random_batches(5), lr=0.05))
    # brute force: 5 batches per epoch, steps 0-4 then 5-9; every forward from step 3 on is NaN at both sites
    expected = [sum(1 for step in range(5 * e, 5 * e + 5) if step >= _POISON_STEP) for e in (0, 1)]
    assert expected == [2, 5]
    for report, batches in zip(monitor.history, expected, strict=True):
        assert report.nonfinite_sites == ["net.1", "net.3"]
        assert report.first_nonfinite_step == max(_POISON_STEP, 5 * report.epoch)  # the epoch's first
        for layer in report.layers.values():
            assert layer.nonfinite and layer.nonfinite_batches == batches
            assert layer.num_dead == 0 and not bool(layer.dead.any()) and not layer.collapsed
            assert math.isnan(layer.dead_fraction)
        assert report.total_dead == 0 and report.dead_fraction == 0.0
    messages = [str(w.message) for w in caught]
    assert not [w for w in caught if issubclass(w.category, CollapseWarning)]
    nonfinite = [m for m in messages if "produced NaN or Inf activations" in m]
    assert len(nonfinite) == 1  # one warning, naming the first site and step
    assert "Site 'net.1'" in nonfinite[0] and f"first at global step {_POISON_STEP}" in nonfinite[0]
    assert float(fit.callback_metrics["nonfinite/net.1"]) == 5.0  # the logged scalar, last epoch
    assert float(fit.callback_metrics["nonfinite/total"]) == 2.0
    assert "dead_units/net.1" not in fit.callback_metrics
    assert monitor.reviver.history == []  # no remedy on a NaN network
    assert sum("revived nothing after epoch" in m for m in messages) == 2


def test_a_finite_run_logs_no_non_finite_site(tmp_path: Path) -> None:
    monitor = DeadUnitMonitor()
    fit = trainer(tmp_path, [monitor], max_epochs=1)
    fit.fit(Net(random_batches(5)))
    report = monitor.history[0]
    assert report.nonfinite_sites == [] and report.first_nonfinite_step is None
    assert float(fit.callback_metrics["nonfinite/total"]) == 0.0
    assert report.layers["net.3"].num_dead > 0  # dead units are still reported where the values are finite


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_tracker_report_of_a_non_finite_output_and_revival_change_nothing(value: float) -> None:
    model = mlp([4, 6, 1], seed=0)
    x = torch.randn(8, 4)
    x[:, 0] = value  # every sample holds NaN (or Inf): every unit's output is NaN, +Inf or 0
    with DeadUnitTracker(model) as tracker:
        model(x)
    report = tracker.report()["1"]
    with torch.no_grad():
        out = model[:2](x)
    assert report.active_count.tolist() == [int((out[:, u] > 0).sum()) for u in range(6)]  # counts kept
    assert report.nonfinite and not bool(report.dead.any()) and not report.collapsed
    before = {name: value.clone() for name, value in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert revive_dead_units_(model, tracker.report(), optimizer, generator=torch.Generator().manual_seed(0)) == {
        "1": 0
    }
    after = model.state_dict()
    assert all(torch.equal(after[name], value) for name, value in before.items())


def test_layer_report_from_counts_with_non_finite_batches() -> None:
    """Counts with every unit inactive: dead when finite, not judged when a batch was non-finite."""
    zeros = torch.zeros(3, dtype=torch.int64)
    finite = LayerReport.from_counts("a", zeros, 10, 10, 10)
    broken = LayerReport.from_counts("a", zeros, 10, 10, 10, nonfinite_batches=1)
    assert finite.collapsed and finite.num_dead == 3 and not finite.nonfinite
    assert broken.nonfinite and not broken.collapsed and broken.num_dead == 0 and broken.num_dying == 0
    assert math.isnan(broken.dead_fraction) and "nonfinite=True" in repr(broken)
    restored = LayerReport.from_state_dict(broken.state_dict())
    assert restored.nonfinite and restored.num_dead == 0


@pytest.mark.parametrize("poisoned", [[5], [67], [5, 67], [66, 67], []])
def test_the_first_non_finite_batch_is_told_by_its_tag_across_folds(poisoned: list[int]) -> None:
    """The CPU path keeps each output's per-sample sums back (64 outputs of these shapes) and folds them later; the
    tag of each output (the monitor's step) tells the first non-finite batch exactly, before and after a fold."""
    model = mlp([4, 8, 8, 1], seed=0)
    steps = 70  # one fold after 64 outputs, the rest at the read
    x = torch.rand(steps, 4, 4, generator=torch.Generator().manual_seed(0))
    for step in poisoned:
        x[step, 1, 0] = float("nan")
    expected_flags = {}  # brute force: per site, the steps whose output holds NaN or Inf
    with torch.no_grad():
        for step in range(steps):
            a = torch.relu(model[0](x[step]))
            b = torch.relu(model[2](a))
            for name, out in (("1", a), ("3", b)):
                if not bool(torch.isfinite(out).all()):
                    expected_flags.setdefault(name, []).append(step)
    with DeadUnitTracker(model) as tracker, torch.no_grad():
        for step in range(steps):
            tracker.tag_batch(step)
            model(x[step])
    report = tracker.report()
    for name in ("1", "3"):
        assert report[name].nonfinite_batches == len(expected_flags.get(name, []))
    tag = tracker.first_nonfinite_tag()
    firsts = [flags[0] for flags in expected_flags.values()]
    assert tag is not None  # every output was tagged
    assert int(tag) == (min(firsts) if firsts else 2**62)
    tracker.reset()
    assert tracker.first_nonfinite_tag() is None  # a new epoch starts without tags


class _PoisonBatches(Callback):
    """The fault: one sample of the batches at the given global steps holds NaN (a corrupt record); the gradients'
    NaN are zeroed before each optimizer step, so the weights stay finite and only those batches are non-finite."""

    def __init__(self, steps: list[int]) -> None:
        self.steps = steps

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step in self.steps:
            batch[0][1, 0] = float("nan")

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        for parameter in pl_module.parameters():
            if parameter.grad is not None:
                parameter.grad.nan_to_num_(0.0, 0.0, 0.0)


@pytest.mark.parametrize("steps", [[67], [5, 67]])
def test_a_monitor_names_the_first_of_a_few_non_finite_batches_exactly(tmp_path: Path, steps: list[int]) -> None:
    """70 batches in one epoch: the CPU path folds the per-sample sums of the first 64 during the epoch and the rest
    at its end; the monitor tags each batch with its step and reports the first non-finite one."""
    monitor = DeadUnitMonitor()
    fit = trainer(tmp_path, [_PoisonBatches(steps), monitor], max_epochs=1, limit_train_batches=70)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit.fit(Net(random_batches(70), lr=0.05))
    (report,) = monitor.history
    assert report.nonfinite_sites == ["net.1", "net.3"]  # NaN in a sample reaches every unit of both sites
    assert report.first_nonfinite_step == steps[0]
    for layer in report.layers.values():
        assert layer.nonfinite_batches == len(steps)


def test_a_checkpoint_after_a_non_finite_batch_resumes_with_its_step(tmp_path: Path) -> None:
    """The checkpoint is saved mid-epoch while the CPU path still keeps the non-finite batch's per-sample sums back:
    the saved progress names its step (the tags are read at save), and the resumed fit reports it."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1, filename="{step}")
    whole, resumed = DeadUnitMonitor(), DeadUnitMonitor()
    settings: dict[str, Any] = dict(max_epochs=1, limit_train_batches=8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(tmp_path, [_PoisonBatches([2]), whole, ckpt], enable_checkpointing=True, **settings).fit(
            Net(random_batches(8), lr=0.05)
        )
        trainer(tmp_path, [_PoisonBatches([2]), resumed], **settings).fit(
            Net(random_batches(8), lr=0.05), ckpt_path=str(tmp_path / "ckpt" / "step=4.ckpt")
        )
    for monitor in (whole, resumed):
        (report,) = monitor.history
        assert report.first_nonfinite_step == 2
        assert report.layers["net.1"].nonfinite_batches == 1
