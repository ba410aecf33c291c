"""Exact resume from any step, on one process; partial epochs flagged where exactness is impossible (issue 20)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, OnExceptionCheckpoint

from lightning_relu import DeadUnitMonitor, DeadUnitReviver
from tests.faults.models import Net, alike_batches, random_batches, summary, trainer


def _params(module: Net) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def test_a_checkpoint_on_the_epochs_last_batch_resumes_with_that_epochs_report_and_revival(tmp_path: Path) -> None:
    """`ModelCheckpoint(every_n_train_steps=5)` lands on the last of 5 batches, before the epoch's end: the resumed
    fit reports that epoch and revives after it exactly as the uninterrupted fit (same seed): the same reports,
    the same revivals, and bit for bit the same weights after two epochs of SGD with momentum."""
    x = random_batches(5)
    whole = DeadUnitMonitor(revive=DeadUnitReviver(seed=0))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=5, save_top_k=-1, filename="{step}")
    torch.manual_seed(0)
    first = Net(x, lr=0.05)
    trainer(tmp_path, [whole, ckpt], enable_checkpointing=True).fit(first)
    assert sum(whole.reviver.history[0]["revived"].values()) > 0  # the data holds what is tested

    resumed = DeadUnitMonitor(revive=DeadUnitReviver(seed=0))
    torch.manual_seed(0)
    second = Net(x, lr=0.05)
    trainer(tmp_path, [resumed]).fit(second, ckpt_path=str(tmp_path / "ckpt" / "step=5.ckpt"))
    assert summary(resumed.history) == summary(whole.history)
    assert resumed.reviver.history == whole.reviver.history
    after, expected = _params(second), _params(first)
    assert all(torch.equal(after[name], expected[name]) for name in expected)


def _checkpoint_at_step_2(tmp_path: Path, x: torch.Tensor, **monitor: object) -> DeadUnitMonitor:
    whole = DeadUnitMonitor(**monitor)  # type: ignore[arg-type]
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer(tmp_path, [whole, ckpt], max_epochs=1, enable_checkpointing=True).fit(Net(x))
    return whole


def _resume_partial(tmp_path: Path, x: torch.Tensor, monitor: DeadUnitMonitor) -> tuple[object, list[str]]:
    fit = trainer(tmp_path, [monitor], max_epochs=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit.fit(Net(x), ckpt_path=str(tmp_path / "ckpt" / "step=2.ckpt"))
    return fit, [str(w.message) for w in caught]


def test_track_margin_changed_between_save_and_resume_keeps_the_counts_and_flags_the_epoch_partial(
    tmp_path: Path,
) -> None:
    """The mid-epoch counts were dropped silently: now they are kept (exact dead units), the margins, which the
    checkpoint did not keep, make the epoch partial: flagged, logged, warned, and not revived."""
    x = alike_batches(5)
    whole = _checkpoint_at_step_2(tmp_path, x)
    resumed = DeadUnitMonitor(track_margin=True, revive=DeadUnitReviver(seed=0))
    fit, messages = _resume_partial(tmp_path, x, resumed)
    report = resumed.history[0]
    assert [(layer.active_count.tolist(), layer.samples) for layer in report.layers.values()] == [
        (layer.active_count.tolist(), layer.samples) for layer in whole.history[0].layers.values()
    ]
    with torch.no_grad():  # brute force: lr = 0, so every batch meets the initial weights
        out = Net(x).net[:4](x)
    assert report.layers["net.3"].samples == 20  # the whole epoch
    assert report.layers["net.3"].dead.tolist() == [bool((out[:, u] <= 0).all()) for u in range(6)]
    assert report.layers["net.3"].num_dead > 0
    assert report.partial and "track_margin" in report.partial_reason
    assert float(fit.callback_metrics["partial_epoch"]) == 1.0
    assert sum("epoch 0 is partial" in m for m in messages) == 1
    assert resumed.reviver.history == []  # dead units, but no remedy on partial data
    assert any("revived nothing after epoch 0" in m for m in messages)


def test_a_checkpoint_without_the_epochs_counts_resumes_into_a_partial_epoch(tmp_path: Path) -> None:
    """A checkpoint that lacks the interrupted epoch's counts (an older version under DDP wrote none): the epoch
    is reported over the batches after the resume and flagged partial, and nothing is revived."""
    x = alike_batches(5)
    _checkpoint_at_step_2(tmp_path, x)
    path = tmp_path / "ckpt" / "step=2.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("DeadUnitMonitor")]
    checkpoint["callbacks"][key]["window"] = None  # the fault: a rank's partial counts are missing
    torch.save(checkpoint, path)
    resumed = DeadUnitMonitor(revive=DeadUnitReviver(seed=0))
    fit, messages = _resume_partial(tmp_path, x, resumed)
    assert sum("epoch 0 is partial" in m for m in messages) == 1
    report = resumed.history[0]
    assert report.layers["net.3"].samples == 12  # the 3 batches run after the resume
    assert report.partial and "holds no counts of the 2 training batches" in report.partial_reason
    assert float(fit.callback_metrics["partial_epoch"]) == 1.0
    assert resumed.reviver.history == []


def test_a_whole_epoch_is_not_partial(tmp_path: Path) -> None:
    x = alike_batches(5)
    whole = _checkpoint_at_step_2(tmp_path, x)
    resumed = DeadUnitMonitor()
    fit, messages = _resume_partial(tmp_path, x, resumed)
    assert not whole.history[0].partial and not resumed.history[0].partial
    assert float(fit.callback_metrics["partial_epoch"]) == 0.0
    assert summary(resumed.history) == summary(whole.history)
    assert not any("partial" in m for m in messages)


class _Boom(Callback):
    """Interrupts the fit at the start of batch 3 of epoch 0 (after 3 of its 5 batches), as a crash or a Ctrl-C."""

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.current_epoch == 0 and batch_idx == 3:
            raise RuntimeError("interrupted")


def test_a_checkpoint_written_on_an_exception_keeps_the_epochs_counts(tmp_path: Path) -> None:
    """`OnExceptionCheckpoint` saves after the monitor's own `on_exception` has removed its hooks: the checkpoint
    held no counts (the resumed epoch was partial, 8 of 20 samples); it now holds those of the 3 batches run."""
    x = alike_batches(5)
    whole = DeadUnitMonitor()
    trainer(tmp_path / "whole", [whole]).fit(Net(x))
    with pytest.raises(RuntimeError, match="interrupted"):
        callbacks = [DeadUnitMonitor(), _Boom(), OnExceptionCheckpoint(tmp_path)]
        trainer(tmp_path, callbacks, enable_checkpointing=True).fit(Net(x))
    resumed = DeadUnitMonitor()
    trainer(tmp_path, [resumed]).fit(Net(x), ckpt_path=str(tmp_path / "on_exception.ckpt"))
    assert not any(report.partial for report in resumed.history)
    assert summary(resumed.history) == summary(whole.history)  # lr = 0: every batch meets the same weights
    assert resumed.history[0].layers["net.3"].samples == 20


@pytest.mark.parametrize("saved_with", ["no monitor", "a monitor of other sites"])
def test_a_mid_epoch_checkpoint_without_this_monitors_state_resumes_into_a_partial_epoch(
    tmp_path: Path, saved_with: str
) -> None:
    """The checkpoint (step 2 of 5) holds no state of this monitor: the 2 batches before it are not counted, so the
    resumed epoch is flagged partial (it was reported whole, and revived on 3 of 5 batches) and not revived."""
    x = random_batches(5)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    first = [ckpt] if saved_with == "no monitor" else [DeadUnitMonitor(sites=["net.1", "net.3"]), ckpt]
    trainer(tmp_path, first, max_epochs=1, enable_checkpointing=True).fit(Net(x))
    resumed = DeadUnitMonitor(revive=DeadUnitReviver(seed=0))
    fit, messages = _resume_partial(tmp_path, x, resumed)
    report = resumed.history[0]
    assert report.layers["net.3"].samples == 12  # the 3 batches run after the resume
    assert report.partial and "holds no state of this monitor" in report.partial_reason
    assert "the 2 training batches of epoch 0" in report.partial_reason
    assert float(fit.callback_metrics["partial_epoch"]) == 1.0
    assert sum("epoch 0 is partial" in m for m in messages) == 1
    assert resumed.reviver.history == []


def test_an_epoch_end_checkpoint_without_this_monitors_state_starts_a_whole_epoch(tmp_path: Path) -> None:
    x = random_batches(5)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    trainer(tmp_path, [ckpt], max_epochs=1, enable_checkpointing=True).fit(Net(x))
    resumed = DeadUnitMonitor()
    trainer(tmp_path, [resumed]).fit(Net(x), ckpt_path=str(tmp_path / "ckpt" / "epoch=0.ckpt"))
    assert [report.epoch for report in resumed.history] == [1]
    assert not resumed.history[0].partial and resumed.history[0].layers["net.3"].samples == 20


class _Functional(Net):
    """The same layers, the rectifiers called as functions: their sites are found, and sized, in the first forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        return net[4](torch.relu(net[2](torch.relu(net[0](x)))))


def test_saved_counts_that_do_not_fit_a_site_make_the_epoch_partial(tmp_path: Path) -> None:
    """A checkpoint's counts of a site whose width differs now (saved with another unit axis) were dropped at the
    epoch's end and the epoch reported whole over the batches after the resume."""
    x = alike_batches(5)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1, filename="{step}")
    trainer(tmp_path, [DeadUnitMonitor(), ckpt], max_epochs=1, enable_checkpointing=True).fit(_Functional(x))
    path = tmp_path / "ckpt" / "step=2.ckpt"
    checkpoint = torch.load(path, weights_only=False)
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("DeadUnitMonitor")]
    states = checkpoint["callbacks"][key]["window"]["sites"]["relu_1"]
    states["active"] = states["active"][:4]  # the fault: 4 units saved where the site has 6
    torch.save(checkpoint, path)
    resumed = DeadUnitMonitor()
    fit = trainer(tmp_path, [resumed], max_epochs=1)
    fit.fit(_Functional(x), ckpt_path=str(path))
    report = resumed.history[0]
    assert report.partial and "counts of site 'relu_1'" in report.partial_reason
    assert "another width (4 units saved, 6 now" in report.partial_reason
    assert float(fit.callback_metrics["partial_epoch"]) == 1.0
