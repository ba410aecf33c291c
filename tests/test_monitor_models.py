"""``DeadUnitMonitor`` in Lightning fits of real model code (functional rectifiers, ``sites=``, functional calls in the
LightningModule's own forward), every count checked against the brute-force oracle on outputs replayed in
``training_step``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_relu import (
    DeadUnitMonitor,
)
from tests.helpers import (
    FUNCTIONAL_SITES,
    MLP,
    AllFunctional,
    Replayed,
    assert_monitor_matches,
    assert_report,
    clamp,
    lin,
    positive_data,
    quiet_trainer,
)


@pytest.mark.filterwarnings("ignore::lightning_relu.CollapseWarning")
def test_monitor_counts_every_functional_form_exactly(tmp_path):
    torch.manual_seed(0)
    net = AllFunctional()
    net.kill()
    module = Replayed(net, AllFunctional.replay, torch.randn(16, 4, generator=torch.Generator().manual_seed(1)))
    monitor = DeadUnitMonitor()
    quiet_trainer(tmp_path, [monitor], limit_train_batches=3).fit(module)
    assert len(monitor.history) == 2
    assert set(monitor.last_report) == {f"net.{n}" for n in FUNCTIONAL_SITES}
    assert_monitor_matches(monitor, module)


def test_monitor_sites_restricts_and_unknown_names_list_the_available_ones(tmp_path):
    module = Replayed(MLP(), MLP.replay, positive_data(12))
    monitor = DeadUnitMonitor(sites=["net.3"])
    quiet_trainer(tmp_path, [monitor], max_epochs=1, limit_train_batches=3).fit(module)
    assert set(monitor.last_report) == {"net.3"}
    assert_report(monitor.last_report, {"net.3": module.expected(0)["net.3"]})

    bad = DeadUnitMonitor(sites=["net.3", "net.7"])
    with pytest.raises(ValueError, match=r"unknown site names \['net\.7'\].*\['net\.1', 'net\.3'\]"):
        quiet_trainer(tmp_path, [bad], max_epochs=1).fit(Replayed(MLP(), MLP.replay, positive_data(8)))


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
    quiet_trainer(tmp_path, [monitor], limit_train_batches=2).fit(module)
    assert set(monitor.last_report) == {"relu", "relu_1"}
    assert_monitor_matches(monitor, module)
