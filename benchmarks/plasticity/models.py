"""The benchmark's networks (plain ``nn.Sequential`` ReLU nets) and the description of their hidden layers.

The baselines written here (ReDo, continual backprop) need, for every hidden ReLU layer, the layer producing its
pre-activation, the layer reading its output and which of that reader's input columns/channels each unit feeds.
:class:`Hidden` holds that, written by hand for the two architectures (our own revival finds it by itself).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["MODELS", "Hidden", "build_model", "hidden_layers"]

MODELS: tuple[str, ...] = ("mlp", "cnn")


@dataclass(eq=False)
class Hidden:
    """One hidden ReLU layer: ``producer`` → ``relu`` → (pooling, flatten) → ``consumer``."""

    producer: nn.Linear | nn.Conv2d
    relu: nn.ReLU
    consumer: nn.Linear | nn.Conv2d
    #: the consumer's input columns (Linear) or channels (Conv2d) fed by each unit: unit -> index tensor
    columns: Callable[[Tensor], Tensor]

    @property
    def units(self) -> int:
        return self.producer.weight.shape[0]


def build_model(kind: str, input_shape: tuple[int, ...], outputs: int, widths: tuple[int, ...]) -> nn.Sequential:
    """``mlp``: Linear/ReLU layers of ``widths``; ``cnn``: two 3x3 conv layers (``widths[0]``, ``widths[1]``
    channels, each followed by 2x2 max pooling), then a dense ReLU layer of ``widths[2]`` units (8x8 inputs).
    PyTorch's default initialization, from the global generator (seeded by the caller)."""
    layers: list[nn.Module] = []
    if kind == "mlp":
        fan_in = int(torch.tensor(input_shape).prod())
        if len(input_shape) > 1:
            layers.append(nn.Flatten())
        for width in widths:
            layers += [nn.Linear(fan_in, width), nn.ReLU()]
            fan_in = width
        layers.append(nn.Linear(fan_in, outputs))
    elif kind == "cnn":
        if len(input_shape) != 3 or len(widths) != 3:
            raise ValueError(f"the cnn takes (channels, 8, 8) inputs and 3 widths, got {input_shape} and {widths}")
        c1, c2, dense = widths
        side = input_shape[1] // 4
        layers = [
            nn.Conv2d(input_shape[0], c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(c2 * side * side, dense), nn.ReLU(), nn.Linear(dense, outputs),
        ]
    else:
        raise ValueError(f"`model` can be {', '.join(map(repr, MODELS))}, got {kind!r}")
    return nn.Sequential(*layers)


def hidden_layers(model: nn.Sequential) -> list[Hidden]:
    """The hidden ReLU layers of a :func:`build_model` network, in forward order."""
    modules = list(model)
    found: list[Hidden] = []
    for i, module in enumerate(modules):
        if not isinstance(module, nn.ReLU):
            continue
        producer = modules[i - 1]
        j = i + 1
        flatten = False
        while not isinstance(modules[j], (nn.Linear, nn.Conv2d)):
            flatten = flatten or isinstance(modules[j], nn.Flatten)
            j += 1
        consumer = modules[j]
        assert isinstance(producer, (nn.Linear, nn.Conv2d)) and isinstance(consumer, (nn.Linear, nn.Conv2d))
        if flatten and isinstance(producer, nn.Conv2d):
            per_unit = consumer.weight.shape[1] // producer.weight.shape[0]  # channel-major flatten

            def columns(units: Tensor, per_unit: int = per_unit) -> Tensor:
                return (units[:, None] * per_unit + torch.arange(per_unit)).reshape(-1)
        else:

            def columns(units: Tensor) -> Tensor:
                return units

        found.append(Hidden(producer, module, consumer, columns))
    return found
