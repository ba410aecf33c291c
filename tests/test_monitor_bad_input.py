"""``DeadUnitMonitor`` on bad input: a model without rectifiers, NaN and Inf activations."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_relu import (
    DeadUnitMonitor,
)
from tests.helpers import (
    MLP,
    Replayed,
    assert_monitor_matches,
    assert_report,
    assert_same_params,
    params_of,
    positive_data,
    quiet_trainer,
)

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
        quiet_trainer(tmp_path, callbacks, max_epochs=2).fit(module)
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
        quiet_trainer(tmp_path, [monitor], limit_train_batches=3, limit_val_batches=0).fit(module)
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
