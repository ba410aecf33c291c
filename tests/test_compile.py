"""``torch.compile`` and the tracker's hooks (issue 20, item 4): the hooks trace into the model's graph without a
graph break or a recompilation caused by the package (counted with ``torch._dynamo``'s own tooling), and the counts
of the compiled model equal the eager counts; and the public signal that tells the hooks a forward is activation
checkpointing's recomputation inside a backward pass (it replaced autograd's private graph-task id, which broke the
graph at every site)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import Tensor, nn
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.utils import counters
from torch.utils.checkpoint import checkpoint

from lightning_relu import DeadUnitTracker


class _Net(nn.Module):
    """A functional call (seen by the tracker's ``TorchFunctionMode``), a module site, a convolution's channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.fc1 = nn.Linear(4 * 5 * 5, 8)
        self.fc2 = nn.Linear(8, 6)
        self.act = nn.ReLU()
        self.head = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.conv(x)).flatten(1)
        h = self.act(self.fc1(h))
        return self.head(self.act(self.fc2(h)))


def _brute(model: _Net, batches: list[Tensor]) -> dict[str, list[int]]:
    """Per-unit counts of entries > 0 at every site, from the layers' own outputs (no hook involved)."""
    counts: dict[str, Tensor] = {}
    with torch.no_grad():
        for x in batches:
            a = torch.relu(model.conv(x))
            b = torch.relu(model.fc1(a.flatten(1)))
            c = torch.relu(model.fc2(b))
            for name, out, dims in (("relu", a, (0, 2, 3)), ("act", b, (0,)), ("act_1", c, (0,))):
                counts[name] = counts.get(name, 0) + (out > 0).sum(dims)
    return {name: value.tolist() for name, value in counts.items()}


@pytest.fixture
def compiled_graphs():
    """A backend that keeps every graph dynamo hands it (and compiles it as ``aot_eager`` does: the same ATen kernels
    as eager, so counts can be compared exactly), with dynamo's caches and counters cleared around the test."""
    graphs: list[torch.fx.GraphModule] = []
    aot_eager = lookup_backend("aot_eager")

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Tensor]):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    counters.clear()
    yield backend, graphs
    torch._dynamo.reset()
    counters.clear()


@pytest.mark.parametrize("track_margin", [False, True], ids=["counts", "with margin"])
def test_compiled_training_steps_trace_the_hooks_in_one_graph_and_count_exactly(compiled_graphs, track_margin):
    backend, graphs = compiled_graphs
    torch.manual_seed(0)
    model = _Net()
    with torch.no_grad():
        model.fc1.bias[:3] = -1e3  # dead units at `act`
    reference = copy.deepcopy(model)
    batches = [torch.randn(8, 2, 5, 5) for _ in range(3)]
    with DeadUnitTracker(model, track_margin=track_margin) as tracker:
        model(batches[0]).square().mean().backward()  # one eager step: it finds `F.relu` and the second `act` call
        compiled = torch.compile(model, backend=backend)
        for x in batches[1:]:
            compiled(x).square().mean().backward()  # a training step's forward and backward (no update)
    with DeadUnitTracker(reference, track_margin=track_margin) as eager:
        for x in batches:
            reference(x).square().mean().backward()

    assert dict(counters["graph_break"]) == {}  # no graph break anywhere, the hooks' bodies included
    assert len(graphs) == 1  # one graph for the compiled steps: nothing the hooks read makes dynamo recompile
    compiled_report, eager_report = tracker.report(), eager.report()
    expected = _brute(reference, batches)
    assert {name: r.active_count.tolist() for name, r in compiled_report.items()} == expected
    assert {name: r.active_count.tolist() for name, r in eager_report.items()} == expected
    assert compiled_report["act"].num_dead == 3
    for name, report in compiled_report.items():
        assert (report.samples, report.killed, report.entries_per_unit) == (
            eager_report[name].samples,
            eager_report[name].killed,
            eager_report[name].entries_per_unit,
        )
        if track_margin:
            torch.testing.assert_close(report.margin, eager_report[name].margin, rtol=1e-9, atol=1e-12)


class _Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU())
        self.head = nn.Linear(4, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(checkpoint(self.body, x, use_reentrant=False))


def test_forwards_after_a_backward_count_again_once_the_recomputation_is_over():
    """The model's output says a backward began (activation checkpointing recomputes `body` inside it: not counted
    again); a forward without autograd after it, or the model's next forward, counts as usual."""
    torch.manual_seed(0)
    model = _Checkpointed()
    x = torch.randn(6, 3, requires_grad=True)
    with DeadUnitTracker(model) as tracker:
        model(x).sum().backward()  # counted once, recomputed once
        assert int(tracker.stats["body.1"].samples) == 6
        with torch.no_grad():
            model.body(x)  # a submodule on its own, without autograd: counted
        assert int(tracker.stats["body.1"].samples) == 12
        model(x).sum().backward()
        assert int(tracker.stats["body.1"].samples) == 18
    with torch.no_grad():
        a = torch.relu(model.body[0](x))
    assert tracker.report()["body.1"].active_count.tolist() == (3 * (a > 0).sum(0)).tolist()
