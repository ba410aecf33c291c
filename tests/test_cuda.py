"""Checks only a GPU can make: they run where CUDA is available and are skipped elsewhere."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_relu import DeadUnitTracker
from tests.helpers import brute_force, conv_bn_net, kill_units

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _steps(model: nn.Module, batches: list[torch.Tensor], autocast: bool = False) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    for x in batches:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = model(x).float().pow(2).mean()
        loss.backward()
        opt.step()


def test_no_host_sync_in_training_steps():
    model = conv_bn_net().cuda()
    batches = [torch.randn(8, 3, 8, 8, device="cuda") for _ in range(4)]
    _steps(model, batches[:1])  # warm-up outside the check: lazy state allocation, cuDNN autotuning
    with DeadUnitTracker(model) as tracker:
        _steps(model, batches[:1])
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _steps(model, batches)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert tracker.report()["2"].samples == 8 * 5


@pytest.mark.parametrize("autocast", [False, True])
def test_counts_on_cuda_match_brute_force(autocast):
    model = conv_bn_net().cuda()
    kill_units(model, 1, [0, 3])
    batches = [torch.randn(6, 3, 8, 8, device="cuda") for _ in range(3)]
    with DeadUnitTracker(model) as tracker:
        _steps(model, batches, autocast=autocast)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        expected = brute_force(model, batches)
    report = tracker.report()
    for name, exp in expected.items():
        assert report[name].active_count.tolist() == exp["active"], name
        assert report[name].killed == exp["killed"]
