"""The reference CPU workloads of the benchmark suite."""

from __future__ import annotations

import torch
from torch import nn


def mlp() -> nn.Sequential:
    """784-1024-1024-1024-10, ReLU after each hidden layer."""
    return nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(),
        nn.Linear(1024, 1024), nn.ReLU(),
        nn.Linear(1024, 1024), nn.ReLU(),
        nn.Linear(1024, 10),
    )  # fmt: skip


def cnn() -> nn.Sequential:
    """Three Conv-BatchNorm-ReLU blocks (32/64/128 channels), max-pool after the second, GAP, Linear head."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(128, 10),
    )  # fmt: skip


WORKLOADS = {
    "mlp": (mlp, (256, 784)),
    "cnn": (cnn, (64, 3, 32, 32)),
}


def batch(name: str, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    _, shape = WORKLOADS[name]
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g), torch.randint(0, 10, (shape[0],), generator=g)
