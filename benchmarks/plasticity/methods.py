"""The remedies compared, all acting on a :func:`~benchmarks.plasticity.models.build_model` network.

- ``none``: plain training.
- ``revival``: ours. A :class:`lightning_relu.DeadUnitTracker` counts every training forward; every ``period``
  steps its report goes to :func:`lightning_relu.revive_dead_units_` with ``example_input=`` a scoring batch of the
  current task (the observed-structure path: revived units are calibrated to fire on it) and the default settings
  (``init="default"``, ``max_fraction=1.0``), then the counts start again.
- ``redo``: ReDo (Sokar, Agarwal, Castro and Evci, ICML 2023), written from the paper's description: every
  ``period`` steps, on a scoring batch, unit ``i`` of a layer scores :math:`s_i = \\mathbb{E}|h_i| / (\\frac{1}{H}
  \\sum_k \\mathbb{E}|h_k|)` and is τ-dormant when :math:`s_i \\le τ`; dormant units get fresh incoming weights
  (the initial distribution), zero outgoing weights, and the optimizer state of those weights reset.
- ``cbp``: continual backprop (Dohare et al., Nature 2024), from the paper's description: after every step each
  hidden unit's contribution utility :math:`u \\leftarrow η u + (1-η) |h| \\sum_k |w_{out,k}|` (η the decay rate,
  :math:`|h|` averaged over the batch and positions); units older than the maturity threshold are eligible; each
  layer accumulates ``rate × eligible`` per step and, whenever the sum reaches 1, replaces that many eligible units
  of lowest utility (fresh incoming weights, zero outgoing weights, utility and age 0, optimizer state reset).
- ``rai``: :func:`lightning_relu.rai_` at initialization, then plain training.
- ``sign_flip``: :func:`lightning_relu.sign_flip_` on task 0's inputs at initialization, then plain training.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from benchmarks.plasticity.metrics import dormant_scores, unit_activity
from benchmarks.plasticity.models import Hidden, hidden_layers
from benchmarks.plasticity.problems import Problem
from lightning_relu import DeadUnitTracker, rai_, revive_dead_units_, sign_flip_

__all__ = [
    "METHODS",
    "ContinualBackprop",
    "ReDo",
    "Remedy",
    "Revival",
    "initialize",
    "make_remedy",
    "reinitialize_units",
]

METHODS: tuple[str, ...] = ("none", "revival", "redo", "cbp", "rai", "sign_flip")


def reinitialize_units(layer: Hidden, units: Tensor, generator: torch.Generator, optimizer: Optimizer) -> None:
    """Fresh incoming weights and bias for ``units`` (PyTorch's default, U(±1/√fan_in)), outgoing weights zeroed,
    the optimizer state (every per-parameter tensor shaped like its parameter) of those entries set to 0."""
    if units.numel() == 0:
        return
    producer, consumer = layer.producer, layer.consumer
    fan_in = producer.weight[0].numel()
    bound = 1.0 / math.sqrt(fan_in)
    touched: dict[Tensor, Any] = {}
    with torch.no_grad():
        rows = producer.weight.shape[1:]
        fresh = (torch.rand(units.numel(), *rows, generator=generator) * 2 - 1) * bound
        producer.weight[units] = fresh.to(producer.weight)
        touched[producer.weight] = (units,)
        if producer.bias is not None:
            producer.bias[units] = ((torch.rand(units.numel(), generator=generator) * 2 - 1) * bound).to(producer.bias)
            touched[producer.bias] = (units,)
        columns = layer.columns(units)
        consumer.weight[:, columns] = 0.0
        touched[consumer.weight] = (slice(None), columns)
        for param, index in touched.items():
            state = optimizer.state.get(param, {})
            for value in state.values():
                if isinstance(value, Tensor) and value.shape == param.shape:
                    value[index] = 0.0


class Remedy:
    """No remedy: the interface. ``after_step`` runs after every optimizer step; ``units_reset`` counts units."""

    def __init__(self) -> None:
        self.units_reset = 0
        self.warnings = 0

    def after_step(self, step: int, problem: Problem) -> None:
        """Called after optimizer step ``step`` (1-based)."""

    def pause(self) -> None:
        """Stop watching forwards (the evaluation passes)."""

    def resume(self) -> None:
        """Watch forwards again."""

    def close(self) -> None:
        """Remove hooks."""


class Revival(Remedy):
    """Ours: the tracker's dead units revived every ``period`` steps (see the module docstring)."""

    def __init__(self, model: nn.Module, optimizer: Optimizer, generator: torch.Generator, period: int,
                 score_batch: int) -> None:
        super().__init__()
        self.model, self.optimizer, self.generator = model, optimizer, generator
        self.period, self.score_batch = period, score_batch
        self.tracker = DeadUnitTracker(model).attach()

    def after_step(self, step: int, problem: Problem) -> None:
        if step % self.period:
            return
        report = self.tracker.report()
        if any(layer.num_dead for layer in report.values()):
            example = problem.sample(self.score_batch)
            self.tracker.pause()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                counts = revive_dead_units_(self.model, report, self.optimizer, self.generator,
                                            example_input=example, sites=self.tracker.all_sites)
            self.tracker.resume()
            self.units_reset += sum(counts.values())
            self.warnings += len(caught)
        self.tracker.reset()

    def pause(self) -> None:
        self.tracker.pause()

    def resume(self) -> None:
        self.tracker.resume()

    def close(self) -> None:
        self.tracker.detach()


class _Watching(Remedy):
    """A remedy that sees the hidden layers' outputs through forward hooks on their ``nn.ReLU`` modules."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.layers = hidden_layers(model)  # type: ignore[arg-type]
        self.outputs: list[Tensor | None] = [None] * len(self.layers)
        self.watching = True
        self.handles = [layer.relu.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]

    def _hook(self, index: int) -> Any:
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            if self.watching:
                self.outputs[index] = output.detach()

        return hook

    def pause(self) -> None:
        self.watching = False

    def resume(self) -> None:
        self.watching = True

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


class ReDo(_Watching):
    """Recycle τ-dormant units every ``period`` steps, scored on a batch of ``score_batch`` inputs."""

    def __init__(self, model: nn.Module, optimizer: Optimizer, generator: torch.Generator, tau: float, period: int,
                 score_batch: int) -> None:
        super().__init__(model)
        self.watching = False  # only the scoring forward is watched
        self.model, self.optimizer, self.generator = model, optimizer, generator
        self.tau, self.period, self.score_batch = tau, period, score_batch

    def dormant(self, x: Tensor) -> list[Tensor]:
        """Per layer, the indices of the τ-dormant units on inputs ``x``."""
        self.watching = True
        with torch.no_grad():
            self.model(x)
        self.watching = False
        found = []
        for output in self.outputs:
            assert output is not None
            found.append(torch.nonzero(dormant_scores(output) <= self.tau).reshape(-1))
        return found

    def after_step(self, step: int, problem: Problem) -> None:
        if step % self.period:
            return
        for layer, units in zip(self.layers, self.dormant(problem.sample(self.score_batch)), strict=True):
            reinitialize_units(layer, units, self.generator, self.optimizer)
            self.units_reset += int(units.numel())

    def resume(self) -> None:
        pass  # ReDo watches its scoring forward only


class ContinualBackprop(_Watching):
    """Replace a ``rate`` of the mature, lowest-utility units per step (see the module docstring)."""

    def __init__(self, model: nn.Module, optimizer: Optimizer, generator: torch.Generator, rate: float, decay: float,
                 maturity: int) -> None:
        super().__init__(model)
        self.optimizer, self.generator = optimizer, generator
        self.rate, self.decay, self.maturity = rate, decay, maturity
        self.utility = [torch.zeros(layer.units, dtype=torch.float64) for layer in self.layers]
        self.age = [torch.zeros(layer.units, dtype=torch.int64) for layer in self.layers]
        self.pending = [0.0] * len(self.layers)

    def after_step(self, step: int, problem: Problem) -> None:
        for i, layer in enumerate(self.layers):
            output = self.outputs[i]
            assert output is not None, "continual backprop needs the step's forward"
            weight = layer.consumer.weight.detach().abs()
            outgoing = weight.sum(dim=[d for d in range(weight.dim()) if d != 1]).reshape(layer.units, -1).sum(1)
            contribution = unit_activity(output).double() * outgoing.double()
            self.utility[i].mul_(self.decay).add_((1.0 - self.decay) * contribution)
            self.age[i] += 1
            eligible = torch.nonzero(self.age[i] > self.maturity).reshape(-1)
            self.pending[i] += self.rate * eligible.numel()
            count = min(int(self.pending[i]), eligible.numel())
            if count == 0:
                continue
            self.pending[i] -= count
            lowest = torch.argsort(self.utility[i][eligible], stable=True)[:count]
            units = eligible[lowest].sort().values
            reinitialize_units(layer, units, self.generator, self.optimizer)
            self.utility[i][units] = 0.0
            self.age[i][units] = 0
            self.units_reset += count


def initialize(method: str, model: nn.Module, problem: Problem, generator: torch.Generator, samples: int = 512) -> None:
    """The initial conditions: ``rai`` and ``sign_flip`` change the fresh network; the others leave it."""
    if method == "rai":
        rai_(model, generator=generator)
    elif method == "sign_flip":
        sign_flip_(model, problem.initial_inputs(samples))


def make_remedy(method: str, model: nn.Module, optimizer: Optimizer, generator: torch.Generator,
                options: dict[str, Any]) -> Remedy:
    """The remedy acting during training (``none``, ``rai`` and ``sign_flip``: nothing)."""
    if method == "revival":
        return Revival(model, optimizer, generator, options["revival_period"], options["score_batch"])
    if method == "redo":
        return ReDo(model, optimizer, generator, options["redo_tau"], options["redo_period"], options["score_batch"])
    if method == "cbp":
        return ContinualBackprop(model, optimizer, generator, options["cbp_rate"], options["cbp_decay"],
                                 options["cbp_maturity"])
    if method in METHODS:
        return Remedy()
    raise ValueError(f"`method` can be {', '.join(map(repr, METHODS))}, got {method!r}")
