"""Setting up and counting is thread-safe: nothing is patched process-wide (issue 20, item 3)."""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from lightning_relu import DeadUnitTracker


class _Functional(nn.Module):
    """Module and functional sites: the first forward a tracker sees must find `F.relu` by observing it."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2, self.act = nn.Linear(4, 6), nn.Linear(6, 3), nn.ReLU()
        with torch.no_grad():
            self.fc1.bias[0] = -1e4  # a dead unit at each site
            self.fc2.bias[1] = -1e4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.fc2(self.act(self.fc1(x))))


def _expected(model: _Functional, batches: list[torch.Tensor]) -> dict[str, list[int]]:
    """Active counts per unit, by hand: the independent ground truth."""
    with torch.no_grad():
        a = [torch.clamp(x @ model.fc1.weight.T + model.fc1.bias, min=0) for x in batches]
        b = [torch.clamp(h @ model.fc2.weight.T + model.fc2.bias, min=0) for h in a]
    return {"act": (torch.cat(a) > 0).sum(0).tolist(), "relu": (torch.cat(b) > 0).sum(0).tolist()}


def _count(model: _Functional, batches: list[torch.Tensor]) -> dict[str, list[int]]:
    with DeadUnitTracker(model) as tracker, torch.no_grad():
        for x in batches:
            model(x)
    return {name: report.active_count.tolist() for name, report in tracker.report().items()}


def test_a_serving_thread_runs_while_trackers_set_up_and_count() -> None:
    served = _Functional(0)
    watched = _Functional(1)
    stop = threading.Event()
    errors: list[BaseException] = []
    outputs: list[bool] = []
    reference = served(torch.ones(2, 4)).detach()

    def serve() -> None:
        try:
            while not stop.is_set():
                with torch.no_grad():
                    outputs.append(torch.equal(served(torch.ones(2, 4)), reference))
        except BaseException as error:  # the failure the test looks for
            errors.append(error)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        counted = []
        for seed in range(5):
            batches = [torch.randn(8, 4, generator=torch.Generator().manual_seed(seed * 10 + i)) for i in range(3)]
            DeadUnitTracker(served)  # set up on the served model too: construction touches nothing
            counted.append((_count(watched, batches), _expected(watched, batches)))
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    assert outputs and all(outputs)
    for got, expected in counted:
        assert got == expected


def test_trackers_in_several_threads_count_their_own_models_exactly() -> None:
    results: dict[int, tuple[dict[str, list[int]], dict[str, list[int]]]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def run(seed: int) -> None:
        try:
            model = _Functional(seed)
            batches = [torch.randn(16, 4, generator=torch.Generator().manual_seed(seed * 7 + i)) for i in range(4)]
            start.wait()  # every thread sets up and counts at the same time
            results[seed] = (_count(model, batches), _expected(model, batches))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert sorted(results) == [0, 1, 2, 3]
    for got, expected in results.values():
        assert got == expected
        assert got["act"][0] == 0 and got["relu"][1] == 0
